"""Dynamic int8 on SmolLM2-135M: which activation scales keep perplexity, and the speed (~6 minutes).

    .venv/bin/python bench/int8_dynamic.py [--texts 80] [--rounds 4]
    .venv/bin/python bench/int8_dynamic.py --kernels     # fbgemm (tunelab's) vs oneDNN int8 GEMM only

Quality: perplexity on held-out fortunes for torch.ao's dynamic quantization (the standard
alternative: one activation scale per tensor), tunelab's per-token scales, and per-token scales
after SmoothQuant smoothing at several α, all relative to fp32 in the same run.
Speed: fp32, torch.ao and tunelab's default live in one process and take turns for several
rounds (batch 1, 1 thread, 128-token prompt, 32 new tokens), so machine load hits all alike;
each one's best round is reported. Writes bench/results/int8_dynamic.{md,json}.
``--kernels`` times the same per-token layer on fbgemm (what tunelab ships) and on oneDNN's
``qlinear_pointwise`` (identical numerics) against fp32 instead; writes int8_kernels.{md,json}.
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
    parser.add_argument("--kernels", action="store_true", help="compare the int8 GEMM kernels instead")
    args = parser.parse_args()
    if args.kernels:
        compare_kernels(args.rounds)
        return

    import torch

    from tunelab.compress.calibration import read_texts, token_chunks
    from tunelab.compress.measure import interleaved_speed
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
    runs, best = interleaved_speed(timed, tokenizer, token_chunks(tokenizer, texts, 128, 1), 32, args.rounds)

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


def compare_kernels(rounds: int) -> None:
    """fbgemm vs oneDNN under the same per-token layer (same codes, same scales, same outputs)."""
    import torch

    from tunelab.compress.calibration import read_texts, token_chunks
    from tunelab.compress.int8_dynamic import ACTIVATION_MAX, ZERO_POINT, DynamicInt8Linear
    from tunelab.compress.measure import interleaved_speed
    from tunelab.compress.quantize import quantize
    from tunelab.models import load_model

    class OneDnnInt8Linear(DynamicInt8Linear):
        """The same layer on oneDNN's int8 GEMM (uint8 codes; its int8 path is far slower on some shapes)."""

        def pack_for_onednn(self) -> None:
            self.onednn_weight = torch.ops.onednn.qlinear_prepack(self.weight_int8(), None)
            self.onednn_zero = torch.zeros(self.out_features, dtype=torch.int32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, self.in_features).float()
            if self.input_multiplier is not None:
                rows = rows * self.input_multiplier
            scale = rows.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / ACTIVATION_MAX
            codes = torch.round(rows / scale).add_(ZERO_POINT).to(torch.uint8)
            out = torch.ops.onednn.qlinear_pointwise(codes, 1.0, ZERO_POINT, self.onednn_weight, self.weight_scale,
                                                     self.onednn_zero, None, 1.0, 0, torch.float32, "none", [], "")
            out.mul_(scale)
            if self.bias is not None:
                out.add_(self.bias)
            return out.view(*x.shape[:-1], self.out_features)

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    base, tokenizer = loaded.model.eval(), loaded.tokenizer
    chunks = token_chunks(tokenizer, read_texts(HELDOUT / "calibration.txt"), 256, 16)
    fbgemm = quantize(copy.deepcopy(base), "dynamic-int8", chunks=chunks, smooth=0.8)[0]
    onednn = copy.deepcopy(fbgemm)
    for module in onednn.modules():
        if isinstance(module, DynamicInt8Linear):
            module.__class__ = OneDnnInt8Linear
            module.pack_for_onednn()
    prompt = token_chunks(tokenizer, read_texts(HELDOUT / "fortunes.txt"), 128, 1)
    with torch.no_grad():
        same = torch.allclose(fbgemm(input_ids=prompt).logits, onednn(input_ids=prompt).logits, atol=1e-3)
    runs, best = interleaved_speed({"fp32": base, "fbgemm (tunelab)": fbgemm, "oneDNN qlinear_pointwise": onednn},
                                   tokenizer, prompt, 32, rounds)
    fp32 = best["fp32"]
    lines = ["| kernel | prefill tok/s | decode tok/s |", "|---|---:|---:|"]
    for name, b in best.items():
        lines.append(f"| {name} | {b['prefill_tokens_per_s']:.0f} ({b['prefill_tokens_per_s'] / fp32['prefill_tokens_per_s']:.2f}x) "
                     f"| {b['decode_tokens_per_s']:.1f} ({b['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}x) |")
    table = "\n".join(lines) + (f"\n\nSmolLM2-135M, per-token dynamic int8 with SmoothQuant α=0.8 on every linear but the head; "
                                f"both kernels give the same logits (allclose 1e-3: {same}). Batch 1, 1 thread, 128-token prompt "
                                f"then 32 greedy tokens, {rounds} interleaved rounds, best round shown.\n")
    results = ROOT / "bench" / "results"
    (results / "int8_kernels.md").write_text(table)
    (results / "int8_kernels.json").write_text(json.dumps({"rounds": rounds, "same_logits": same, "speed_runs": runs}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
