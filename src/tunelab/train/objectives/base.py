"""The objective protocol and its registry.

An objective says what the loss is. The trainer calls ``objective(model, batch)`` and gets back
the loss **summed** over the batch's supervision units (tokens, examples, pairs) plus statistics
to aggregate. Summing rather than averaging is what makes gradient accumulation and
data-parallel training exact: the trainer divides by the number of units in the whole optimizer
step across all micro-batches and processes (``units(batch)``), so a step means the same thing
however the batch is split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tunelab.config_base import Section
from tunelab.plugins import Registry

Stats = dict[str, Any]


class Objective(Protocol):
    """What the trainer needs from a loss."""

    name: str
    #: How batches must be built: "packed" (one row, position_ids restart) or "padded".
    collation: str

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many supervision units (the loss's denominator) this batch holds."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        """Summed loss over the batch's units and additive statistics (sums, or lists to concatenate)."""

    def summarize(self, stats: Stats) -> dict[str, float]:
        """Turn accumulated statistics into reportable metrics (loss, perplexity, accuracy, ...)."""

    # Optional: ``attention_scope(model, batch) -> ContextManager``. An objective that changes how
    # the model attends for a batch (packed rows: per-example attention) exposes it, and the
    # trainer holds it over forward *and* backward, because activation checkpointing re-runs the
    # forward inside backward and must attend the same way.
    #
    # Optional: ``unit_name: str``, what ``units`` counts in the run summary ("preference pairs");
    # by default the units are called "supervised" (tokens, or examples for a head).
    #
    # Optional: ``loss_from_hidden(model, hidden, batch) -> (loss_sum, stats)``: the same loss from
    # the decoder's last hidden states, the LM head applied by the objective. A pipeline's last
    # stage holds only those (``strategy: pp``); an objective without it is refused there.
    #
    # Optional: ``shared_prefix: bool``. True asks the trainer for packed rows that hold a common
    # unsupervised prefix once (``collate_packed(share_prefix=True)``); only an objective whose
    # attention scope understands that layout may say so. ``prefix_group: int`` shares prefixes
    # within each run of that many examples instead of across the batch (a preference pair's two
    # answers). ``drops_unread_inputs: bool``: True says the loss reads only positions that
    # predict a supervised token, so a packed row may leave out the inputs no target reads and move
    # labels into the slots the layout leaves free (``collate_packed(drop_unread_inputs=True)``).
    #
    # Optional: ``row_padding: bool``. True says the objective reads a packed row that ends in a
    # padding segment (``tunelab.data.collate.pad_packed_row``: no example, no loss); the trainer
    # then pads rows where repeating shapes pay (``tunelab.train.shape_buckets``).


@dataclass
class ObjectiveContext:
    """What an objective is built from: the prepared model and run facts, plus auxiliary models
    (a teacher, a reference model) that it asks for by name and that are loaded once per run."""

    model: torch.nn.Module
    tokenizer: Any = None
    label_names: list[str] | None = None
    train: Any = ()
    head: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    #: The recipe's ``model.name`` (what the trained model was loaded from: a distilled student's teacher).
    model_name: str | None = None
    #: The objective the model's head implies (what a wrapping objective, e.g. meta-learning, wraps).
    default_objective: str = "causal_lm"
    _auxiliary: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def auxiliary_model(self, name: str, model_task: str = "causal-lm") -> torch.nn.Module:
        """Model ``name`` (any alias, directory, GGUF file or run directory), frozen, in eval mode,
        on the run's device; asking twice returns the same instance."""
        return self._load_auxiliary(name, model_task).model

    def auxiliary_tokenizer(self, name: str, model_task: str = "causal-lm") -> Any:
        """The tokenizer that came with ``auxiliary_model(name)``."""
        return self._load_auxiliary(name, model_task).tokenizer

    def _load_auxiliary(self, name: str, model_task: str) -> Any:
        key = (name, model_task)
        if key not in self._auxiliary:
            from tunelab.models.load import load_model

            loaded = load_model(name, model_task, seed=self.seed)  # type: ignore[arg-type]
            loaded.model.eval().to(self.device).requires_grad_(False)
            self._auxiliary[key] = loaded
        return self._auxiliary[key]


