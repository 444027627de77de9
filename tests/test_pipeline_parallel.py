"""Pipeline parallelism (train.distributed.strategy: pp) under torchrun with gloo: two stages
train exactly what one process trains on the same global batch (LoRA and full fine-tuning, Llama
with its tied embedding, Qwen2 with a sliding-window block, and BLOOM, 1F1B and GPipe), evaluate
the same, save an ordinary model, and write sharded checkpoints that finish on one plain process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import FULL, LORA, UNFUSED, final_tensors, load_distributed_settings, records, train
from tunelab.errors import UserError
from tunelab.train.pipeline_parallel import stage_sizes

#: How far a LoRA weight may end from the one-process run's. Adam's normalised steps at lr 0.01 turn
#: float-order differences of the gradients into weight differences: tiny Llama's second-stage
#: ``q_proj.lora_B`` ended 8.0e-6 away with the fused loss of session 32 and 1.16e-5 with session
#: 33's (one softmax kernel instead of ``logsumexp``, another rounding order), the losses equal to 1e-6.
LORA_ATOL = 3e-5
#: One process trains on padded rows too (stages exchange fixed shapes): the same arithmetic.
PADDED = ("data.packing=false", *UNFUSED)  # computed like the stages: padded rows, peft's layers


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of a (model, method) at 2 micro-batches of 4, trained once per module."""
    done: dict[tuple[str, str], Path] = {}

    def run(model: str, method: str) -> Path:
        if (model, method) not in done:
            done[(model, method)] = train(tmp_path_factory.mktemp("one"), "one", 1, model=model, method=method, accum=2, strategy="ddp", extra=PADDED)
        return done[(model, method)]

    return run


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_run(one: Path, piped: Path, weights_atol: float) -> None:
    assert [r["loss"] for r in records(piped, "train")] == pytest.approx([r["loss"] for r in records(one, "train")], rel=1e-6)
    assert [r["eval_loss"] for r in records(piped, "eval")] == pytest.approx([r["eval_loss"] for r in records(one, "eval")], rel=1e-6)
    alone, together = final_tensors(one), final_tensors(piped)
    assert alone.keys() == together.keys()  # an ordinary artifact: the same files and tensor names
    for key, value in alone.items():
        assert torch.allclose(together[key], value, atol=weights_atol), key


@pytest.mark.parametrize(("model", "method", "schedule", "extra"), [
    ("tiny-llama", LORA, "1f1b", ()), ("tiny-llama", FULL, "1f1b", ()), ("tiny-bloom", LORA, "1f1b", ()), ("tiny-bloom", FULL, "gpipe", ()),
    ("tiny-llama", FULL, "gpipe", ("train.gradient_checkpointing=true",)),  # recomputing a stage's blocks changes nothing
    ("tiny-qwen2", LORA, "1f1b", ()),  # its second block (the second stage's first) attends through a sliding window
], ids=["llama-lora-1f1b", "llama-full-tied-1f1b", "bloom-lora-1f1b", "bloom-full-tied-gpipe", "llama-full-tied-gpipe-checkpointing", "qwen2-sliding-lora-1f1b"])
def test_two_stages_train_what_one_process_trains(tmp_path, one_process, model, method, schedule, extra):
    one = one_process(model, method)
    piped = train(tmp_path, "pp", 2, model=model, method=method, accum=2, strategy="pp", extra=(f"train.distributed.pp.schedule={schedule}", *extra))
    # Adam at lr 0.01 amplifies float-order differences in full fine-tuning (docs/scaling_out.md)
    assert_same_run(one, piped, weights_atol=1e-4 if method == FULL else LORA_ATOL)
    if method == FULL:  # each stage keeps Adam's moments of its own blocks only
        assert summary(piped)["optimizer_state_bytes"] < 0.75 * summary(one)["optimizer_state_bytes"]
    assert len(summary(piped)["peak_rss_bytes_per_process"]) == 2 and len(summary(one)["peak_rss_bytes_per_process"]) == 1


def test_example_weights_reach_the_last_stage(tmp_path):
    """data.weight_column travels with the labels to the stage that takes the loss."""
    rows = [{"messages": [{"role": "user", "content": f"#{i} say {w}"}, {"role": "assistant", "content": w.upper()}], "w": 1 + i % 3}
            for i, w in enumerate(["yes", "no", "no"] * 32)]
    data = tmp_path / "weighted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    weighted = ("data.weight_column=w",)
    one = train(tmp_path, "one", 1, accum=2, strategy="ddp", data=data, extra=(*PADDED, *weighted))
    piped = train(tmp_path, "pp", 2, accum=2, strategy="pp", data=data, extra=weighted)
    assert_same_run(one, piped, weights_atol=LORA_ATOL)


def test_a_pipeline_checkpoint_finishes_on_one_plain_process(tmp_path, one_process):
    """Each stage writes its part (torch.distributed.checkpoint); one process stitches them
    together on resume and ends where the uninterrupted one-process run does."""
    half = train(tmp_path, "half", 2, steps=2, accum=2, strategy="pp")
    last = sorted((half / "checkpoints").iterdir())[-1]
    assert len(list((last / "sharded").glob("*.distcp"))) == 2
    train(tmp_path, "resumed", 1, extra=("--resume", str(half), "train.max_steps=4", "train.distributed.strategy=ddp", *UNFUSED))
    straight = final_tensors(one_process("tiny-llama", LORA))
    resumed = final_tensors(half)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=LORA_ATOL), key


def test_pipeline_refusals_are_one_line(tmp_path):
    """1F1B with fewer micro-batches than stages, and a whole checkpoint resumed under pp."""
    whole = train(tmp_path, "whole", 1, steps=2, accum=2, strategy="ddp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731", "-m", "tunelab.cli", "train", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for args, says in [
        ((str(tmp_path / "whole.yaml"), f"output_dir={tmp_path / 'new'}", "train.distributed.strategy=pp", "train.grad_accum=1", "train.batch_size=8"),
         "the 1F1B schedule needs at least as many micro-batches per step as stages (2); train.grad_accum is 1"),
        (("--resume", str(whole), "train.max_steps=4", "train.distributed.strategy=pp"), "strategy pp resumes from sharded checkpoints"),
    ]:
        proc = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True)
        assert proc.returncode != 0
        assert says in proc.stderr
        assert 'File "' not in proc.stderr.split(says)[0][-1000:]  # the rank's line comes without a traceback


def test_stage_sizes():
    assert stage_sizes(30, 4, None) == [8, 8, 7, 7]
    assert stage_sizes(30, 2, [14, 16]) == [14, 16]
    with pytest.raises(UserError, match="must give 2 stages"):
        stage_sizes(30, 2, [10, 10])
    with pytest.raises(UserError, match="2 blocks cannot fill 4 pipeline stages"):
        stage_sizes(2, 4, None)


@pytest.mark.parametrize(("setting", "says"), [
    ("{strategy: ddp, pp: {schedule: gpipe}}", "pp settings apply to strategy pp, not ddp"),
    ("{strategy: pp, pp: {layers: [2, 0]}}", "every stage needs at least one block"),
])
def test_pipeline_settings_are_checked(tmp_path, setting, says):
    with pytest.raises(UserError, match=re.escape(says)):
        load_distributed_settings(tmp_path, setting)
