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
def validate(file: str, overrides: tuple[str, ...], print_resolved: bool) -> None:
    """Check FILE (plus KEY.PATH=VALUE overrides) against the schema."""
    from pathlib import Path

    from tunelab.recipe import dump_recipe, load_recipe
    from tunelab.rundir import check_writable

    recipe = load_recipe(file, overrides)
    if recipe.output_dir is not None:
        check_writable(Path(recipe.output_dir))
    if print_resolved:
        click.echo(dump_recipe(recipe), nl=False)
    else:
        click.echo(f"{file}: ok (output_dir: {recipe.output_dir or f'runs/{recipe.name}-<time>-<random>, new per run'})")


@recipe_group.command("schema")
def schema() -> None:
    """Print the recipe's JSON Schema (for editors and validation tools)."""
    from tunelab.recipe import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


commands = [recipe_group]
