"""The distillation losses as plain tensor functions (no models), so each is tested against a
reference computation on its own.

Every function returns one loss per position (or per vector); the objectives sum them, so
gradient accumulation and data parallelism stay exact (see ``train.objectives.base``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward", "reverse", "js"]


def logit_kd(
    student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, divergence: Divergence = "forward", top_k: int | None = None
) -> torch.Tensor:
    """Per-position divergence between the teacher's and the student's next-token distributions at
    ``temperature``, times T² (Hinton et al.: keeps the gradient's scale independent of T).

    ``forward`` is KL(teacher ‖ student) (mode-covering, the classic KD), ``reverse`` is
    KL(student ‖ teacher) (mode-seeking, MiniLLM), ``js`` the Jensen-Shannon divergence (bounded,
    symmetric). ``top_k`` keeps only each position's k most likely teacher tokens, renormalised:
    the teacher's side then costs k numbers per position instead of the vocabulary (what a cache
    stores); with k = vocabulary it is exactly the full loss.
    """
    if top_k is not None and top_k < teacher.shape[-1]:
        values, index = teacher.topk(top_k, dim=-1)
        return sparse_logit_kd(student, values, index, temperature=temperature, divergence=divergence)
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return divergence_terms(log_s, log_t, divergence) * temperature**2


def sparse_logit_kd(
    student: torch.Tensor, teacher_values: torch.Tensor, teacher_index: torch.Tensor, *, temperature: float = 1.0, divergence: Divergence = "forward"
) -> torch.Tensor:
    """``logit_kd`` from the teacher's k largest logits and their token ids only (what a teacher
    cache stores): the teacher's distribution renormalised over those k tokens, the student's
    log-probabilities (over the whole vocabulary) read at the same tokens."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, teacher_index)
    log_t = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    return divergence_terms(log_s, log_t, divergence) * temperature**2


def divergence_terms(log_s: torch.Tensor, log_t: torch.Tensor, divergence: Divergence) -> torch.Tensor:
    """Per-row divergence from log-probabilities over the same support (last dimension)."""
    p_t = log_t.exp()
    if divergence == "forward":
        return (p_t * (log_t - log_s)).sum(-1)
    p_s = log_s.exp()
    if divergence == "reverse":
        return (p_s * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
    return 0.5 * (p_t * (log_t - log_m)).sum(-1) + 0.5 * (p_s * (log_s - log_m)).sum(-1)


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, kind: Literal["mse", "cosine"]) -> torch.Tensor:
    """Per-vector distance between student and teacher hidden states of the same width (FitNets:
    mean squared error; or 1 - cosine similarity, which ignores the states' scale)."""
    if kind == "mse":
        return (student.float() - teacher.float()).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)

