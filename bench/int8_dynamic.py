"""Dynamic int8 on SmolLM2-135M: which activation scales keep perplexity, and the speed (~6 minutes).

    .venv/bin/python bench/int8_dynamic.py [--texts 80] [--rounds 4]

Quality: perplexity on held-out fortunes for torch.ao's dynamic quantization (the standard
alternative: one activation scale per tensor), tunelab's per-token scales, and per-token scales
after SmoothQuant smoothing at several α, all relative to fp32 in the same run.
Speed: fp32, torch.ao and tunelab's default live in one process and take turns for several
rounds (batch 1, 1 thread, 128-token prompt, 32 new tokens), so machine load hits all alike;
each one's best round is reported. Writes bench/results/int8_dynamic.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "examples" / "data" / "heldout"
ALPHAS = (0.5, 0.65, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=80, help="held-out fortunes scored for perplexity")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved speed rounds")
    args = parser.parse_args()

    import torch

    from tunelab.compress.calibration import read_texts, token_chunks
    from tunelab.compress.measure import measure_speed
    from tunelab.compress.quantize import quantize
    from tunelab.evaluate.perplexity import perplexity
    from tunelab.models import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    base, tokenizer = loaded.model.eval(), loaded.tokenizer
    texts = read_texts(HELDOUT / "fortunes.txt", args.texts)
    chunks = token_chunks(tokenizer, read_texts(HELDOUT / "calibration.txt"), 256, 16)

    def variant(**options):
        return quantize(copy.deepcopy(base), "dynamic-int8", chunks=chunks, **options)[0]

    models = {
        "fp32": base,
        "torch.ao dynamic int8 (per-tensor activations)": variant(activations="per-tensor"),
        "per-token activations": variant(smooth=0.0),
        **{f"per-token + SmoothQuant α={alpha}": variant(smooth=alpha) for alpha in ALPHAS},
    }
    quality = {}
    for name, model in models.items():
        quality[name] = perplexity(model, tokenizer, texts, max_length=256)["perplexity"]
        print(f"{name}: perplexity {quality[name]:.2f}", flush=True)

    default = "per-token + SmoothQuant α=0.8"
    timed = {name: models[name] for name in ("fp32", "torch.ao dynamic int8 (per-tensor activations)", default)}
    prompt = token_chunks(tokenizer, texts, 128, 1)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, model in timed.items():
            runs[name].append(measure_speed(model, tokenizer, prompt, 32, 1))
    best = {name: {key: max(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}

    fp32_ppl, fp32_speed = quality["fp32"], best["fp32"]
    lines = ["| activations | perplexity | prefill tok/s | decode tok/s |", "|---|---:|---:|---:|"]
    for name, ppl in quality.items():
        row = f"| {name} | {ppl:.2f} ({100 * (ppl / fp32_ppl - 1):+.1f}%) |"
        if name in best:
            b = best[name]
            row += (f" {b['prefill_tokens_per_s']:.0f} ({b['prefill_tokens_per_s'] / fp32_speed['prefill_tokens_per_s']:.2f}x) |"
                    f" {b['decode_tokens_per_s']:.1f} ({b['decode_tokens_per_s'] / fp32_speed['decode_tokens_per_s']:.2f}x) |")
        else:
            row += " | |"
        lines.append(row)
    table = "\n".join(lines) + (
        f"\n\nSmolLM2-135M-Instruct, every linear layer but the output head; perplexity on the first {args.texts} held-out "
        f"fortunes (256-token windows), calibration on 16x256 tokens of disjoint text. Speed: batch 1, 1 thread, "
        f"128-token prompt then 32 greedy tokens, {args.rounds} interleaved rounds, best round shown.\n"
    )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "int8_dynamic.md").write_text(table)
    (results / "int8_dynamic.json").write_text(json.dumps({"texts": args.texts, "rounds": args.rounds, "perplexity": quality,
                                                           "speed_runs": runs}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
