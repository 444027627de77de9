"""The cubic sparsity schedule of gradual magnitude pruning (Zhu & Gupta 2017, eq. 1).

``s_t = s_f + (s_0 - s_f) · (1 - (t - t_0) / (t_1 - t_0))³`` between ``t_0`` and ``t_1``: prune
fast while many redundant weights remain, slowly near the target, so the network can recover.
"""

from __future__ import annotations

from tunelab.compress.masks import check_sparsity
from tunelab.errors import UserError


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Target sparsity at optimizer ``step`` (``initial`` before ``start``, ``final`` from ``end`` on)."""
    check_sparsity(initial)
    check_sparsity(final)
    if end <= start:
        raise UserError(f"gradual pruning needs start_step < end_step, got {start} and {end}")
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1 - progress) ** 3
