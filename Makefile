# The README's two commands: `make demo` (set up + quickstart) and `make test` (set up + test suite).
.PHONY: demo test test-fast setup

DEMO_PROMPT = Review: A thoughtful, beautifully acted film that stays with you.\nIs this review positive or negative?

setup:
	@scripts/setup.sh

demo:
	@scripts/setup.sh
	@run=runs/quickstart-$$(date +%Y%m%d-%H%M%S); set -e; \
	echo "+ tunelab train examples/quickstart.yaml output_dir=$$run"; \
	.venv/bin/tunelab train examples/quickstart.yaml output_dir=$$run; \
	echo "+ tunelab generate --model $$run ..."; \
	.venv/bin/tunelab generate --model $$run --max-new-tokens 8 --prompt "$$(printf '$(DEMO_PROMPT)')"

test:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest -q

test-fast:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest -q -m "not slow"
