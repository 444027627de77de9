"""What swapping a SiLU model's MLP activation costs before any recovery, and how much of it a
per-channel floor gives back (``method.activation.floor``).

    .venv/bin/python bench/relu_floor_probe.py runs/as_silu          # ~10 min on 2 cores

The model (a run directory or any model tunelab loads) is scored as it is, then with each MLP
activation replaced, no training in between:

- ``silu``: unchanged; ``relu``: the plain swap;
- ``silu>t, 0``: SiLU above the threshold ``t``, zero at or below it (the negative lobe dropped);
- ``silu>t, floor`` / ``relu>t, floor``: each channel's mean SiLU output at or below ``t`` there
  instead (``relu>0, floor`` is what ``FlooredReLU`` starts as).

Floors are calibrated on the first 48 reviews of ``rt_sentiment_distill_more.jsonl``; perplexity
is over every token of its last 64 rows (chat format); task accuracy is the quickstart's choice
between "negative" and "positive" on ``rt_cls_test.jsonl`` (the sum of the answer's token
log-probabilities). "closed" is the fraction of gate values at or below ``t`` on the calibration
text: the MLP channels a sparse decode skips. Writes bench/results/relu_floor_probe.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.hardware import cpu_model_name
from tunelab.methods.activation import gated_mlps
from tunelab.models import load_model

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "Is this review positive or negative?"


class Activation(nn.Module):
    """A function of the gate as an MLP's ``act_fn`` (it must be a module)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        return self.fn(gate)


def closed_means(model: nn.Module, mlps: list[nn.Module], texts: list[list[int]], threshold: float) -> tuple[list[torch.Tensor], float]:
    """Per MLP, each channel's mean SiLU output where its gate is ≤ ``threshold`` on ``texts``
    (0 where it never is), and the fraction of gate values there."""
    sums: list[torch.Tensor] = [torch.zeros(0)] * len(mlps)
    counts: list[torch.Tensor] = [torch.zeros(0)] * len(mlps)

    def record(index: int):
        def hook(module: nn.Module, inputs: tuple, gate: torch.Tensor) -> None:
            flat = gate.reshape(-1, gate.shape[-1]).float()
            closed = flat <= threshold
            s, c = (F.silu(flat) * closed).sum(0), closed.sum(0)
            sums[index] = s if not sums[index].numel() else sums[index] + s
            counts[index] = c if not counts[index].numel() else counts[index] + c
        return hook

    hooks = [m.gate_proj.register_forward_hook(record(i)) for i, m in enumerate(mlps)]
    with torch.no_grad():
        for ids in texts:
            model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    tokens = sum(len(ids) for ids in texts) * len(mlps) * mlps[0].up_proj.out_features
    return [s / c.clamp(min=1) for s, c in zip(sums, counts, strict=True)], float(sum(c.sum() for c in counts)) / tokens


def perplexity(model: nn.Module, texts: list[list[int]]) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in texts:
            row = torch.tensor([ids])
            total += F.cross_entropy(model(input_ids=row).logits[0, :-1].float(), row[0, 1:], reduction="sum").item()
            tokens += len(ids) - 1
    return math.exp(total / tokens)


def accuracy(model: nn.Module, tokenizer, items: list[dict]) -> float:
    correct = 0
    with torch.no_grad():
        for item in items:
            user = {"role": "user", "content": f"Review: {item['text']}\n{QUESTION}"}
            prompt = tokenizer.apply_chat_template([user], tokenize=True, add_generation_prompt=True, return_dict=False)
            scores = []
            for choice in ("negative", "positive"):
                full = torch.tensor([tokenizer.apply_chat_template([user, {"role": "assistant", "content": choice}], tokenize=True, return_dict=False)])
                answer = len(tokenizer(choice, add_special_tokens=False)["input_ids"])
                logprobs = F.log_softmax(model(input_ids=full).logits[0, :-1].float(), -1)
                span = slice(len(prompt) - 1, len(prompt) - 1 + answer)
                scores.append(logprobs[span].gather(1, full[0, 1:][span, None]).sum().item())
            correct += ("negative", "positive")[scores[1] > scores[0]] == item["label"]
    return correct / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a SiLU model: run directory, alias or HF directory")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    mlps = list(gated_mlps(model).values())
    original = [m.act_fn for m in mlps]
    rows = [json.loads(line) for line in (DATA / "rt_sentiment_distill_more.jsonl").read_text().splitlines()]
    encode = lambda row: tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)  # noqa: E731
    calibration, heldout = [encode(r) for r in rows[:48]], [encode(r) for r in rows[-64:]]
    items = [json.loads(line) for line in (DATA / "rt_cls_test.jsonl").read_text().splitlines()]

    def measure(name: str, make: Callable[[int], nn.Module] | None, closed: float | None, with_accuracy: bool) -> dict:
        for i, mlp in enumerate(mlps):
            mlp.act_fn = make(i) if make else original[i]
        row = {"activation": name, "closed": closed, "perplexity": perplexity(model, heldout),
               "task_accuracy": accuracy(model, tokenizer, items) if with_accuracy else None}
        print(json.dumps(row), flush=True)
        return row

    table = [measure("silu", None, None, True), measure("relu", lambda i: Activation(torch.relu), None, True)]
    for threshold in (0.0, 0.25, 0.5):
        for i, mlp in enumerate(mlps):
            mlp.act_fn = original[i]  # calibrated on the SiLU model's own gates
        means, closed = closed_means(model, mlps, calibration, threshold)
        first = threshold == 0.0
        table.append(measure(f"silu>{threshold:g}, 0", lambda i, t=threshold: Activation(lambda g: torch.where(g > t, F.silu(g), torch.zeros_like(g))), closed, False))
        for kind, positive in (("silu", F.silu), ("relu", torch.relu)):
            table.append(measure(f"{kind}>{threshold:g}, floor",
                                 lambda i, t=threshold, p=positive: Activation(lambda g, c=means[i]: torch.where(g > t, p(g), c.to(g.dtype))), closed, first))
    for i, mlp in enumerate(mlps):
        mlp.act_fn = original[i]
    RESULTS.mkdir(exist_ok=True)
    meta = {"model": args.model, "cpu": cpu_model_name(), "threads": args.threads, "calibration_rows": 48, "heldout_rows": 64, "test_items": len(items)}
    (RESULTS / "relu_floor_probe.json").write_text(json.dumps({**meta, "rows": table}, indent=2))
    lines = [f"# MLP activation swapped in `{args.model}`, no training ({meta['cpu']}, {args.threads} threads)", "",
             "| activation | gate values closed | perplexity (64 reviews) | task accuracy (200) |", "|---|---:|---:|---:|"]
    for row in table:
        closed = "-" if row["closed"] is None else f"{row['closed']:.1%}"
        acc = "-" if row["task_accuracy"] is None else f"{row['task_accuracy']:.3f}"
        lines.append(f"| {row['activation']} | {closed} | {row['perplexity']:,.1f} | {acc} |")
    (RESULTS / "relu_floor_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
