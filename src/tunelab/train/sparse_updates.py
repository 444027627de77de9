"""Sparse updates (``train.sparse_updates``): embedding rows that no token of the step used are not touched.

Why: a step of a few thousand tokens reads a few hundred rows of a 30k-250k-row input embedding,
yet its dense gradient is a whole ``[vocab, hidden]`` tensor that is zeroed, accumulated, clipped
and handed to AdamW, which then rewrites every row (its moments decay and its momentum keeps
moving rows no token asked about). With sparse gradients (PyTorch's ``nn.Embedding(sparse=True)``)
a step carries only the rows its tokens used, and PyTorch's ``SparseAdam`` updates only those rows
("lazy Adam": a row's moments advance when its token occurs). Every other parameter keeps the
recipe's optimizer. That is a change of semantics for rare tokens, so it is opt-in and its effect
on accuracy is measured next to the time and memory it saves (``bench/sparse_updates.py``).

Applies to a trainable input embedding that nothing else shares: a head tied to the embedding
(SmolLM2, most small decoders) gets a gradient in every row from the softmax, so there is nothing
sparse to exploit and the recipe is refused with that reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.errors import UserError

WHERE = "train.sparse_updates"


def sparse_embedding(model: nn.Module) -> nn.Embedding:
    """The model's input embedding, switched to sparse gradients; refused where that cannot pay."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Embedding):
        raise UserError("this model has no input embedding table to update sparsely", where=WHERE, hint="remove train.sparse_updates")
    if not embedding.weight.requires_grad:
        raise UserError("the input embedding is frozen (an adapter method or method.freeze): no embedding rows are updated",
                        where=WHERE, hint="remove train.sparse_updates, or train the embedding (full fine-tuning)")
    holders = sum(p is embedding.weight for module in model.modules() for p in module.parameters(recurse=False))
    if holders > 1:
        raise UserError("the input embedding is tied to the output head, whose gradient reaches every row: nothing is sparse",
                        where=WHERE, hint="remove train.sparse_updates (it pays for models with an untied embedding: encoders, large decoders)")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if distributed and torch.distributed.get_backend() != "gloo":  # DDP averages sparse gradients on gloo (tested); others untested
        raise UserError(f"sparse embedding gradients are exchanged between processes on gloo only, not {torch.distributed.get_backend()}",
                        where=WHERE, hint="remove train.sparse_updates for this launch")
    embedding.sparse = True
    return embedding


def with_sparse_rows(build_dense: Any, groups: list[dict], embedding: nn.Embedding, cfg: Any) -> torch.optim.Optimizer:
    """The recipe's optimizer over every group but the embedding, plus SparseAdam for its rows."""
    if cfg.optimizer not in ("adam", "adamw"):
        raise UserError(f"sparse rows are updated with Adam (torch's SparseAdam), which does not match train.optimizer {cfg.optimizer}",
                        where=WHERE, hint="use train.optimizer adamw, or remove train.sparse_updates")
    dense_groups, row_groups = [], []
    for group in groups:
        rows = [p for p in group["params"] if p is embedding.weight]
        others = [p for p in group["params"] if p is not embedding.weight]
        if rows and group["weight_decay"]:
            raise UserError("SparseAdam has no weight decay, and this recipe decays the embedding (decay_norms_biases_embeddings)",
                            where=WHERE, hint="set train.decay_norms_biases_embeddings false, or remove train.sparse_updates")
        if rows:
            row_groups.append({**group, "params": rows})
        if others:
            dense_groups.append({**group, "params": others})
    rows = torch.optim.SparseAdam(row_groups, lr=row_groups[0]["lr"], betas=cfg.betas)
    return WithSparseRows(build_dense(dense_groups, cfg), rows) if dense_groups else rows


class WithSparseRows(torch.optim.Optimizer):
    """Two optimizers as one: the recipe's for dense gradients and ``SparseAdam`` for embedding rows.

    They share one list of parameter groups (so the schedule sets every group's learning rate) and
    one state (so checkpoints save and resume it like any optimizer's)."""

    def __init__(self, dense: torch.optim.Optimizer, rows: torch.optim.SparseAdam):
        self.dense, self.rows = dense, rows
        super().__init__(dense.param_groups + rows.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups and state (again after a checkpoint is loaded,
        which replaces them)."""
        count = len(self.dense.param_groups)
        self.dense.param_groups, self.rows.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.dense.state = self.rows.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.dense.step(closure)
        self.rows.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

