"""``tunelab export``: a run's model as a plain Hugging Face model with its adapters merged."""

from __future__ import annotations

from pathlib import Path

from tunelab import atomic
from tunelab.methods.artifacts import merge_methods
from tunelab.models import load_model


def export_merged(run_dir: Path, out: Path) -> Path:
    """Load ``run_dir``'s model, fold every method into the base weights and save it to ``out``."""
    loaded = load_model(str(run_dir))
    model = merge_methods(loaded.model)
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return out
