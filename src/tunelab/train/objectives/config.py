"""Each built-in objective's own settings: the ``objective:`` section once its ``name`` is chosen.

A key belongs to the objective that reads it, so ``focal_gamma`` on a contrastive objective is an
unknown-key error instead of a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.config_base import Section


class WeightedCrossEntropyConfig(Section):
    """Cross-entropy over classes (classification, token_classification), shaped and weighted."""

    class_weights: Literal["auto"] | dict[str, float] | None = Field(
        None, description="{label: weight}, or auto = inverse class frequency in the training split."
    )
    focal_gamma: float = Field(0.0, ge=0, description="Focal loss exponent; 0 is cross-entropy.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class MultiLabelConfig(Section):
    """Binary cross-entropy per label."""

    threshold: float = Field(0.5, gt=0, lt=1, description="A label is predicted when its probability exceeds this.")


class InfoNCEConfig(Section):
    """(anchor, positive[, negative]) rows; every other row's texts are in-batch negatives."""

    temperature: float = Field(0.05, gt=0, description="Softmax temperature over cosine similarities.")


class SimCSEConfig(Section):
    """Unsupervised SimCSE on single texts: two dropout views of each text are its positive pair."""

    temperature: float = Field(0.05, gt=0, description="Softmax temperature over cosine similarities.")


class TripletConfig(Section):
    """Margin loss on cosine distance (the hardest in-batch negative when a row has none)."""

    margin: float = Field(0.5, gt=0, description="Margin in cosine distance.")


class MaskedLMConfig(Section):
    """Masked language modelling for encoders (BERT's 80/10/10 corruption)."""

    mask_rate: float = Field(0.15, gt=0, lt=1, description="Fraction of tokens masked (80% [MASK], 10% random, 10% kept).")
    whole_word: bool = Field(False, description="Mask every token of a chosen word together.")
