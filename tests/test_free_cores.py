"""Training threads follow the cores other processes leave free (train/free_cores.py)."""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tunelab import hardware
from tunelab.train.free_cores import FreeCoreThreads


class FakeMachine:
    """/proc counters and a clock the test moves: 2 cores, this process idle."""

    def __init__(self) -> None:
        self.busy = self.total = 0
        self.clock = 0.0

    def run(self, seconds: float, others_busy: float) -> None:
        ticks = int(seconds * 100)  # 100 ticks per second per core
        self.total += 2 * ticks
        self.busy += int(others_busy * ticks)
        self.clock += seconds

    def sample(self) -> hardware.CpuSample:
        return hardware.CpuSample(self.busy, self.total, 0)


@pytest.fixture
def machine(monkeypatch):
    fake = FakeMachine()
    monkeypatch.setattr(hardware.CpuSample, "now", staticmethod(fake.sample))
    monkeypatch.setattr("tunelab.train.free_cores.time.monotonic", lambda: fake.clock)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield fake
    torch.set_num_threads(threads)


def test_threads_leave_a_core_to_a_process_that_keeps_it_busy_and_take_it_back(machine):
    callback = FreeCoreThreads(window_s=2.0)
    state = SimpleNamespace(model=torch.nn.Linear(2, 2), step=0)
    callback.on_train_start(state)
    assert callback.active

    def steps(n: int, others_busy: float) -> None:
        for _ in range(n):
            machine.run(0.5, others_busy)
            state.step += 1
            callback.on_step_end(state)

    steps(8, 0.0)
    assert torch.get_num_threads() == 2 and not callback.changes
    steps(4, 1.0)  # one window: not yet
    assert torch.get_num_threads() == 2
    steps(4, 1.0)  # a second window agrees
    assert torch.get_num_threads() == 1
    steps(4, 0.0)
    steps(4, 1.0)  # windows that disagree change nothing
    assert torch.get_num_threads() == 1
    steps(8, 0.0)
    assert torch.get_num_threads() == 2
    assert callback.changes == [(16, 2, 1), (32, 1, 2)]


def test_only_where_tunelab_chooses_the_threads(monkeypatch):
    from tunelab.train.free_cores import _free_core_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert isinstance(_free_core_threads(SimpleNamespace(train=SimpleNamespace(threads=None)), None), FreeCoreThreads)
    assert _free_core_threads(SimpleNamespace(train=SimpleNamespace(threads=2)), None) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _free_core_threads(SimpleNamespace(train=SimpleNamespace(threads=None)), None) is None


def test_a_real_busy_process_takes_a_thread_while_it_runs():
    """The real /proc counters: a busy loop beside a 'training' loop of matmuls on every core."""
    cores = len(os.sched_getaffinity(0))
    idle = hardware.CpuSample.now()
    time.sleep(0.3)
    if cores < 2 or idle is None or (hardware.CpuSample.now().others_busy_since(idle)) > 0.3:
        pytest.skip("needs 2+ cores and an otherwise idle machine: the test measures another process's load")
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    callback = FreeCoreThreads(window_s=0.3)
    state = SimpleNamespace(model=torch.nn.Linear(2, 2), step=0)
    a = torch.randn(256, 256)

    def train_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(20):
                a @ a
            state.step += 1
            callback.on_step_end(state)

    try:
        callback.on_train_start(state)
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            train_for(2.0)
            assert torch.get_num_threads() == cores - 1
        finally:
            loop.kill()
            loop.wait()
        train_for(2.0)
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(threads)
