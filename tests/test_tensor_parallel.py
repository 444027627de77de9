"""Tensor parallelism (train.distributed.strategy: tp, and fsdp+tp) under torchrun with gloo:
processes that split every layer train exactly what one process trains on the same global batch
(LoRA and full fine-tuning, Llama and BLOOM), hold their share of the weights, save an ordinary
model, and checkpoints resume on one plain process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import FULL, LORA, UNFUSED, final_tensors, load_distributed_settings, records, train
from tunelab.errors import UserError

CASES = [("tiny-llama", LORA), ("tiny-llama", FULL), ("tiny-bloom", LORA), ("tiny-bloom", FULL)]
CASE_IDS = ["llama-lora", "llama-full", "bloom-lora", "bloom-full"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of a (model, method) at the global batch of 8, trained once per module."""
    done: dict[tuple[str, str], Path] = {}

    def run(model: str, method: str) -> Path:
        if (model, method) not in done:
            # computed as tensor parallelism computes it: Adam at lr 0.01 amplifies another float order past the tolerance below
            done[(model, method)] = train(tmp_path_factory.mktemp("one"), "one", 1, model=model, method=method, bs=8, strategy="ddp", extra=UNFUSED)
        return done[(model, method)]

    return run


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize(("strategy", "processes", "batch", "extra"), [("tp", 2, 8, ()), ("fsdp+tp", 4, 4, ("train.distributed.tp.degree=2",))],
                         ids=["tp2", "fsdp2xtp2"])
@pytest.mark.parametrize(("model", "method"), CASES, ids=CASE_IDS)
def test_split_layers_train_what_one_process_trains(tmp_path, one_process, model, method, strategy, processes, batch, extra):
    one = one_process(model, method)
    split = train(tmp_path, "split", processes, model=model, method=method, bs=batch, strategy=strategy, extra=extra)
    assert [r["loss"] for r in records(split, "train")] == pytest.approx([r["loss"] for r in records(one, "train")], rel=1e-5)
    assert [r["eval_loss"] for r in records(split, "eval")] == pytest.approx([r["eval_loss"] for r in records(one, "eval")], rel=1e-5)
    alone, together = final_tensors(one), final_tensors(split)
    assert alone.keys() == together.keys()  # an ordinary artifact: the same files and tensor names
    tolerance = 1e-4 if method == FULL else 1e-5  # Adam at lr 0.01 amplifies float-order differences (docs/scaling_out.md)
    for key, value in alone.items():
        assert torch.allclose(together[key], value, atol=tolerance), key
    if method == FULL:  # each process keeps 1/N of Adam's moments, but for norms and row-split biases (whole in every tp process)
        share = summary(split)["optimizer_state_bytes"] / summary(one)["optimizer_state_bytes"]
        assert 1 / processes <= share < 1.1 / processes


def test_a_tensor_parallel_checkpoint_finishes_on_one_plain_process(tmp_path, one_process):
    """Checkpoints hold full-size tensors: two tensor-parallel processes stopped at step 2 and
    one process finishing the run (the same global batch: tp processes share theirs) end where
    the uninterrupted one-process run does."""
    half = train(tmp_path, "half", 2, steps=2, bs=8, strategy="tp")
    train(tmp_path, "resumed", 1, extra=("--resume", str(half), "train.max_steps=4", "train.distributed.strategy=ddp", *UNFUSED))
    straight = final_tensors(one_process("tiny-llama", LORA))
    resumed = final_tensors(half)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=1e-5), key


@pytest.mark.parametrize(("setting", "says"), [
    ("{strategy: fsdp+tp}", "fsdp+tp needs train.distributed.tp.degree"),
    ("{strategy: tp, fsdp: {checkpoint: sharded}}", "fsdp settings apply to strategy fsdp or fsdp+tp, not tp"),
    ("{strategy: ddp, tp: {degree: 2}}", "tp settings apply to strategy tp or fsdp+tp, not ddp"),
])
def test_settings_of_another_strategy_are_refused(tmp_path, setting, says):
    with pytest.raises(UserError, match=re.escape(says)):
        load_distributed_settings(tmp_path, setting)
