"""The distillation table: a teacher run and the students distilled from it, side by side.

    .venv/bin/python bench/distill_students.py TEACHER_RUN STUDENT_RUN [STUDENT_RUN ...]

For each model: the held-out task metric its run's evaluation measured (``eval/eval.json``: the
teacher's row is its 0-shot score there), parameters, weights on disk, prefill and decode tokens/s
(batch 1, greedy, KV cache) and peak RSS while running it, each measured in a fresh process by
``tunelab.compress.measure`` (the teacher after merging its adapter, as it would be deployed).
Prints a markdown table and writes bench-results/distill_students.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ROOT / "examples/data/heldout/fortunes.txt"


def task_scores(run: Path, teacher: bool = False) -> dict[str, float]:
    """The student's scores in the evaluation its run wrote after training, or (``teacher``) those
    of the base it was built from, the 0-shot row of the same table."""
    systems = json.loads((run / "eval" / "eval.json").read_text())["systems"]
    return next(s["scores"] for s in systems if s["system"].endswith(" 0-shot") == teacher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("students", nargs="+")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()

    from tunelab.compress.measure import measure_in_subprocess
    from tunelab.export import export_merged
    from tunelab.hardware import cpu_model_name

    settings = {"prefill_tokens": 128, "decode_tokens": 32, "repeats": 3, "threads": 1}
    teacher, students = Path(args.teacher), [Path(s) for s in args.students]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        merged = export_merged(teacher, Path(tmp) / "teacher")
        first = students[0]
        rows.append({"model": f"teacher ({teacher.name})", **task_scores(first, teacher=True),
                     **measure_in_subprocess(merged, TEXTS, 20, settings)})
    for run in students:
        summary = json.loads((run / "summary.json").read_text())
        rows.append({"model": run.name, "steps": summary["steps"], **task_scores(run),
                     **measure_in_subprocess(run / "final" / "model", TEXTS, 20, settings)})
    print(f"CPU: {cpu_model_name()}, 1 thread")
    print("| model | accuracy | macro F1 | params | disk MB | prefill tok/s | decode tok/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['accuracy']:.3f} | {r['f1_macro']:.3f} | {r['params'] / 1e6:.1f}M | {r['size_bytes'] / 2**20:.0f} | "
              f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_students.json").write_text(json.dumps({"cpu": cpu_model_name(), "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
