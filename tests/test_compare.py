"""`tunelab compare`: the table repeats what the stages measured; charts exist and open cleanly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.browser import CHROMIUM, PipeBrowser
from tests.train_helpers import train, write_chat_data
from tunelab.cli import cli
from tunelab.report.pareto import Point, frontier

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs evaluated on one choice set after training; the LoRA one also compressed."""
    root = tmp_path_factory.mktemp("compare")
    data = write_chat_data(root / "d.jsonl")
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps({"prompt": f"#{i} say yes", "answer": "YES" if i % 2 else "NO"}) + "\n" for i in range(6)))
    evaluation = f"eval: {{after_training: true, task: choice, data: {questions}, choices: ['YES', 'NO'], answer_field: answer}}\n"
    made = {}
    for name, method in (("lora", "method: {lora: {r: 4}}\n"), ("full", "")):
        folder = root / name
        folder.mkdir()
        train(folder, f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\n{method}{evaluation}"
                      "train: {max_steps: 3, batch_size: 8, precision: fp32, threads: 1}\n")
        made[name] = folder / "run"
    variants = "compress.variants=[{name: int8, steps: [{quantize: dynamic-int8, smooth: 0}]}]"
    result = _invoke("compress", made["lora"], variants, "--recipe", EXAMPLES / "compress_tiny.yaml")
    assert result.exit_code == 0, result.output
    return made


def test_table_values_equal_what_train_eval_and_compress_wrote(runs, tmp_path):
    result = _invoke("compare", runs["lora"], runs["full"], "--out", tmp_path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["metric"] == "accuracy"
    # Both runs live in folders called "run": their names grow until they differ.
    assert [row["name"] for row in saved["rows"]] == ["lora/run", "tiny-llama 0-shot", "full/run", "lora/run/int8"]
    by_path = {(row["kind"], row["path"]): row for row in saved["rows"]}
    for name in ("lora", "full"):
        run = by_path[("run", str(runs[name].resolve()))]
        summary = json.loads((runs[name] / "summary.json").read_text())
        report = json.loads((runs[name] / "eval" / "eval.json").read_text())
        assert run["train_seconds"] == summary["seconds"] and run["train_peak_rss_bytes"] == summary["peak_rss_bytes"]
        assert run["trainable_params"] == summary["trainable_params"] and run["cpu"] == summary["cpu"]
        assert run["scores"] == report["systems"][-1]["scores"]
    compressed = {row["variant"]: row for row in json.loads((runs["lora"] / "compress" / "compress.json").read_text())["rows"]}
    lora = by_path[("run", str(runs["lora"].resolve()))]
    assert lora["decode_tokens_per_s"] == compressed["original"]["decode_tokens_per_s"]
    assert lora["peak_rss_bytes"] == compressed["original"]["peak_rss_bytes"]
    assert lora["model_bytes"] == compressed["original"]["size_bytes"]
    assert by_path[("run", str(runs["full"].resolve()))]["decode_tokens_per_s"] is None  # never compressed: not measured, not guessed
    int8 = next(row for row in saved["rows"] if row["kind"] == "compressed")
    assert int8["scores"] == compressed["int8"]["task"] and int8["prefill_tokens_per_s"] == compressed["int8"]["prefill_tokens_per_s"]
    assert int8["train_seconds"] == lora["train_seconds"]  # a variant costs its run's training
    bases = [row for row in saved["rows"] if row["kind"] == "base model"]
    assert len(bases) == 1 and bases[0]["train_seconds"] == 0  # both runs scored the same base on the same data: one row
    with (tmp_path / "compare.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["accuracy"]) for r in table] == [row["scores"]["accuracy"] for row in saved["rows"]]
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lora/run/int8 | compressed |" in (tmp_path / "compare.md").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="headless test needs Debian's chromium (apt-get install -y chromium)")
def test_html_opens_in_headless_chromium_with_a_named_point_per_measured_row(runs, tmp_path):
    assert _invoke("compare", runs["lora"], runs["full"], "--out", tmp_path).exit_code == 0
    saved = json.loads((tmp_path / "compare.json").read_text())
    # Points per chart: memory and decode speed only where compress measured them; training time everywhere.
    expected = 2 * sum(row["peak_rss_bytes"] is not None for row in saved["rows"]) + len(saved["rows"])
    browser = PipeBrowser(tmp_path / "profile")
    try:
        browser.open((tmp_path / "pareto.html").as_uri(), ready="document.querySelectorAll('svg').length > 0")
        assert browser.js("document.querySelectorAll('svg').length") == 3
        assert browser.js("document.querySelectorAll('circle.point').length") == expected
        titles = browser.js("[...document.querySelectorAll('circle.point title')].map(t => t.textContent)")
        assert any(title.startswith("lora/run/int8 (compressed): accuracy") for title in titles)
        assert browser.js("document.querySelectorAll('tbody tr').length") == len(saved["rows"])
        assert browser.errors() == []
    finally:
        browser.close()


def test_a_compression_of_a_base_model_is_a_row_with_no_training_cost(tmp_path):
    out = tmp_path / "tiny-compress"
    variants = "compress.variants=[{name: m50, steps: [{prune: magnitude, sparsity: 0.5}]}]"
    assert _invoke("compress", variants, "--recipe", EXAMPLES / "compress_tiny.yaml", "--output", out).exit_code == 0
    result = _invoke("compare", out, "--out", tmp_path / "cmp")  # listed like a run: recognised by its compress.json
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    table = json.loads((out / "compress.json").read_text())["rows"]
    assert saved["metric"] == "perplexity"  # no eval data: the held-out perplexity compress measured is the metric
    assert [row["name"] for row in saved["rows"]] == ["tiny-compress/original", "tiny-compress/m50"]
    assert [row["perplexity"] for row in saved["rows"]] == [row["perplexity"] for row in table]
    assert all(row["train_seconds"] == 0 and row["kind"] == "compressed" for row in saved["rows"])


def test_frontier_keeps_only_undominated_points_in_the_right_directions():
    pts = [Point("a", "run", 100, 0.9), Point("b", "run", 50, 0.8), Point("c", "run", 120, 0.85), Point("d", "run", 50, 0.7)]
    assert [p.name for p in frontier(pts, x_lower_is_better=True, y_lower_is_better=False)] == ["b", "a"]
    assert [p.name for p in frontier(pts, x_lower_is_better=False, y_lower_is_better=False)] == ["a", "c"]
    assert [p.name for p in frontier(pts, x_lower_is_better=True, y_lower_is_better=True)] == ["d"]


def test_bad_input_is_one_line(tmp_path, runs):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    result = _invoke("compare", not_a_run, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a finished run (no summary.json)" in result.output
    assert len(result.output.strip().splitlines()) == 1
    missing = _invoke("compare", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert missing.exit_code == 2 and missing.output.strip() == f"error: {tmp_path / 'nowhere'}: no such directory — pass run directories (tunelab train) or compression outputs (tunelab compress)"
    typo = _invoke("compare", runs["lora"], "--metric", "acuracy", "--out", tmp_path / "o")
    assert typo.exit_code == 2 and "--metric 'acuracy': no row has it" in typo.output and "accuracy" in typo.output.split("choose")[1]
