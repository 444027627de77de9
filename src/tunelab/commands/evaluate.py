"""``tunelab metrics``: score predictions from files; ``tunelab eval``: compare systems on a task."""

from __future__ import annotations

import json

import click

from tunelab.errors import UserError
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
    if predictions and len(predictions) != len(references):
        raise UserError(
            f"{predictions_path} has {len(predictions)} predictions but {', '.join(reference_paths)} "
            f"{'has' if len(reference_paths) == 1 else 'have'} {len(references)} references",
            hint="give exactly one line/row of references per prediction (check for a missing line or an extra blank one)",
        )
    scores = score(names, predictions, references)
    click.echo(json.dumps({"items": len(predictions), "scores": scores, "settings": settings(names)}, indent=2))


def _unescape(text: str) -> str:
    """Shells make a newline hard to type, so ``\\n`` and ``\\t`` in a stop string mean newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _shots(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: write counts separated by commas, e.g. 0,1,5") from None


@click.command("eval")
@click.option("--model", "-m", "model_name", default=None, help="Base model (alias, HF directory, .gguf, run directory); default: the recipe's model.")
@click.option("--run", "runs", multiple=True, help="A fine-tuned model or run directory, evaluated zero-shot (repeatable).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None, help="Take eval:/data: settings from this recipe.")
@click.option("--data", default=None, help="Evaluation file (JSONL, JSON, CSV, Parquet).")
@click.option("--pool", default=None, help="File of solved examples for few-shot demonstrations.")
@click.option("--task", type=click.Choice(["generation", "choice", "classification", "perplexity"]), default=None)
@click.option("--metrics", "metric_list", default=None, help=f"Comma-separated: {', '.join(METRICS)}.")
@click.option("--shots", default=None, help="In-context examples for the base model, e.g. 0,5.")
@click.option("--prompt-template", default=None, help="E.g. '{passage}\nQuestion: {question}?'.")
@click.option("--answer-field", default=None, help="Field with the reference answer(s) or correct option.")
@click.option("--text-field", default=None, help="Field with the text (classification, perplexity).")
@click.option("--task-field", default=None, help="Field naming each item's task (a hierarchical-adapter run answers with its family's adapters).")
@click.option("--choice", "choices", multiple=True, help="An option shared by all items (repeat: --choice no --choice yes).")
@click.option("--format", "prompt_format", type=click.Choice(["chat", "plain"]), default=None)
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--max-examples", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None, help="0 = greedy.")
@click.option("--stop", multiple=True, help="Stop string for generation (repeatable; '\\n' means a newline).")
@click.option("--extract", type=click.Choice(["none", "first_line", "regex", "choice_letter"]), default=None)
@click.option("--extract-pattern", default=None)
@click.option("--seed", type=int, default=None)
@click.option("--ensemble", type=click.Choice(["logits", "probs", "vote"]), default=None, help="Add a row for the --run models combined.")
@click.option("--out", "out_dir", default=None, help="Output folder; default: <recipe output_dir>/eval or ./eval-<task>.")
@click.option("--rescore-base", is_flag=True, help="Score the base model again even if an identical evaluation is cached.")
def eval_command(
    model_name: str | None, runs: tuple[str, ...], recipe_path: str | None, out_dir: str | None, rescore_base: bool, **options: object
) -> None:
    """Evaluate the base model zero-/few-shot and fine-tuned runs on one task; write eval.json, eval.md, predictions."""
    from pathlib import Path

    from tunelab.evaluate.pipeline import run_eval
    from tunelab.evaluate.report import markdown_table
    from tunelab.evaluate.score_cache import REUSED
    from tunelab.hardware import configure_threads
    from tunelab.recipe import load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else None
    overrides = {
        "data": options["data"], "pool": options["pool"], "task": options["task"],
        "metrics": _metric_names(str(options["metric_list"])) if options["metric_list"] else None,
        "shots": _shots(options["shots"]),  # type: ignore[arg-type]
        "prompt_template": options["prompt_template"], "answer_field": options["answer_field"],
        "text_field": options["text_field"], "task_field": options["task_field"], "choices": list(options["choices"]) or None,  # type: ignore[call-overload]
        "format": options["prompt_format"], "system_prompt": options["system_prompt"],
        "max_examples": options["max_examples"], "batch_size": options["batch_size"],
        "max_new_tokens": options["max_new_tokens"], "temperature": options["temperature"],
        "stop": [_unescape(s) for s in options["stop"]] or None,  # type: ignore[attr-defined]
        "extract": options["extract"], "extract_pattern": options["extract_pattern"], "seed": options["seed"],
        "ensemble": options["ensemble"],
    }
    base = model_name or (recipe.model.name if recipe else None)
    task = overrides["task"] or (recipe.eval.task if recipe else "generation")
    out = Path(out_dir) if out_dir else (Path(recipe.output_dir) / "eval" if recipe and recipe.output_dir else Path(f"eval-{task}"))
    configure_threads()
    results, path = run_eval(recipe, overrides, base, runs, out, recipe_dir=Path(recipe_path).parent if recipe_path else None,
                             reuse_base_scores=not rescore_base)
    click.echo(markdown_table(results), nl=False)
    if any(r.source.endswith(REUSED) for r in results):
        click.echo(f"{base}: scores {REUSED} (same model files, data, settings and scoring code); --rescore-base recomputes them")
    click.echo(f"wrote {path}, {out / 'eval.md'} and per-system predictions")


@click.group("human")
def human_group() -> None:
    """Blinded side-by-side human review: export a page, import the ratings."""


@human_group.command("export")
@click.option("--predictions", "predictions", multiple=True, required=True, type=click.Path(dir_okay=False), help="A system's predictions JSONL (from `tunelab eval`); repeat for 2+ systems.")
@click.option("--name", "names", multiple=True, help="System names, in --predictions order (default: file names).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The HTML page to write (its key goes to <out>.key.json).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the per-item shuffle.")
def human_export_command(predictions: tuple[str, ...], names: tuple[str, ...], out_path: str, seed: int) -> None:
    """Write a self-contained HTML page where raters compare blinded outputs and download ratings."""
    from tunelab.evaluate.human_export import export_review, key_path

    page = export_review(predictions, out_path, names, seed)
    click.echo(f"wrote {page} (send this to raters) and {key_path(page)} (keep it: it unblinds the ratings)")


@human_group.command("import")
@click.argument("ratings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False), help="The page's .key.json.")
def human_import_command(ratings: tuple[str, ...], key_file: str) -> None:
    """Win rates with 95% intervals and rater agreement (Cohen's/Fleiss' kappa), as JSON."""
    from pathlib import Path

    from tunelab.evaluate.human_stats import read_ratings, summarize

    key = json.loads(Path(key_file).read_text(encoding="utf-8"))
    click.echo(json.dumps(summarize(read_ratings(ratings, key), key["systems"]), indent=2))


commands = [metrics_command, eval_command, human_group]
