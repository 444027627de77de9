"""Retrieval metrics of an embedding model: each query's own document among all documents."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def retrieval_metrics(queries: torch.Tensor, documents: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@k and MRR when query ``i``'s relevant document is ``documents[i]`` and every other
    document is a distractor; similarity is the dot product (cosine on normalised embeddings).
    Ties count against the query (the relevant document ranks after equal scores)."""
    scores = queries.float() @ documents.float().T
    relevant = scores.diagonal().unsqueeze(1)
    rank = (scores >= relevant).sum(dim=1)  # 1 = first
    metrics = {f"recall@{k}": float((rank <= k).float().mean()) for k in ks if k < documents.shape[0]}
    metrics["mrr"] = float((1.0 / rank.float()).mean())
    return metrics
