"""The trade-off table: each variant's measurements next to the uncompressed model's."""

from __future__ import annotations

from typing import Any

MB = 1024 * 1024


def relative(row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Ratios to the baseline (size, RAM, speeds), the perplexity change in percent and task-metric differences."""
    ratios = {
        "size_ratio": row["size_bytes"] / baseline["size_bytes"],
        "peak_ram_ratio": row["peak_rss_bytes"] / baseline["peak_rss_bytes"],
        "prefill_speedup": row["prefill_tokens_per_s"] / baseline["prefill_tokens_per_s"],
        "decode_speedup": row["decode_tokens_per_s"] / baseline["decode_tokens_per_s"],
        "perplexity_change_pct": 100 * (row["perplexity"] / baseline["perplexity"] - 1),
    }
    if "task" in row:
        ratios["task_change"] = {key: value - baseline["task"][key] for key, value in row["task"].items()}
    return ratios


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table; the first row is the baseline every ratio refers to."""
    metrics = list(rows[0].get("task", {}))
    header = (
        "| variant | params | sparsity | size on disk | peak RAM | prefill tok/s | decode tok/s | perplexity |"
        + "".join(f" {metric} |" for metric in metrics) + "\n"
        + "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(metrics) + "\n"
    )
    lines = []
    for row in rows:
        r = row["relative"]
        sparsity = _sparsity(row["steps"])
        lines.append(
            f"| {row['variant']} | {row['params'] / 1e6:.1f}M | {sparsity} "
            f"| {row['size_bytes'] / MB:.0f} MB ({r['size_ratio']:.2f}x) "
            f"| {row['peak_rss_bytes'] / MB:.0f} MB ({r['peak_ram_ratio']:.2f}x) "
            f"| {row['prefill_tokens_per_s']:.0f} ({r['prefill_speedup']:.2f}x) "
            f"| {row['decode_tokens_per_s']:.1f} ({r['decode_speedup']:.2f}x) "
            f"| {row['perplexity']:.2f} ({r['perplexity_change_pct']:+.1f}%) |"
            + "".join(f" {row['task'][m]:.3f} ({r['task_change'][m]:+.3f}) |" for m in metrics)
        )
    return header + "\n".join(lines) + "\n"


def _sparsity(steps: list[dict[str, Any]]) -> str:
    """Each step's sparsity, in order: of the pruned layers' weights, of the MLP channels a
    ReLU gate closes (gated-mlp), or of the linear layers' inputs (activation sparsity on the
    calibration text)."""
    parts = []
    for step in steps:
        if "activation_sparsity" in step:
            kind = "MLP channels" if "sparsified_mlps" in step else "inputs"
            parts.append(f"{100 * step['activation_sparsity']:.0f}% of {kind}")
        elif "sparsity" in step:
            parts.append(f"{100 * step['sparsity']:.0f}% of weights")
    return " + ".join(parts) or "-"
