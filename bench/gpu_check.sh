#!/usr/bin/env bash
# The GPU check: run on a machine with one NVIDIA GPU (not needed for CI; nothing here runs on the CPU-only machines).
#
#   bash bench/gpu_check.sh                         # ~5 minutes on one H100/H200-class GPU: bench/results/gpu/
#   PYTHON=python3 GPU_CHECK_OUT=DIR bash bench/gpu_check.sh
#                                                   # a machine whose own python3 has a CUDA torch, transformers
#                                                   # and peft (tunelab's src/ and its other needs on PYTHONPATH)
#
# 1. Training throughput, tunelab vs Hugging Face Trainer + PEFT, the same LoRA workloads as
#    bench/train_throughput.py (SmolLM2-135M; short chat answers and long raw text), both sides in
#    bf16 on the GPU in one invocation: tokens/s, MFU against the GPU's measured bf16 GEMM peak,
#    and peak GPU memory (torch.cuda.max_memory_allocated) of each side, with the speedup and
#    memory ratio per workload.
# 2. The quickstart recipe trained and evaluated on the GPU by the CLI (bf16 chosen by precision:
#    auto), to show the same recipe runs unchanged: its summary.json names the device, precision,
#    tokens/s and the accuracy before and after.
# 3. Whether padding the vocabulary to a multiple of 64 speeds up the LM head's GEMMs on tensor
#    cores (bench/shape_padding.py, fp32 with TF32 as tunelab sets it, and bf16).
# Every figure is written with the GPU's name (nvidia-smi) beside it. A part that fails is reported
# and the next one still runs (a GPU lease is short); the exit status counts the failed parts.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); run this on a GPU machine" >&2
    exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    [ -x .venv/bin/python ] || scripts/setup.sh --test || exit 2
    PYTHON=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${GPU_CHECK_OUT:-bench/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
"$PYTHON" -c "import torch, transformers, peft; assert torch.cuda.is_available(), 'this torch build has no CUDA: install a CUDA wheel of torch'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)" \
    | tee "$out/versions.txt" || exit 2

failed=0
part() {  # part NAME COMMAND...: run one part, its output also in $out/NAME.log
    local name=$1
    shift
    echo "== gpu_check: $name"
    if ! "$@" 2>&1 | tee "$out/$name.log"; then
        echo "== gpu_check: $name FAILED (see $out/$name.log)"
        failed=$((failed + 1))
    fi
}

# 1. tunelab vs Trainer + PEFT, bf16, one GPU.
part train_throughput "$PYTHON" bench/train_throughput.py --device cuda --precision bf16 --model smollm2-135m --steps 30 --batch-size 16 --out "$out"

# 2. The quickstart recipe, unchanged, on the GPU.
run="runs/gpu-check-quickstart-$(date +%Y%m%d-%H%M%S)"
part quickstart "$PYTHON" -m tunelab.cli train examples/quickstart.yaml "output_dir=$run" --no-progress
[ -f "$run/summary.json" ] && cp "$run/summary.json" "$out/quickstart_summary.json"

# 3. Tensor-core-friendly vocabulary sizes.
part shape_padding "$PYTHON" bench/shape_padding.py --device cuda --out "$out"

echo "gpu_check: results in $out ($failed part(s) failed)"
exit "$failed"
