"""`tunelab compress`: a recipe in, a measured table and reloadable models out; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunelab.cli import cli
from tunelab.compress.store import load_compressed
from tunelab.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_tiny_recipe_writes_a_table_relative_to_the_original(tmp_path):
    result = CliRunner().invoke(cli, ["compress", "--recipe", str(EXAMPLES / "compress_tiny.yaml"), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "compress.json").read_text())
    rows = {row["variant"]: row for row in table["rows"]}
    assert list(rows) == ["original", "wanda-2of4-int8", "heads-mlp", "int4-keep-sensitive", "teal-50-int8"]
    assert rows["original"]["relative"]["size_ratio"] == 1
    assert rows["heads-mlp"]["params"] < rows["original"]["params"]
    assert rows["heads-mlp"]["size_bytes"] < rows["original"]["size_bytes"]
    assert rows["int4-keep-sensitive"]["size_bytes"] < rows["original"]["size_bytes"]
    assert rows["wanda-2of4-int8"]["steps"][0]["sparsity"] == 0.5
    assert abs(rows["teal-50-int8"]["steps"][0]["activation_sparsity"] - 0.5) < 0.01
    assert rows["teal-50-int8"]["params"] == rows["original"]["params"]
    for row in rows.values():
        assert row["perplexity"] > 1 and row["tokens_scored"] == rows["original"]["tokens_scored"]
        assert row["peak_rss_bytes"] > 0 and row["decode_tokens_per_s"] > 0
    assert "| heads-mlp |" in (tmp_path / "compress.md").read_text()
    model, _, manifest = load_compressed(tmp_path / "compressed" / "int4-keep-sensitive")
    assert manifest["loader"] == "tunelab" and len(manifest["layers"]) == 14 - 4 - 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compress.variants=[{name: a, steps: [{prune: magnitude, sparsity: 1.5}]}]", "sparsity"),
        ("compress.variants=[{name: a, steps: [{prune: wanda, pattern: '4:2'}]}]", "0 < N < M"),
        ("compress.variants=[{name: a, steps: [{quantize: int4, group_size: 48}]}]", "does not divide"),
        ("compress.variants=[{name: a, steps: [{prune: magnitude, targets: [nope]}]}]", "matches no linear layer"),
        ("compress.variants=[{name: a, steps: [{shrink: 2}]}]", "needs a 'prune:', 'quantize:' or 'sparsify:' key"),
        ("compress.heldout=missing.txt", "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, override, message):
    result = CliRunner().invoke(
        cli, ["compress", override, "--recipe", str(EXAMPLES / "compress_tiny.yaml"), "--output", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len([line for line in result.output.splitlines() if not line.startswith("compress: ")]) == 1


def test_example_recipes_validate():
    for name in ("compress_tiny.yaml", "compress_smollm2.yaml", "compress_quickstart.yaml", "compress_activation_sparsity.yaml", "compress_relufied.yaml"):
        assert load_recipe(EXAMPLES / name).compress.variants


def test_variants_are_scored_on_the_recipes_eval_task(tmp_path):
    """With eval data, every variant gets the task metrics (relative to the original) and its predictions."""
    overrides = [
        "compress.variants=[{name: int8, steps: [{quantize: dynamic-int8}]}, {name: magnitude-90, steps: [{prune: magnitude, sparsity: 0.9}]}]",
        "eval.task=choice", f"eval.data={EXAMPLES / 'data' / 'rt_cls_test.jsonl'}", "eval.answer_field=label",
        "eval.choices=[negative, positive]", "eval.prompt_template='Review: {text}'", "eval.format=plain",
        "eval.metrics=[accuracy, f1]", "eval.max_examples=12",
    ]
    result = CliRunner().invoke(cli, ["compress", *overrides, "--recipe", str(EXAMPLES / "compress_tiny.yaml"), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {row["variant"]: row for row in json.loads((tmp_path / "compress.json").read_text())["rows"]}
    for row in rows.values():
        assert {"accuracy", "f1_macro"} <= set(row["task"]) and 0 <= row["task"]["accuracy"] <= 1
        assert row["relative"]["task_change"]["accuracy"] == pytest.approx(row["task"]["accuracy"] - rows["original"]["task"]["accuracy"])
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [system["system"] for system in report["systems"]] == ["original", "int8", "magnitude-90"]
    assert all(system["examples"] == 12 for system in report["systems"])
    assert " accuracy | " in (tmp_path / "compress.md").read_text().splitlines()[0]

    off = CliRunner().invoke(cli, ["compress", *overrides, "compress.evaluate=false", "--recipe", str(EXAMPLES / "compress_tiny.yaml"),
                                   "--output", str(tmp_path / "off")])
    assert off.exit_code == 0, off.output
    assert all("task" not in row for row in json.loads((tmp_path / "off" / "compress.json").read_text())["rows"])


def test_a_run_is_compressed_into_its_own_folder_and_scored_on_its_own_eval_set(tmp_path):
    from tests.train_helpers import train, write_chat_data

    data = write_chat_data(tmp_path / "d.jsonl")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"prompt": f"#{i} say yes", "answer": "YES"}) + "\n" for i in range(4)))
    train(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\ntrain: {{max_steps: 2, batch_size: 8, precision: fp32}}\n"
                    f"eval: {{task: generation, data: {questions}, max_new_tokens: 3}}\n")
    run = tmp_path / "run"
    variants = "compress.variants=[{name: int8, steps: [{quantize: dynamic-int8, smooth: 0}]}]"
    result = CliRunner().invoke(cli, ["compress", str(run), variants, "--recipe", str(EXAMPLES / "compress_tiny.yaml")])
    assert result.exit_code == 0, result.output
    table = json.loads((run / "compress" / "compress.json").read_text())
    rows = table["rows"]
    assert table["run"] == str(run.resolve())  # tunelab compare charges the variants this run's training
    assert [row["variant"] for row in rows] == ["original", "int8"]
    assert all("exact_match" in row["task"] for row in rows)
    assert (run / "compress" / "eval" / "eval.json").exists()


def test_a_validation_split_alone_is_not_an_evaluation_task(tmp_path):
    from tests.train_helpers import recipe_for, write_chat_data
    from tunelab.compress.run import task_evaluation

    data = write_chat_data(tmp_path / "d.jsonl")
    base = f"model: {{name: tiny-llama}}\ndata: {{train: {data}, validation: {data}}}\n"
    assert task_evaluation(recipe_for(tmp_path, base)) is None  # chat rows: nothing to score them by
    assert task_evaluation(recipe_for(tmp_path, base, "eval.after_training=true")) is not None
    assert task_evaluation(recipe_for(tmp_path, base, "eval.after_training=true", "compress.evaluate=false")) is None


def test_running_again_into_the_same_folder_starts_a_fresh_row_log(tmp_path):
    args = ["compress", "compress.variants=[{name: m, steps: [{prune: magnitude, sparsity: 0.5}]}]",
            "--recipe", str(EXAMPLES / "compress_tiny.yaml"), "--output", str(tmp_path)]
    for _ in range(2):
        assert CliRunner().invoke(cli, args).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "compress.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in rows] == ["original", "m"]
