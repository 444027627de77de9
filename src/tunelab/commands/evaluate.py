"""``tunelab metrics``: score predictions from files; ``tunelab eval``: evaluate a model on a task."""

from __future__ import annotations

import json

import click

from tunelab.evaluate.metrics import METRICS


def _metric_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


@click.command("metrics")
@click.option("--metric", "metric_list", required=True, help=f"Comma-separated: {', '.join(METRICS)}.")
@click.option("--predictions", "predictions_path", required=True, type=click.Path(dir_okay=False), help="JSONL (field prediction/text) or text, one per line.")
@click.option(
    "--references",
    "reference_paths",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="JSONL (field references/reference/answers/text, string or list) or text; repeat for several reference sets.",
)
def metrics_command(metric_list: str, predictions_path: str, reference_paths: tuple[str, ...]) -> None:
    """Score any system's outputs against references and print JSON."""
    from tunelab.evaluate.metrics import get_metrics, score, settings
    from tunelab.evaluate.textfiles import read_predictions, read_references

    names = _metric_names(metric_list)
    get_metrics(names)  # a typo fails before any file is read
    predictions = read_predictions(predictions_path)
    references = read_references(reference_paths)
    scores = score(names, predictions, references)
    click.echo(json.dumps({"items": len(predictions), "scores": scores, "settings": settings(names)}, indent=2))


commands = [metrics_command]
