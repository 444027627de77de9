"""An estimate as people read it (a table) and as programs read it (JSON-ready dicts)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from tunelab.plan.architecture import Architecture
from tunelab.plan.estimate import COMPONENTS, Estimate
from tunelab.plan.fit import Verdict
from tunelab.plan.methods import adapted_linears
from tunelab.plan.units import format_bytes

LABELS = {
    "weights": "weights", "gradients": "gradients", "optimizer_state": "optimizer state",
    "activations": "activations", "temporaries": "temporary buffers", "runtime": "runtime overhead",
}


def describe_method(arch: Architecture, result: Estimate) -> str:
    s = result.settings
    if s.method == "full":
        return "full fine-tuning"
    targets = ", ".join(sorted(adapted_linears(arch, s)))
    return f"{'QLoRA (NF4 base)' if s.method == 'qlora' else 'LoRA'} r={s.adapter_rank} on {targets}"


def as_dict(arch: Architecture, result: Estimate, device_memory: float, rows: list[Verdict], runtime_source: str) -> dict[str, Any]:
    return {
        "model": {**asdict(arch), "total_params": arch.total_params()},
        "settings": asdict(result.settings),
        "device_memory_bytes": device_memory,
        "peak_moment": result.peak.name,
        "components_bytes": dict(result.components),
        "total_bytes": result.total,
        "fits": result.total <= device_memory,
        "moments_bytes": {m.name: m.total for m in result.moments},
        "activations_bytes": {"without_checkpointing": result.activations_plain, "with_checkpointing": result.activations_checkpointed},
        "trainable_params": result.trainable_params,
        "runtime_source": runtime_source,
        "verdicts": [asdict(v) for v in rows],
        "notes": result.notes,
    }


def render(arch: Architecture, result: Estimate, device_memory: float, rows: list[Verdict], runtime_source: str) -> str:
    s = result.settings
    where = f"{s.strategy} over {s.devices} {s.device} device{'s' if s.devices > 1 else ''}"
    lines = [
        f"{arch.name}: {arch.model_type}, {arch.total_params() / 1e6:,.1f}M parameters, {arch.layers} blocks | {describe_method(arch, result)}",
        (f"seq {s.seq} x batch {s.batch} | {s.precision} | checkpointing {'on' if s.checkpointing else 'off'} | {where} | "
         f"{format_bytes(device_memory)} per device"),
        "",
        f"{'per device, at the peak':<26} {'bytes':>11}",
    ]
    details = {
        "weights": f"{result.total_params / 1e6:,.1f}M parameters, {result.trainable_params / 1e6:,.2f}M trainable",
        "activations": f"without checkpointing {format_bytes(result.activations_plain)}, with {format_bytes(result.activations_checkpointed)}",
        "runtime": runtime_source,
    }
    for key in COMPONENTS:
        note = details.get(key, "")
        lines.append(f"{LABELS[key]:<26} {format_bytes(result.components[key]):>11}   {note}".rstrip())
    verdict = "fits" if result.total <= device_memory else "does NOT fit"
    lines.append(f"{'total (peak: ' + result.peak.name + ')':<26} {format_bytes(result.total):>11}   {verdict}")
    lines.append("moments: " + " | ".join(f"{m.name} {format_bytes(m.total)}" for m in result.moments))
    lines += [f"note: {note}" for note in result.notes]
    lines += ["", f"{'method':<7} {'strategy':<9} {'peak':>11}  {'fits':<4} {'largest batch':>13}  peak at"]
    for v in rows:
        if not v.peak_bytes:
            lines.append(f"{v.method:<7} {v.strategy:<9} {'-':>11}  {'-':<4} {'-':>13}  {v.note}")
            continue
        mark = "*" if (v.method, v.strategy) == (s.method, s.strategy) else ""
        lines.append(f"{v.method:<7} {v.strategy:<9} {format_bytes(v.peak_bytes):>11}  {'yes' if v.fits else 'no':<4} "
                     f"{str(v.largest_batch) + mark:>13}  {v.peak_moment}")
    lines.append(f"(peak at batch {s.batch}; largest batch of {s.seq}-token examples per {'pipeline' if s.strategy == 'pp' else 'device'} that fits; * = the plan above)")
    return "\n".join(lines)
