"""What a run leaves behind in ``RUN_DIR/final`` and how to load it again.

- ``tunelab_model.json``: the base model, task, label names and the method section, which is
  everything needed to rebuild the trained model's structure.
- ``adapter/``: the PEFT adapter in peft's own format (``PeftModel.from_pretrained`` loads it).
- ``bottleneck.safetensors`` + ``bottleneck.json``: bottleneck adapters.
- ``trainable.safetensors``: every other trained tensor (task heads, partially frozen bases).
- ``model/``: a plain Hugging Face model, when the base weights themselves were trained
  (full fine-tuning, freezing); then it is all that is needed.
- tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab import atomic
from tunelab.errors import UserError
from tunelab.methods import MethodConfig, is_head_parameter
from tunelab.methods.bottleneck import load_bottleneck, save_bottleneck
from tunelab.train.checkpoint import trainable_state

MANIFEST = "tunelab_model.json"


def base_weights_trained(model: torch.nn.Module) -> bool:
    """True when any original (non-adapter, non-head) weight has requires_grad."""
    return any(
        p.requires_grad and "lora_" not in n and ".bottleneck_" not in n and not is_head_parameter(n) and "prompt_encoder" not in n
        for n, p in model.named_parameters()
    )


def save_final(run_dir: Path, model: torch.nn.Module, tokenizer: Any, *, base: str, task: str, method: MethodConfig, label_names: list[str] | None) -> Path:
    """Write the trained model into ``run_dir/final`` atomically."""
    target = run_dir / "final"
    with atomic.directory(target) as tmp:
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        manifest = {
            "base": base, "task": task, "label_names": label_names, "num_labels": num_labels,
            "method": method.model_dump(mode="json"), "files": [],
        }
        if base_weights_trained(model):
            plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") and method.lora else model
            plain.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            manifest["files"].append("model/")
        else:
            if method.peft_family():
                model.save_pretrained(tmp / "adapter")
                manifest["files"].append("adapter/")
            if method.bottleneck:
                save_bottleneck(model, method.bottleneck, tmp)
                manifest["files"].append("bottleneck.safetensors")
            rest = {k: v for k, v in trainable_state(model).items() if "lora_" not in k and ".bottleneck_" not in k and "prompt_encoder" not in k}
            if rest:
                save_file(rest, str(tmp / "trainable.safetensors"))
                manifest["files"].append("trainable.safetensors")
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


def is_run_dir(path: Path) -> bool:
    return (path / "final" / MANIFEST).exists() or (path / MANIFEST).exists()


def load_run(
    path: Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the trained model of a run directory (or of its ``final/`` folder).

    ``attn_implementation`` is the attention kernel to build it with (see ``load_model``).
    """
    from tunelab.models import load_model

    final = path / "final" if (path / "final" / MANIFEST).exists() else path
    manifest = json.loads((final / MANIFEST).read_text())
    if manifest["task"] == "multi-task":
        raise UserError(
            "a multi-task run holds one model per task", where=str(path),
            hint="load them with tunelab.train.multitask.load_multitask(run_dir)",
        )
    labelled = manifest["task"] in ("sequence-classification", "token-classification")
    num_labels = manifest.get("num_labels") or len(manifest.get("label_names") or [])
    kwargs = {"num_labels": num_labels} if labelled and num_labels else {}
    if (final / "model").exists():
        loaded = load_model(str(final / "model"), manifest["task"], dtype=dtype, attn_implementation=attn_implementation, **kwargs)
        return loaded.model, loaded.tokenizer, manifest
    loaded = load_model(manifest["base"], manifest["task"], dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    model = loaded.model
    if (final / "bottleneck.json").exists():
        load_bottleneck(model, final)
    if (final / "adapter").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(final / "adapter"))
    if (final / "trainable.safetensors").exists():
        weights = load_file(str(final / "trainable.safetensors"))
        names = {n for n, _ in model.named_parameters()}
        missing = set(weights) - names
        if missing:
            raise UserError(f"trained weights do not fit the rebuilt model: {sorted(missing)[:2]}", where=str(final))
        model.load_state_dict(weights, strict=False)
    model.eval()
    return model, loaded.tokenizer, manifest


def export_merged(run_dir: Path, out: Path) -> Path:
    """A plain Hugging Face model with LoRA/IA3 merged into the base weights."""
    model, tokenizer, manifest = load_run(run_dir)
    if (run_dir / "final" / "bottleneck.json").exists():
        raise UserError(
            "bottleneck adapters cannot be merged into the base weights (they add non-linear layers)",
            where=str(run_dir), hint="load the run directory with tunelab instead",
        )
    if hasattr(model, "merge_and_unload"):
        if getattr(model.active_peft_config, "is_prompt_learning", False):
            raise UserError("prompt/prefix tuning adds virtual tokens and cannot be merged", where=str(run_dir))
        model = model.merge_and_unload()
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out

