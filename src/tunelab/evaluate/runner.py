"""Evaluate several systems on one task: the base model at each k shots, then each fine-tuned run.

This answers the question tunelab exists for -- which approach is best for this goal? -- with
numbers made the same way for every system: the same items, template, metrics and seed. The base
model is prompted with k in-context examples for each k in ``eval.shots``; a fine-tuned run is
evaluated zero-shot (its training replaces the demonstrations). Models load through
``tunelab.models.load_model``, so any alias, Hugging Face directory, GGUF file or run directory works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.evaluate.by_family import evaluate_by_family
from tunelab.evaluate.config import EvalConfig
from tunelab.evaluate.items import read_items
from tunelab.evaluate.metrics import get_metrics
from tunelab.evaluate.prompts import PromptBuilder
from tunelab.evaluate.tasks import (
    FEW_SHOT_TASKS,
    MODEL_TASK,
    TASKS,
    TaskInputs,
    TaskOutput,
    check_shots,
)
from tunelab.methods.hierarchy_stacks import hierarchy_of

DEFAULT_TEMPLATE = "{prompt}"


@dataclass(frozen=True)
class EvalSetup:
    """An evaluation fully resolved from a recipe and command-line options."""

    cfg: EvalConfig
    data: str
    pool: str | None = None
    chat_template: str = "auto"


@dataclass
class SystemResult:
    """One row of the comparison table, plus its per-item records."""

    system: str
    model: str
    source: str
    shots: int
    examples: int
    seconds: float
    scores: dict[str, float]
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict[str, Any]:
        """What eval.json records for this system."""
        return {
            "system": self.system, "model": self.model, "source": self.source, "shots": self.shots,
            "examples": self.examples, "seconds": self.seconds, "examples_per_second": self.examples_per_second,
            "scores": self.scores,
        }


def evaluate(
    setup: EvalSetup, base: str | None, runs: Sequence[str] = (), *, show_progress: bool = True, reuse_base_scores: bool = True
) -> list[SystemResult]:
    """Score ``base`` at every k in ``setup.cfg.shots`` and each of ``runs`` zero-shot.

    The base model's rows come from the score cache (``evaluate.score_cache``) when an identical
    evaluation was done before, unless ``reuse_base_scores`` is off; its source then says so.
    """
    from tunelab.evaluate import score_cache
    from tunelab.models import load_model

    cfg = setup.cfg
    shots = cfg.shots if cfg.task in FEW_SHOT_TASKS else [0]
    check_shots(cfg, cfg.shots)
    if cfg.metric_names():
        get_metrics(cfg.metric_names())  # a typo fails before any model is loaded
    items = read_items(setup.data, cfg.max_examples)
    pool = read_items(setup.pool, setting="--pool / eval.pool") if setup.pool and any(shots) else []
    same_file = bool(setup.pool) and Path(setup.pool).resolve() == Path(setup.data).resolve()
    plan = ([(base, k) for k in shots] if base else []) + [(run, 0) for run in runs]
    results: list[SystemResult] = []
    loaded, loaded_name = None, None
    for name, k in plan:
        system = f"{name} {k}-shot" if name == base and cfg.task in FEW_SHOT_TASKS else name
        key = score_cache.score_key(name, cfg.seed, setup, k) if name == base else None
        cached = score_cache.load_scores(key) if key and reuse_base_scores else None
        if cached is not None:
            results.append(SystemResult(system, name, f"{cached['source']}; scores {score_cache.REUSED}", k, len(items),
                                        cached["seconds"], cached["scores"], cached["records"]))
            continue
        if loaded_name != name:
            loaded, loaded_name = load_model(name, MODEL_TASK[cfg.task], seed=cfg.seed), name
        assert loaded is not None
        output = evaluate_loaded(setup, items, loaded.model, loaded.tokenizer, pool=pool, same_file=same_file, shots=k,
                                 progress=system if show_progress else None)
        if key:
            score_cache.store_scores(key, loaded.source, output.seconds, output.scores, output.records)
        results.append(SystemResult(system, name, loaded.source, k, len(items), output.seconds, output.scores, output.records))
    return results


def evaluate_loaded(
    setup: EvalSetup, items: list[Any], model: Any, tokenizer: Any, *, pool: Sequence[Any] = (), same_file: bool = False,
    shots: int = 0, progress: str | None = None,
) -> TaskOutput:
    """Score a model already in memory (``evaluate`` loads them; a greedy soup builds them)."""
    inputs = TaskInputs(items, setup.cfg, prompt_builder(setup, tokenizer), list(pool), same_file, shots)
    hierarchy = hierarchy_of(model)
    if hierarchy is not None:  # a hierarchical-adapter run: each item under its family's stack
        return evaluate_by_family(model, tokenizer, inputs, hierarchy, progress=progress)
    return TASKS[setup.cfg.task](model, tokenizer, inputs, progress=progress)


def prompt_builder(setup: EvalSetup, tokenizer: Any) -> PromptBuilder:
    """How this setup turns an item into a prompt and an option into its continuation."""
    return PromptBuilder(
        tokenizer=tokenizer,
        template=setup.cfg.prompt_template or DEFAULT_TEMPLATE,
        format=setup.cfg.format,
        system=setup.cfg.system_prompt,
        chat_template_name=setup.chat_template,
    )

