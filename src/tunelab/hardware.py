"""What the hardware does well: device, instruction set, thread count and the precision to train in.

``precision: auto`` must never assume bf16 is fast: on CPUs without native bf16 instructions
(AVX2-only parts) bf16 matmuls are 4-5x and bf16 autocast backward 24-35x slower than fp32, while
on CPUs with AMX the same bf16 training step is ~2.5x faster than fp32. So on a CPU that reports
bf16 instructions, ``auto`` times one small forward+backward in both precisions (a fraction of a
second, cached per CPU and torch version) and keeps bf16 only if it measured faster. CUDA: bf16
where supported, else fp16 with loss scaling.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved training precision and why it was chosen."""

    name: str  # "fp32" | "bf16" | "fp16"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def autocast(self) -> bool:
        """Mixed precision via autocast (weights stay fp32) for anything but fp32."""
        return self.name != "fp32"


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return set()
    for line in info.read_text(errors="ignore").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model_name() -> str:
    """The CPU's model name and its widest matrix/vector unit, e.g. ``AMD EPYC (AVX-512 BF16)``.

    Cloud CPUs often report a bare family name ("AMD EPYC" is both an AVX2-only and an
    AVX-512 BF16 part), and the unit is what decides a benchmark's figures, so results say both."""
    name = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    unit = widest_unit(cpu_flags())
    return f"{name} ({unit})" if unit else name


def widest_unit(flags: set[str]) -> str:
    """The widest matrix/vector unit among CPU ``flags`` ("" where none is known)."""
    for flag, unit in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")):
        if flag in flags:
            return unit
    return ""


