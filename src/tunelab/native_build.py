"""Build a C++ extension for this machine's CPU on first use, cached on disk.

Used by tunelab's own kernels (``compress.sparse_kernels``, ``train.block_kernels``). Compiled with
``-O3 -march=native`` by ``torch.utils.cpp_extension`` (g++, and ninja from pip) into
``<tunelab cache>/kernels/<name>``, where the name carries a hash of the source, the flags, the CPU's
feature flags and the torch version: the CPU changes between machines, and a binary built for
AVX-512 must not run elsewhere. A first build takes ~30-60 s and says so; later processes load it in
milliseconds. Where it cannot be built (no compiler), the caller gets None, once, with a warning,
and keeps its PyTorch path.
"""

from __future__ import annotations

import contextlib
import hashlib
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


def build_name(prefix: str, source: str, flags: list[str]) -> str:
    """The extension's name: ``prefix`` and a hash of the source, the flags, the CPU's feature flags
    and the torch version."""
    from tunelab.hardware import cpu_flags

    key = "|".join([source, " ".join(flags), " ".join(sorted(cpu_flags())), torch.__version__])
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


def build_extension(prefix: str, source: str, functions: list[str], what: str, fallback: str, flags: list[str] = FLAGS) -> ModuleType | None:
    """The compiled extension (built on first use in this machine's cache), or None if it cannot be
    built; ``what`` names it and ``fallback`` says what runs instead, in the warnings."""
    from torch.utils.cpp_extension import load_inline

    from tunelab.models.cache import cache_root

    if shutil.which("g++") is None:  # torch would try c++ and print a page of warnings first
        logger.warning("no C++ compiler (g++) on PATH: %s", fallback)
        return None
    name = build_name(prefix, source, flags)
    directory = cache_root() / "kernels" / name
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
