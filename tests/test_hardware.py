"""Precision is chosen from what the hardware measurably does well, never assumed."""

import os
import subprocess
import sys
import time

import pytest
import torch

from tunelab import hardware


def test_explicit_precision_is_respected():
    choice = hardware.resolve_precision("fp32")
    assert choice.dtype == torch.float32 and not choice.autocast


def test_cpu_without_bf16_instructions_gets_fp32(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})
    choice = hardware.resolve_precision("auto", torch.device("cpu"))
    assert choice.name == "fp32" and "no native bf16" in choice.reason


def test_cpu_with_bf16_instructions_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 0.4)
    assert hardware.resolve_precision("auto", torch.device("cpu")).name == "fp32"
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 2.5)
    assert hardware.resolve_precision("auto", torch.device("cpu")).name == "bf16"


def test_speed_probe_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    first = hardware.cpu_bf16_speedup()
    assert (tmp_path / "hardware.json").exists()
    assert hardware.cpu_bf16_speedup() == first > 0


def test_environment_report_names_precision_and_reason():
    report = hardware.environment_report()
    assert report.precision in {"fp32", "bf16", "fp16"} and report.precision_reason
    assert report.torch == torch.__version__


def test_busy_cores_counts_other_processes_not_this_one(monkeypatch):
    """Ticks over the sample: 150 of 200 busy on 2 CPUs, 50 of them this process's own: one core."""
    cpu = iter([(1000, 5000), (1150, 5200)])
    own = iter([300, 350])
    monkeypatch.setattr(hardware, "_cpu_ticks", lambda: next(cpu))
    monkeypatch.setattr(hardware, "_own_ticks", lambda: next(own))
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    assert hardware.busy_cores(interval=0, samples=1) == pytest.approx(1.0)


def test_a_burst_in_one_sample_does_not_decide_the_threads(monkeypatch):
    """Busy in the first quarter second, idle in the next: the least busy sample counts."""
    cpu = iter([(0, 0), (200, 200), (200, 200), (210, 400)])  # 2 cores: 2.0 busy, then 0.1
    monkeypatch.setattr(hardware, "_cpu_ticks", lambda: next(cpu))
    monkeypatch.setattr(hardware, "_own_ticks", lambda: 0)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(hardware.time, "sleep", lambda s: None)
    hardware._last_busy[0] = -1e9
    assert hardware.busy_cores(interval=0.25) == pytest.approx(0.1)
    hardware._last_busy[0] = -1e9


def test_a_finished_process_leaves_its_cores_to_the_next_run():
    """While a busy loop runs, it keeps a core; once it exits the cores are free again, even though
    the load average still remembers it (what fooled the thread choice before)."""
    from tunelab.hardware import busy_cores, configure_threads

    cores = len(os.sched_getaffinity(0))
    hardware._last_busy[0] = -1e9  # sample afresh, not a value cached by an earlier test
    if cores < 2 or (busy_cores() or 0) > 0.3:
        pytest.skip("needs 2+ cores and an otherwise idle machine")
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        hardware._last_busy[0] = -1e9
        assert busy_cores() == pytest.approx(1.0, abs=0.3)
        assert configure_threads() == cores - 1
    finally:
        loop.kill()
        loop.wait()
    hardware._last_busy[0] = -1e9
    assert configure_threads() == cores