class NoSettings(Section):
    """This objective has no settings of its own."""


@dataclass(frozen=True)
class ObjectivePlugin:
    """A registered objective: its settings' schema (the ``objective:`` section) and its builder."""

    Config: type[Section]
    build: Callable[[Any, ObjectiveContext], Objective]
    #: The ``method.head.type`` values it trains (None in the tuple: no head, causal LM); None: any model.
    heads: tuple[str | None, ...] | None = None
    #: ``data(cfg, ctx, data_section) -> data_section``: where the training data comes from when the
    #: objective makes its own (a teacher's answers); called before the data is read.
    data: Callable[[Any, ObjectiveContext, Any], Any] | None = None
    #: The example shape it trains on when not the head's own (``preference``: DPO pairs).
    shape: str | None = None
    #: ``sampler(cfg, sampler_context) -> Sampler``: the data order it needs (meta-learning's
    #: one-task episodes); a recipe that names another ``sampler:`` is refused.
    sampler: Callable[[Any, Any], Any] | None = None


OBJECTIVES: Registry[ObjectivePlugin] = Registry("objective", "objective.name")


Builder = Callable[[Any, ObjectiveContext], Objective]


def register_objective(
    name: str, Config: type[Section] = NoSettings, *, heads: tuple[str | None, ...] | None = None,
    data: Callable[[Any, ObjectiveContext, Any], Any] | None = None, shape: str | None = None,
    sampler: Callable[[Any, Any], Any] | None = None,
) -> Callable[[Builder], Builder]:
    """Register ``build(cfg, ctx) -> Objective`` under ``name``; recipes choose it with
    ``objective: {name: ..., <Config's keys>}``. ``heads`` limits it to those head types; ``data``
    rewrites the data section first (see ``ObjectivePlugin.data``); ``shape`` names the examples
    it reads when they are not the head's (see ``ObjectivePlugin.shape``); ``sampler`` is the data
    order it needs (see ``ObjectivePlugin.sampler``)."""

    def wrap(build: Builder) -> Builder:
        OBJECTIVES.register(name, ObjectivePlugin(Config, build, heads, data, shape, sampler))
        return build

    return wrap


def build_objective(name: str, settings: Any, ctx: ObjectiveContext) -> Objective:
    """The objective ``name`` with its validated settings (None: its defaults), checked against the head."""
    from tunelab.errors import UserError

    plugin = OBJECTIVES.get(name)
    head_type = getattr(ctx.head, "type", None)
    if plugin.heads is not None and head_type not in plugin.heads:
        wanted = ", ".join("no head (causal LM)" if h is None else f"a {h} head" for h in plugin.heads)
        have = f"a {head_type} head" if head_type else "no head (causal LM)"
        raise UserError(f"objective {name!r} trains {wanted}, but the recipe has {have}", where="objective.name", hint="choose an objective for this head, or leave objective: out for the default")
    return plugin.build(settings if settings is not None else plugin.Config(), ctx)


#: Where an objective's own trainable modules (``trainable_modules``) sit on the model during a run.
OBJECTIVE_MODULES = "tunelab_objective"


def attach_objective_modules(model: torch.nn.Module, objective: Objective) -> None:
    """Put the objective's trainable parts (a distillation projection) on the model for the run,
    so the optimizer, DDP, device moves and checkpoints cover them with no special case."""
    modules = getattr(objective, "trainable_modules", None)
    if modules is not None and len(modules) > 0:
        model.add_module(OBJECTIVE_MODULES, modules)


def detach_objective_modules(model: torch.nn.Module) -> None:
    """Take them off again before the final model is saved: they are training aids, not the model."""
    if OBJECTIVE_MODULES in model._modules:
        del model._modules[OBJECTIVE_MODULES]


def accumulate(total: Stats, new: Stats) -> Stats:
    """Add numbers, concatenate lists/tensors: how per-batch statistics combine."""
    for key, value in new.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            total[key] = torch.cat([total[key], value.reshape(-1)]) if key in total else value.reshape(-1).clone()
        elif isinstance(value, list):
            total.setdefault(key, []).extend(value)
        else:
            total[key] = total.get(key, 0) + value
    return total
