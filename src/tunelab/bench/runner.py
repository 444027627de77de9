"""Run both sides back to back, each in its own process, and turn their reports into ratios.

Timings on a shared machine are noisy, so the result is a set of ratios from one invocation
(tunelab vs Trainer + PEFT, run back to back), the median over ``repeats`` where asked, and a GEMM
peak measured in the same invocation for MFU. The speedup only counts when the two train the same
(``parity``). In fp32 that is a direct comparison:

- the first step's loss (the same weights on the same batch: only the arithmetic differs) within
  ``STEP_ONE_PARITY["fp32"]`` on every seed, and
- the held-out loss (200 examples), averaged over ``seeds`` (a different data order and adapter
  initialisation each), within ``PARITY`` of the baseline's.

In a reduced precision (bf16, fp16) the two sides' rounding differs, and a dozen steps amplify a
rounding difference chaotically: on the AMX Xeon one seed's bf16 held-out loss lands up to 24% from
the fp32 run of the same seed, on both sides and under any change of rounding (bench/README.md,
sessions 27 and 36), so a 2% band on the mean of a few seeds measured noise there. So both sides
also train every seed in fp32 (``reference``), and the speedup counts when

- in fp32 the two sides pass the direct comparison above (the same training, exactly), and
- rounding moves tunelab no further from that fp32 run than it moves the Trainer: tunelab's
  held-out loss's mean relative distance from the fp32 Trainer's over the seeds at most ``PARITY``
  more than the Trainer's own, and its first step's largest distance at most
  ``STEP_ONE_ROUNDING_TOLERANCE`` more.

The direct bf16 comparison is still reported. The final training loss (the mean of the last quarter
of the steps' batches) is reported, not judged: three batches of ~16 supervised tokens cannot tell
training from batch noise, and a dozen bf16 steps move it by ~7% per seed between any two bf16 runs
(bench/bf16_grad_fidelity.py: each side's bf16 gradient is ~3% from fp32's at every step).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import tunelab
from tunelab import atomic
from tunelab.bench.measure import gemm_gflops
from tunelab.bench.workload import Workload

PARITY = 0.02
#: The first step's loss band, by precision. fp32 sides agree to 1e-5. In bf16 the loss over a
#: short-workload batch's 16 supervised tokens moves by up to 0.7% with rounding alone (SmolLM2,
#: seed 0, against fp32's 4.3830: Trainer -0.11%; tunelab -0.05% with flash attention for suffixes,
#: -0.68% with the math kernel; -0.07% / -0.39% with the frozen weights left in fp32).
STEP_ONE_PARITY = {"fp32": 0.001, "bf16": 0.01, "fp16": 0.01}
#: How much further rounding may move tunelab's first-step loss from fp32 than the Trainer's (the
#: largest over the seeds). Measured on the AMX Xeon, short workload, 5 seeds: the Trainer's bf16
#: step-1 loss lies +0.16..+1.21% from fp32's, tunelab's -0.88..+0.57% (session 36).
STEP_ONE_ROUNDING_TOLERANCE = 0.005
LOSSES = ("final_train_loss", "eval_loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIDE_NAMES = {"tunelab": "tunelab", "hf": "Trainer + PEFT"}


def run_side(side: str, workload: Workload, profile_steps: int = 0) -> dict[str, Any]:
    """One side in a fresh ``tunelab.bench.worker`` process; its JSON report."""
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "tunelab.bench.worker", side, workload.to_json(), str(out)]
        if profile_steps:
            command += ["--profile-steps", str(profile_steps)]
        # The baseline runs with the libraries' own kernel-cache sizes (1,024 entries), not
        # tunelab's bound, which its process inherited (a tunelab lever, see tunelab/__init__.py).
        env = {**os.environ, **dict.fromkeys(tunelab.BOUNDED_KERNEL_CACHES, "1024")} if side == "hf" else None
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark side {side!r} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def derived(report: dict[str, Any], peak_gflops: float) -> dict[str, float]:
    """Throughput, memory and MFU of one side's report."""
    seconds = report["steady_seconds"]
    return {
        "real_tokens_per_s": report["real_tokens"] / seconds,
        "supervised_tokens_per_s": report["supervised_tokens"] / seconds,
        "real_tokens_per_cpu_s": report["real_tokens"] / report["steady_cpu_seconds"],
        "mfu": report["flops"] / seconds / (peak_gflops * 1e9),
        "peak_rss_mb": report["peak_rss_mb"],  # as training ends, model load included
        "peak_rss_mb_with_parity_eval": report.get("peak_rss_mb_with_parity_eval"),
        # on a GPU the memory that limits a run is the device's; on a CPU the process's RSS
        "peak_memory_mb": report.get("peak_device_mb") or report["peak_rss_mb"],
        "first_step_seconds": report["first_step_seconds"],
        "final_train_loss": report["final_train_loss"],
        "eval_loss": report["eval_loss"],
    }


