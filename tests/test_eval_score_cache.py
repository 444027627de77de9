"""The base model's scores are reused only for an identical evaluation, and equal a fresh scoring."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tunelab.models
from tunelab.cli import cli
from tunelab.evaluate.runner import evaluate
from tunelab.evaluate.score_cache import REUSED
from tunelab.evaluate.setup import resolve_setup

ITEMS = [{"question": q, "answer": a} for q, a in [("is the sky blue", "yes"), ("is fire cold", "no"), ("do fish swim", "yes")]]
SETTINGS = {"task": "choice", "choices": ["no", "yes"], "prompt_template": "Q: {question}?", "metrics": ["accuracy"]}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return path


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads: a reused result loads nothing."""
    real, count = tunelab.models.load_model, []

    def counting(*args, **kwargs):
        count.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(tunelab.models, "load_model", counting)
    return count


def score(data, **settings):
    (result,) = evaluate(resolve_setup(None, {**SETTINGS, "data": str(data), **settings}), "tiny-llama", show_progress=False)
    return result


def test_second_identical_evaluation_reuses_the_first(data, loads):
    first = score(data)
    again = score(data, batch_size=1)  # the batch size cannot change a score: same key
    assert loads == ["tiny-llama"]
    assert again.source.endswith(REUSED) and not first.source.endswith(REUSED)
    assert again.scores == first.scores and again.records == first.records


@pytest.mark.parametrize("change", ["data", "prompt", "seed", "rescore"])
def test_anything_that_can_change_a_score_recomputes(data, loads, change):
    first = score(data)
    if change == "data":
        data.write_text(data.read_text().replace('"yes"', '"no"', 1))
        again = score(data)
    elif change == "prompt":
        again = score(data, prompt_template="Question: {question}?")
    elif change == "seed":  # the tiny model is built from the seed
        again = score(data, seed=1)
    else:
        (again,) = evaluate(resolve_setup(None, {**SETTINGS, "data": str(data)}), "tiny-llama", show_progress=False, reuse_base_scores=False)
    assert loads == ["tiny-llama", "tiny-llama"]
    assert not again.source.endswith(REUSED)
    if change == "rescore":
        assert again.records == first.records


def test_cli_says_when_it_reused_scores_and_rescore_base_recomputes(data, tmp_path):
    args = ["eval", "--model", "tiny-llama", "--data", str(data), "--task", "choice", "--choice", "no", "--choice", "yes",
            "--prompt-template", "Q: {question}?", "--out", str(tmp_path / "out")]
    first = CliRunner().invoke(cli, args)
    second = CliRunner().invoke(cli, args)
    third = CliRunner().invoke(cli, [*args, "--rescore-base"])
    assert first.exit_code == second.exit_code == third.exit_code == 0, first.output + second.output + third.output
    assert REUSED not in first.output and REUSED in second.output and REUSED not in third.output
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert not report["systems"][0]["source"].endswith(REUSED)  # the third run scored afresh
