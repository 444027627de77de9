"""The ``eval:`` section: what to measure after training, and how the prompts are built.

Prompts are data, not code: the same ``prompt_template`` (row fields in braces) builds the
zero-shot prompt, every few-shot demonstration and the fine-tuning prompt, so the three numbers
a user compares measure the same task.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunelab.config_base import Section

EvalTask = Literal["generation", "choice", "classification", "perplexity"]

#: What each task reports when ``metrics`` is empty.
DEFAULT_METRICS: dict[str, list[str]] = {
    "generation": ["exact_match"],
    "choice": ["accuracy"],
    "classification": ["accuracy", "f1"],
    "perplexity": [],
}


class EvalConfig(Section):
    """Evaluation settings (``tunelab eval`` options override them)."""

    after_training: bool = Field(False, description="Run this evaluation (base model vs the fine-tuned run) when `tunelab train` finishes.")
    task: EvalTask = Field("generation", description="generation | choice (option likelihood) | classification (trained head) | perplexity.")
    data: str | None = Field(None, description="Evaluation file; default: data.validation.")
    pool: str | None = Field(None, description="Few-shot demonstrations are drawn from this file; default: data.train.")
    metrics: list[str] = Field(default_factory=list, description="Metric names; `tunelab metrics --help` lists them. Empty: the task's default.")
    shots: list[int] = Field(default_factory=lambda: [0], description="Evaluate the base model once per k in-context examples, e.g. [0, 1, 5].")
    prompt_template: str | None = Field(None, description="Builds the prompt from row fields, e.g. '{passage}\\nQuestion: {question}?'. Default: data.prompt_template, else '{prompt}'.")
    answer_field: str = Field("answer", description="Row field with the reference answer(s) (a string or a list) or, for choice, the correct option (its text or index).")
    text_field: str = Field("text", description="Row field with the input text (classification) or the text to score (perplexity).")
    choices: list[str] | None = Field(None, description="Options shared by every item (choice task), e.g. ['no', 'yes'].")
    choices_field: str = Field("choices", description="Row field with the item's own options when `choices` is not set.")
    format: Literal["chat", "plain"] = Field("chat", description="chat: through the tokenizer's chat template (data.template); plain: prompt and answer joined by a space.")
    task_field: str | None = Field(
        None, description="Row field naming each item's task: a hierarchical-adapter run answers it with that task's family stack (items without it go to the run's router)."
    )
    system_prompt: str | None = Field(None, description="System message; default: data.system_prompt.")
    max_examples: int | None = Field(None, gt=0, description="Score only the first N items.")
    batch_size: int = Field(8, gt=0)
    seed: int = Field(0, description="Seeds few-shot sampling and sampled decoding.")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="Generation ends at the first of these strings (not included).")
    extract: Literal["none", "first_line", "regex", "choice_letter"] = Field("none", description="How the answer is taken out of generated text before scoring.")
    extract_pattern: str | None = Field(None, description="Regex for extract: regex; its first group (else the whole match) is the answer.")
    ensemble: Literal["logits", "probs", "vote"] | None = Field(
        None, description="Add a row combining the evaluated runs: average their logits, their probabilities, or take a majority vote (generation: vote only).",
    )
    max_length: int = Field(1024, gt=1, description="Perplexity window in tokens.")
    stride: int | None = Field(None, gt=0, description="Perplexity: new tokens scored per window (default max_length // 2).")

    @model_validator(mode="after")
    def _regex_needs_pattern(self) -> EvalConfig:
        if self.extract == "regex" and not self.extract_pattern:
            raise ValueError("extract: regex needs extract_pattern")
        if any(k < 0 for k in self.shots) or not self.shots:
            raise ValueError("shots must be a non-empty list of counts >= 0")
        return self

    def metric_names(self) -> list[str]:
        """The metrics to report: the configured ones, else the task's default."""
        return self.metrics or DEFAULT_METRICS[self.task]
