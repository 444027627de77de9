"""One rule per merge method for combining task vectors (peft's merge utilities, the reference
implementations of TIES and DARE), shared by full-weight merges; LoRA merges name peft's own
combination types for the same rules."""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from tunelab.merge.spec import MergeSpec

#: peft ``add_weighted_adapter`` combination per merge method: ``cat`` stacks the adapters, which
#: is the weighted sum of their deltas exactly; the ``*_svd`` ones trim/elect on the full deltas
#: and factor the result back into a LoRA of the requested rank.
PEFT_COMBINATION = {
    "uniform": "cat", "greedy": "cat", "linear": "cat", "task_arithmetic": "cat",
    "ties": "ties_svd", "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd",
}


def combine(vectors: list[torch.Tensor], weights: list[float], spec: MergeSpec) -> torch.Tensor:
    """The merged task vector of one tensor (``spec.method``'s rule, weights already scaled)."""
    w = torch.tensor(weights, dtype=vectors[0].dtype)
    if spec.method == "ties":
        return merge_utils.ties(vectors, w, spec.density, spec.majority_sign)
    if spec.method == "dare_linear":
        return merge_utils.dare_linear(vectors, w, spec.density)
    if spec.method == "dare_ties":
        return merge_utils.dare_ties(vectors, w, spec.density, spec.majority_sign)
    return merge_utils.task_arithmetic(vectors, w)