def machine(device: str = "cpu") -> dict[str, Any]:
    from tunelab.hardware import cpu_flags, cpu_model_name

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    import os

    gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if device == "cuda" else {}
    return {
        "cpu": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "flags": flags, "torch": torch.__version__,
        "python": platform.python_version(), "load_average": os.getloadavg(), **gpu,
    }


def run_pairs(workload: Workload, seeds: int, repeats: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Both sides' reports, ``repeats`` times (alternating) for each of ``seeds`` seeds from ``workload.seed``."""
    reports: dict[str, list[dict[str, Any]]] = {"hf": [], "tunelab": []}
    for seed in range(workload.seed, workload.seed + seeds):
        for _ in range(repeats):
            for side in ("hf", "tunelab"):
                reports[side].append({**run_side(side, replace(workload, seed=seed)), "seed": seed})
    return reports


def run_benchmark(workload: Workload, *, repeats: int = 1, seeds: int = 1, ablate: tuple[str, ...] = (),
                  profile_steps: int = 0, reference: bool = True) -> dict[str, Any]:
    """Both sides ``repeats`` times (alternating) for each of ``seeds`` seeds from ``workload.seed``,
    in fp32 once per seed as well where they ran in a reduced precision (``reference``: what the
    parity judges rounding against), optional lever ablations and profiles; the full result."""
    started = time.time()
    from tunelab.hardware import configure_threads

    configure_threads(workload.threads)  # the peak must use the threads the sides use
    reports = run_pairs(workload, seeds, repeats)
    precision = reports["tunelab"][0]["precision"]
    fp32_reports = run_pairs(replace(workload, precision="fp32"), seeds) if reference and precision != "fp32" else None
    # Only the precisions the sides ran in: on CPUs without native bf16 (AVX2-only EPYC) one bf16
    # 2048² product takes minutes, which made the CI smoke run of this benchmark take 13 minutes.
    gemm_size = 8192 if workload.device == "cuda" else 2048  # a GPU needs a larger product to reach its peak
    peaks = {p: [gemm_gflops(DTYPES[p], gemm_size, device=workload.device) for _ in range(2)]
             for p in dict.fromkeys([precision, *(["fp32"] if fp32_reports else [])])}
    peak_gflops = max(peaks[precision])
    sides = {side: _aggregate([derived(r, peak_gflops) for r in runs], [r["seed"] for r in runs]) for side, runs in reports.items()}
    result: dict[str, Any] = {
        "workload": json.loads(workload.to_json()),
        "machine": machine(workload.device),
        "precision": precision,
        "gemm_peak_gflops": {k: max(v) for k, v in peaks.items()},
        "sides": sides,
        "raw": reports,
        "seeds": seeds,
        "losses_by_seed": {side: {r["seed"]: {key: r[key] for key in LOSSES} for r in runs} for side, runs in reports.items()},
        **summary(sides["tunelab"], sides["hf"]),
        **parity(reports, precision, fp32_reports),
    }
    if fp32_reports:
        fp32_peak = max(peaks["fp32"])
        fp32_sides = {side: _aggregate([derived(r, fp32_peak) for r in runs], [r["seed"] for r in runs]) for side, runs in fp32_reports.items()}
        result["fp32_reference"] = {"sides": fp32_sides, "raw": fp32_reports, **summary(fp32_sides["tunelab"], fp32_sides["hf"])}
    if ablate:
        result["ablations"] = {
            ("without " if workload.uses(lever) else "with ") + lever: derived(run_side("tunelab", workload.toggled(lever)), peak_gflops)
            for lever in ablate
        }
    if profile_steps:
        result["profiles"] = {side: run_side(side, workload, profile_steps)["profile"] for side in ("hf", "tunelab")}
    result["seconds"] = time.time() - started
    return result


def summary(ours: dict[str, float], baseline: dict[str, float]) -> dict[str, Any]:
    """The ratios the issue asks for, and the sides' loss differences (mean over the seeds)."""
    return {
        "speedup": ours["real_tokens_per_s"] / baseline["real_tokens_per_s"],
        "cpu_time_speedup": ours["real_tokens_per_cpu_s"] / baseline["real_tokens_per_cpu_s"],
        "mem_ratio": ours["peak_memory_mb"] / baseline["peak_memory_mb"],
        "loss_delta": _relative(ours["final_train_loss"], baseline["final_train_loss"]),
        "eval_loss_delta": _relative(ours["eval_loss"], baseline["eval_loss"]),
        "mfu": ours["mfu"],
    }


def parity(reports: dict[str, list[dict[str, Any]]], precision: str,
           fp32_reports: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Whether the sides train the same (see the module's docstring): the direct comparison of
    ``reports``, or, given fp32 runs of the same seeds, that comparison of the fp32 runs plus each
    side's distance from the fp32 Trainer's losses."""
    direct = _direct_parity(reports, STEP_ONE_PARITY[precision])
    within = direct.pop("within")  # the verdict only where the direct comparison is the rule
    if fp32_reports is None:
        return {**direct, "loss_parity": within, "parity_criterion": "direct"}
    exact = _direct_parity(fp32_reports, STEP_ONE_PARITY["fp32"])
    reference = {key: _by_seed(fp32_reports["hf"], key) for key in ("step_one_loss", "eval_loss")}
    distance = {side: {key: _distances(_by_seed(runs, key), reference[key]) for key in reference} for side, runs in reports.items()}
    rounding = {
        "step_one_max": {side: max(d["step_one_loss"]) for side, d in distance.items()},
        "eval_mean": {side: statistics.fmean(d["eval_loss"]) for side, d in distance.items()},
        "step_one_tolerance": STEP_ONE_ROUNDING_TOLERANCE,
        "eval_tolerance": PARITY,
        "by_seed": distance,
    }
    rounding["within"] = (rounding["step_one_max"]["tunelab"] <= rounding["step_one_max"]["hf"] + STEP_ONE_ROUNDING_TOLERANCE
                          and rounding["eval_mean"]["tunelab"] <= rounding["eval_mean"]["hf"] + PARITY)
    return {**direct, "loss_parity": exact["within"] and rounding["within"], "parity_criterion": "against fp32",
            "fp32_parity": exact, "rounding": rounding}


def _direct_parity(reports: dict[str, list[dict[str, Any]]], step_one_band: float) -> dict[str, Any]:
    """The largest first-step loss difference over the runs within ``step_one_band``, and the
    difference of the mean held-out losses over the seeds within ``PARITY``."""
    step_one = step_one_delta(reports)
    held_out = {side: statistics.fmean(_by_seed(runs, "eval_loss").values()) for side, runs in reports.items()}
    eval_delta = _relative(held_out["tunelab"], held_out["hf"])
    return {"step_one_loss_delta": step_one, "step_one_band": step_one_band, "eval_loss_delta": eval_delta,
            "within": abs(step_one) <= step_one_band and abs(eval_delta) <= PARITY}


def step_one_delta(reports: dict[str, list[dict[str, Any]]]) -> float:
    """The largest relative difference between the sides' first-step losses, over every run."""
    deltas = [_relative(ours["step_losses"][0], base["step_losses"][0]) for ours, base in zip(reports["tunelab"], reports["hf"])]
    return max(deltas, key=abs, default=0.0)


def _by_seed(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
    """One value per seed (``step_one_loss``: the first step's loss), the median of its repeats
    (which train identically)."""
    values = [(r["seed"], r["step_losses"][0] if key == "step_one_loss" else r[key]) for r in runs]
    return {seed: statistics.median(v for s, v in values if s == seed) for seed in sorted({s for s, _ in values})}


def _distances(values: dict[int, float], reference: dict[int, float]) -> list[float]:
    return [abs(_relative(values[seed], reference[seed])) for seed in sorted(reference)]


def _relative(value: float, reference: float) -> float:
    return (value - reference) / reference


def _aggregate(rows: list[dict[str, float]], seeds: list[int]) -> dict[str, float]:
    """Speed and memory: the median over every run. Losses: the mean over the seeds of each
    seed's median (repeats of one seed train identically; seeds are what averaging is for)."""
    out = _median(rows)
    runs = [{**r, "seed": seed} for r, seed in zip(rows, seeds)]
    for key in LOSSES:
        out[key] = statistics.fmean(_by_seed(runs, key).values())
    return out


def _median(rows) -> dict[str, float]:
    rows = list(rows)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def result_line(result: dict[str, Any]) -> str:
    return (
        f"speedup={result['speedup']:.2f} mem_ratio={result['mem_ratio']:.2f} "
        f"loss_delta={result['loss_delta']:.3f} eval_loss_delta={result['eval_loss_delta']:.3f} mfu={result['mfu']:.2f} "
        f"parity={'within' if result['loss_parity'] else 'OUTSIDE'}"
    )


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of both sides (and ablations) for the README and the terminal."""
    gemm = result["gemm_peak_gflops"]
    lines = [
        f"model {result['workload']['model']} | workload {result['workload'].get('name', 'short')} | {result['workload']['steps']} steps x {result['workload']['batch_size']} examples | "
        f"precision {result['precision']} | GEMM peak {' / '.join(f'{k} {v:.0f}' for k, v in gemm.items())} GFLOP/s",
        "",
        f"| run | real tok/s | supervised tok/s | real tok/CPU-s | {'peak GPU MB' if result['workload'].get('device') == 'cuda' else 'peak RSS MB (training)'} | first step s | final loss | eval loss | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(SIDE_NAMES[s], m) for s, m in result["sides"].items()]
    rows += [(f"tunelab {change}", m) for change, m in result.get("ablations", {}).items()]
    # the parity's fp32 runs (MFU against the fp32 peak)
    rows += [(f"{SIDE_NAMES[s]}, fp32", m) for s, m in result.get("fp32_reference", {}).get("sides", {}).items()]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['real_tokens_per_s']:.0f} | {m['supervised_tokens_per_s']:.1f} | {m['real_tokens_per_cpu_s']:.0f} | "
            f"{m['peak_memory_mb']:.0f} | {m['first_step_seconds']:.1f} | {m['final_train_loss']:.4f} | {m['eval_loss']:.4f} | {m['mfu']:.3f} |"
        )
    return "\n".join([*lines, "", parity_text(result)])


def parity_text(result: dict[str, Any]) -> str:
    """What the parity judged, in one paragraph."""
    seeds = result.get("seeds", 1)
    over = f"mean over {seeds} seeds: " if seeds > 1 else ""
    verdict = f"losses {'within' if result['loss_parity'] else 'OUTSIDE'} the parity band"
    final = f"final training loss {result['loss_delta']:+.2%}"
    if result.get("parity_criterion") != "against fp32":
        return (f"{verdict}: step-1 loss {result['step_one_loss_delta']:+.2%} (band {result['step_one_band']:.1%}), "
                f"{over}held-out loss {result['eval_loss_delta']:+.2%} (band {PARITY:.0%}); {final} (reported, not judged)")
    exact, rounding = result["fp32_parity"], result["rounding"]
    return (
        f"{verdict}, judged against fp32 runs of the same seeds. In fp32 the sides differ by: step-1 loss "
        f"{exact['step_one_loss_delta']:+.2%} (band {exact['step_one_band']:.1%}), {over}held-out loss {exact['eval_loss_delta']:+.2%} "
        f"(band {PARITY:.0%}). {result['precision']} rounding moves the held-out loss from the fp32 Trainer's by "
        f"{rounding['eval_mean']['tunelab']:.2%} (tunelab) vs {rounding['eval_mean']['hf']:.2%} (Trainer) on average over the seeds "
        f"(allowed: the Trainer's + {rounding['eval_tolerance'] * 100:g} points), the step-1 loss by at most "
        f"{rounding['step_one_max']['tunelab']:.2%} vs {rounding['step_one_max']['hf']:.2%} (+ {rounding['step_one_tolerance'] * 100:g} points). "
        f"Reported, not judged: in {result['precision']} the sides differ by step-1 loss {result['step_one_loss_delta']:+.2%}, "
        f"{over}held-out loss {result['eval_loss_delta']:+.2%}; {final}."
    )


def save(result: dict[str, Any], directory: Path) -> Path:
    """``train_throughput_<model>.json`` for the short workload (the name it always had), ``..._<workload>.json``
    otherwise, ``..._dropout<p>`` added for a run with LoRA dropout."""
    workload = result["workload"]
    suffix = "" if workload.get("name", "short") == "short" else f"_{workload['name']}"
    if workload.get("lora_dropout"):
        suffix += f"_dropout{workload['lora_dropout']:g}"
    path = directory / f"train_throughput_{workload['model']}{suffix}.json"
    atomic.write_json(path, result)
    return path
