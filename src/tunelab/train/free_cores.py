"""Training threads that follow the cores other processes leave free, step by step.

The thread count chosen at start (``hardware.configure_threads``) is right only while the machine
stays as it was: a job that starts beside a 2-thread run on 2 cores makes every GEMM wait for a
descheduled thread (~15x slower steps, measured on the 2-core CI machine), and a run that started
beside a busy process keeps 1 thread after that process ends (the throughput benchmark's tunelab
side, started while a test ran for a few seconds, trained all 12 steps at 1 thread: 402 tokens/s
against 595-696 at 2 threads).
So between steps this callback reads how many cores other processes used since it last looked
(``/proc/stat`` counters, no waiting) and moves the thread count to the cores left, once two
consecutive windows of at least ``WINDOW_S`` seconds agree. It acts only where tunelab chose the
threads (neither ``train.threads`` nor ``OMP_NUM_THREADS``), on CPU, in a single-process run.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from tunelab import hardware
from tunelab.train.callbacks import Callback, TrainState, register_callback

#: The shortest window the other processes' load is judged over: long enough that one burst (a
#: command starting) does not move the threads, short enough to react within a few steps.
WINDOW_S = 2.0


class FreeCoreThreads(Callback):
    """Sets ``torch.set_num_threads`` to the cores other processes leave free, as they change."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.active = False
        self.mark: hardware.CpuSample | None = None
        self.mark_time = 0.0
        self.proposed: int | None = None
        #: (step, threads before, threads after) of every change this run.
        self.changes: list[tuple[int, int, int]] = []

    def on_train_start(self, state: TrainState) -> None:
        on_cpu = all(p.device.type == "cpu" for p in state.model.parameters())
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.active = on_cpu and not distributed and self._look() is not None

    def _look(self) -> hardware.CpuSample | None:
        """Start a new window now; returns its first sample."""
        self.mark, self.mark_time = hardware.CpuSample.now(), time.monotonic()
        return self.mark

    def on_step_end(self, state: TrainState) -> None:
        if not self.active or self.mark is None or time.monotonic() - self.mark_time < self.window_s:
            return
        earlier = self.mark
        now = self._look()
        if now is None:
            self.active = False
            return
        busy = now.others_busy_since(earlier)
        wanted = hardware.threads_for(busy)
        current = torch.get_num_threads()
        if wanted == current:
            self.proposed = None
        elif self.proposed != wanted:
            self.proposed = wanted  # a second window must agree
        else:
            torch.set_num_threads(wanted)
            self.changes.append((state.step, current, wanted))
            self.proposed = None
            tqdm.write(f"tunelab: step {state.step}: {current} -> {wanted} threads (other processes keep {busy:.1f} cores busy)")


@register_callback("free_core_threads")
def _free_core_threads(recipe, cfg) -> Callback | None:  # type: ignore[no-untyped-def]
    return FreeCoreThreads() if hardware.threads_are_automatic(recipe.train.threads) else None
