"""What a training process holds before any model exists.

On a CPU that is the resident memory of Python with everything ``tunelab train`` imports
(torch, transformers, peft, the engine): measured here, once per Python, torch and tunelab
version, in a child process that imports exactly that and nothing else, and cached with the
other per-machine measurements. On a GPU it is the CUDA context (driver, kernels, cuBLAS
workspace), which no PyTorch allocator statistic counts: one published measurement is 781 MB for
a process that only initialises CUDA (https://github.com/pytorch/pytorch/issues/34323); it varies
with the GPU, driver and CUDA version, so ``--runtime-overhead`` overrides it.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys

#: The CUDA context of a bare PyTorch process, pytorch/pytorch#34323 (nvidia-smi, 781 MB).
CUDA_CONTEXT_BYTES = 781 * 10**6

#: What the child imports: the modules a training process has loaded before it loads a model.
PROBE = (
    "import tunelab.train.run, re; "
    "status = open('/proc/self/status').read(); "
    "print(int(re.search(r'VmRSS:\\s+(\\d+)', status).group(1)) * 1024)"
)


def cpu_runtime_bytes(refresh: bool = False) -> int:
    """Resident bytes of a process that has imported the training engine (measured, cached)."""
    import torch

    from tunelab import __version__
    from tunelab.models.cache import cache_root

    key = f"{platform.python_version()}|{torch.__version__}|{__version__}"
    cache_file = cache_root() / "plan_runtime.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached and not refresh:
        return int(cached[key])
    measured = measure_cpu_runtime()
    cached[key] = measured
    try:
        from tunelab import atomic

        atomic.write_json(cache_file, cached)
    except OSError:
        pass  # a read-only cache only costs measuring again next time
    return measured


def measure_cpu_runtime(env: dict[str, str] | None = None) -> int:
    """Run the probe in a fresh interpreter (``env`` added to this one's) and return its resident bytes."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**_env(), **(env or {})})
    return int(re.findall(r"^\d+$", out.stdout, flags=re.MULTILINE)[-1])


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
