"""Run a recipe in a child process and stream its events back (what the service's workers use).

A training run owns process-wide state (torch's thread count and RNG, the environment), so runs
that must not disturb each other, or the process that starts them, each get a fresh interpreter
("spawn"). The child sends every metrics record through a queue; setting ``cancel`` in the parent
stops the child after its current step with a checkpoint, and ``resume=True`` continues it.
The child imports the modules that registered plug-ins in the parent (and any named in
``imports``), so the recipe means the same on both sides.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from tunelab.errors import UserError
from tunelab.plugins import external_plugin_modules
from tunelab.recipe import Recipe
from tunelab.train.loop import EventSink

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when the parent dies. A service killed with
    SIGKILL must not leave a training process writing into a run directory that the restarted
    service resumes from."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)


def _child(data: dict[str, Any], name: str, resume: bool, imports: Sequence[str], events: Any, cancel: Any, parent: int) -> None:
    _die_with_parent(parent)
    try:
        for module in imports:
            importlib.import_module(module)
        from tunelab.recipe import recipe_from_dict
        from tunelab.train.run import run_training

        recipe = recipe_from_dict(data, name=name)
        run_training(recipe, resume=resume, show_progress=False, events=events.put, cancel=cancel)
    except UserError as exc:
        events.put({"type": "error", "user_error": True, "message": exc.message, "where": exc.where, "hint": exc.hint})
    except BaseException as exc:  # the parent re-raises; the child must not die silently
        events.put({"type": "error", "user_error": False, "message": f"{type(exc).__name__}: {exc}"})


def run_in_subprocess(
    recipe: Recipe, *, events: EventSink | None = None, cancel: threading.Event | None = None, resume: bool = False, imports: Sequence[str] = ()
) -> dict[str, Any]:
    """Train ``recipe`` in a fresh process; returns the final ``done`` record (the run summary).

    ``events`` receives every record as the child writes it; ``cancel`` (set from any thread)
    stops the child with a checkpoint. A user error in the child is raised here as a ``UserError``.
    """
    imports = (*imports, *external_plugin_modules())
    context = mp.get_context("spawn")
    stream, stop = context.Queue(), context.Event()
    child = context.Process(target=_child, args=(recipe.model_dump(mode="json"), recipe.name, resume, tuple(imports), stream, stop, os.getpid()), daemon=True)
    child.start()
    done: dict[str, Any] | None = None
    while done is None:
        if cancel is not None and cancel.is_set():
            stop.set()
        try:
            record = stream.get(timeout=0.2)
        except queue_module.Empty:
            if not child.is_alive():
                raise RuntimeError(f"training process exited with code {child.exitcode} without a summary") from None
            continue
        if record.get("type") == "error":
            child.join()
            if record["user_error"]:
                raise UserError(record["message"], where=record.get("where"), hint=record.get("hint"))
            raise RuntimeError(f"training process failed: {record['message']}")
        if events is not None:
            events(record)
        if record.get("type") == "done":
            done = record
    child.join()
    return done
