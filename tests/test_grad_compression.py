"""Gradient compression as DDP communication hooks: off equals plain DDP, top-k at 100% equals the
dense all-reduce, error feedback loses nothing, the bytes each method sends are what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.train_helpers import write_chat_data
from tunelab.train.config import GradCompressionConfig
from tunelab.train.grad_compression import register_compression


@pytest.fixture
def one_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp_gradients(method: str, steps: list[torch.Tensor], **settings) -> tuple[list[torch.Tensor], object]:
    """What DDP leaves in ``.grad`` after each step of a linear layer whose gradient is ``steps[i]``
    (the gradient of w . x with respect to w is x)."""
    layer = torch.nn.Linear(len(steps[0]), 1, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(layer)
    state = register_compression(ddp, GradCompressionConfig(method=method, **settings))
    out = []
    for target in steps:
        layer.weight.grad = None
        ddp(target.unsqueeze(0)).sum().backward()
        out.append(layer.weight.grad.detach().clone().squeeze())
    return out, state


def test_top_k_error_feedback_sends_everything_eventually_and_sign_is_the_scaled_sign(one_process):
    torch.manual_seed(0)
    grads = [torch.randn(64) for _ in range(3)]
    sent, state = ddp_gradients("topk", grads, ratio=0.25)
    for g in sent:
        assert int((g != 0).sum()) == 16, "a quarter of the entries are sent"
    residual = state.residuals["weight"]
    assert torch.allclose(sum(sent) + residual, sum(grads), atol=1e-5), "what was not sent waits in the residual"
    dense, _ = ddp_gradients("topk", grads[:1], ratio=1.0)
    assert torch.allclose(dense[0], grads[0]), "top-k at 100% is the dense gradient"
    signed, state = ddp_gradients("sign", grads[:1])
    assert torch.allclose(signed[0], grads[0].sign() * grads[0].abs().mean())
    sent_bytes, dense_bytes = state.take_counts()
    assert sent_bytes == 4 + 64 // 8 and dense_bytes == 64 * 4, "one bit per entry plus the scale"


RECIPE = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.0}}\nmethod: {{lora: {{r: 4, dropout: 0.0, target_modules: all-linear}}}}\n"
    "train: {{lr: 0.01, max_steps: {steps}, batch_size: 4, precision: fp32, eval_before: false, schedule: constant, save_every: 2, keep_last: 4{extra}}}\n"
    "output_dir: {out}\n"
)


def torchrun(name: str, *args: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(29600 + sum(map(ord, name)) % 300),
                "-m", "tunelab.cli", "train", "--no-progress", *args]
    proc = subprocess.run(launcher, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]


def launch(tmp_path: Path, name: str, data: Path, compression: str | None, steps: int = 4) -> Path:
    out = tmp_path / name
    extra = f", distributed: {{grad_compression: {compression}}}" if compression else ""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(data=data, steps=steps, extra=extra, out=out))
    torchrun(name, str(recipe))
    return out


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))


def step_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_compression_off_is_plain_ddp_and_top_k_at_100_percent_is_dense(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    plain = adapter(launch(tmp_path, "plain", data, None))
    counted_run = launch(tmp_path, "none", data, "{method: none}")
    counted, dense_topk = adapter(counted_run), adapter(launch(tmp_path, "topk100", data, "{method: topk, ratio: 1.0}"))
    for key, value in plain.items():
        assert torch.equal(counted[key], value), "the counting hook is the plain all-reduce"
        assert torch.allclose(dense_topk[key], value, atol=1e-6), key
    records = step_records(counted_run)
    assert all(r["comm_bytes"] == r["comm_dense_bytes"] > 0 for r in records)


@pytest.mark.parametrize(("compression", "ratio"), [("{method: fp16}", (0.5, 0.5)), ("{method: topk, ratio: 0.05}", (0.09, 0.11)),
                                                    ("{method: sign}", (1 / 32, 1 / 30)), ("{method: powersgd, rank: 1, start_step: 2}", (0.0, 0.5))])
def test_each_compression_trains_and_sends_the_bytes_it_says(tmp_path, compression, ratio):
    data = write_chat_data(tmp_path / "d.jsonl")
    records = step_records(launch(tmp_path, "run", data, compression))
    last = records[-1]  # powersgd compresses from its start step on
    assert ratio[0] <= last["comm_bytes"] / last["comm_dense_bytes"] <= ratio[1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_resume_restores_every_process_residuals(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    straight = adapter(launch(tmp_path, "straight", data, "{method: topk, ratio: 0.05}"))
    half = launch(tmp_path, "half", data, "{method: topk, ratio: 0.05}", 2)
    assert (half / "checkpoints" / "step-0000002" / "process_state.pt").exists()
    torchrun("resumed", "--resume", str(half), "train.max_steps=4")
    resumed = adapter(half)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key
