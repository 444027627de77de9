"""Does it fit? Verdicts per method and strategy, and the largest batch that fits a device.

Memory grows with the batch at every moment (activations, the loss's temporaries and the
backward's working gradients scale with tokens; nothing shrinks), so the largest batch is found
by doubling and then bisecting on the estimate itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tunelab.errors import UserError
from tunelab.plan.architecture import Architecture
from tunelab.plan.estimate import estimate
from tunelab.plan.settings import METHODS, STRATEGIES, Settings

#: The search stops here: a batch this large is a plan for a cluster, not a device.
MAX_BATCH = 1 << 16


@dataclass(frozen=True)
class Verdict:
    """One method x strategy at the planned batch, and the largest batch that fits."""

    method: str
    strategy: str
    devices: int
    peak_bytes: float
    peak_moment: str
    fits: bool
    largest_batch: int  # 0: not even one example fits
    note: str = ""


def fits(arch: Architecture, settings: Settings, device_memory: float) -> bool:
    return estimate(arch, settings).total <= device_memory


def largest_batch(arch: Architecture, settings: Settings, device_memory: float) -> int:
    """The largest ``batch`` whose estimate fits ``device_memory`` (0 when 1 does not)."""
    if not fits(arch, settings.with_batch(1), device_memory):
        return 0
    low, high = 1, 2
    while high <= MAX_BATCH and fits(arch, settings.with_batch(high), device_memory):
        low, high = high, high * 2
    if high > MAX_BATCH:
        return MAX_BATCH
    while high - low > 1:  # low fits, high does not
        middle = (low + high) // 2
        low, high = (middle, high) if fits(arch, settings.with_batch(middle), device_memory) else (low, middle)
    return low


def verdicts(arch: Architecture, settings: Settings, device_memory: float) -> list[Verdict]:
    """Every method with every strategy the device count allows, at ``settings``' batch."""
    rows = []
    strategies = [s for s in STRATEGIES if settings.devices > 1 or s == "ddp"]
    for method in METHODS:
        for strategy in strategies:
            try:
                planned = replace(settings, method=method, strategy=strategy, tp_degree=settings.tp_degree if strategy == settings.strategy else None)
            except UserError as exc:
                rows.append(Verdict(method, strategy, settings.devices, 0.0, "", False, 0, exc.one_line()))
                continue
            result = estimate(arch, planned)
            rows.append(Verdict(
                method, strategy, settings.devices, result.total, result.peak.name, result.total <= device_memory,
                largest_batch(arch, planned, device_memory), "; ".join(result.notes),
            ))
    return rows
