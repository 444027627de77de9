#!/usr/bin/env bash
# The GPU check: run on a machine with one NVIDIA GPU (not needed for CI; nothing here runs on the CPU-only machines).
#
#   bash bench/gpu_check.sh            # ~10 minutes on one H100/H200-class GPU: bench/results/gpu/
#
# 1. Training throughput, tunelab vs Hugging Face Trainer + PEFT, the same LoRA workloads as
#    bench/train_throughput.py (SmolLM2-135M; short chat answers and long raw text), both sides in
#    bf16 on the GPU in one invocation: tokens/s, MFU against the GPU's measured bf16 GEMM peak,
#    and peak GPU memory (torch.cuda.max_memory_allocated) of each side, with the speedup and
#    memory ratio per workload.
# 2. The quickstart recipe trained on the GPU by the CLI (bf16 chosen by precision: auto), to show
#    the same recipe runs unchanged: its summary.json names the device, precision and tokens/s.
# 3. Whether padding the vocabulary to a multiple of 64 speeds up the LM head's GEMMs on tensor
#    cores (bench/shape_padding.py, fp32 with TF32 as tunelab sets it, and bf16).
# Every figure is written with the GPU's name (nvidia-smi) beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); run this on a GPU machine" >&2
    exit 2
fi
[ -x .venv/bin/python ] || scripts/setup.sh --test
export HF_HUB_OFFLINE=1
out=bench/results/gpu
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'this torch build has no CUDA: install a CUDA wheel of torch==2.13.0'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 1. tunelab vs Trainer + PEFT, bf16, one GPU.
.venv/bin/python bench/train_throughput.py --device cuda --precision bf16 --model smollm2-135m --steps 30 --batch-size 16 \
    --out "$out" | tee "$out/train_throughput.log"

# 2. The quickstart recipe, unchanged, on the GPU.
run="runs/gpu-check-quickstart-$(date +%Y%m%d-%H%M%S)"
.venv/bin/tunelab train examples/quickstart.yaml "output_dir=$run" eval.after_training=false --no-progress | tee "$out/quickstart.log"
cp "$run/summary.json" "$out/quickstart_summary.json"

# 3. Tensor-core-friendly vocabulary sizes.
.venv/bin/python bench/shape_padding.py --device cuda | tee "$out/shape_padding.log"
echo "gpu_check: results in $out"
