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



def relation_log_probs(a: torch.Tensor, b: torch.Tensor, heads_a: int, heads_b: int, *, causal: bool) -> torch.Tensor:
    """Self-attention-style relations of one sequence: per head, ``softmax(a_h · b_hᵀ / √d)`` over
    positions, as log-probabilities ``[heads_a, T, T]``.

    ``a`` ``[T, width_a]`` is split into ``heads_a`` heads and ``b`` into ``heads_b`` (each of
    ``b``'s heads serves ``heads_a / heads_b`` of ``a``'s, as grouped-query attention shares keys).
    With ``a = q, b = k`` and the model's head counts this is the attention map itself (MiniLM);
    with ``a = b`` (queries, keys or values) split into any number of relation heads it is
    MiniLMv2's relation, which compares models whose head counts differ. ``causal`` hides later
    positions, as a decoder does."""
    length, dtype = a.shape[0], torch.promote_types(a.dtype, torch.float32)
    a_heads = a.to(dtype).view(length, heads_a, -1).transpose(0, 1)
    b_heads = b.to(dtype).view(length, heads_b, -1).transpose(0, 1).repeat_interleave(heads_a // heads_b, dim=0)
    scores = a_heads @ b_heads.transpose(1, 2) / math.sqrt(a_heads.shape[-1])
    if causal:
        later = torch.ones(length, length, dtype=torch.bool, device=a.device).triu(1)
        scores = scores.masked_fill(later, float("-inf"))
    return F.log_softmax(scores, dim=-1)


def relation_kd(log_student: torch.Tensor, log_teacher: torch.Tensor) -> torch.Tensor:
    """Per query position, KL(teacher relation ‖ student relation) averaged over heads (``[T]``);
    hidden (masked) positions have probability zero on both sides and add nothing."""
    p_t = log_teacher.exp()
    terms = p_t * (log_teacher - log_student)
    return torch.where(p_t > 0, terms, torch.zeros_like(terms)).sum(-1).mean(0)
