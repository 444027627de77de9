"""``tunelab bench train``: tunelab's training throughput against Trainer + PEFT, side by side."""

from __future__ import annotations

from pathlib import Path

import click

# Relative to where the command runs: an installed package has no source tree to write into.
DEFAULT_OUT = Path("bench-results")


@click.group("bench")
def bench_group() -> None:
    """Benchmarks against the standard alternatives."""


@bench_group.command("train")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name (packaged alias, tiny alias, HF dir).")
@click.option("--steps", type=int, default=12, show_default=True, help="Optimizer steps per side (the first is warm-up).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per step.")
@click.option("--threads", type=int, default=None, help="CPU threads for both sides (default: the cores other processes leave free, as `tunelab train` chooses).")
@click.option("--repeats", type=int, default=1, show_default=True, help="Run both sides this many times; report medians.")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Train both sides with this many seeds (data order, adapter init); losses are compared as means over them.")
@click.option("--compile", "use_compile", is_flag=True, help="tunelab side with regional torch.compile.")
@click.option("--ablate", multiple=True, help="Also run tunelab with this lever switched (repeatable; 'all' for every lever).")
@click.option("--profile", "profile_steps", type=int, default=0, help="Profile this many steps of each side (top-10 table).")
@click.option("--workload", "workload_names", type=click.Choice(["short", "long", "both"]), default="both", show_default=True,
              help="short: chat rows with 2-token answers; long: raw text, every token supervised.")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="LoRA dropout on both sides (the shipped recipes use 0.05; the published figures 0).")
@click.option("--quick", is_flag=True, help="CI smoke test: tiny-llama, 3 steps of 4 examples.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where both sides train (cuda: bench/gpu_check.sh).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Both sides' precision (auto: what the device measurably does best).")
@click.option("--fp32-reference/--no-fp32-reference", default=True, show_default=True,
              help="Where the sides run in bf16/fp16, also train both in fp32 per seed and judge each side's rounding against that (the parity; see bench/README.md).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Folder for train_throughput_<model>.json (relative to the current directory).")
def train_bench(model: str, steps: int, batch_size: int, threads: int | None, repeats: int, seeds: int, ablate: tuple[str, ...],
                use_compile: bool, profile_steps: int, workload_names: str, lora_dropout: float, quick: bool, device: str, precision: str,
                fp32_reference: bool, out: Path) -> None:
    """Train the same LoRA on the same data both ways, per workload; print the tables and one result line each."""
    from tunelab.bench.runner import format_table, result_line, run_benchmark, save
    from tunelab.bench.workload import DEFAULT_LEVERS, LEVERS, WORKLOADS, Workload
    from tunelab.errors import UserError

    levers = tuple(LEVERS) if "all" in ablate else ablate
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise UserError(f"unknown lever {', '.join(unknown)}", where="--ablate", hint=f"one of: {', '.join(LEVERS)}, all")
    if seeds < 1 or repeats < 1:
        raise UserError("--seeds and --repeats must be at least 1", where="--seeds" if seeds < 1 else "--repeats")
    if steps < 2:
        raise UserError("--steps must be at least 2 (the first step is warm-up)", where="--steps")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("no CUDA device here (torch.cuda.is_available() is false)", where="--device", hint="run on a GPU machine with a CUDA build of torch, or use --device cpu")
    on = (*DEFAULT_LEVERS, "compile") if use_compile else DEFAULT_LEVERS
    if quick:
        settings = {"model": "tiny-llama", "steps": 3, "batch_size": 4, "validation_examples": 8}
    else:
        settings = {"model": model, "steps": steps, "batch_size": batch_size}
    names = ["short", "long"] if workload_names == "both" else [workload_names]
    lines = []
    for name in names:
        workload = Workload.named(name, threads=threads, levers=on, device=device, precision=precision, lora_dropout=lora_dropout, **settings)
        click.echo(f"\nworkload {name}: {WORKLOADS[name].about}")
        result = run_benchmark(workload, repeats=repeats, seeds=seeds, ablate=levers, profile_steps=profile_steps, reference=fp32_reference)
        for side, table in result.get("profiles", {}).items():
            click.echo(f"\nprofile ({side}, top 10 by self CPU time):\n{table}")
        click.echo(format_table(result))
        click.echo(f"results: {save(result, out)}")
        lines.append(f"{name}: {result_line(result)}")
    click.echo("\n".join(lines))


commands = [bench_group]
