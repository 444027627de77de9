"""``tunelab models`` and ``tunelab env``: what is available on this machine."""

from __future__ import annotations

import json

import click


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_command(as_json: bool) -> None:
    """List model aliases and whether each is available offline."""
    from tunelab.models.cache import cache_root
    from tunelab.models.inventory import inventory

    rows = inventory()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["alias"]) for r in rows)
    for r in rows:
        click.echo(f"{r['alias']:<{width}}  {r['status']:<28}  {r['description']}")
    click.echo(f"\ncache: {cache_root()}  |  also accepted: a Hugging Face model directory or a .gguf file")


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def env_command(as_json: bool) -> None:
    """Show torch version, devices, threads, CPU features and the precision `auto` picks."""
    from tunelab.hardware import configure_threads, environment_report

    configure_threads()
    report = environment_report().as_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key.replace('_', ' '):<17} {value}")


commands = [models_command, env_command]
