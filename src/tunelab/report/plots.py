"""Loss curves as PNG, drawn from a run's ``metrics.jsonl`` (matplotlib, no display needed)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tunelab import atomic  # noqa: E402


def plot_training(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Training loss per step and every evaluated loss; returns None when nothing was logged."""
    if not metrics_jsonl.exists():
        return None
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("type") == "eval" and "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(metrics_jsonl.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png)


def save_figure(fig: Figure, out_png: Path) -> Path:
    """Lay out ``fig``, write it as a PNG atomically (a reader never sees half a file) and free it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic.write_bytes(out_png, buffer.getvalue())
    return out_png
