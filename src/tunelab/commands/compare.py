"""``tunelab compare``: one trade-off table and Pareto charts over runs and compressed variants."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click


@click.command("compare")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--compress-dirs", "compress_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A tunelab compress output outside the runs (repeatable; such directories may also be listed as DIRS).")
@click.option("--metric", default=None, help="Task score to chart (default: accuracy, else the first score every row has).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write (default: runs/compare-<time>).")
def compare_command(dirs: tuple[Path, ...], compress_dirs: tuple[Path, ...], metric: str | None, out: Path | None) -> None:
    """Put runs (with their base model and RUN/compress variants) and compression outputs in one table.

    Every number comes from what train, eval and compress already measured (summary.json,
    eval/eval.json, compress.json); nothing is re-run. Writes compare.md, compare.csv,
    compare.json, pareto.png and pareto.html (self-contained; hover a point for its name): the
    task metric against serving memory, decode speed and training time, frontier highlighted.
    """
    from tunelab import atomic
    from tunelab.errors import UserError
    from tunelab.report.compare import (
        choose_metric,
        collect,
        csv_table,
        html_table,
        markdown_table,
        mixed_cpu_warning,
        mixed_data_warning,
    )
    from tunelab.report.pareto import write_html, write_png
    from tunelab.rundir import unique_run_dir

    for d in (*dirs, *compress_dirs):
        if not d.is_dir():
            raise UserError(f"{d}: no such directory", hint="pass run directories (tunelab train) or compression outputs (tunelab compress)")
    runs = [d for d in dirs if (d / "summary.json").exists() or not (d / "compress.json").exists()]
    rows = collect(runs, [*compress_dirs, *(d for d in dirs if d not in runs)])
    chosen = choose_metric(rows, metric)
    notes = [note for note in (mixed_data_warning(rows), mixed_cpu_warning(rows)) if note]
    target = out or unique_run_dir(Path("runs"), "compare")
    target.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, chosen)
    atomic.write_text(target / "compare.md", table + "".join(f"\nNote: {note}\n" for note in notes))
    atomic.write_text(target / "compare.csv", csv_table(rows))
    atomic.write_json(target / "compare.json", {"metric": chosen, "notes": notes, "rows": [asdict(row) for row in rows]})
    png = write_png(rows, chosen, target / "pareto.png")
    write_html(rows, chosen, html_table(rows, chosen), target / "pareto.html", notes)
    click.echo(table)
    for note in notes:
        click.echo(f"note: {note}")
    written = ["compare.md", "compare.csv", "compare.json", *(["pareto.png"] if png else []), "pareto.html"]
    click.echo(f"written: {', '.join(str(target / name) for name in written)}")


commands = [compare_command]
