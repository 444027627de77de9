"""A run directory belongs to one run, resume continues it exactly, and bad places fail before any work."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.train_helpers import recipe_for, write_chat_data
from tunelab.atomic import is_disk_full, read_jsonl
from tunelab.cli import cli
from tunelab.errors import UserError
from tunelab.recipe import load_recipe
from tunelab.rundir import holds_a_run, list_checkpoints
from tunelab.train import checkpoint
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
    write_chat_data(tmp_path / "other.jsonl", n=32, seed=1)
    with pytest.raises(UserError, match=r"data.train .*train.lr"):
        run_training(load_run_recipe(tmp_path / "run", ("train.lr=0.05", f"data.train={tmp_path / 'other.jsonl'}")), resume=True, show_progress=False)
    run_training(load_run_recipe(tmp_path / "run", ("train.max_steps=6",)), resume=True, show_progress=False)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == started  # the record of the first steps is kept
    logged = [line for line in (tmp_path / "run" / "resume_changes.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and '"train.max_steps": [4, 6]' in logged[0] and '"from_step": 2' in logged[0]


class Crash(Callback):
    """An ordinary exception (not Ctrl-C) at the end of a step: no checkpoint is written for it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            raise RuntimeError("crash")


def test_extending_a_completed_run_and_restarting_one_that_never_checkpointed(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    run_training(recipe_for(tmp_path, RUN.format(data=data), "train.max_steps=4"), show_progress=False)
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    extended = run_training(load_run_recipe(tmp_path / "run", ("train.max_steps=6",)), resume=True, show_progress=False)
    assert extended.steps == 6 and extended.tokens_seen > first["tokens_seen"]  # totals carry on over the whole run
    assert json.loads((tmp_path / "run" / "summary-step-4.json").read_text()) == first  # the shorter run stays on record
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    with pytest.raises(RuntimeError, match="crash"):
        run_training(recipe_for(crashed, RUN.format(data=data), "train.log_every=1"), show_progress=False, callbacks=[Crash(2)])
    assert not list_checkpoints(crashed / "run") and read_jsonl(crashed / "run" / "metrics.jsonl")
    summary = run_training(load_run_recipe(crashed / "run"), resume=True, show_progress=False)
    assert summary.steps == 8
    steps = [r["step"] for r in read_jsonl(crashed / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 9))  # the crashed attempt's records are gone, not mixed in


@pytest.fixture
def small_disk(tmp_path):
    """A folder on an 8 MB tmpfs (root), and a function that fills what is left of it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root to mount a size-limited tmpfs (the fault-injection test covers this case)")

    def fill() -> None:
        with open(mount / "filler", "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()

    yield mount, fill
    subprocess.run(["umount", "-l", str(mount)], check=False)


class AtStep(Callback):
    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_step_end(self, state):
        if state.step == self.step:
            self.action()


def test_a_full_disk_says_so_in_one_line_and_keeps_the_last_checkpoint(tmp_path, small_disk):
    mount, fill = small_disk
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    recipe = recipe_for(mount, RUN.format(data=data), "train.save_every=2", "train.log_every=100")
    with pytest.raises(UserError) as caught:
        run_training(recipe, show_progress=False, callbacks=[AtStep(3, fill)])
    message = str(caught.value)
    assert "disk full while writing checkpoint step 4" in message and "MB free" in message and "needs about" in message
    assert "continues from step 2" in message and "\n" not in message
    assert [p.name for p in list_checkpoints(mount / "run")] == ["step-0000002"]  # the previous one survives, whole
    assert not list((mount / "run" / "checkpoints").glob(".*"))  # no half-written temporaries
    (mount / "filler").unlink()
    assert run_training(load_run_recipe(mount / "run"), resume=True, show_progress=False).steps == 8


def test_disk_full_is_recognised_however_the_writer_reports_it(tmp_path, monkeypatch):
    """Without root: a fault-injecting writer raises what safetensors raises on ENOSPC."""
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    real_save = checkpoint.save_file

    def save_file(tensors, path):
        if "step-0000004" in path:
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    with pytest.raises(UserError, match=r"disk full while writing checkpoint step 4 .* continues from step 2"):
        run_training(recipe_for(tmp_path, RUN.format(data=data), "train.save_every=2"), show_progress=False)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    torch_error.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(torch_error) and not is_disk_full(RuntimeError("unexpected pos 576 vs 534"))


KILL_RUN = RUN.replace("max_steps: 8", "max_steps: 24, save_every: 3, log_every: 1")


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_run_that_cannot_resume(tmp_path):
    """SIGKILL a real `tunelab train` at random offsets (seeded); every run directory it leaves
    either resumes to the very adapter an uninterrupted run makes, or holds nothing yet."""
    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    (tmp_path / "straight").mkdir()
    straight = run_training(recipe_for(tmp_path / "straight", KILL_RUN.format(data=data)), show_progress=False)
    expected = load_file(str(tmp_path / "straight" / "run" / "final" / "adapter" / "adapter_model.safetensors"))
    command = [sys.executable, "-m", "tunelab.cli", "train", str(tmp_path / "straight" / "recipe.yaml"), "--no-progress"]
    rng = random.Random(12)
    for attempt in range(4):
        run_dir = tmp_path / f"killed-{attempt}"
        proc = subprocess.Popen([*command, f"output_dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (run_dir / "recipe.yaml").exists() and proc.poll() is None:  # the model has loaded
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.2) * straight.seconds)  # somewhere in training, checkpointing or saving
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (run_dir / "recipe.yaml").exists():
            continue  # killed while loading: nothing written that a new run could mix with
        if holds_a_run(run_dir):
            with pytest.raises(UserError, match="already holds a run .*--resume"):
                run_training(load_recipe(tmp_path / "straight" / "recipe.yaml", [f"output_dir={run_dir}"]), show_progress=False)
        if (run_dir / "summary.json").exists():
            continue  # killed after it had finished (the complete-run refusal has its own test)
        run_training(load_run_recipe(run_dir), resume=True, show_progress=False)
        got = load_file(str(run_dir / "final" / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(expected[k], got[k]) for k in expected)
        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"]
        assert steps == list(range(1, 25))
        assert not [p for p in run_dir.rglob(".*") if p.name.endswith((".tmp", ".old"))]
