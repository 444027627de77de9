# The README's two commands: `make demo` (set up + quickstart) and `make test` (set up + test suite).
.PHONY: demo test test-fast setup

setup:
	@scripts/setup.sh

demo:
	@scripts/setup.sh
	.venv/bin/tunelab generate --model smollm2-135m --prompt "What is the capital of France? Answer in one sentence."

test:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest -q

test-fast:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest -q -m "not slow"
