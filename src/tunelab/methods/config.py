"""The ``method:`` section: which parameters train and which modules are added.

Sub-sections compose (``freeze`` + ``lora`` + ``head``); a recipe with none of them is full
fine-tuning. At most one PEFT adapter family (lora, ia3, prompt_tuning, prefix_tuning) per run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tunelab.config_base import Section
from tunelab.data.config import DataConfig


class FreezeConfig(Section):
    """Freeze parts of the model; frozen parameters get no gradient and no optimizer state.

    This is the one place a recipe freezes: ``base`` freezes every pretrained weight (what was
    ``head.base: frozen`` and ``bottleneck.freeze_base``); modules a method adds (adapters, a new
    task head) still train.
    """

    base: bool | None = Field(
        None,
        description="Freeze every pretrained weight; added adapters and task heads still train. "
        "Default: true with a classifier head (classification, multi_label, regression, token_classification, "
        "multiple_choice) or bottleneck adapters, else false.",
    )
    embeddings: bool = Field(False, description="Freeze input embeddings (and a tied LM head).")
    first_n: int = Field(0, ge=0, description="Freeze the first N transformer blocks.")
    last_n: int = Field(0, ge=0, description="Freeze the last N transformer blocks.")
    include: list[str] = Field(default_factory=list, description="Regexes of parameter names to freeze.")
    exclude: list[str] = Field(default_factory=list, description="Regexes of parameter names kept trainable (wins).")


class LoraConfig(Section):
    """LoRA and its variants (DoRA, rsLoRA) through peft."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("auto", description="auto (per architecture), all-linear, or module names.")
    use_dora: bool = False
    qlora: bool = Field(False, description="QLoRA: quantize the frozen base to NF4 (bitsandbytes) before adding LoRA; saves memory, not time.")
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class IA3Config(Section):
    """(IA)^3: learned rescaling of keys, values and feed-forward activations."""

    target_modules: str | list[str] = "auto"
    feedforward_modules: str | list[str] = "auto"


class PromptTuningConfig(Section):
    """Soft prompt: trainable virtual token embeddings prepended to every input."""

    num_virtual_tokens: int = Field(20, gt=0)
    init_text: str | None = Field(None, description="Initialise the soft prompt from this text's embeddings.")


class PrefixTuningConfig(Section):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""

    num_virtual_tokens: int = Field(20, gt=0)


class BottleneckConfig(Section):
    """Bottleneck adapters (Houlsby: after attention and MLP; Pfeiffer: after MLP only)."""

    style: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: int = Field(16, gt=0, description="hidden / bottleneck width.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "freeze_base" in data:
            raise ValueError("freeze_base moved: write method.freeze.base: true (or false to train the base too)")
        return data


HeadType = Literal["classification", "multi_label", "regression", "token_classification", "multiple_choice", "embedding", "masked_lm"]
HEADS_WITH_FROZEN_DEFAULT = ("classification", "multi_label", "regression", "token_classification", "multiple_choice")


class HeadConfig(Section):
    """A task head on top of the model and the loss it trains with.

    classification (one label per text), multi_label (a set of labels per text), regression (a
    number per text) and multiple_choice (one score per choice) use transformers' sequence
    classification heads (decoders pool the last non-pad token, encoders CLS); token_classification
    its token heads; embedding pools the body's hidden states (mean / CLS / last token) with an
    optional projection; masked_lm the encoder's own MLM head.
    """

    type: HeadType = "classification"
    num_labels: int | None = Field(None, gt=1, description="Default: the number of labels in the data.")
    pooling: Literal["mean", "cls", "last"] | None = Field(
        None, description="embedding: how token states become one vector; default mean (encoders) or last (decoders)."
    )
    projection: int | None = Field(None, gt=0, description="embedding: a trained linear projection to this many dimensions.")
    normalize: bool = Field(True, description="embedding: L2-normalise embeddings (cosine similarity).")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "base" in data:
            frozen = {"frozen": "true", "full": "false"}.get(str(data["base"]), "true|false")
            raise ValueError(f"head.base moved: write method.freeze.base: {frozen}")
        if isinstance(data, dict) and isinstance(data.get("loss"), dict):
            settings = dict(data["loss"])
            name = settings.pop("contrastive", None) or {"embedding": "infonce"}.get(str(data.get("type")), data.get("type", "classification"))
            shown = ", ".join(f"{k}: {v}" for k, v in {"name": name, **settings}.items())
            raise ValueError(f"head.loss moved to its own section: write objective: {{{shown}}} (in a multi-task run, under the task)")
        return data


class TaskConfig(Section):
    """One task of a multi-task run: its data (over the top-level ``data:`` defaults), head, objective and loss weight."""

    data: DataConfig = Field(
        default_factory=DataConfig, description="This task's data; keys it leaves out come from the top-level data: section."
    )
    head: HeadConfig = Field(default_factory=HeadConfig)
    objective: Any = Field(None, description="This task's loss: {name: <objective>, ...}; default: derived from its head.")
    weight: float = Field(1.0, gt=0, description="This task's loss is multiplied by weight.")


class DropoutConfig(Section):
    """Dropout overrides (null keeps the model's own value)."""

    hidden: float | None = Field(
        None, ge=0, lt=1, description="Dropout on hidden states (embeddings, sub-layer outputs); BERT and BLOOM, not Llama (it has none)."
    )
    attention: float | None = Field(None, ge=0, lt=1, description="Dropout on attention probabilities.")


class MethodConfig(Section):
    """Methods applied to the model before training, in their registered order (``tunelab.methods.base``):
    dropout, freeze, a peft family, bottleneck, head. Plug-in methods add their own keys here."""

    dropout: DropoutConfig | None = None
    freeze: FreezeConfig | None = None
    lora: LoraConfig | None = None
    ia3: IA3Config | None = None
    prompt_tuning: PromptTuningConfig | None = None
    prefix_tuning: PrefixTuningConfig | None = None
    bottleneck: BottleneckConfig | None = None
    head: HeadConfig | None = None
    tasks: dict[str, TaskConfig] | None = Field(
        None, description="Multi-task: {task_name: {data, head, weight}}; every task's head sits on one shared body (and its adapters)."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("task_sampling"), dict):
            shown = ", ".join(f"{k}: {v}" for k, v in {"name": "task_mix", **data["task_sampling"]}.items())
            raise ValueError(f"task_sampling moved to the data order: write sampler: {{{shown}}}")
        return data

    @model_validator(mode="after")
    def _one_peft_family(self) -> MethodConfig:
        chosen = [n for n in ("lora", "ia3", "prompt_tuning", "prefix_tuning") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one PEFT adapter family, not {' + '.join(chosen)}")
        if self.tasks is not None and self.head is not None:
            raise ValueError("set a head per task under method.tasks, not method.head as well")
        if self.tasks is not None and len(self.tasks) < 2:
            raise ValueError("method.tasks needs at least two tasks (use method.head for one)")
        if self.freeze is None or self.freeze.base is None:
            heads = [self.head] if self.head else [t.head for t in (self.tasks or {}).values()]
            frozen = bool(heads) and all(h.type in HEADS_WITH_FROZEN_DEFAULT for h in heads) or self.bottleneck is not None
            freeze = self.freeze or FreezeConfig()
            freeze.base = frozen
            self.freeze = freeze
        return self

    def peft_family(self) -> str | None:
        """The PEFT adapter family in use, if any."""
        return next((n for n in ("lora", "ia3", "prompt_tuning", "prefix_tuning") if getattr(self, n) is not None), None)
