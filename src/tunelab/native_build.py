"""Build a C++ extension for this machine's CPU on first use, cached on disk.

Used by tunelab's own kernels (``compress.sparse_kernels``, ``train.block_kernels``). Compiled with
``-O3 -march=native`` by ``torch.utils.cpp_extension`` (g++, and ninja from pip) into
``<tunelab cache>/kernels/<name>``, where the name carries a hash of the source, the flags, the CPU's
feature flags and the torch version: the CPU changes between machines, and a binary built for
AVX-512 must not run elsewhere. A first build takes ~30-60 s and says so; later processes import
the built library directly, in milliseconds. Where it cannot be built (no compiler), the caller
gets None, once, with a warning, and keeps its PyTorch path.

torch's ``load_inline`` takes a lock file in the build directory before it even checks whether
anything needs building, and waits, with no time limit, for any lock it finds to disappear. A
process killed while it holds it (SIGKILL a second into a run, the OOM killer) leaves it there:
every later run then hung in its first step (a test suite did, session 36). So a built library is
imported without ``load_inline``, and a lock older than any build is removed before building.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
#: A build lock older than this was left by a killed builder (a build takes ~30-60 s).
STALE_LOCK_SECONDS = 600


def build_name(prefix: str, source: str, flags: list[str]) -> str:
    """The extension's name: ``prefix`` and a hash of the source, the flags, the CPU's feature flags,
    the torch version and the Python ABI (the library is a Python extension module)."""
    from tunelab.hardware import cpu_flags

    key = "|".join([source, " ".join(flags), " ".join(sorted(cpu_flags())), torch.__version__, sys.implementation.cache_tag or ""])
    return f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _environment_bin_on_path() -> Iterator[None]:
    """torch looks for ``ninja`` on PATH; the pip-installed one sits beside this Python, which is not
    on PATH when the environment is not activated (``.venv/bin/tunelab ...``)."""
    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{previous}"
    try:
        yield
    finally:
        os.environ["PATH"] = previous


def _import_built(name: str, directory: Path) -> ModuleType | None:
    """The extension already built in ``directory``, imported as the Python module it is; None if
    there is none, or only a partial one (a build killed while linking: built again)."""
    library = directory / f"{name}.so"
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def clear_stale_lock(directory: Path, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """Remove ``directory``'s build lock if it is older than ``max_age`` seconds (left by a builder
    that was killed: torch would wait on it forever); whether one was removed."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age:
        return False
    logger.warning("removing a build lock left %.0f min ago by a process that did not finish: %s", age / 60, lock)
    lock.unlink(missing_ok=True)
    return True


def build_extension(prefix: str, source: str, functions: list[str], what: str, fallback: str, flags: list[str] = FLAGS) -> ModuleType | None:
    """The compiled extension (built on first use in this machine's cache), or None if it cannot be
    built; ``what`` names it and ``fallback`` says what runs instead, in the warnings."""
    from torch.utils.cpp_extension import load_inline

    from tunelab.models.cache import cache_root

    name = build_name(prefix, source, flags)
    directory = cache_root() / "kernels" / name
    built = _import_built(name, directory)
    if built is not None:
        return built
    if shutil.which("g++") is None:  # torch would try c++ and print a page of warnings first
        logger.warning("no C++ compiler (g++) on PATH: %s", fallback)
        return None
    clear_stale_lock(directory)
    first_build = not any(directory.glob("*.so"))
    if first_build:
        logger.warning("building the %s for this CPU (once, ~30-60 s) in %s", what, directory)
    started = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _environment_bin_on_path():
            module = load_inline(name, cpp_sources=[source], functions=functions, extra_cflags=flags,
                                 extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    except Exception as error:  # no compiler, no ninja, no headers: the PyTorch path still works
        logger.warning("the %s could not be built (%s): %s", what,
                       str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__, fallback)
        return None
    if first_build:
        logger.warning("built the %s in %.0f s", what, time.perf_counter() - started)
    return module
