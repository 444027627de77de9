"""peft's adapter-input cast under bf16 autocast: on (peft's default) vs off (tunelab's), one process (~2 minutes).

    .venv/bin/python bench/adapter_input_cast.py [--rounds 5]

With frozen weights in bf16 the activations are bf16; peft copies each one to fp32 before an
adapter (its weights are fp32) and autocast copies it back to bf16 for the matmul. tunelab turns
that cast off while training (``tunelab.train.frozen_precision``). This times one SmolLM2 LoRA
step (r=16, all linear layers, 560 packed tokens, bf16 autocast, 1 thread) both ways, alternating
so machine load hits both alike, checks the losses are identical, and prints the median CPU
seconds per step and the ratio. Writes bench/results/adapter_input_cast.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch

    from tunelab.methods import apply_methods
    from tunelab.methods.config import LoraConfig, MethodConfig
    from tunelab.models import load_model
    from tunelab.train.frozen_precision import cast_frozen

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    model = apply_methods(loaded.model, MethodConfig(lora=lora), model_task="causal-lm", tokenizer_dir=loaded.details.get("directory"))
    adapters = cast_frozen(model, torch.bfloat16).adapter_layers
    model.train()
    ids = torch.randint(0, 49_000, (1, 560), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(1, 560, dtype=torch.bool)
    keep[0, ::35] = True  # a few supervised positions, as in chat SFT

    def step(cast: bool) -> tuple[float, float]:
        for layer in adapters:
            layer.cast_input_dtype_enabled = cast
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.process_time() - start, loss.item()

    step(True), step(False)  # warm-up
    seconds: dict[str, list[float]] = {"peft cast": [], "no cast (tunelab)": []}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, cast in (("peft cast", True), ("no cast (tunelab)", False)):
            spent, losses[name] = step(cast)
            seconds[name].append(spent)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = medians["peft cast"] / medians["no cast (tunelab)"]
    same = losses["peft cast"] == losses["no cast (tunelab)"]
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "adapter_input_cast.json").write_text(json.dumps({"cpu_seconds": seconds, "losses": losses}, indent=2) + "\n")
    for name, value in medians.items():
        print(f"{name}: {value:.3f} CPU-s per step (median of {args.rounds})")
    print(f"speedup={ratio:.2f} identical_loss={same}")


if __name__ == "__main__":
    main()
