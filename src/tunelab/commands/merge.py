"""``tunelab merge``: soups, task arithmetic, TIES and DARE over finished runs of one base."""

from __future__ import annotations

import click

from tunelab.errors import UserError
from tunelab.merge.spec import MERGE_METHODS


def _weights(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(w) for w in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: write numbers separated by commas, e.g. 0.5,0.5 or 1,-1") from None


@click.command("merge")
@click.argument("runs", nargs=-1, required=True)
@click.option("--method", type=click.Choice(MERGE_METHODS), required=True, help="uniform / greedy soup, linear or task_arithmetic, ties, dare_linear, dare_ties.")
@click.option("--out", "out_dir", required=True, help="The new run directory.")
@click.option("--weights", default=None, help="One weight per run, e.g. 0.7,0.3 or 1,-1 (task arithmetic: negative subtracts a task).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiplies every weight (task arithmetic's lambda).")
@click.option("--density", type=float, default=0.5, show_default=True, help="TIES/DARE: share of each task vector kept.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True, help="TIES sign election.")
@click.option("--rank", type=int, default=None, help="LoRA ties/dare: rank of the merged adapter (default: sum of the members' ranks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds DARE's random drops.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None, help="greedy: held-out data and task from this recipe's eval:/data: sections.")
@click.option("--data", default=None, help="greedy: held-out file the soup is scored on (not your test set).")
@click.option("--task", type=click.Choice(["generation", "choice", "classification", "perplexity"]), default=None)
@click.option("--choice", "choices", multiple=True, help="greedy, choice task: an option shared by all items (repeat).")
@click.option("--prompt-template", default=None)
@click.option("--answer-field", default=None)
@click.option("--text-field", default=None)
@click.option("--max-examples", type=int, default=None)
def merge_command(runs: tuple[str, ...], method: str, out_dir: str, weights: str | None, recipe_path: str | None, **options: object) -> None:
    """Combine fine-tuned RUNS of one base into a new run directory (final/ + merge.json)."""
    from pathlib import Path

    from tunelab.hardware import configure_threads
    from tunelab.merge.run import run_merge
    from tunelab.merge.spec import MergeSpec

    spec = MergeSpec(
        method=method, weights=_weights(weights), scale=float(options["scale"]), density=float(options["density"]),  # type: ignore[arg-type]
        majority_sign=options["majority_sign"], rank=options["rank"], seed=int(options["seed"]),  # type: ignore[arg-type]
    )
    setup = None
    if method == "greedy" and (recipe_path or options["data"]):
        from tunelab.evaluate.setup import resolve_setup
        from tunelab.recipe import load_recipe

        recipe = load_recipe(recipe_path) if recipe_path else None
        overrides = {key: options[key] for key in ("data", "task", "prompt_template", "answer_field", "text_field", "max_examples")}
        overrides["choices"] = list(options["choices"]) or None  # type: ignore[call-overload]
        setup = resolve_setup(recipe, overrides, Path(recipe_path).parent if recipe_path else None)
    elif options["data"] or recipe_path:
        raise UserError("--data and --recipe only feed a greedy soup's scoring", hint="drop them, or use --method greedy")
    configure_threads()
    report = run_merge(list(runs), spec, Path(out_dir), setup, echo=click.echo)
    chosen = f", kept {len(report['chosen'])} of {len(report['members'])}" if method == "greedy" else ""
    click.echo(f"merged {len(report['members'])} {report['kind']} runs ({method}{chosen}) into {out_dir} in {report['seconds']:.1f}s; "
               f"evaluate it with: tunelab eval --run {out_dir}")


commands = [merge_command]
