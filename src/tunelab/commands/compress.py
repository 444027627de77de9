"""``tunelab compress``: prune/quantize a model or a run's model and measure every variant."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("compress")
@click.argument("source", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None, help="Recipe with a compress: section.")
@click.option("--output", "-o", "output", type=click.Path(file_okay=False), default=None, help="Where to write (default: RUN_DIR/compress, else the recipe's output_dir).")
def compress_command(source: str | None, overrides: tuple[str, ...], recipe_path: str | None, output: str | None) -> None:
    """Compress SOURCE (a run directory or a model; default: the recipe's model) as the recipe's compress: section says.

    Writes <output>/compressed/<variant>/ (each model, reloadable), compress.jsonl, compress.json
    and the table compress.md (default output: RUN_DIR/compress, else the recipe's output_dir).
    With eval data (in the recipe, else in the run's own recipe) each variant is also scored on
    that task (<output>/eval/). KEY.PATH=VALUE overrides follow SOURCE.
    """
    from tunelab.compress.run import run_compression, task_evaluation
    from tunelab.errors import UserError
    from tunelab.hardware import configure_threads
    from tunelab.methods.artifacts import merge_methods
    from tunelab.models import load_model
    from tunelab.recipe import load_recipe
    from tunelab.rundir import is_run_dir, unique_run_dir

    if source and "=" in source and not Path(source).exists():  # no SOURCE, only overrides
        source, overrides = None, (source, *overrides)
    run_dir = Path(source) if source and Path(source).is_dir() and is_run_dir(Path(source)) else None
    if recipe_path is None and run_dir is not None and (run_dir / "recipe.yaml").exists():
        recipe_path = str(run_dir / "recipe.yaml")
    if recipe_path is None:
        raise UserError("give --recipe with a compress: section", hint="e.g. tunelab compress --recipe examples/compress_smollm2.yaml")
    recipe = load_recipe(recipe_path, overrides)
    config = recipe.compress
    configure_threads(config.threads)
    if run_dir is not None:
        loaded = load_model(str(run_dir))
        model, tokenizer = merge_methods(loaded.model, for_compression=True), loaded.tokenizer  # compression works on plain weights
        label = f"run {run_dir}"
    else:
        loaded = load_model(source or recipe.model.name, seed=recipe.seed)
        model, tokenizer, label = loaded.model, loaded.tokenizer, loaded.source
    target = Path(output or (run_dir / "compress" if run_dir else recipe.output_dir or unique_run_dir(Path("runs"), f"{recipe.name}-compress")))
    evaluation = task_evaluation(recipe)
    if evaluation is None and config.evaluate and run_dir is not None and (run_dir / "recipe.yaml").exists():
        eval_overrides = [o for o in overrides if o.startswith("eval.")]
        evaluation = task_evaluation(load_recipe(run_dir / "recipe.yaml", eval_overrides))  # the run's own eval set
    run_compression(model, tokenizer, config, target, source=label, seed=recipe.seed, evaluation=evaluation,
                    trained_run=run_dir, echo=click.echo)
    click.echo((target / "compress.md").read_text())
    click.echo(f"written: {target / 'compress.md'}, {target / 'compress.json'}, models under {target / 'compressed'}")


commands = [compress_command]
