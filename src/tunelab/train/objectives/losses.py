"""The loss functions of the head objectives, as plain per-example functions of tensors.

Each returns one loss per example (or row), unreduced, so objectives can apply per-example weights
and sum, which keeps gradient accumulation exact (see ``base``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tunelab.errors import UserError


def class_weight_vector(spec: str | dict[str, float] | None, label_names: Sequence[str], counts: Counter[int]) -> torch.Tensor | None:
    """Per-class loss weights: given by name, or ``auto``: inverse class frequency in the training
    split, ``n / (k * n_c)`` (scikit-learn's "balanced"), so every class carries the same total weight."""
    if spec is None:
        return None
    if spec == "auto":
        total, k = sum(counts.values()), len(label_names)
        missing = [label_names[i] for i in range(k) if counts[i] == 0]
        if missing:
            raise UserError(
                f"class_weights: auto needs every class in the training split; {', '.join(missing)} never occurs",
                hint="give objective.class_weights by name instead",
            )
        return torch.tensor([total / (k * counts[i]) for i in range(k)], dtype=torch.float32)
    unknown = sorted(set(spec) - set(label_names))
    if unknown:
        raise UserError(f"class_weights names unknown labels: {', '.join(unknown)}", hint=f"labels are {', '.join(label_names)}")
    return torch.tensor([float(spec.get(name, 1.0)) for name in label_names], dtype=torch.float32)


def weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy per example with class weights, label smoothing and the focal term
    ``(1 - p_target)^gamma`` (Lin et al. 2017), which shrinks the loss of examples already
    classified confidently; ``gamma = 0`` is plain cross-entropy."""
    weight = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
    loss = F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing, reduction="none")
    if focal_gamma:
        p_target = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
        loss = (1 - p_target).pow(focal_gamma) * loss
    return loss


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE per anchor: cross-entropy of picking candidate ``i`` for anchor ``i`` among all
    candidates (the other anchors' positives and any hard negatives are the negatives)."""
    logits = anchors @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=anchors.device), reduction="none")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(a, b, dim=-1)


def triplet_margin(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """``max(0, d(a, p) - d(a, n) + margin)`` per triplet with cosine distance."""
    return F.triplet_margin_with_distance_loss(
        anchors, positives, negatives, distance_function=cosine_distance, margin=margin, reduction="none"
    )


def hardest_negatives(anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """For each anchor, the most similar positive of another row (batch-hard mining)."""
    similarity = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T
    similarity.fill_diagonal_(float("-inf"))
    return positives[similarity.argmax(dim=1)]


def weighted_sum(per_example: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of per-example losses, each times its ``data.weight_column`` weight when the batch has one."""
    weights = batch.get("weights")
    return per_example.sum() if weights is None else (per_example * weights.to(per_example.dtype)).sum()
