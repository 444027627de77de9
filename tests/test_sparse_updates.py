"""train.sparse_updates: only the embedding rows a step's tokens used are updated (lazy Adam)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tests.distributed_helpers import records
from tests.distributed_helpers import train as distributed_train
from tests.train_helpers import train, write_chat_data, write_label_data
from tunelab.errors import UserError
from tunelab.train.config import TrainConfig
from tunelab.train.optim import build_optimizer
from tunelab.train.sharding import clip_grad_norm_

HEAD = "model: {name: tiny-bert}\nmethod: {head: {type: classification}, freeze: {base: false}}\n"
SETTINGS = "lr: 0.003, batch_size: 8, schedule: constant, precision: fp32, threads: 1, eval_before: false"


class Toy(nn.Module):
    """An untied embedding and a dense layer: what sparse updates split between two optimizers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.out = nn.Linear(4, 1)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks[0](self.embed(ids))).square().mean()


def _step(model: Toy, optimizer: torch.optim.Optimizer, ids: list[int]) -> None:
    model(torch.tensor(ids)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_rows_no_token_used_are_not_touched_while_adamw_keeps_moving_them():
    cfg = TrainConfig(lr=0.1, sparse_updates=True)
    lazy, dense = Toy(), Toy()
    lazy_optimizer, dense_optimizer = build_optimizer(lazy, cfg), build_optimizer(dense, TrainConfig(lr=0.1))
    assert lazy.embed.sparse and not dense.embed.sparse
    for model, optimizer in ((lazy, lazy_optimizer), (dense, dense_optimizer)):
        _step(model, optimizer, [1, 2])
    torch.testing.assert_close(lazy.embed.weight, dense.embed.weight)  # first step: Adam's update either way
    after_first = lazy.embed.weight.detach().clone()
    for model, optimizer in ((lazy, lazy_optimizer), (dense, dense_optimizer)):
        _step(model, optimizer, [3])
    assert torch.equal(lazy.embed.weight[[0, 1, 2, 4]], after_first[[0, 1, 2, 4]])  # rows 1, 2: not used in step 2
    assert not torch.equal(lazy.embed.weight[3], after_first[3])
    assert not torch.allclose(dense.embed.weight[1], after_first[1])  # AdamW's momentum moves row 1 again
    torch.testing.assert_close(lazy.out.weight, dense.out.weight)  # dense parameters: the recipe's optimizer, unchanged


def test_the_optimizer_state_saves_and_resumes_exactly():
    cfg = TrainConfig(lr=0.1, sparse_updates=True)
    first, second = Toy(), Toy()
    optimizer = build_optimizer(first, cfg)
    _step(first, optimizer, [1, 2])
    second.load_state_dict(first.state_dict())
    resumed = build_optimizer(second, cfg)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # a checkpoint holds copies, not the live moments
    for ids in ([2, 5], [1, 1, 7]):
        _step(first, optimizer, ids)
        _step(second, resumed, ids)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_clipping_a_sparse_gradient_takes_the_same_norm_as_the_dense_one():
    sparse, dense = Toy(), Toy()
    sparse.embed.sparse = True
    for model in (sparse, dense):
        model(torch.tensor([1, 2, 2, 6])).backward()  # row 2 twice: the sparse gradient holds it twice until coalesced
    clip_grad_norm_(list(sparse.parameters()), 0.01)
    clip_grad_norm_(list(dense.parameters()), 0.01)
    assert sparse.embed.weight.grad.is_sparse
    torch.testing.assert_close(sparse.embed.weight.grad.to_dense(), dense.embed.weight.grad)
    torch.testing.assert_close(sparse.out.weight.grad, dense.out.weight.grad)


def test_when_every_step_uses_the_same_rows_a_run_equals_adamw(tmp_path):
    """Eight examples and batches of eight: every step sees the same tokens, so lazy Adam is Adam."""
    data = write_label_data(tmp_path / "d.jsonl", n=8)
    runs = {}
    for sparse in (False, True):
        out = tmp_path / f"sparse_{sparse}"
        out.mkdir()
        runs[sparse] = train(out, HEAD + f"data: {{train: {data}, val_fraction: 0}}\ntrain: {{max_steps: 6, sparse_updates: {str(sparse).lower()}, {SETTINGS}}}\n")
    losses = {sparse: [r["loss"] for r in summary.history if "loss" in r] for sparse, summary in runs.items()}
    assert len(losses[True]) == 6 and losses[True][-1] < losses[True][0]
    # SparseAdam adds eps before the bias correction, AdamW after (docs/sparse_updates.md): a few 1e-5 apart by step 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_a_run_with_sparse_updates_trains_and_records_it(tmp_path):
    data = write_label_data(tmp_path / "d.jsonl", n=96)
    settings = SETTINGS.replace("eval_before: false", "eval_before: true")
    summary = train(tmp_path, HEAD + f"data: {{train: {data}, val_fraction: 0.2}}\ntrain: {{max_steps: 24, sparse_updates: true, {settings}}}\n")
    assert summary.eval_after["eval_loss"] < 0.5 * summary.eval_before["eval_loss"]
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    # two fp32 moments per parameter (SparseAdam keeps them dense too; AdamW adds a step counter per tensor)
    assert written["optimizer_state_bytes"] == pytest.approx(8 * summary.trainable_params, rel=1e-3)


@pytest.mark.parametrize(("recipe", "message"), [
    ("model: {name: tiny-llama}\ntrain: {max_steps: 1, sparse_updates: true}\n", "tied to the output head"),
    ("model: {name: tiny-bert}\nmethod: {head: {type: classification}, lora: {r: 4}}\ntrain: {max_steps: 1, sparse_updates: true}\n", "frozen"),
    (HEAD + "train: {max_steps: 1, sparse_updates: true, optimizer: lion}\n", "SparseAdam"),
    (HEAD + "train: {max_steps: 1, sparse_updates: true, weight_decay: 0.1, decay_norms_biases_embeddings: true}\n", "no weight decay"),
])
def test_where_sparse_updates_cannot_pay_the_recipe_is_refused_in_one_line(tmp_path, recipe, message):
    data = (write_chat_data if "llama" in recipe else write_label_data)(tmp_path / "d.jsonl", n=16)
    with pytest.raises(UserError, match=message) as error:
        train(tmp_path, recipe + f"data: {{train: {data}, val_fraction: 0}}\n")
    assert "\n" not in str(error.value)


def test_strategies_that_split_the_model_are_refused_at_validation():
    with pytest.raises(ValueError, match="does not combine with strategy fsdp"):
        TrainConfig(sparse_updates=True, distributed={"strategy": "fsdp"})
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(sparse_updates=True, compile=True)
    with pytest.raises(ValueError, match="grad_compression"):
        TrainConfig(sparse_updates=True, distributed={"grad_compression": {"method": "fp16"}})


def test_backends_other_than_gloo_are_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    with pytest.raises(UserError, match="on gloo only, not nccl"):
        build_optimizer(Toy(), TrainConfig(lr=0.1, sparse_updates=True))


def test_under_ddp_the_rows_are_averaged_like_dense_gradients(tmp_path):
    """Two gloo processes, eight training examples and a global batch of eight: every step uses the
    same rows, so a ddp run with sparse updates trains as a ddp run with dense AdamW does."""
    data = write_label_data(tmp_path / "d.jsonl", n=9)  # val_fraction 0.1: one for validation
    head = "{head: {type: classification}, freeze: {base: false}}"
    runs = {sparse: distributed_train(tmp_path, f"ddp_sparse_{sparse}", 2, model="tiny-bert", method=head, steps=4, strategy="ddp",
                                      data=data, extra=(f"train.sparse_updates={str(sparse).lower()}",))
            for sparse in (False, True)}
    losses = {sparse: [r["loss"] for r in records(run, "train")] for sparse, run in runs.items()}
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def _sparse_and_dense_ddp_gradients(rank: int, out: str) -> None:
    """One of two gloo processes: the embedding gradient DDP averages, dense and sparse."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29951")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        embedding = nn.Embedding(10, 4, sparse=sparse)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(embedding, nn.Linear(4, 1)))
        model(torch.tensor([1, 2, 2] if rank == 0 else [2, 5])).square().mean().backward()
        grad = embedding.weight.grad
        grads[sparse] = grad.coalesce().to_dense() if grad.is_sparse else grad
    if rank == 0:
        torch.save(grads, out)
    # Drop DDP's reducer while the default group still holds the process group, then let gloo's
    # worker threads finish with the sparse all-reduce (its last reference, dropped on a worker,
    # needs the GIL): otherwise the reducer's deallocation at return can destroy the group, whose
    # destructor joins those workers while holding the GIL, and the process hangs (torch 2.13).
    del model
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_averages_sparse_embedding_gradients_exactly_as_dense_ones(tmp_path):
    out = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(_sparse_and_dense_ddp_gradients, args=(out,), nprocs=2)
    grads = torch.load(out)
    assert grads[False].abs().sum() > 0 and torch.equal(grads[True], grads[False])
