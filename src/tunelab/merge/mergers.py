"""Build merged models from loaded members: full weights (task vectors against the base) or LoRA
adapters (peft's weighted-adapter API). Members load once; ``build`` can run many times (a greedy
soup tries one candidate after another)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import UserError
from tunelab.merge.combine import PEFT_COMBINATION, combine
from tunelab.merge.members import Member
from tunelab.merge.spec import MergeSpec
from tunelab.methods.artifacts import MODEL_DIR
from tunelab.methods.heads import head_modules
from tunelab.methods.peft_adapters import ADAPTER_DIR
from tunelab.models.trained import LABELLED, manifest_model_task


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, tied ones once (so a random DARE mask cannot untie them)."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


class FullMerger:
    """Full fine-tunes of one base: merged = base + combine(member - base). Parameters a task
    head adds (absent from the pretrained base) have no base to subtract: their base is zero."""

    def __init__(self, members: list[Member]):
        from tunelab.models import load_model

        first = members[0].manifest
        self.model_task = manifest_model_task(first)
        # The first member is the container the merge is written into: its config keeps the
        # run's label names, which a freshly loaded base would not have.
        loaded = load_model(str(members[0].path), self.model_task)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        kwargs = {"num_labels": first.get("num_labels") or len(first.get("label_names") or [])} if self.model_task in LABELLED else {}
        base = load_model(first["base"], self.model_task, **kwargs).model
        heads = {id(p) for module in head_modules(base) for p in module.parameters()}
        self.base = {n: (torch.zeros_like(p) if id(p) in heads else p.detach().float().clone()) for n, p in base.named_parameters()}
        self.members = [_parameters(self.model)] + [_parameters(load_model(str(m.path), self.model_task).model) for m in members[1:]]
        for member, params in zip(members, self.members):
            if params.keys() != self.base.keys():
                raise UserError("the run's parameters do not match its base model's", where=str(member.path))

    def build(self, indices: list[int], weights: list[float], spec: MergeSpec) -> torch.nn.Module:
        torch.manual_seed(spec.seed)  # DARE draws its drop masks
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, base in self.base.items():
                vectors = [self.members[i][name] - base for i in indices]
                params[name].copy_(base + combine(vectors, weights, spec))
        return self.model

    def save(self, directory: Path) -> tuple[list[str], dict[str, Any]]:
        """Write the built model; returns the files and the manifest's method section."""
        self.model.save_pretrained(directory / MODEL_DIR)
        self.tokenizer.save_pretrained(directory / MODEL_DIR)
        return [f"{MODEL_DIR}/"], {}


class LoraMerger:
    """LoRA runs of one base: every member's adapter loaded into one peft model, combined with
    ``add_weighted_adapter`` into a new adapter (a LoRA again, loadable by peft and tunelab)."""

    def __init__(self, members: list[Member]):
        from tunelab.models import load_model

        loaded = load_model(str(members[0].path), manifest_model_task(members[0].manifest))
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.adapters = ["default"]
        for i, member in enumerate(members[1:], start=1):
            self.model.load_adapter(str(member.final / ADAPTER_DIR), adapter_name=f"member{i}")
            self.adapters.append(f"member{i}")
        self.ranks = [self.model.peft_config[a].r for a in self.adapters]
        self.method = members[0].manifest["method"]
        self.built: str | None = None

    def build(self, indices: list[int], weights: list[float], spec: MergeSpec) -> torch.nn.Module:
        if self.built is not None:
            self.model.set_adapter(self.adapters[0])
            self.model.delete_adapter(self.built)
        self.built = f"merged{len(indices)}_{'_'.join(map(str, indices))}"
        torch.manual_seed(spec.seed)
        combination = PEFT_COMBINATION[spec.method]
        rank = spec.rank or sum(self.ranks[i] for i in indices)
        try:
            self.model.add_weighted_adapter(
                [self.adapters[i] for i in indices], weights, self.built, combination_type=combination, svd_rank=rank,
                density=spec.density, majority_sign_method=spec.majority_sign,
                svd_full_matrices=False,  # a layer narrower than the rank then gets its own full rank, consistently
            )
        except ValueError as exc:
            raise UserError(f"peft cannot merge these adapters: {exc}", hint="LoRA runs merge when they adapt the same modules") from None
        self._record_capped_ranks(self.built)
        self.model.set_adapter(self.built)
        self.model.eval()
        return self.model

    def _record_capped_ranks(self, adapter: str) -> None:
        """A layer narrower than the requested rank gets only its full rank from peft's SVD;
        record those ranks (and alphas, keeping the scale at 1) so the saved adapter reloads."""
        config = self.model.peft_config[adapter]
        for name, module in self.model.get_base_model().named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a and lora_a[adapter].weight.shape[0] != config.r:
                rank = lora_a[adapter].weight.shape[0]
                config.rank_pattern[name] = rank
                config.alpha_pattern[name] = rank

    def save(self, directory: Path) -> tuple[list[str], dict[str, Any]]:
        assert self.built is not None
        staging = directory / "staging"
        self.model.save_pretrained(str(staging), selected_adapters=[self.built])
        shutil.move(str(staging / self.built), str(directory / ADAPTER_DIR))
        shutil.rmtree(staging)
        config = json.loads((directory / ADAPTER_DIR / "adapter_config.json").read_text())
        method = {**self.method, "lora": {**self.method["lora"], "r": config["r"], "alpha": config["lora_alpha"]}}
        return [f"{ADAPTER_DIR}/"], method


def merger_for(members: list[Member]) -> FullMerger | LoraMerger:
    return FullMerger(members) if members[0].kind == "full" else LoraMerger(members)
