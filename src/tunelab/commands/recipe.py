"""``tunelab recipe validate|schema``: check a recipe, print the schema."""

from __future__ import annotations

import json

import click


@click.group("recipe")
def recipe_group() -> None:
    """Validate recipes and print the recipe schema."""


@recipe_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--print", "print_resolved", is_flag=True, help="Print the resolved recipe (defaults filled in).")
@click.option(
    "--for", "purpose", type=click.Choice(["train", "eval", "compress"]), default="train", show_default=True,
    help="What the recipe is for: train also checks what tunelab train checks before loading the model (data, output_dir).",
)
def validate(file: str, overrides: tuple[str, ...], print_resolved: bool, purpose: str) -> None:
    """Check FILE (plus KEY.PATH=VALUE overrides) against the schema, and that it can do its job."""
    from pathlib import Path

    from tunelab.recipe import dump_recipe, load_recipe
    from tunelab.rundir import check_writable

    recipe = load_recipe(file, overrides)
    if purpose == "train":
        from tunelab.train.preflight import check_trainable

        check_trainable(recipe)
    elif recipe.output_dir is not None:
        check_writable(Path(recipe.output_dir))
    if print_resolved:
        click.echo(dump_recipe(recipe), nl=False)
    else:
        stages = f"; {len(recipe.stages)} stages: {', '.join(s.name for s in recipe.stages)}" if recipe.stages else ""
        click.echo(f"{file}: ok (output_dir: {recipe.output_dir or f'runs/{recipe.name}-<time>-<random>, new per run'}{stages})")


@recipe_group.command("schema")
def schema() -> None:
    """Print the recipe's JSON Schema (for editors and validation tools)."""
    from tunelab.recipe import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


commands = [recipe_group]
