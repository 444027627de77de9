"""Requests that wait for the same model are decoded together.

One ``Batcher`` per model in memory (a shared base with its adapters, or a model loaded whole)
owns that model's lock. Requests queue in arrival order; each round takes the oldest request and
every other waiting request for the same adapter (up to ``MAX_BATCH``), decodes them as one batch
(``decoding.decode_batch``) and hands each its pieces through its own queue as they are
released, so streaming still streams. Requests for another adapter of the same base wait for the
next round: the adapter is switched between rounds, never within one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.serve.decoding import Piece, Sampling, decode_batch

#: Rows decoded together at most (memory grows with it: each row keeps its key/value cache).
MAX_BATCH = 16


@dataclass
class _Waiting:
    view: Any  # an ``inference.LoadedModel``: model, tokenizer, adapter key, how to activate it
    ids: torch.Tensor
    sampling: Sampling
    out: queue.Queue = field(default_factory=queue.Queue)


class Batcher:
    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self._waiting: list[_Waiting] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, view: Any, ids: torch.Tensor, sampling: Sampling) -> queue.Queue:
        """Queue one request; its pieces (the last with ``finish_reason``), or an exception, arrive
        on the returned queue."""
        waiting = _Waiting(view, ids, sampling)
        with self._ready:
            self._waiting.append(waiting)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tunelab-decode", daemon=True)
                self._thread.start()
            self._ready.notify()
        return waiting.out

    def _next_round(self) -> list[_Waiting]:
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            key = self._waiting[0].view.key
            group = [w for w in self._waiting if w.view.key == key][:MAX_BATCH]
            self._waiting = [w for w in self._waiting if all(w is not g for g in group)]
        return group

    def _loop(self) -> None:
        while True:
            group = self._next_round()
            view = group[0].view
            try:
                with self.lock, view.activate():
                    for row, piece in decode_batch(view.model, view.tokenizer, [w.ids for w in group], [w.sampling for w in group]):
                        group[row].out.put(piece)
            except Exception as exc:  # every request of the round gets the error instead of hanging
                for waiting in group:
                    waiting.out.put(exc)


def pieces(out: queue.Queue) -> Iterator[Piece]:
    """Iterate a submitted request's pieces until its last one (re-raising a decoding error)."""
    while True:
        item = out.get()
        if isinstance(item, Exception):
            raise item
        yield item
        if item.finish_reason is not None:
            return
