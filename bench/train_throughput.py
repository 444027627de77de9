"""Training throughput: tunelab vs Hugging Face Trainer + PEFT on the same LoRA workloads.

    .venv/bin/python bench/train_throughput.py                      # SmolLM2-135M, both workloads (the real figures)
    .venv/bin/python bench/train_throughput.py --workload long      # only raw text, every token supervised
    .venv/bin/python bench/train_throughput.py --model tiny-llama-20m
    .venv/bin/python bench/train_throughput.py --quick              # CI smoke test
    .venv/bin/python bench/train_throughput.py --ablate all         # + one tunelab run per lever switched off

Same as ``tunelab bench train``, but writes bench/results/train_throughput_<model>[_long].json
(where this repository keeps its measured results; a later ``--out`` wins) and ends with one
``<workload>: speedup=X.XX mem_ratio=Y.YY loss_delta=Z.ZZZ eval_loss_delta=E.EEE mfu=W.WW parity=within|OUTSIDE``
line per workload. Workloads:
``short`` (Rotten Tomatoes chat rows, 2-token answers) and ``long`` (fortune-cookie text, every
token supervised). See bench/README.md.
"""

import sys
from pathlib import Path

from tunelab.cli import cli

if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    cli.main(["bench", "train", "--out", str(results), *sys.argv[1:]], prog_name="train_throughput.py")
