"""A "two-node" job on loopback: two torchrun launchers meeting through c10d rendezvous train what
one launcher with two processes trains, and when one node's process dies the other node ends
within seconds with one line saying so, not a hang or a C++ traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_helpers import write_chat_data

RECIPE = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.0}}\nmethod: {{lora: {{r: 4, dropout: 0.0}}}}\n"
    "train: {{lr: 0.01, max_steps: {steps}, batch_size: 4, precision: fp32, eval_before: false, save_every: 1000}}\noutput_dir: {out}\n"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TRAIN = ["-m", "tunelab.cli", "train", "--no-progress"]


def recipe(tmp_path: Path, name: str, steps: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(data=write_chat_data(tmp_path / "d.jsonl"), steps=steps, out=tmp_path / name))
    return path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave them running)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [c for child in children for c in (child, *descendants(child))]


@pytest.fixture
def launched():
    """Launchers a test starts; whatever of them is still running when it ends (a failed
    assertion, a timeout) is killed with its workers, so a hung job cannot hold the port for the next test."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        for pid in [*descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def node(launched: list[subprocess.Popen], path: Path, port: int) -> subprocess.Popen:
    """One of two launchers ("nodes") of a job, one process each, meeting at 127.0.0.1:port."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", path.stem]
    launched.append(subprocess.Popen([*launcher, *TRAIN, str(path)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return launched[-1]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))


def test_two_launchers_train_what_one_launcher_trains(tmp_path, launched):
    one = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29471", *TRAIN, str(recipe(tmp_path, "one", 4))]
    assert subprocess.run(one, env=ENV, capture_output=True).returncode == 0
    nodes = [node(launched, recipe(tmp_path, "two", 4), 29472) for _ in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-2000:]
    expected, trained = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert all(torch.allclose(trained[k], v, atol=1e-6) for k, v in expected.items())


def test_a_dead_process_ends_the_other_node_within_a_minute_with_one_line(tmp_path, launched):
    path = recipe(tmp_path, "long", 100_000)
    nodes = [node(launched, path, 29473) for _ in range(2)]
    metrics = tmp_path / "long" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), "the job did not start training"
        time.sleep(0.5)
    victim = descendants(nodes[1].pid)[0]
    os.kill(victim, signal.SIGKILL)  # the second node's process dies mid-run
    killed_at = time.monotonic()
    _, stderr = nodes[0].communicate(timeout=120)
    assert nodes[0].returncode != 0 and time.monotonic() - killed_at < 60
    assert "another process of this job stopped or stopped answering" in stderr and "--resume" in stderr, stderr[-3000:]
    assert 'File "' not in stderr.split("another process of this job")[0][-2000:]  # no traceback before the line
    nodes[1].communicate(timeout=120)
