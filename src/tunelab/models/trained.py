"""Rebuilding a trained model from a run directory: its base, then each method's saved state.

Kept apart from ``models.load`` and given the base loader as an argument, so that loading any
model never imports training code and no module imports the one that imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from tunelab import rundir
from tunelab.errors import UserError
from tunelab.methods import METHODS, MethodContext
from tunelab.methods.artifacts import MODEL_DIR, merge_methods

LABELLED = ("sequence-classification", "token-classification")


def manifest_model_task(manifest: dict[str, Any]) -> str:
    """The model class family a run trained (``task`` in manifests written before it was renamed)."""
    return manifest.get("model_task") or manifest["task"]


def load_run(
    path: Path, load_base: Callable[..., Any], *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The trained model of a run directory (or its ``final/``), its tokenizer and manifest.

    ``load_base(name, model_task, dtype=..., attn_implementation=..., **kwargs)`` loads a base
    model (``models.load.load_model``).
    """
    final = rundir.final_dir(path)
    manifest = rundir.read_manifest(path)
    model_task = manifest_model_task(manifest)
    if model_task == "multi-task":
        raise UserError("a multi-task run holds one model per task", where=str(path), hint="load them with tunelab.train.multitask.load_multitask(run_dir)")
    num_labels = manifest.get("num_labels") or len(manifest.get("label_names") or [])
    kwargs = {"num_labels": num_labels} if model_task in LABELLED and num_labels else {}
    source = str(final / MODEL_DIR) if (final / MODEL_DIR).exists() else manifest["base"]
    loaded = load_base(source, model_task, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    model = loaded.model
    if "run_dir" in loaded.details:  # trained on top of another run (a stage): it trained that run's merged model
        model = merge_methods(model)
    labels = manifest.get("label_names")
    if model_task in LABELLED and labels and source == manifest["base"]:
        # A head trained as an adapter run: the base's config has placeholder names (LABEL_0 ...).
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    ctx = MethodContext(model_task=model_task)
    saved = {key: value for key, value in (manifest.get("method") or {}).items() if value is not None}
    for key in sorted((k for k in saved if k in METHODS), key=lambda k: METHODS.get(k).order):
        model = METHODS.get(key).load(model, saved[key], final, ctx)
    model.eval()
    return model, loaded.tokenizer, manifest
