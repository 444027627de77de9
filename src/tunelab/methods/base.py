"""The method plug-in contract and its registry.

A method changes what is trained: it may add modules (adapters, a head), freeze parameters or
change the model's settings. Each method is one class registered under its recipe key
(``method.<key>``); ``apply_methods`` runs the active ones in their declared ``order``; the run
directory's writer and reader call ``save``/``load`` and ``merge`` without knowing any method's
parameter names, because each method recognises only the modules it created itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from tunelab.config_base import Section
from tunelab.plugins import Registry


@dataclass(frozen=True)
class MethodContext:
    """What a method may need besides the model and its own section."""

    #: The transformers model class family: causal-lm, sequence-classification, token-classification, base, masked-lm.
    model_task: str
    #: The tokenizer's directory (prompt tuning initialised from text reads it).
    tokenizer_dir: str | None = None
    #: The model's tokenizer (a student measures its teacher's blocks on tokenized text).
    tokenizer: Any = None


class Method:
    """Override what your method needs; the defaults describe a method that adds nothing."""

    #: The recipe key under ``method:``.
    key: ClassVar[str]
    #: The section's schema (a ``tunelab.config_base.Section``).
    Config: ClassVar[type[Section]]
    #: Application order: lower first. Built-ins: student 5, activation 8, dropout 10, freeze 20, peft 50, hierarchy 52, bottleneck 55, head 60, vision 65, init 95.
    order: ClassVar[int] = 50
    #: False when the added modules cannot be folded into the base weights (export refuses then).
    mergeable: ClassVar[bool] = True
    #: True when what this method added survives ``tunelab compress`` as it is (the compressed-model
    #: store saves and rebuilds it), so compression does not ask for ``merge``.
    compressible_unmerged: ClassVar[bool] = False

    def apply(self, model: torch.nn.Module, cfg: Any, ctx: MethodContext) -> torch.nn.Module:
        """Prepare ``model`` for training; return it (or the wrapper that replaces it)."""
        return model

    def added_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Modules this method created in ``model`` (found structurally, never by name substrings)."""
        return []

    def owned_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Parameters this method added; the run directory saves them with ``save``, not as base weights."""
        return [p for module in self.added_modules(model) for p in module.parameters()]

    def save(self, model: torch.nn.Module, cfg: Any, directory: Path) -> list[str]:
        """Write this method's trained state into ``directory``; return the names written."""
        return []

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        """Rebuild this method's modules on a freshly loaded base and load what ``save`` wrote."""
        return model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """Fold the added modules into the base weights (a plain model); identity when nothing was added."""
        return model

    def tensor_parallel_parts(self, module: torch.nn.Module, style: str) -> dict[str, str] | None:
        """How ``module``, a layer this method wrapped, splits under tensor parallelism when the
        model's plan splits the layer it wraps ``style`` ("colwise": by output features,
        "rowwise": by input features): {sub-module path: style}, every ``nn.Linear``; parts not
        named stay whole on every process. None when ``module`` is not this method's wrapper (the
        tensor-parallel plan then refuses it rather than split what it does not understand)."""
        return None

    def wire(self, cfg: Any, prepared: Any, recipe: Any) -> None:
        """Adjust the wired-up run (``tunelab.train.prepared.Prepared``: its sampler, collate,
        objective, save) once its objective is built, for a method that decides per batch how the
        model runs (hierarchical adapters run each batch with its task family's adapters)."""


METHODS: Registry[Method] = Registry("method", "method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of ``cls`` under ``cls.key``."""
    METHODS.register(cls.key, cls())
    return cls


def active_methods(section: Any) -> list[tuple[Method, Any]]:
    """The methods ``section`` (the recipe's ``method:``) switches on, with their configs, in order."""
    chosen = [(METHODS.get(key), getattr(section, key, None)) for key in METHODS]
    return sorted(((m, cfg) for m, cfg in chosen if cfg is not None), key=lambda pair: pair[0].order)


def added_module_ids(model: torch.nn.Module) -> set[int]:
    """Ids of every module any registered method added (compression skips them: it acts on base weights)."""
    return {id(sub) for key in METHODS for module in METHODS.get(key).added_modules(model) for sub in module.modules()}


def owned_parameter_ids(model: torch.nn.Module, methods: Iterable[Method]) -> set[int]:
    return {id(p) for method in methods for p in method.owned_parameters(model)}
