"""A run directory belongs to one run, resume continues it exactly, and bad places fail before any work."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.train_helpers import recipe_for, write_chat_data
from tunelab.cli import cli
from tunelab.errors import UserError
from tunelab.train.callbacks import Callback
from tunelab.train.run import load_run_recipe, run_training

RUN = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.1}}\n"
    "method: {{lora: {{r: 4, target_modules: all-linear, dropout: 0.1}}}}\n"
    "train: {{lr: 0.01, batch_size: 4, precision: fp32, max_steps: 8, threads: 1}}\n"
)


class InterruptDuringStep(Callback):
    """Ctrl-C after the backward pass of one step: its dropout masks are drawn, its update is not made."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, state):
        if state.step == self.step - 1:
            raise KeyboardInterrupt


def test_resume_after_ctrl_c_mid_step_is_bit_exact_with_dropout(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    (tmp_path / "straight").mkdir()
    run_training(recipe_for(tmp_path / "straight", RUN.format(data=data)), show_progress=False)
    (tmp_path / "cut").mkdir()
    recipe = recipe_for(tmp_path / "cut", RUN.format(data=data))
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, show_progress=False, callbacks=[InterruptDuringStep(6)])
    assert (tmp_path / "cut" / "run" / "checkpoints" / "step-0000005").exists()
    run_training(load_run_recipe(tmp_path / "cut" / "run"), resume=True, show_progress=False)
    a = load_file(str(tmp_path / "straight" / "run" / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "run" / "final" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_dir_that_is_a_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    (tmp_path / "taken").write_text("a file")
    recipe = recipe_for(tmp_path, RUN.format(data=data), f"output_dir={tmp_path / 'taken'}")
    monkeypatch.setattr("tunelab.train.run.prepare", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(UserError, match="output_dir is an existing file"):
        run_training(recipe, show_progress=False)
    with pytest.raises(UserError, match="lies under a file"):
        run_training(recipe_for(tmp_path, RUN.format(data=data), f"output_dir={tmp_path / 'taken' / 'run'}"), show_progress=False)
    (tmp_path / "r.yaml").write_text(RUN.format(data=data) + f"output_dir: {tmp_path / 'taken'}\n")
    result = CliRunner().invoke(cli, ["recipe", "validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "output_dir is an existing file" in result.output


def test_a_run_directory_belongs_to_one_run(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    recipe = recipe_for(tmp_path, RUN.format(data=data), "train.max_steps=4")
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, show_progress=False, callbacks=[InterruptDuringStep(3)])
    with pytest.raises(UserError, match=r"already holds a run .* tunelab train --resume"):
        run_training(recipe, show_progress=False)  # would have appended to its metrics and mixed checkpoints
    run_training(load_run_recipe(tmp_path / "run"), resume=True, show_progress=False)
    summary = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(UserError, match="the run is complete"):
        run_training(load_run_recipe(tmp_path / "run"), resume=True, show_progress=False)
    assert (tmp_path / "run" / "summary.json").read_text() == summary  # never damaged


def test_resume_says_what_it_expects_and_ctrl_c_exits_130(tmp_path, monkeypatch):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    (tmp_path / "other.yaml").write_text(RUN.format(data=data))
    result = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path), str(tmp_path / "other.yaml")])
    assert result.exit_code == 2 and "is not a KEY.PATH=VALUE override" in result.output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tunelab.train.run.run_training", interrupted)
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "other.yaml"), f"output_dir={tmp_path / 'x'}"])
    assert result.exit_code == 130


def test_resume_refuses_a_changed_recipe_and_records_safe_changes(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    recipe = recipe_for(tmp_path, RUN.format(data=data), "train.max_steps=4")
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, show_progress=False, callbacks=[InterruptDuringStep(3)])
    started = (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(UserError, match=r"method.lora.r \(4 -> 8\)"):
        run_training(load_run_recipe(tmp_path / "run", ("method.lora.r=8",)), resume=True, show_progress=False)
    with pytest.raises(UserError, match=r"data.train .*train.lr"):
        run_training(load_run_recipe(tmp_path / "run", ("train.lr=0.05", f"data.train={tmp_path / 'other.jsonl'}")), resume=True, show_progress=False)
    run_training(load_run_recipe(tmp_path / "run", ("train.max_steps=6",)), resume=True, show_progress=False)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == started  # the record of the first steps is kept
    logged = [line for line in (tmp_path / "run" / "resume_changes.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and '"train.max_steps": [4, 6]' in logged[0] and '"from_step": 2' in logged[0]
