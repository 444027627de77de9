"""Pareto charts of a trade-off table: the task metric against each cost, the frontier highlighted.

A system is on the frontier when no other system is at least as good on both axes and better
on one; everything off it is beaten outright by something on it. Two renderings of the same
points: a PNG for reports and READMEs (matplotlib), and a self-contained HTML page (inline SVG,
no scripts or network) whose points name themselves on hover.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.lines import Line2D

from tunelab import atomic
from tunelab.report.compare import LOWER_IS_BETTER, MB, TradeoffRow, metric_value
from tunelab.report.plots import plt, save_figure  # plots selects the Agg backend


@dataclass(frozen=True)
class Axis:
    """A cost axis: which row field, in which unit, and which direction is better."""

    label: str
    attribute: str
    divisor: float
    lower_is_better: bool


CHARTS = (
    Axis("serving peak RAM (MB)", "peak_rss_bytes", MB, True),
    Axis("decode speed (tokens/s)", "decode_tokens_per_s", 1, False),
    Axis("training time (s)", "train_seconds", 1, True),
)
KIND_COLOURS = {"base model": "#7f7f7f", "run": "#1f77b4", "compressed": "#ff7f0e"}
FRONTIER_COLOUR = "#d62728"


@dataclass(frozen=True)
class Point:
    name: str
    kind: str
    x: float
    y: float


def points(rows: Sequence[TradeoffRow], axis: Axis, metric: str) -> list[Point]:
    """The rows that have both the metric and this cost measured."""
    found = []
    for row in rows:
        cost, value = getattr(row, axis.attribute), metric_value(row, metric)
        if cost is not None and value is not None:
            found.append(Point(row.name, row.kind, cost / axis.divisor, value))
    return found


def frontier(found: Sequence[Point], x_lower_is_better: bool, y_lower_is_better: bool) -> list[Point]:
    """The points no other point dominates, ordered along the cost axis."""
    sx = -1 if x_lower_is_better else 1
    sy = -1 if y_lower_is_better else 1

    def dominates(a: Point, b: Point) -> bool:
        at_least = sx * a.x >= sx * b.x and sy * a.y >= sy * b.y
        return at_least and (sx * a.x > sx * b.x or sy * a.y > sy * b.y)

    best = [p for p in found if not any(dominates(q, p) for q in found)]
    return sorted(best, key=lambda p: p.x)


def _charts(rows: Sequence[TradeoffRow], metric: str) -> list[tuple[Axis, list[Point], list[Point]]]:
    y_lower = metric in LOWER_IS_BETTER
    drawn = []
    for axis in CHARTS:
        found = points(rows, axis, metric)
        if found:
            drawn.append((axis, found, frontier(found, axis.lower_is_better, y_lower)))
    return drawn


def _better(axis_lower: bool) -> str:
    return "lower is better" if axis_lower else "higher is better"


def write_png(rows: Sequence[TradeoffRow], metric: str, out_png: Path) -> Path | None:
    """One panel per cost that some row measured; None when no row has a metric and a cost."""
    charts = _charts(rows, metric)
    if not charts:
        return None
    fig, axes = plt.subplots(1, len(charts), figsize=(5.2 * len(charts), 4.4), dpi=110, squeeze=False)
    for ax, (axis, found, best) in zip(axes[0], charts):
        for kind, colour in KIND_COLOURS.items():
            mine = [p for p in found if p.kind == kind]
            if mine:
                ax.scatter([p.x for p in mine], [p.y for p in mine], s=28, color=colour, zorder=3)
        ax.plot([p.x for p in best], [p.y for p in best], "-", color=FRONTIER_COLOUR, linewidth=1.2, zorder=2)
        ax.scatter([p.x for p in best], [p.y for p in best], s=70, facecolors="none", edgecolors=FRONTIER_COLOUR, zorder=4)
        for p in found:
            ax.annotate(p.name, (p.x, p.y), textcoords="offset points", xytext=(4, 3), fontsize=6.5)
        ax.set_xlabel(f"{axis.label} ({_better(axis.lower_is_better)})")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    kinds = [kind for kind in KIND_COLOURS if any(p.kind == kind for _, found, _ in charts for p in found)]
    handles = [Line2D([], [], marker="o", linestyle="", color=KIND_COLOURS[kind], label=kind) for kind in kinds]
    handles.append(Line2D([], [], color=FRONTIER_COLOUR, marker="o", markerfacecolor="none", label="Pareto frontier"))
    axes[0][0].legend(handles=handles, fontsize=7, loc="best")
    return save_figure(fig, out_png)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    span = high - low or abs(high) or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step) + 1)]


def _svg(axis: Axis, found: list[Point], best: list[Point], metric: str, width: int = 460, height: int = 340) -> str:
    left, right, top, bottom = 62, 16, 16, 48
    xs = _ticks(min(p.x for p in found), max(p.x for p in found))
    ys = _ticks(min(p.y for p in found), max(p.y for p in found))

    def px(x: float) -> float:
        return left + (x - xs[0]) / ((xs[-1] - xs[0]) or 1) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - ys[0]) / ((ys[-1] - ys[0]) or 1) * (height - top - bottom)

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
              f'aria-label="{html.escape(metric)} vs {html.escape(axis.label)}">')]
    for x in xs:
        parts.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{height - bottom}" stroke="#e5e5e5"/>'
                     f'<text x="{px(x):.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">{x:g}</text>')
    for y in ys:
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{width - right}" y2="{py(y):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{py(y) + 3:.1f}" font-size="10" text-anchor="end">{y:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" font-size="11" text-anchor="middle">'
                 f'{html.escape(axis.label)} ({_better(axis.lower_is_better)})</text>'
                 f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" font-size="11" '
                 f'text-anchor="middle">{html.escape(metric)}</text>')
    line = " ".join(f"{px(p.x):.1f},{py(p.y):.1f}" for p in best)
    parts.append(f'<polyline class="frontier" points="{line}" fill="none" stroke="{FRONTIER_COLOUR}" stroke-width="1.5"/>')
    on_frontier = {p.name for p in best}
    for p in found:
        ring = f' stroke="{FRONTIER_COLOUR}" stroke-width="2.5"' if p.name in on_frontier else ""
        parts.append(f'<circle class="point" data-name="{html.escape(p.name)}" cx="{px(p.x):.1f}" cy="{py(p.y):.1f}" r="5" '
                     f'fill="{KIND_COLOURS.get(p.kind, "#333")}"{ring}><title>{html.escape(p.name)} ({p.kind}): '
                     f'{html.escape(metric)} {p.y:.4g}, {html.escape(axis.label)} {p.x:.4g}'
                     f'{" (Pareto frontier)" if p.name in on_frontier else ""}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def write_html(rows: Sequence[TradeoffRow], metric: str, table_html: str, out_html: Path, notes: Sequence[str] = ()) -> Path:
    """A self-contained page: every chart some row can be placed on, then the full table."""
    charts = _charts(rows, metric)
    legend = " ".join(f'<span style="color:{c}">&#9679;</span> {html.escape(k)}' for k, c in KIND_COLOURS.items())
    figures = "".join(f"<figure>{_svg(axis, found, best, metric)}<figcaption>{html.escape(metric)} vs "
                      f"{html.escape(axis.label)}: {len(best)} of {len(found)} on the frontier</figcaption></figure>"
                      for axis, found, best in charts)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunelab compare: {html.escape(metric)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}figure{{display:inline-block;margin:0 18px 18px 0}}
figcaption{{font-size:12px;color:#555}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ddd;padding:3px 6px}}
td{{text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}circle.point:hover{{r:7}}</style></head>
<body><h1>Trade-offs: {html.escape(metric)} against cost</h1>
<p>{legend} &nbsp; <span style="color:{FRONTIER_COLOUR}">&#9711;</span> Pareto frontier (nothing else is better on both axes).
Hover a point for its name.</p>
{"".join(f"<p><b>Note:</b> {html.escape(note)}</p>" for note in notes)}
{figures or "<p>No row has both the metric and a cost measured: compress or evaluate the runs first.</p>"}
{table_html}
</body></html>
"""
    atomic.write_text(out_html, page)
    return out_html