@pytest.mark.parametrize(("flags", "precision", "expected"), [
    ({"avx2", "fma"}, "fp32", "fp32 on AVX2 FMA; int8 (dynamic-int8, sparse int8): AVX2 (7-bit activations, no VNNI)"),
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "bf16", "bf16 on AVX-512 BF16; int8 (dynamic-int8, sparse int8): AVX-512 VNNI"),
    ({"avx512f", "amx_bf16", "amx_int8"}, "bf16", "bf16 on AMX tiles (oneDNN); int8 (dynamic-int8, sparse int8): AMX int8"),
])
def test_the_report_names_the_matrix_units_a_cpu_uses(monkeypatch, flags, precision, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.matmul_path(precision, torch.device("cpu")) == expected
    assert hardware.environment_report().matmul == hardware.matmul_path(hardware.resolve_precision("auto").name)


@pytest.mark.parametrize(("capability", "tf32", "expected"), [((8, 0), None, "tf32"), ((8, 0), False, "ieee"), ((7, 0), None, "ieee"), ((7, 0), True, "ieee")])
def test_tf32_is_used_for_fp32_matmuls_on_gpus_that_have_it(monkeypatch, capability, tf32, expected):
    before = torch.backends.cuda.matmul.fp32_precision
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    try:
        hardware.configure_matmul(torch.device("cuda"), tf32)
        assert torch.backends.cuda.matmul.fp32_precision == expected
        hardware.configure_matmul(torch.device("cpu"), True)  # CPUs are never changed
        assert torch.backends.cuda.matmul.fp32_precision == expected
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize(("capability", "precision", "expected"), [
    ((8, 0), "fp32", "TF32 tensor cores"),          # what a run's configure_matmul will choose
    ((7, 0), "fp32", "IEEE fp32 CUDA cores"),
    ((9, 0), "bf16", "bf16 tensor cores (sm_90)"),
    ((6, 1), "fp16", "fp16 on CUDA cores (sm_61 has no fp16 tensor cores)"),
])
def test_the_report_names_the_gpu_units(monkeypatch, capability, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "none"  # no run has configured it yet
    try:
        assert hardware.matmul_path(precision, torch.device("cuda")).split(";")[0] == expected
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize(("flags", "unit"), [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AMX"), ({"avx2", "avx512f", "avx512_bf16"}, "AVX-512 BF16"),
    ({"avx2", "avx512f"}, "AVX-512"), ({"avx2", "fma"}, "AVX2"),
])
def test_results_name_the_cpus_widest_unit(monkeypatch, flags, unit):
    """Two CPUs both called "AMD EPYC" (AVX2-only and AVX-512 BF16) must not look alike in results."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set())
    bare = hardware.cpu_model_name()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.cpu_model_name() == f"{bare} ({unit})"


CACHE_PROBE = """
import tunelab  # bounds oneDNN's and ideep's primitive caches unless the environment set them
import torch
from tunelab.hardware import current_rss_bytes
def rss():
    return current_rss_bytes() / 2**20
w = torch.randn(256, 128, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(8, 128, dtype=torch.bfloat16), w)
before = rss()
for tokens in range(300, 900):  # a packed row's token count changes every step
    torch.nn.functional.linear(torch.randn(tokens, 128, dtype=torch.bfloat16), w)
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bf16_matmuls_of_ever_new_shapes_do_not_grow_memory_without_bound():
    """torch's bf16 matmuls cache a compiled primitive per shape (1,024 by default, ~1 MB each);
    tunelab bounds the caches so varying packed lengths cannot grow a run's memory by hundreds of MB."""
    def growth(env: dict[str, str]) -> float:
        clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    unbounded = growth({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
    if unbounded < 50:
        pytest.skip(f"bf16 matmuls cache little on this CPU ({unbounded:.0f} MB for 600 shapes)")
    assert growth({}) < 0.5 * unbounded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_release_free_memory_returns_a_fragmented_heap():
    """Freed tensors interleaved with live ones stay resident until the heap is trimmed."""
    def rss_mb() -> float:
        return hardware.current_rss_bytes() / 2**20

    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB each: below glibc's mmap threshold, from the heap
    del blocks[::2]  # every other one freed: no free space at the heap's top to shrink
    before = rss_mb()
    if not hardware.release_free_memory():
        pytest.skip("no glibc malloc_trim here")
    assert rss_mb() < before - 80  # half of 250 MB was free
    assert all(float(b[0]) == 1.0 for b in blocks)  # what stays alive is untouched
