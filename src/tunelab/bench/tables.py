"""How benchmark scripts print a figure measured over several seeds."""

from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` to three decimals (the value alone for a single seed)."""
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
