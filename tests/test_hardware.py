"""Precision is chosen from what the hardware measurably does well, never assumed."""

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
