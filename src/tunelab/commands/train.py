"""``tunelab train``, ``tunelab adapt`` and ``tunelab export``."""

from __future__ import annotations

import signal
from pathlib import Path

import click


@click.command("train")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue RUN_DIR from its last checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (metrics.jsonl is still written).")
def train_command(recipe: str | None, overrides: tuple[str, ...], resume_dir: str | None, no_progress: bool) -> None:
    """Fine-tune as RECIPE says (KEY.PATH=VALUE overrides allowed); or --resume RUN_DIR."""
    from tunelab.errors import UserError
    from tunelab.recipe import load_recipe
    from tunelab.train.run import load_run_recipe, run_training

    _stop_gracefully_on_sigterm()

    try:
        if resume_dir:
            if recipe:  # with --resume, every positional argument is an override
                if "=" not in recipe:
                    raise UserError(
                        f"--resume continues {resume_dir} with the recipe it was started with; {recipe!r} is not a KEY.PATH=VALUE override",
                        hint=f"drop {recipe}, or start a new run with: tunelab train {recipe}",
                    )
                overrides = (recipe, *overrides)
            run_training(load_run_recipe(Path(resume_dir), overrides), resume=True, show_progress=not no_progress)
            return
        if not recipe:
            raise UserError("give a recipe file (or --resume RUN_DIR)", hint="e.g. tunelab train examples/quickstart.yaml")
        run_training(load_recipe(recipe, overrides), show_progress=not no_progress)
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the shell's code for Ctrl-C; the run said how to resume


@click.command("adapt")
@click.argument("source")
@click.argument("overrides", nargs=-1)
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="The new task's few rows (every row is in every step).")
@click.option("--steps", type=click.IntRange(min=1), required=True, help="SGD steps to take (k).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Step size; default: the meta-learned run's objective.inner_lr.")
@click.option("--out", "output_dir", type=click.Path(file_okay=False), help="Run directory of the adapted model (default: a new one under runs/).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def adapt_command(source: str, overrides: tuple[str, ...], data: str, steps: int, lr: float | None, output_dir: str | None, no_progress: bool) -> None:
    """Adapt SOURCE (a run directory, e.g. a meta-learned one, or any model) to a new task in k plain
    SGD steps on --data, and evaluate it as SOURCE's recipe says (KEY.PATH=VALUE overrides allowed)."""
    from tunelab.train.adapt import adaptation_recipe
    from tunelab.train.run import run_training

    _stop_gracefully_on_sigterm()
    try:
        run_training(adaptation_recipe(source, data, steps, lr=lr, output_dir=output_dir, overrides=overrides), show_progress=not no_progress)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _stop_gracefully_on_sigterm() -> None:
    """SIGTERM (a scheduler's preemption, ``kill``) stops like Ctrl-C: the last completed step is
    checkpointed so ``--resume`` continues exactly."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@click.command("export")
@click.argument("model")
@click.option("--merge", "merge_out", type=click.Path(file_okay=False), help="Write a plain HF model with adapters merged here.")
@click.option("--gguf", "gguf_out", type=click.Path(dir_okay=False), help="Write one GGUF file (Llama family) that llama.cpp runs.")
@click.option("--quant", type=click.Choice(["f32", "f16", "q8_0", "q4_1", "q4_0"]), default="f16", show_default=True,
              help="GGUF tensor type for the matrices (norms stay f32; layers already int4 with groups of 32 stay Q4_1).")
def export_command(model: str, merge_out: str | None, gguf_out: str | None, quant: str) -> None:
    """Export MODEL (a run directory, compressed variant, HF directory or alias) with its adapters merged."""
    from tunelab.errors import UserError

    if not merge_out and not gguf_out:
        raise UserError("say what to export", hint="add --merge OUT_DIR (Hugging Face) or --gguf OUT.gguf (llama.cpp)")
    if merge_out:
        from tunelab.export.merged import export_merged

        click.echo(f"merged model written to {export_merged(Path(model), Path(merge_out))}")
    if gguf_out:
        from tunelab.export.gguf_file import export_gguf

        report = export_gguf(model, Path(gguf_out), quant)
        types = ", ".join(f"{name} x{count}" for name, count in sorted(report["tensor_types"].items()))
        click.echo(f"GGUF written to {report['path']} ({report['bytes'] / 2**20:,.1f} MiB; tensors {types}) in {report['seconds']}s")
        click.echo(f"pre-tokenizer: {report['pre_tokenizer']}")
        click.echo(f"run it: llama-cli -m {report['path']}   or   tunelab generate --model {report['path']}")


commands = [train_command, adapt_command, export_command]
