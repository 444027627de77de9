"""Produce the README's compression table for SmolLM2-135M (about 10 minutes on 2 CPU cores).

    .venv/bin/python bench/compress_table.py [compress.heldout_texts=N ...]

Runs ``examples/compress_smollm2.yaml`` through the same function as ``tunelab compress`` and
copies the table (Markdown) and the raw measurements (JSON) to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "examples" / "compress_smollm2.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "compress_smollm2"))
    parser.add_argument("--retable", action="store_true", help="Only re-render the table from the run's compress.json.")
    parser.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE recipe overrides")
    args = parser.parse_args()

    from tunelab.commands.compress import compress_command
    from tunelab.compress.table import markdown

    if not args.retable:
        compress_command.main([*args.overrides, "--recipe", args.recipe, "--output", args.out], standalone_mode=False)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    table = markdown(json.loads((Path(args.out) / "compress.json").read_text())["rows"])
    note = (f"\nSmolLM2-135M-Instruct (packaged GGUF, dequantized to fp32), {platform.processor() or platform.machine()}, "
            f"Python {sys.version.split()[0]}. Ratios are relative to the original model measured in the same run; "
            "peak RAM is the peak RSS of a fresh process that loads the saved model, measured after loading "
            "(model + perplexity batches of 4x256 tokens + generation). Pruned-layer sparsity is measured on the saved "
            "tensors of the pruned layers (the output head and embeddings are not pruned). Speeds: batch 1, 1 thread, best "
            "of 3; variants run one after another, so speed ratios carry the machine's load of the moment "
            "(int8_dynamic.md has an interleaved fp32/int8 comparison).\n")
    (results / "compress_smollm2.md").write_text(table + note)
    shutil.copy(Path(args.out) / "compress.json", results / "compress_smollm2.json")
    print(table)


if __name__ == "__main__":
    main()