def best_device() -> torch.device:
    """CUDA when present, else CPU (MPS is left to explicit request: its op coverage varies).
    Under torchrun each process of a node takes its own GPU (``LOCAL_RANK``), made current so
    that NCCL and every ``cuda`` tensor without an index use it."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def resolve_precision(requested: str = "auto", device: torch.device | None = None) -> PrecisionChoice:
    """Turn ``auto|fp32|bf16|fp16`` into a concrete choice for ``device``."""
    device = device or best_device()
    if requested != "auto":
        return PrecisionChoice(requested, "set in the recipe")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"{torch.cuda.get_device_name(device)} supports bf16 natively")
        return PrecisionChoice("fp16", "GPU without bf16: fp16 autocast with loss scaling")
    native = sorted(BF16_CPU_FLAGS & cpu_flags())
    if not native:
        return PrecisionChoice("fp32", "CPU has no native bf16 (no avx512_bf16/amx_bf16): bf16 would be several times slower")
    speedup = cpu_bf16_speedup()
    if speedup > 1.2:
        return PrecisionChoice("bf16", f"CPU has {'+'.join(native)}; bf16 autocast step measured {speedup:.1f}x faster than fp32")
    return PrecisionChoice("fp32", f"CPU reports {'+'.join(native)} but bf16 measured only {speedup:.2f}x fp32 speed")


def configure_matmul(device: torch.device, tf32: bool | None = None) -> None:
    """Let fp32 matmuls and convolutions on an Ampere-or-newer GPU use TF32 tensor cores (10-bit
    mantissa products, fp32 accumulation: the default of every major trainer for fp32 on those
    GPUs, ~8x the fp32 FLOPs). ``tf32=False`` keeps IEEE fp32; CPUs are never changed."""
    if device.type != "cuda":
        return
    supported = torch.cuda.get_device_capability(device) >= (8, 0)
    chosen = "tf32" if (supported if tf32 is None else tf32 and supported) else "ieee"
    torch.backends.cuda.matmul.fp32_precision = chosen
    torch.backends.cudnn.conv.fp32_precision = chosen


def matmul_path(precision: str, device: torch.device | None = None) -> str:
    """Which units the model's matrix products run on at ``precision`` (``tunelab env`` prints it)."""
    device = device or best_device()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if precision in ("bf16", "fp16") and major >= 7:
            path = f"{precision} tensor cores (sm_{major}{minor})"
        elif precision == "fp32":
            setting = torch.backends.cuda.matmul.fp32_precision  # "none" until a run's configure_matmul sets it
            tf32 = setting == "tf32" or (setting == "none" and major >= 8)
            path = "TF32 tensor cores" if tf32 else f"IEEE fp32 CUDA cores{'' if major < 8 else ' (TF32 off)'}"
        else:
            path = f"{precision} on CUDA cores (sm_{major}{minor} has no {precision} tensor cores)"
        flash = torch.backends.cuda.is_flash_attention_available() and torch.backends.cuda.flash_sdp_enabled()
        return f"{path}; attention: {'flash' if flash and precision != 'fp32' else 'memory-efficient/math'} SDPA"
    flags = cpu_flags()
    if precision == "bf16":
        path = "bf16 on AMX tiles (oneDNN)" if "amx_bf16" in flags else "bf16 on AVX-512 BF16" if "avx512_bf16" in flags else "bf16 emulated (slow)"
    else:
        path = f"{precision} on " + ("AVX-512 FMA" if "avx512f" in flags else "AVX2 FMA" if "avx2" in flags else "baseline SIMD")
    int8 = "AMX int8" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2 (7-bit activations, no VNNI)"
    return f"{path}; int8 (dynamic-int8, sparse int8): {int8}"


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of one MLP forward+backward (cached per CPU and torch)."""
    from tunelab.models.cache import cache_root

    key = f"{cpu_model_name()}|{torch.__version__}|{torch.get_num_threads()}".replace("/", "_")
    cache_file = cache_root() / "hardware.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key])
    fp32, bf16 = _time_mlp_steps()
    cached[key] = round(fp32 / bf16, 3)
    from tunelab import atomic

    try:
        atomic.write_json(cache_file, cached)
    except OSError:
        pass  # a read-only cache only costs re-measuring next time
    return cached[key]


def _time_mlp_steps(repeats: int = 8) -> tuple[float, float]:
    """Best-of-``repeats`` seconds (fp32, bf16 autocast) for a SwiGLU-sized MLP forward+backward
    on 512 tokens. The two alternate, trial by trial: the answer is cached for good, and timing
    all fp32 trials before all bf16 ones let one burst of another process's work land on a single
    side (a cached 0.96x on a CPU where bf16 measures 1.5-2.1x made every later run fp32)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576))
        x = torch.randn(512, 576)
    best = {False: float("inf"), True: float("inf")}
    for i in range(repeats + 1):
        for autocast in (False, True):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = mlp(x).float().pow(2).mean()
            loss.backward()
            if i:  # the first call pays one-time kernel selection
                best[autocast] = min(best[autocast], time.perf_counter() - start)
    return best[False], best[True]


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``); False where unavailable.

    Why: a training step frees its activations in an order and at sizes glibc cannot coalesce,
    so the heap keeps hundreds of MB of free pages (SmolLM2 LoRA, 12 steps: RSS 1.60 GB at the end
    of training, 1.13 GB after a trim). Trimming after every step cost ~20% of the step time
    (the pages fault back in), so it is done once, before work that allocates a lot at the
    end of training (restoring the frozen weights' dtype)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux ``clear_refs`` 5); a no-op where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``) in bytes; None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size in bytes since start or the last reset."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: torch.device) -> str:
    """``cpu``, or the accelerator and its model (``cuda:0 NVIDIA H200``): figures name where they ran."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def peak_device_bytes(device: torch.device) -> int:
    """The accelerator's allocation high-water mark (``torch.cuda.max_memory_allocated``); 0 on the CPU,
    whose figure is the process's RSS (``peak_rss_bytes``)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def current_rss_bytes() -> int | None:
    """Resident set size in bytes now (Linux); None where the kernel does not say."""
    return _status_bytes("VmRSS")


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from the first line of /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split(None, 9)[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total


def _own_ticks() -> int:
    """Clock ticks this process (all its threads) has run, user plus system."""
    after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(after_name[11]) + int(after_name[12])  # fields 14 and 15: utime, stime


@dataclass(frozen=True)
class CpuSample:
    """Clock ticks at one moment: all CPUs' busy and total ticks, and this process's own."""

    busy: int
    total: int
    own: int

    @staticmethod
    def now() -> CpuSample | None:
        """The counters now; None where /proc is unavailable (not Linux)."""
        try:
            return CpuSample(*_cpu_ticks(), _own_ticks())
        except (OSError, ValueError, IndexError):
            return None

    def others_busy_since(self, earlier: CpuSample) -> float:
        """How many cores other processes kept busy between ``earlier`` and this sample."""
        total = self.total - earlier.total
        if total <= 0:
            return 0.0
        return max(0.0, (self.busy - earlier.busy - (self.own - earlier.own)) / total * (os.cpu_count() or 1))


def busy_cores(interval: float = 0.25, samples: int = 3) -> float | None:
    """How many cores other processes keep busy now, sampled over ``interval`` seconds; None
    where /proc/stat is unavailable (then the caller falls back to the load average). A sample
    that finds cores busy is repeated, up to ``samples`` in all, and the least busy one counts:
    a process that keeps a core busy does so in every sample, while a burst (a command starting,
    a process exiting) that filled one quarter second would otherwise decide a whole run's threads."""
    if interval and time.monotonic() - _last_busy[0] < 10:
        return _last_busy[1]  # one process starting several stages does not wait a quarter second each time
    busy: float | None = None
    for _ in range(max(1, samples)):
        before = CpuSample.now()
        time.sleep(interval)
        after = CpuSample.now()
        if before is None or after is None:
            return None
        sampled = after.others_busy_since(before)
        busy = sampled if busy is None else min(busy, sampled)
        if busy < 0.5:  # rounds to no busy core: no need to look again
            break
    if interval:
        _last_busy[:] = [time.monotonic(), busy]
    return busy


#: (monotonic time, value) of the last ``busy_cores`` sample.
_last_busy: list[float] = [-1e9, 0.0]


def threads_for(busy: float) -> int:
    """The threads to use when other processes keep ``busy`` cores busy: the cores left to this process."""
    cores = len(os.sched_getaffinity(0))
    return min(cores, max(1, round(cores - busy)))


def threads_are_automatic(threads: int | None = None) -> bool:
    """Whether the thread count is tunelab's to choose: neither ``threads`` nor ``OMP_NUM_THREADS`` set it."""
    env = os.environ.get("OMP_NUM_THREADS")
    return threads is None and not (env and env.isdigit())


def configure_threads(threads: int | None = None) -> int:
    """Use the cores this process may run on that other processes are not using right now.

    Measured on the 2-core CI machine: when another process keeps one core busy, a 2-thread
    training step runs ~15x slower than a 1-thread one (each GEMM waits for the descheduled
    thread), so by default the cores other processes keep busy are left to them. "Busy" is
    sampled from /proc/stat over a quarter second, not read from the load average: the 1-minute
    load average still counts a process that has just finished (tunelab's side of the throughput
    benchmark took 1 thread from the load the Trainer side had left, on two idle cores, and
    measured 1.03x the Trainer instead of 1.39x). Training keeps following the free cores step
    by step (``train/free_cores.py``).
    ``OMP_NUM_THREADS`` or an explicit ``threads`` wins.
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        if env and env.isdigit():
            threads = int(env)
        else:
            busy = busy_cores()
            if busy is None:
                busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            threads = threads_for(busy)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


@dataclass(frozen=True)
class EnvironmentReport:
    """What ``tunelab env`` prints."""

    tunelab: str
    python: str
    torch: str
    transformers: str
    peft: str
    device: str
    cpu: str
    isa: str
    threads: int
    precision: str
    precision_reason: str
    matmul: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def environment_report() -> EnvironmentReport:
    import peft
    import transformers

    from tunelab import __version__

    device = best_device()
    choice = resolve_precision("auto", device)
    flags = cpu_flags()
    interesting = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "neon", "asimd") if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        device_text = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
    else:
        device_text = "cpu"
    return EnvironmentReport(
        tunelab=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        device=device_text,
        cpu=cpu_model_name(),
        isa=f"torch kernels: {capability}; flags: {' '.join(interesting) or 'none detected'}",
        threads=torch.get_num_threads(),
        precision=choice.name,
        precision_reason=choice.reason,
        matmul=matmul_path(choice.name, device),
    )
