"""Byte sizes as people write them (``80GiB``, ``24GB``, ``512MiB``) and as the planner prints them.

Device memory is quoted in both systems: GPU vendors and ``torch.cuda`` figures divided by 1e9
say GB, ``free -g`` and ``nvidia-smi`` say GiB. Both are accepted, and a bare number means bytes.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

GiB = 2**30
MiB = 2**20


def parse_size(text: str) -> int:
    """``"80GiB"`` -> 85899345920; raises ``ValueError`` with the accepted forms otherwise."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write a number and a unit, e.g. 80GiB, 24GB, 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(value: float) -> str:
    """Binary units with three significant figures: ``1.25 GiB``, ``812 MiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.3g} {unit}" if scaled < 1000 else f"{scaled:,.0f} {unit}"
    return f"{value:.0f} B"
