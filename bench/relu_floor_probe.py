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
is tunelab's (``tunelab.evaluate.perplexity``) over its last 64 rows in chat format; task accuracy
is the quickstart's evaluation (its recipe's ``eval:`` section, scored by ``tunelab.evaluate``) on
``rt_cls_test.jsonl``. "closed" is the fraction of gate values at or below ``t`` on the calibration
text: the MLP channels a sparse decode skips. Writes bench/results/relu_floor_probe.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.evaluate.items import read_items
from tunelab.evaluate.perplexity import perplexity
from tunelab.evaluate.runner import evaluate_loaded
from tunelab.evaluate.setup import resolve_setup
from tunelab.hardware import cpu_model_name
from tunelab.methods.activation import gated_mlps
from tunelab.models import load_model
from tunelab.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "data"
RESULTS = Path(__file__).resolve().parent / "results"


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
    calibration = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in rows[:48]]
    heldout = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows[-64:]]
    task = resolve_setup(load_recipe(EXAMPLES / "quickstart.yaml"), {"data": str(DATA / "rt_cls_test.jsonl")})
    items = read_items(task.data)

    def measure(name: str, make: Callable[[int], nn.Module] | None, closed: float | None, with_accuracy: bool) -> dict:
        for i, mlp in enumerate(mlps):
            mlp.act_fn = make(i) if make else original[i]
        accuracy = evaluate_loaded(task, items, model, tokenizer).scores["accuracy"] if with_accuracy else None
        row = {"activation": name, "closed": closed, "perplexity": perplexity(model, tokenizer, heldout)["perplexity"], "task_accuracy": accuracy}
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
