"""QLoRA's memory saving on SmolLM2-135M: LoRA on an fp32 base vs on an NF4 base (about 3 minutes).

    .venv/bin/python bench/qlora_memory.py

Each setting runs in its own process (peak RSS never goes down within one): load (NF4 from a
saved NF4 directory, as a QLoRA run would), prepare, then train a few LoRA steps on held-out fortunes; the peak RSS of the training steps is read
from the kernel after resetting it once the model is ready. Writes bench/results/qlora_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ROOT / "examples" / "data" / "heldout" / "calibration.txt"
NF4_DIR = ROOT / "runs" / "qlora_memory" / "smollm2-nf4"


def child(mode: str, steps: int, batch: int, length: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.compress.calibration import read_texts, token_chunks
    from tunelab.hardware import peak_rss_bytes, reset_peak_rss
    from tunelab.models import load_model

    torch.set_num_threads(1)
    if mode == "nf4":  # load the saved NF4 model: converting here would leave the fp32 copy's pages behind
        from peft import prepare_model_for_kbit_training

        from tunelab.compress.store import load_compressed

        base, tokenizer, _ = load_compressed(NF4_DIR)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        loaded = load_model("smollm2-135m")
        tokenizer, base = loaded.tokenizer, loaded.model
    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear", lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = token_chunks(tokenizer, read_texts(TEXTS), length, batch * steps)
    gc.collect()
    reset_peak_rss()
    ready = peak_rss_bytes()
    losses, start = [], time.perf_counter()
    for chunk in data.split(batch):
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"mode": mode, "rss_ready_bytes": ready, "peak_rss_training_bytes": peak_rss_bytes(),
            "seconds_per_step": (time.perf_counter() - start) / steps, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["fp32", "nf4"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.length)))
        return
    from tunelab.compress.qlora import nf4_base
    from tunelab.compress.store import save_compressed
    from tunelab.models import load_model

    loaded = load_model("smollm2-135m")
    save_compressed(nf4_base(loaded.model), loaded.tokenizer, NF4_DIR)  # what QLoRA starts from
    del loaded
    rows = []
    for mode in ("fp32", "nf4"):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mb = 1024 * 1024
    lines = ["| base | RSS with model ready | peak RSS while training | s/step |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['mode']} + LoRA r=16 | {row['rss_ready_bytes'] / mb:.0f} MB | "
                     f"{row['peak_rss_training_bytes'] / mb:.0f} MB ({row['peak_rss_training_bytes'] / rows[0]['peak_rss_training_bytes']:.2f}x) "
                     f"| {row['seconds_per_step']:.1f} |")
    note = f"\nSmolLM2-135M, LoRA r=16 on all linears, batch {args.batch}x{args.length} tokens, AdamW, 1 thread.\n"
    table = "\n".join(lines) + "\n" + note
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "qlora_memory.md").write_text(table)
    (results / "qlora_memory.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
