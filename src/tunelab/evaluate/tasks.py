"""The four ways to evaluate one model on a set of items; each returns scores and per-item records.

- generation: decode an answer per prompt, extract it, score it against the references;
- choice: pick the option with the highest log-likelihood (raw sum, and per character as
  lm-evaluation-harness's ``acc_norm``), no decoding needed;
- classification: a trained classification head's arg-max label;
- perplexity: how well the model predicts held-out text (``evaluate.perplexity``).

The seconds measured cover the model's work only (not loading), so examples/s compares systems.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.data.images import shorthand_images
from tunelab.data.readers import Row
from tunelab.errors import UserError
from tunelab.evaluate import items as item_fields
from tunelab.evaluate.config import EvalConfig
from tunelab.evaluate.extract import extract_answer
from tunelab.evaluate.generation import generate_batch
from tunelab.evaluate.likelihood import continuation_logprobs
from tunelab.evaluate.metrics import score
from tunelab.evaluate.prompts import PromptBuilder, draw_shots
from tunelab.generate import GenerationSettings


@dataclass
class TaskInputs:
    """Everything a task needs besides the model: the items, prompts, and demonstrations."""

    items: list[Row]
    cfg: EvalConfig
    builder: PromptBuilder
    pool: list[Row] = field(default_factory=list)
    pool_is_items: bool = False
    shots: int = 0


@dataclass
class TaskOutput:
    """Corpus scores, one record per item (for reading failures), and the time the model took."""

    scores: dict[str, float]
    records: list[dict[str, Any]]
    seconds: float


def _demonstrations(inputs: TaskInputs, index: int, answer: Callable[[Row], str]) -> list[tuple[Row, str]]:
    rows = draw_shots(inputs.pool, inputs.shots, inputs.cfg.seed, index, inputs.pool_is_items)
    return [(row, answer(row)) for row in rows]


def _choice_answer(cfg: EvalConfig) -> Callable[[Row], str]:
    def answer(row: Row) -> str:
        opts = item_fields.options(row, cfg.choices, cfg.choices_field)
        return opts[item_fields.correct_option(row, opts, cfg.answer_field)]

    return answer


def run_choice(model: torch.nn.Module, tokenizer: Any, inputs: TaskInputs, progress: str | None = None) -> TaskOutput:
    cfg, builder = inputs.cfg, inputs.builder
    with_images = next((row for row in inputs.items if shorthand_images(row.fields, row.where)), None)
    if with_images is not None:
        raise UserError("rows with images are scored by generation, not by option likelihood", where=with_images.where, hint="set eval.task: generation (with eval.metrics: [exact_match])")
    answer = _choice_answer(cfg)
    contexts, options, gold = [], [], []
    for i, row in enumerate(inputs.items):
        opts = item_fields.options(row, cfg.choices, cfg.choices_field)
        gold.append(item_fields.correct_option(row, opts, cfg.answer_field))
        options.append(opts)
        contexts.append(builder.context(row, _demonstrations(inputs, i, answer)))
    requests = [(ctx, builder.continuation(opt)) for ctx, opts in zip(contexts, options) for opt in opts]
    start = time.perf_counter()
    scored = continuation_logprobs(
        model, tokenizer, requests, add_special_tokens=builder.add_special_tokens, batch_size=cfg.batch_size, progress=progress
    )
    seconds = time.perf_counter() - start
    records, picked, picked_norm, offset = [], [], [], 0
    for row, opts, g in zip(inputs.items, options, gold):
        item = scored[offset : offset + len(opts)]
        offset += len(opts)
        raw = max(range(len(opts)), key=lambda j: item[j].logprob)
        norm = max(range(len(opts)), key=lambda j: item[j].logprob / max(item[j].chars, 1))
        picked.append(opts[raw])
        picked_norm.append(opts[norm])
        records.append(
            {"where": row.where, "prediction": opts[raw], "prediction_norm": opts[norm], "answer": opts[g],
             "correct": raw == g, "options": opts, "logprobs": [s.logprob for s in item]}
        )
    refs = [[opts[g]] for opts, g in zip(options, gold)]
    scores = score(cfg.metric_names(), picked, refs)
    scores["accuracy_norm"] = score(["accuracy"], picked_norm, refs)["accuracy"]
    return TaskOutput(scores, records, seconds)


def run_generation(model: torch.nn.Module, tokenizer: Any, inputs: TaskInputs, progress: str | None = None) -> TaskOutput:
    cfg, builder = inputs.cfg, inputs.builder

    def first_reference(row: Row) -> str:
        return item_fields.references(row, cfg.answer_field)[0]

    refs = [item_fields.references(row, cfg.answer_field) for row in inputs.items]
    prompts, images = [], []
    for i, row in enumerate(inputs.items):
        shots = _demonstrations(inputs, i, first_reference)
        prompts.append(builder.context(row, shots))
        images.append([ref for r in [*(shot for shot, _ in shots), row] for ref in shorthand_images(r.fields, r.where)])
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    start = time.perf_counter()
    outputs = generate_batch(
        model, tokenizer, prompts, settings, stop=cfg.stop, add_special_tokens=builder.add_special_tokens,
        batch_size=cfg.batch_size, progress=progress, images=images,
    )
    seconds = time.perf_counter() - start
    answers = [extract_answer(text, cfg.extract, cfg.extract_pattern) for text in outputs]
    records = [
        {"where": row.where, "prompt": builder.prompt(row), "output": text, "prediction": ans, "references": r}
        for row, text, ans, r in zip(inputs.items, outputs, answers, refs)
    ]
    return TaskOutput(score(cfg.metric_names(), answers, refs), records, seconds)


def _input_texts(inputs: TaskInputs) -> list[str]:
    if inputs.cfg.prompt_template:
        return [inputs.builder.prompt(row) for row in inputs.items]
    return [str(item_fields.field(row, inputs.cfg.text_field)) for row in inputs.items]


@torch.no_grad()
def run_classification(model: torch.nn.Module, tokenizer: Any, inputs: TaskInputs, progress: str | None = None) -> TaskOutput:
    """Labels from a trained sequence-classification head (``model.config.id2label``)."""
    cfg = inputs.cfg
    id2label = getattr(model.config, "id2label", None) or {}
    texts = _input_texts(inputs)
    refs = [item_fields.references(row, cfg.answer_field) for row in inputs.items]
    # Inputs longer than the model's position table are cut, as its training data would have been.
    limit = min(cfg.max_length, getattr(model.config, "max_position_embeddings", None) or cfg.max_length)
    start = time.perf_counter()
    model.eval()
    logits: list[list[float]] = []
    for begin in range(0, len(texts), cfg.batch_size):
        batch = tokenizer(texts[begin : begin + cfg.batch_size], padding=True, truncation=True, max_length=limit, return_tensors="pt")
        logits += model(**batch).logits.float().tolist()
    seconds = time.perf_counter() - start
    names = [str(id2label.get(i, i)) for i in range(len(logits[0]))] if logits else []
    labels = [names[max(range(len(row)), key=row.__getitem__)] for row in logits]
    records = [
        {"where": row.where, "prediction": label, "references": r, "class_logits": dict(zip(names, scores))}
        for row, label, r, scores in zip(inputs.items, labels, refs, logits)
    ]
    return TaskOutput(score(cfg.metric_names(), labels, refs), records, seconds)


def run_perplexity(model: torch.nn.Module, tokenizer: Any, inputs: TaskInputs, progress: str | None = None) -> TaskOutput:
    from tunelab.evaluate.perplexity import perplexity

    cfg = inputs.cfg
    texts = _input_texts(inputs)
    start = time.perf_counter()
    result = perplexity(model, tokenizer, texts, max_length=cfg.max_length, stride=cfg.stride, batch_size=cfg.batch_size)
    seconds = time.perf_counter() - start
    return TaskOutput({k: float(v) for k, v in result.items()}, [{"where": row.where} for row in inputs.items], seconds)


def scores_from_records(cfg: EvalConfig, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The corpus scores of records made by ``run_choice``, ``run_generation`` or ``run_classification``
    (a set scored in parts, as a hierarchical run's families are), computed as those runners do."""
    refs = [[r["answer"]] if "answer" in r else r["references"] for r in records]
    scores = score(cfg.metric_names(), [r["prediction"] for r in records], refs)
    if cfg.task == "choice":
        scores["accuracy_norm"] = score(["accuracy"], [r["prediction_norm"] for r in records], refs)["accuracy"]
    return scores


TASKS: dict[str, Callable[..., TaskOutput]] = {
    "generation": run_generation,
    "choice": run_choice,
    "classification": run_classification,
    "perplexity": run_perplexity,
}

#: Which ``load_model`` task each evaluation task needs.
MODEL_TASK = {"generation": "causal-lm", "choice": "causal-lm", "classification": "sequence-classification", "perplexity": "causal-lm"}

#: Tasks whose prompts can carry in-context examples.
FEW_SHOT_TASKS = ("generation", "choice")


def check_shots(cfg: EvalConfig, shots: Sequence[int]) -> None:
    if cfg.task not in FEW_SHOT_TASKS and any(shots):
        raise UserError(f"few-shot prompting does not apply to the {cfg.task} task", hint="use --shots 0")
