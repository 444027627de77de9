"""The CLI surface: one-line errors with exit code 2, working informational commands."""

import json
import subprocess
import sys

from click.testing import CliRunner

from tunelab.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_recipe_validate_ok_and_print(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: tiny-llama\n")
    result = run("recipe", "validate", str(path), "train.lr=0.01", "--print", "--for", "eval")
    assert result.exit_code == 0, result.output
    assert "lr: 0.01" in result.output and "name: tiny-llama" in result.output


def test_bad_recipe_is_one_line_exit_2_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "recipe", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "did you mean 'train.lr'" in proc.stderr and f"{path}:2" in proc.stderr


def test_debug_flag_shows_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [\n")
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "--debug", "recipe", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_schema_is_json():
    result = run("recipe", "schema")
    assert result.exit_code == 0
    assert "train" in json.loads(result.output)["properties"]


def test_models_lists_packaged_and_tiny_aliases():
    result = run("models", "--json")
    rows = {r["alias"]: r for r in json.loads(result.output)}
    assert {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-bert"} <= set(rows)
    assert rows["minilm-l6"]["status"] == "offline"


def test_env_reports_precision():
    result = run("env", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["precision"] in {"fp32", "bf16", "fp16"}


def test_generate_unknown_model_is_one_line():
    result = run("generate", "--model", "no-such-model", "--prompt", "hi")
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.output


def test_generate_with_tiny_model_runs():
    result = run("generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "4", "--no-stream")
    assert result.exit_code == 0, result.output
