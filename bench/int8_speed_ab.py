"""fp32 vs dynamic int8 speed on SmolLM2-135M, interleaved so machine load hits all alike (~3 minutes).

    .venv/bin/python bench/int8_speed_ab.py [--rounds 4]

The trade-off table measures variants one after another; on a shared machine the load of the
moment moves those speeds more than int8 does. Here the three models live in one process and
take turns for several rounds (batch 1, 1 thread, 128-token prompt, 32 new tokens), and each
one's best round is reported. Writes bench/results/int8_speed_ab.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import torch

    from tunelab.compress.calibration import read_texts, token_chunks
    from tunelab.compress.measure import measure_speed
    from tunelab.compress.quantize import quantize
    from tunelab.models import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    prompt = token_chunks(loaded.tokenizer, read_texts(ROOT / "examples" / "data" / "heldout" / "fortunes.txt"), 128, 1)
    models = {
        "fp32": loaded.model,
        "dynamic-int8": quantize(copy.deepcopy(loaded.model), "dynamic-int8")[0],
        "dynamic-int8 + head": quantize(copy.deepcopy(loaded.model), "dynamic-int8", targets=["."])[0],
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            runs[name].append(measure_speed(model, loaded.tokenizer, prompt, 32, 1))
    best = {name: {key: max(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    base = best["fp32"]
    lines = ["| model | prefill tok/s | decode tok/s | decode tok/s, every round |", "|---|---:|---:|---|"]
    for name, b in best.items():
        every = ", ".join(f"{r['decode_tokens_per_s']:.1f}" for r in runs[name])
        lines.append(f"| {name} | {b['prefill_tokens_per_s']:.0f} ({b['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x) "
                     f"| {b['decode_tokens_per_s']:.1f} ({b['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x) | {every} |")
    table = "\n".join(lines) + f"\n\nSmolLM2-135M, batch 1, 1 thread, {args.rounds} interleaved rounds, best round shown.\n"
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "int8_speed_ab.md").write_text(table)
    (results / "int8_speed_ab.json").write_text(json.dumps({"rounds": args.rounds, "runs": runs}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
