"""Launching tiny training runs under torchrun for the distributed-strategy tests, and reading
back what they logged and saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.train_helpers import write_chat_data

RECIPE = (
    "model: {{name: {model}}}\ndata: {{train: {data}, val_fraction: 0.1}}\nmethod: {method}\n"
    "train: {{lr: 0.01, max_steps: {steps}, batch_size: {bs}, grad_accum: {accum}, precision: fp32, schedule: constant, eval_before: false, eval_every: 2, "
    "save_every: 2, keep_last: 4, distributed: {{strategy: {strategy}}}}}\noutput_dir: {out}\n"
)
LORA = "{lora: {r: 4, dropout: 0.0, target_modules: all-linear}}"
FULL = "{freeze: {base: false}}"
#: A one-process run computed as layers split over processes compute: peft's own LoRA layers, no
#: fused MLP, q/k/v or block (their float order differs: the C++ silu·up kernel, the stacked
#: down-projections), so weights after Adam at lr 0.01 stay within the tests' 1e-5.
UNFUSED = ("train.fuse_mlp=false", "train.fuse_qkv=false", "train.fuse_blocks=false")


def train(tmp_path: Path, name: str, processes: int, *, model: str = "tiny-llama", method: str = LORA, steps: int = 4, bs: int = 4,
          accum: int = 1, strategy: str = "fsdp", extra: tuple[str, ...] = (), data: Path | None = None) -> Path:
    out = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    data = data or write_chat_data(tmp_path / "d.jsonl")
    recipe.write_text(RECIPE.format(model=model, data=data, method=method, steps=steps, bs=bs, accum=accum, strategy=strategy, out=out))
    cli = ["-m", "tunelab.cli", "train", "--no-progress", *(extra if "--resume" in extra else (str(recipe), *extra))]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(29300 + sum(map(ord, name)) % 300)]
    command = [*launcher, *cli] if processes > 1 else [sys.executable, *cli]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, "\n".join(errors[-10:])
    return out


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor the final artifact holds (a PEFT adapter or a whole model), by file and name."""
    return {f"{path.relative_to(run)}:{name}": value for path in sorted((run / "final").rglob("*.safetensors")) for name, value in load_file(str(path)).items()}


def load_distributed_settings(tmp_path: Path, settings: str) -> object:
    """A recipe whose ``train.distributed`` is ``settings`` (YAML flow mapping), loaded and validated."""
    from tunelab.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: tiny-llama}}\ntrain: {{distributed: {settings}}}\n")
    return load_recipe(recipe)
