"""Model-backed augmentation's settings, and the hooks the data stage calls models through.

A generative model rewrites each training input through ``prompts`` in turn (one prompt: a
paraphrase; "translate to French", then "translate to English": back-translation, Sennrich et al.
2016). The data package cannot load models (the model packages import it), so the generation
lives in ``tunelab.rewrite``, which installs itself here with ``set_rewriter`` and
``set_label_predictor`` when imported (as does the classifier that filters augmented copies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import Field, field_validator, model_validator

from tunelab.config_base import Section

PARAPHRASE = "Rewrite the following text with different words, keeping its meaning. Reply with the rewritten text only.\n\n{text}"


class RewriteConfig(Section):
    """Copies of each training input written by a model: paraphrases, or back-translations."""

    model: str = Field("smollm2-135m", description="The generative model that rewrites (alias, directory, GGUF file or run directory).")
    prompts: list[str] = Field(
        default_factory=lambda: [PARAPHRASE],
        description="Prompts applied in turn, each with {text}: one paraphrases; two such as 'Translate to French: {text}' then 'Translate to English: {text}' back-translate.",
    )
    template: str = Field(
        "auto",
        description="How each prompt reaches the model: auto (its own chat template, else ChatML), a named chat template, "
        "or none: the prompt as plain text, for base models without chat tuning (write it few-shot, e.g. "
        "'English: ...\\nFrench: ...\\n\\nEnglish: {text}\\nFrench:'; the first line of the continuation is kept).",
    )
    copies: int = Field(1, ge=1, description="Rewrites per input (more than one needs temperature > 0).")
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding.")
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)

    @field_validator("prompts")
    @classmethod
    def _each_names_the_text(cls, prompts: list[str]) -> list[str]:
        if not prompts or any("{text}" not in p for p in prompts):
            raise ValueError("every rewrite prompt must contain {text}, where the input goes")
        return prompts

    @model_validator(mode="after")
    def _copies_need_sampling(self) -> RewriteConfig:
        if self.copies > 1 and self.temperature == 0:
            raise ValueError("greedy decoding writes the same rewrite every time: set temperature above 0 for copies > 1")
        return self


Rewrite = Callable[[RewriteConfig, int, Sequence[str]], dict[str, list[str]]]
_rewriter: list[Rewrite] = []


def set_rewriter(rewrite: Rewrite) -> None:
    """Install ``rewrite(cfg, seed, texts) -> {text: [copies]}`` (``tunelab.rewrite`` does)."""
    _rewriter[:] = [rewrite]


def rewrite_texts(cfg: RewriteConfig, seed: int, texts: Sequence[str]) -> dict[str, list[str]]:
    if not _rewriter:
        raise RuntimeError("model-written augmentation needs tunelab.rewrite imported (tunelab.train.prepare does)")
    return _rewriter[0](cfg, seed, texts)


PredictLabels = Callable[[str, int, Sequence[str]], list[str]]
_predictor: list[PredictLabels] = []


def set_label_predictor(predict: PredictLabels) -> None:
    """Install ``predict(model, seed, texts) -> [label name]`` (``tunelab.rewrite`` does)."""
    _predictor[:] = [predict]


def predict_labels(model: str, seed: int, texts: Sequence[str]) -> list[str]:
    if not _predictor:
        raise RuntimeError("filtering augmented rows needs tunelab.rewrite imported (tunelab.train.prepare does)")
    return _predictor[0](model, seed, texts)
