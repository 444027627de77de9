"""The ``compress:`` section: pruning, quantization and activation-sparsity variants measured against the original.

Each variant is a list of steps applied in order to a fresh copy of the model (``[wanda 2:4,
dynamic-int8]`` prunes then quantizes). Every variant becomes one row of the trade-off table,
measured against the uncompressed model in the same run. A step is ``prune: <criterion>``,
``quantize: <format>`` or ``sparsify: activations|gated-mlp``; the key tells them apart, so a
recipe reads like the table it makes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from tunelab.config_base import Section

PruneCriterion = Literal["magnitude", "wanda", "taylor", "mlp", "heads", "blocks"]
QuantFormat = Literal["dynamic-int8", "int8", "int4", "nf4", "ternary", "fixed-point"]


class PruneStep(Section):
    """Remove weights (unstructured or N:M masks) or whole channels, heads or blocks."""

    prune: PruneCriterion = Field(
        description="magnitude/wanda/taylor: zero single weights by that importance; mlp/heads/blocks: remove "
        "MLP channels, attention head groups or decoder blocks (the model really shrinks)."
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction removed (of weights, channels, head groups or blocks).")
    pattern: str | None = Field(None, description="N:M semi-structured pattern such as '2:4' (N kept in every M); replaces sparsity.")
    scope: Literal["row", "layer", "global"] | None = Field(
        None, description="Where the sparsity is exact: per output row (wanda's default), per layer (default) or over all targets."
    )
    sampled: bool = Field(False, description="Importance sampling: prune at random, less important weights more likely.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature: low is close to deterministic, high close to uniform.")
    teacher: str | None = Field(None, description="taylor only: importance from the KL to this teacher model instead of the LM loss.")
    targets: list[str] = Field(default_factory=list, description="Regexes of linear layer names; empty: every linear except the output head.")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            from tunelab.compress.masks import parse_nm

            parse_nm(value)
        return value

    @model_validator(mode="after")
    def _options_fit_the_criterion(self) -> PruneStep:
        if self.prune in ("mlp", "heads", "blocks"):
            used = [name for name in ("pattern", "scope", "teacher") if getattr(self, name) is not None]
            used += ["sampled"] if self.sampled else []
            used += ["targets"] if self.targets else []
            if used:
                raise ValueError(f"option(s) {', '.join(used)} only apply to magnitude/wanda/taylor, not to structured '{self.prune}' pruning")
        if self.teacher and self.prune != "taylor":
            raise ValueError("a teacher only informs taylor pruning")
        return self


class QuantizeStep(Section):
    """Store weights in fewer bits (or quantize activations on the fly: dynamic-int8)."""

    quantize: QuantFormat = Field(
        description="dynamic-int8 (fast on CPU), int8/int4 weight-only with group scales, nf4 (bitsandbytes), "
        "ternary ({-1,0,1}·absmean), fixed-point (per-tensor Q-format)."
    )
    group_size: int | None = Field(128, gt=0, description="Weights sharing one scale (int8/int4/ternary); null: one per output row.")
    bits: int = Field(8, ge=2, le=8, description="fixed-point width in bits (sign included).")
    activations: Literal["per-token", "per-tensor"] = Field(
        "per-token", description="dynamic-int8: one activation scale per token, or per tensor (torch.ao's dynamic quantization, the reference)."
    )
    smooth: float = Field(
        0.8, ge=0, le=1, description="dynamic-int8 per-token: SmoothQuant migration strength α (needs compress.calibration); 0 turns smoothing off."
    )
    targets: list[str] = Field(default_factory=list, description="Regexes of linear layer names; empty: every linear except the output head.")
    keep: list[str] = Field(default_factory=list, description="Regexes of layers kept at full precision (selective precision).")
    keep_sensitive: int = Field(0, ge=0, description="Also keep the N layers a sensitivity scan finds most hurt by this format.")

    @model_validator(mode="after")
    def _activation_options_need_dynamic_int8(self) -> QuantizeStep:
        used = [name for name in ("activations", "smooth") if name in self.model_fields_set]
        if used and self.quantize != "dynamic-int8":
            raise ValueError(f"option(s) {', '.join(used)} only apply to dynamic-int8 (weight-only formats keep activations in float)")
        if self.activations == "per-tensor" and "smooth" in self.model_fields_set and self.smooth:
            raise ValueError("smooth applies to per-token activations; torch.ao's per-tensor path has no smoothing")
        return self


class SparsifyStep(Section):
    """Skip the weights that meet (near-)zero activations when decoding one token at a time."""

    sparsify: Literal["activations", "gated-mlp"] = Field(
        description="activations: inputs of the target linears below a per-layer magnitude threshold count as zero (TEAL); "
        "batch-1 decoding reads only the weight rows of the rest. gated-mlp: a ReLU-fied model's MLPs compute only the "
        "channels their gate opens (exact; of the options, only weights applies)."
    )
    sparsity: float = Field(
        0.5, ge=0, lt=1, description="Fraction of each layer's inputs (the smallest, on compress.calibration text) skipped; "
        "0: exact zeros only (a ReLU-fied model's MLP, see method.activation), the same function."
    )
    weights: Literal["fp32", "int8"] = Field("fp32", description="int8: the weight rows in 8 bits (a scale and offset per input feature; per channel for gated-mlp).")
    targets: list[str] = Field(default_factory=list, description="Regexes of linear layer names; empty: every linear except the output head.")


    @model_validator(mode="after")
    def _gated_mlp_takes_no_options(self) -> SparsifyStep:
        used = [name for name in ("sparsity", "targets") if name in self.model_fields_set]
        if self.sparsify == "gated-mlp" and used:
            raise ValueError(f"option(s) {', '.join(used)} do not apply to sparsify: gated-mlp (it skips exactly the channels a ReLU gate closes)")
        return self


_STEP_KEYS = {"prune": PruneStep, "quantize": QuantizeStep, "sparsify": SparsifyStep}


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((key for key in _STEP_KEYS if key in value), None)
    return next((key for key, cls in _STEP_KEYS.items() if isinstance(value, cls)), None)


Step = Annotated[
    Union[Annotated[PruneStep, Tag("prune")], Annotated[QuantizeStep, Tag("quantize")], Annotated[SparsifyStep, Tag("sparsify")]],
    Discriminator(_step_kind, custom_error_type="step", custom_error_message="a step needs a 'prune:', 'quantize:' or 'sparsify:' key"),
]


class Variant(Section):
    """One compressed model: a name and the steps that make it."""

    name: str = Field(description="Row label and folder name under <run>/compressed/.")
    steps: list[Step] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", value):
            raise ValueError("use letters, digits and . _ + - (it becomes a folder name)")
        return value


class GradualPruning(Section):
    """Magnitude pruning during fine-tuning on a cubic schedule (Zhu & Gupta 2017)."""

    sparsity: float = Field(ge=0, lt=1, description="Final sparsity of every target layer (or overall with scope: global).")
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    start_step: int = Field(0, ge=0, description="Optimizer step where pruning starts.")
    end_step: int | None = Field(None, gt=0, description="Step where the final sparsity is reached (default: the last step).")
    every: int = Field(1, gt=0, description="Recompute masks every N steps (masks are re-applied after every step).")
    scope: Literal["layer", "global"] = "layer"
    targets: list[str] = Field(default_factory=list, description="Regexes of linear layer names; empty: all but the output head and adapters.")


class LotteryTicket(Section):
    """Iterative magnitude pruning with rewinding, in one run: the steps are split into rounds + 1."""

    rounds: int = Field(3, gt=0, description="Pruning rounds (each followed by rewinding and more training).")
    rate: float = Field(0.2, gt=0, lt=1, description="Fraction of the surviving weights pruned per round.")
    rewind_step: int = Field(0, ge=0, description="Surviving weights are reset to their values at this step.")
    targets: list[str] = Field(default_factory=list)


class QuantizationAwareTraining(Section):
    """Fake-quantize layers during fine-tuning; `tunelab compress` with the same format converts exactly."""

    quantize: Literal["int8", "int4", "ternary", "fixed-point"]
    group_size: int | None = Field(128, gt=0)
    bits: int = Field(8, ge=2, le=8)
    targets: list[str] = Field(default_factory=list)


class CompressConfig(Section):
    """Compression variants and how they are measured (empty ``variants``: no compression).

    ``gradual``, ``lottery`` and ``qat`` act during training (as training callbacks); the
    variants run after it.
    """

    gradual: GradualPruning | None = None
    lottery: LotteryTicket | None = None
    qat: QuantizationAwareTraining | None = None

    variants: list[Variant] = Field(default_factory=list)
    heldout: str | None = Field(None, description="Text file for perplexity (fortune '%' separated or blank-line paragraphs).")
    heldout_texts: int = Field(200, gt=0, description="Score the first N texts of the held-out file.")
    calibration: str | None = Field(None, description="Text file for calibration statistics (wanda, taylor, structured, sensitivity).")
    calibration_chunks: int = Field(16, gt=0, description="Calibration sequences of max_length tokens.")
    max_length: int = Field(256, ge=8, description="Tokens per perplexity window and calibration sequence.")
    prefill_tokens: int = Field(128, gt=0, description="Prompt length for the prefill speed measurement.")
    decode_tokens: int = Field(32, gt=1, description="Generated tokens for the decode speed measurement.")
    repeats: int = Field(3, gt=0, description="Speed measurements per variant; the best is reported (contention only slows runs down).")
    threads: int | None = Field(
        None, gt=0, description="CPU threads for compressing and measuring (default: all cores). On a shared machine 1 "
        "is steadier: OpenMP threads that lose their core to another process stall each other.",
    )
    evaluate: bool = Field(
        True, description="Also score every variant on the recipe's eval task when it has one (eval.data, or eval.after_training on data.validation)."
    )
    keep_models: bool = Field(True, description="Keep each compressed model under <run>/compressed/<variant>/.")

    @model_validator(mode="after")
    def _calibrated_steps_need_calibration(self) -> CompressConfig:
        if self.calibration is None:
            for variant in self.variants:
                for step in variant.steps:
                    if isinstance(step, SparsifyStep) and step.sparsify == "activations" and step.sparsity > 0:
                        raise ValueError(
                            f"variant {variant.name!r}: activation thresholds are calibrated on text; set compress.calibration "
                            "(e.g. examples/data/heldout/calibration.txt) or sparsity: 0 (exact zeros only)"
                        )
                    if isinstance(step, QuantizeStep) and step.quantize == "dynamic-int8" and step.activations == "per-token" and step.smooth:
                        raise ValueError(
                            f"variant {variant.name!r}: dynamic-int8 smoothing needs calibration text; set compress.calibration "
                            "(e.g. examples/data/heldout/calibration.txt) or smooth: 0 in that step"
                        )
        return self
