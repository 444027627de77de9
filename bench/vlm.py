"""Image + text on this CPU, end to end from the CLI: a vision encoder pretrained contrastively,
assembled with SmolLM2-135M into a LLaVA-style model, then LLaVA's two stages (projector only;
projector + LoRA on the language model). Reports held-out exact-match accuracy per task (digits
never seen, emoji never seen) before training and after each stage, and the time of each step.

    .venv/bin/python bench/vlm.py [--encoder DIR] [--work runs]

``--encoder DIR`` reuses a vision encoder folder made by ``tunelab vlm encoder`` (its report is
read from DIR/report.json); otherwise one is trained (~8 minutes). The stages are the example
recipes (examples/vlm_projector.yaml, examples/vlm_lora.yaml), with their output under --work;
a third run continues stage 1 for as many steps as stage 2 without LoRA (the control at equal
steps). Runs already finished under --work are reused, so an interrupted benchmark picks up
where it stopped. Writes bench/results/vlm.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "examples" / "data" / "images"
TUNELAB = str(Path(sys.executable).parent / "tunelab")
#: (run name, recipe, the run or model it starts from): LLaVA's two stages, and the control for
#: stage 2 at equal steps: the projector alone for as many more steps, no LoRA.
STAGES = (
    ("vlm_projector", "vlm_projector.yaml", "smolvlm"),
    ("vlm_lora", "vlm_lora.yaml", "vlm_projector"),
    ("vlm_projector_continued", "vlm_projector.yaml", "vlm_projector"),
)
LABELS = {
    "vlm_projector": "stage 1: projector only, 120 steps",
    "vlm_lora": "stage 2: projector + LoRA on the LM, 120 more steps",
    "vlm_projector_continued": "control for stage 2: projector only, 120 more steps",
}


def run(*args: str) -> float:
    """Run one tunelab command (output shown); its wall time in seconds."""
    print("$ tunelab " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([TUNELAB, *args], check=True, cwd=ROOT)
    return time.perf_counter() - start


def per_task_accuracy(run_dir: Path) -> dict[str, dict[str, float]]:
    """Exact-match accuracy per system and task (digits, emoji), from the run's eval predictions."""
    from tunelab.evaluate.metrics import score

    tasks = {i: json.loads(line)["task"] for i, line in enumerate((IMAGES / "test.jsonl").read_text().splitlines(), 1)}
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    out = {}
    for system in report["systems"]:
        records = [json.loads(line) for line in (run_dir / "eval" / system["predictions"]).read_text().splitlines()]
        row = {}
        for task in ("digits", "emoji"):
            chosen = [r for r in records if tasks[int(r["where"].rsplit(":", 1)[1])] == task]  # every item is a line of test.jsonl
            row[task] = score(["exact_match"], [r["prediction"] for r in chosen], [r["references"] for r in chosen])["exact_match"]
            row[f"{task}_items"] = len(chosen)
        row["all"] = system["scores"]["exact_match"]
        out["base" if system is report["systems"][0] else "run"] = row
    return out


def majority_floor() -> dict[str, float]:
    """Per task, the accuracy of always giving the training set's most common answer (what a model
    that ignores the image can reach)."""
    from collections import Counter

    train: dict[str, Counter] = {"digits": Counter(), "emoji": Counter()}
    for line in (IMAGES / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        train["digits" if row["image"].startswith("digits/") else "emoji"][row["messages"][-1]["content"]] += 1
    test = [json.loads(line) for line in (IMAGES / "test.jsonl").read_text().splitlines()]
    floor = {}
    for task, counts in train.items():
        common = counts.most_common(1)[0][0]
        rows = [r for r in test if r["task"] == task]
        floor[task] = sum(r["answer"] == common for r in rows) / len(rows)
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=None, help="reuse this vision encoder folder")
    parser.add_argument("--work", default="runs", help="folder for the encoder, the assembled model and the runs")
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    results = ROOT / "bench" / "results"
    encoder = Path(args.encoder).resolve() if args.encoder else work / "vision-encoder"
    previous = results / "vlm.json"
    seconds = json.loads(previous.read_text())["wall_seconds"] if previous.exists() else {}
    if not args.encoder and not (encoder / "report.json").exists():
        seconds["encoder"] = run("vlm", "encoder", "--captions", str(IMAGES / "captions.jsonl"), "--out", str(encoder))
    if not (work / "smolvlm" / "config.json").exists():
        seconds["assemble"] = run("vlm", "assemble", "--lm", "smollm2-135m", "--vision", str(encoder), "--out", str(work / "smolvlm"))
    for stage, recipe, start in STAGES:  # a finished run is reused: rerunning adds what is missing
        if not (work / stage / "summary.json").exists():
            seconds[stage] = run("train", str(ROOT / "examples" / recipe), f"model.name={work / start}", f"output_dir={work / stage}")
    encoder_report = json.loads((encoder / "report.json").read_text())
    stages = {}
    for stage, _, _ in STAGES:
        summary = json.loads((work / stage / "summary.json").read_text())
        stages[stage] = {"accuracy": per_task_accuracy(work / stage), "train_seconds": summary["seconds"], "steps": summary["steps"],
                         "trainable_params": summary["trainable_params"], "cpu": summary["cpu"], "tokens_per_s": summary["tokens_per_s"]}
    result = {"encoder": {k: encoder_report[k] for k in ("retrieval_before", "retrieval_after", "train_images", "validation_images", "steps", "seconds", "threads")},
              "stages": stages, "wall_seconds": seconds, "majority_floor": majority_floor()}
    (results / "vlm.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / "vlm.md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    enc = result["encoder"]
    lines = [
        f"Vision encoder (CLIP ViT, 32x32, 16 patches; contrastive vs frozen MiniLM, {enc['steps']} steps, {enc['seconds']:.0f} s): "
        f"held-out image->caption retrieval top-1 {enc['retrieval_before']['top1']:.3f} -> {enc['retrieval_after']['top1']:.3f}, "
        f"top-5 {enc['retrieval_before']['top5']:.3f} -> {enc['retrieval_after']['top5']:.3f} ({enc['validation_images']} images)",
        "",
        "| model | digits (unseen images) | emoji kind (unseen emoji) | all | train time |",
        "|---|---:|---:|---:|---:|",
    ]
    first = next(iter(result["stages"].values()))["accuracy"]["base"]
    floor = result["majority_floor"]
    lines.append(f"| always the most common training answer (blind) | {floor['digits']:.3f} | {floor['emoji']:.3f} | - | - |")
    lines.append(f"| assembled, before training | {first['digits']:.3f} | {first['emoji']:.3f} | {first['all']:.3f} | - |")
    for stage, info in result["stages"].items():
        acc = info["accuracy"]["run"]
        lines.append(f"| {LABELS[stage]} | {acc['digits']:.3f} | {acc['emoji']:.3f} | {acc['all']:.3f} | {result['wall_seconds'][stage]:.0f} s |")
    cpu = next(iter(result["stages"].values()))["cpu"]
    lines += ["", f"Exact match on {first['digits_items'] + first['emoji_items']} held-out rows ({first['digits_items']} digits, {first['emoji_items']} emoji); CPU: {cpu}. "
              "Train time is the whole `tunelab train` command (model load, data, training, evaluation of base and run)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
