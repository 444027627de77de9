"""The runs a merge combines: read, and checked to be combinable (one base, one kind)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab import rundir
from tunelab.errors import UserError
from tunelab.methods.artifacts import MODEL_DIR
from tunelab.methods.peft_adapters import ADAPTER_DIR
from tunelab.models.trained import manifest_model_task


@dataclass(frozen=True)
class Member:
    """One run to merge: where it is, its manifest, and whether it is a full model or a LoRA adapter."""

    path: Path
    manifest: dict[str, Any]
    kind: str  # "full" | "lora"

    @property
    def final(self) -> Path:
        return rundir.final_dir(self.path)


def _kind(path: Path, manifest: dict[str, Any]) -> str:
    final = rundir.final_dir(path)
    method = manifest.get("method") or {}
    if (final / MODEL_DIR).exists():
        return "full"
    if method.get("lora") and (final / ADAPTER_DIR).exists():
        return "lora"
    active = sorted(k for k, v in method.items() if v)
    raise UserError(f"cannot merge this run's method ({', '.join(active) or 'none'})", where=str(path),
                    hint="merging combines full fine-tunes (final/model) or LoRA adapters of one base")


def read_members(paths: list[str]) -> list[Member]:
    """The runs behind ``paths``; a one-line error unless they share base, model class, kind and labels."""
    members = []
    for given in paths:
        path = Path(given)
        if not rundir.is_run_dir(path):
            raise UserError("not a finished tunelab run (no final/ with a manifest)", where=given, hint="pass run directories written by tunelab train")
        manifest = rundir.read_manifest(path)
        members.append(Member(path, manifest, _kind(path, manifest)))
    first = members[0]
    for other in members[1:]:
        for what, value in (("base", lambda m: m.manifest["base"]), ("model class", lambda m: manifest_model_task(m.manifest)),
                            ("kind", lambda m: m.kind), ("labels", lambda m: m.manifest.get("label_names"))):
            if value(other) != value(first):
                raise UserError(f"runs differ in {what}: {value(first)!r} vs {value(other)!r}", where=str(other.path),
                                hint="merge runs fine-tuned from one base in the same way")
    return members
