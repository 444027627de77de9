"""LM head + cross-entropy: the plain path vs tunelab's chunked fused loss, interleaved in one process.

    .venv/bin/python bench/fused_loss.py                 # SmolLM2-135M's head shape, 512 and 2048 tokens
    .venv/bin/python bench/fused_loss.py --tokens 4096 --repeats 7

The plain path is what Hugging Face models and Trainer do: ``logits = lm_head(hidden)`` for every
supervised position, ``F.cross_entropy(logits.float(), targets)``, then backward through both.
The fused path is ``tunelab.train.objectives.fused_cross_entropy`` (row chunks; gradients
computed in the forward pass; the ``[tokens, vocab]`` logits never whole). Both take the same
hidden states and the same frozen head weight (LoRA: the head does not train) and produce the
gradient with respect to the hidden states. Timed: forward + backward, median of the repeats,
the two variants alternating so the machine's load falls on both. Memory: the peak RSS growth of
one forward + backward above the inputs, read from the kernel (VmHWM, reset before each variant).
Prints ``tokens=N speedup=... mem_ratio=...`` per size and writes bench/results/fused_loss.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.hardware import cpu_model_name, peak_rss_bytes, reset_peak_rss
from tunelab.train.objectives.fused_cross_entropy import fused_linear_cross_entropy

ROOT = Path(__file__).resolve().parent.parent


def plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return fused_linear_cross_entropy(hidden, weight, targets)[0]


def one_step(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Seconds and peak-RSS growth of one forward + backward, and the hidden-state gradient."""
    hidden = hidden.detach().requires_grad_()
    reset_peak_rss()
    base = peak_rss_bytes()
    start = time.perf_counter()
    loss_fn(hidden, weight, targets).backward()
    seconds = time.perf_counter() - start
    return seconds, peak_rss_bytes() - base, hidden.grad


def measure(tokens: int, width: int, vocab: int, repeats: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) * width**-0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    runs: dict[str, list[tuple[float, int]]] = {"plain": [], "fused": []}
    grads = {}
    for _ in range(repeats + 1):  # the first round warms both up and is dropped
        for name, fn in (("plain", plain), ("fused", fused)):
            seconds, grown, grads[name] = one_step(fn, hidden, weight, targets)
            runs[name].append((seconds, grown))
    row: dict[str, object] = {"tokens": tokens, "max_grad_diff": float((grads["plain"] - grads["fused"]).abs().max())}
    for name, samples in runs.items():
        row[name] = {"seconds": statistics.median(s for s, _ in samples[1:]),
                     "peak_rss_growth_mb": max(m for _, m in samples[1:]) / 2**20}
    row["speedup"] = row["plain"]["seconds"] / row["fused"]["seconds"]
    row["mem_ratio"] = row["fused"]["peak_rss_growth_mb"] / max(row["plain"]["peak_rss_growth_mb"], 1e-9)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--width", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2: 49,152)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fused_loss.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for tokens in args.tokens:
        row = measure(tokens, args.width, args.vocab, args.repeats)
        rows.append(row)
        print(f"tokens={tokens} plain={row['plain']['seconds']:.3f}s/{row['plain']['peak_rss_growth_mb']:.0f}MB "
              f"fused={row['fused']['seconds']:.3f}s/{row['fused']['peak_rss_growth_mb']:.0f}MB "
              f"speedup={row['speedup']:.2f} mem_ratio={row['mem_ratio']:.2f} max_grad_diff={row['max_grad_diff']:.1e}", flush=True)
    report = {"cpu": cpu_model_name(), "threads": args.threads, "width": args.width, "vocab": args.vocab,
              "repeats": args.repeats, "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
