"""Writing a trained model into ``RUN_DIR/final``: each method saves what it added.

When only added modules trained (adapters, a head), ``final/`` holds each method's own files
(peft's ``adapter/``, ``bottleneck.*``, ``head.safetensors``) and the base is named in the
manifest. When any pretrained weight trained (full fine-tuning, partial freezing), the mergeable
methods are folded in and ``final/model/`` is a plain Hugging Face model; methods that cannot be
merged still save their own files on top of it. ``tunelab.models.trained`` reads this back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab import rundir
from tunelab.methods.base import METHODS, Method, active_methods, owned_parameter_ids
from tunelab.models.vision import save_image_processor

MODEL_DIR = "model"


def base_weights_trained(model: torch.nn.Module, methods: list[Method]) -> bool:
    """True when any parameter that no method added has ``requires_grad``."""
    owned = owned_parameter_ids(model, methods)
    return any(p.requires_grad and id(p) not in owned for p in model.parameters())


def merge_methods(model: torch.nn.Module, *, for_compression: bool = False) -> torch.nn.Module:
    """``model`` with whatever any method added folded into the base weights (a plain model);
    a clear error when something added cannot be merged (bottleneck adapters, soft prompts).
    ``for_compression`` leaves in place what compression carries as it is (floored ReLUs)."""
    for key in sorted(METHODS.names(), key=lambda k: METHODS.get(k).order, reverse=True):
        method = METHODS.get(key)
        if not (for_compression and method.compressible_unmerged):
            model = method.merge(model)
    return model


def save_final(run_dir: Path, model: torch.nn.Module, tokenizer: Any, *, base: str, model_task: str, section: Any, label_names: list[str] | None) -> Path:
    """Write the trained model into ``run_dir/final`` atomically; returns that folder."""
    chosen = active_methods(section)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    files: list[str] = []
    manifest = {"base": base, "model_task": model_task, "label_names": label_names, "num_labels": num_labels,
                "method": section.model_dump(mode="json"), "files": files}
    with rundir.writing_final(run_dir, manifest) as tmp:
        if base_weights_trained(model, [m for m, _ in chosen]):
            plain = model
            for method, _ in reversed(chosen):
                plain = method.merge(plain) if method.mergeable else plain
            plain.save_pretrained(tmp / MODEL_DIR)
            tokenizer.save_pretrained(tmp / MODEL_DIR)
            save_image_processor(plain, tmp / MODEL_DIR)
            files.append(f"{MODEL_DIR}/")
            for method, cfg in chosen:
                files.extend(method.save(plain, cfg, tmp) if not method.mergeable else [])
        else:
            for method, cfg in chosen:
                files.extend(method.save(model, cfg, tmp))
        tokenizer.save_pretrained(tmp)
    return run_dir / rundir.FINAL
