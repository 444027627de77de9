"""FSDP2 (train.distributed.strategy: fsdp) under torchrun with gloo: two sharded processes train
exactly what one process trains on the same global batch (LoRA and full fine-tuning, Llama and
BLOOM), the final artifact is an ordinary model, and checkpoints resume across strategies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_helpers import FULL, LORA, RECIPE, final_tensors, records, train
from tests.train_helpers import write_chat_data


@pytest.mark.parametrize(("model", "method", "accum"), [("tiny-llama", LORA, 1), ("tiny-llama", FULL, 2), ("tiny-bloom", LORA, 1), ("tiny-bloom", FULL, 1)],
                         ids=["llama-lora", "llama-full-accumulated", "bloom-lora", "bloom-full"])
def test_two_sharded_processes_train_what_one_process_trains(tmp_path, model, method, accum):
    one = train(tmp_path, "one", 1, model=model, method=method, bs=8)
    two = train(tmp_path, "two", 2, model=model, method=method, bs=4 // accum, accum=accum)
    assert [r["loss"] for r in records(two, "train")] == pytest.approx([r["loss"] for r in records(one, "train")], rel=1e-5)
    assert [r["eval_loss"] for r in records(two, "eval")] == pytest.approx([r["eval_loss"] for r in records(one, "eval")], rel=1e-5)
    held = [json.loads((run / "summary.json").read_text())["optimizer_state_bytes"] for run in (one, two)]
    assert 0.45 < held[1] / held[0] < 0.55  # each of the two processes keeps half of Adam's moments
    expected, sharded = final_tensors(one), final_tensors(two)
    assert sharded.keys() == expected.keys() and expected  # the same ordinary artifact, full size
    for key, value in expected.items():
        # float summation order (the sharded head's loss is unfused): measured at most 4.6e-5 after
        # 4 full fine-tuning steps of Adam at lr 0.01, which turns tiny gradient differences into updates
        assert torch.allclose(sharded[key], value, atol=1e-4), key


def test_checkpoints_are_full_size_and_resume_across_strategies(tmp_path):
    """fsdp writes the same checkpoint one process would (gathered), and loads any checkpoint
    into its shards: stopping at step 2 and resuming under the other strategy changes nothing."""
    straight = final_tensors(train(tmp_path, "straight", 2))
    sharded_half = train(tmp_path, "sharded-half", 2, steps=2)
    saved = load_file(str(sharded_half / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape == (4, 64)  # gathered, not one shard
    train(tmp_path, "to-ddp", 2, extra=("--resume", str(sharded_half), "train.max_steps=4", "train.distributed.strategy=ddp"))
    ddp_half = train(tmp_path, "ddp-half", 2, steps=2, strategy="ddp")
    train(tmp_path, "to-fsdp", 2, extra=("--resume", str(ddp_half), "train.max_steps=4", "train.distributed.strategy=fsdp"))
    for resumed, atol in ((final_tensors(sharded_half), 1e-6), (final_tensors(ddp_half), 5e-5)):
        for key, value in straight.items():
            # ddp's first two steps sum in another order than fsdp's (the fused loss and q/k/v
            # projections), and Adam at lr 0.01 turns that into updates: measured 1.3e-5 after
            # ddp -> fsdp, 4e-8 after fsdp -> ddp
            assert torch.allclose(resumed[key], value, atol=atol), key


def test_a_run_resumes_on_another_number_of_processes_when_the_global_batch_is_kept(tmp_path):
    """2 sharded processes x batch 4, stopped at step 2, continue on one process x batch 8: the
    steps draw the same examples, so the run ends where the uninterrupted one does. Keeping the
    per-process batch would halve the global batch: refused, with the batch that keeps it."""
    straight = final_tensors(train(tmp_path, "straight", 2))
    half = train(tmp_path, "half", 2, steps=2)
    resume = [sys.executable, "-m", "tunelab.cli", "train", "--no-progress", "--resume", str(half), "train.max_steps=4"]
    refused = subprocess.run(resume, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert refused.returncode == 2 and "changes the global batch from 8 to 4" in refused.stderr and "train.batch_size=8" in refused.stderr
    train(tmp_path, "alone", 1, extra=("--resume", str(half), "train.max_steps=4", "train.batch_size=8"))
    resumed = final_tensors(half)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=1e-5), key


def test_what_fsdp_cannot_do_yet_is_refused_with_the_setting_named(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model="tiny-llama", data=data, method=LORA, steps=2, bs=4, accum=1, strategy="fsdp", out=tmp_path / "r") +
                      "callbacks: [{name: ema}]\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29290", "-m", "tunelab.cli", "train", "--no-progress", str(recipe)]
    proc = subprocess.run(launcher, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert proc.returncode != 0 and "strategy fsdp does not work with the ema callback" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr.split("strategy fsdp")[0][-300:]


def test_sharded_checkpoints_hold_one_file_per_process_and_resume_on_any_number(tmp_path):
    """fsdp.checkpoint: sharded: each of 4 processes writes its own shards (torch.distributed.checkpoint),
    nothing gathered; the checkpoint resumes sharded on 2 processes and plain on 1, each keeping the
    global batch of 8, and ends where the uninterrupted run does."""
    sharded = ("train.distributed.fsdp.checkpoint=sharded",)
    straight = final_tensors(train(tmp_path, "straight", 2))
    for name, processes, batch in (("on-two", 2, 4), ("alone", 1, 8)):
        half = train(tmp_path, f"half-{name}", 4, steps=2, bs=2, extra=sharded)
        written = half / "checkpoints" / "step-0000002"
        assert not (written / "trainable.safetensors").exists()
        assert sorted(p.name for p in (written / "sharded").iterdir()) == [".metadata", *(f"__{rank}_0.distcp" for rank in range(4))]
        train(tmp_path, f"resume-{name}", processes, extra=("--resume", str(half), "train.max_steps=4", f"train.batch_size={batch}"))
        resumed = final_tensors(half)
        for key, value in straight.items():
            assert torch.allclose(resumed[key], value, atol=1e-5), (name, key)
