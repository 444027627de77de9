"""The embedding head: pool a body's token states into one vector, optionally project and normalise.

Pooling modes follow sentence-transformers: ``mean`` over non-pad tokens (what all-MiniLM-L6-v2
was trained with), ``cls`` (the first token, BERT-style) and ``last`` (the last non-pad token,
what a decoder's causal attention lets see the whole text). The embedder is a plain module over
any transformers base model (``AutoModel``), so training needs no new loop code.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Pooling = Literal["mean", "cls", "last"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """``[B, L, H]`` token states -> ``[B, H]``; right padding assumed (as our collators pad)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class Embedder(torch.nn.Module):
    """``body`` (a transformers base model) + pooling + optional linear projection + L2 normalisation."""

    def __init__(self, body: torch.nn.Module, pooling: Pooling, projection: int | None = None, normalize: bool = True):
        super().__init__()
        self.body = body
        self.pooling = pooling
        self.normalize = normalize
        hidden = body.config.hidden_size
        self.projection = torch.nn.Linear(hidden, projection) if projection else None

    @property
    def config(self) -> object:
        return self.body.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeddings = pool(hidden, attention_mask, self.pooling)
        if self.projection is not None:
            embeddings = self.projection(embeddings)
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings

    def gradient_checkpointing_enable(self, **kwargs: object) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)


def default_pooling(is_encoder: bool) -> Pooling:
    """Mean for encoders (bidirectional states), last token for decoders (only it has seen all text)."""
    return "mean" if is_encoder else "last"
