"""Ensembles in ``tunelab eval``: logit averaging, probability averaging and majority vote over
the members' own records, as one more row of the same table."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from tests.test_eval_cli import QA, read_report, write_jsonl
from tunelab.cli import cli
from tunelab.errors import UserError
from tunelab.evaluate.config import EvalConfig
from tunelab.evaluate.ensemble import ensemble
from tunelab.evaluate.runner import SystemResult


def member(name: str, logprobs: list[list[float]]) -> SystemResult:
    """A choice-task result over options (a, b, c) with answer 'a' for every item."""
    records = [{"where": f"d.jsonl:{i + 1}", "options": ["a", "b", "c"], "logprobs": lp, "answer": "a",
                "prediction": "abc"[max(range(3), key=lp.__getitem__)]} for i, lp in enumerate(logprobs)]
    return SystemResult(name, name, name, 0, len(records), 1.0, {}, records)


def log(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def test_logit_mean_probability_mean_and_vote_are_different_rules():
    # One item where the three rules disagree: two members lean to b, one is certain of a.
    members = [member("m1", [log(0.10, 0.45, 0.45)]), member("m2", [log(0.30, 0.40, 0.30)]), member("m3", [log(0.98, 0.01, 0.01)])]
    cfg = EvalConfig(task="choice")
    picks = {how: ensemble(members, how, cfg).records[0]["prediction"] for how in ("logits", "probs", "vote")}
    # mean log-prob: a = log(.1*.3*.98)/3, b = log(.45*.4*.01)/3 -> a; mean prob: a .46, b .287 -> a;
    # vote: m1 ties b/c (max picks b), m2 b, m3 a -> b
    assert picks == {"logits": "a", "probs": "a", "vote": "b"}
    row = ensemble(members, "probs", cfg)
    assert row.scores == {"accuracy": 1.0} and row.seconds == 3.0 and row.records[0]["members"] == ["b", "b", "a"]


def test_a_tied_vote_goes_to_the_answer_with_the_highest_mean_probability():
    members = [member("m1", [log(0.6, 0.3, 0.1)]), member("m2", [log(0.2, 0.7, 0.1)])]
    assert ensemble(members, "vote", EvalConfig(task="choice")).records[0]["prediction"] == "b"


@pytest.mark.parametrize(("task", "how", "message"), [
    ("perplexity", "probs", "perplexity runs cannot be ensembled"), ("generation", "logits", "no scores to average"),
])
def test_ensembles_that_cannot_exist_are_refused(task, how, message):
    with pytest.raises(UserError, match=message):
        ensemble([member("m1", [log(1, 1, 1)])] * 2, how, EvalConfig(task=task))


def test_eval_cli_adds_the_ensemble_row_after_its_members(tmp_path):
    from tunelab.models import load_model

    runs = []
    for seed in (1, 2, 3):
        loaded = load_model("tiny-llama", seed=seed)
        loaded.model.save_pretrained(tmp_path / f"m{seed}")
        loaded.tokenizer.save_pretrained(tmp_path / f"m{seed}")
        runs += ["--run", str(tmp_path / f"m{seed}")]
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["eval", *runs, "--data", data, "--task", "choice", "--choice", "no", "--choice", "yes",
                                      "--prompt-template", "Q: {question}?", "--ensemble", "probs", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report, records = read_report(out)
    assert [s["system"] for s in report["systems"]][-1] == "ensemble (probs) of 3 runs"
    member_records = [records[str(tmp_path / f"m{s}")] for s in (1, 2, 3)]
    for i, row in enumerate(records["ensemble (probs) of 3 runs"]):
        probs = [[math.exp(x) / sum(math.exp(y) for y in m[i]["logprobs"]) for x in m[i]["logprobs"]] for m in member_records]
        mean = [sum(p[j] for p in probs) / 3 for j in range(2)]
        assert row["prediction"] == ["no", "yes"][mean.index(max(mean))]
    assert "ensemble (probs) of 3 runs" in (out / "eval.md").read_text()
    one = CliRunner().invoke(cli, ["eval", *runs[:2], "--data", data, "--task", "choice", "--choice", "no", "--choice", "yes",
                                   "--prompt-template", "{question}", "--ensemble", "vote"])
    assert one.exit_code == 2 and "at least two runs, got 1" in one.output


def test_lora_classification_runs_keep_their_label_names_and_ensemble(tmp_path):
    """An adapter run's head loads with the run's label names (not the base's LABEL_0 ...), so
    `eval --task classification` scores its predictions against the data's labels."""
    from tests.train_helpers import train, write_label_data

    data = write_label_data(tmp_path / "d.jsonl", n=48)
    runs = []
    for i in range(2):
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        train(folder, f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
                      "method: {head: {type: classification}, lora: {r: 4}}\n"
                      f"seed: {i}\ntrain: {{lr: 0.01, max_steps: 4, batch_size: 4, precision: fp32, threads: 1, eval_before: false}}\n")
        runs += ["--run", str(folder / "run")]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["eval", *runs, "--data", str(data), "--task", "classification", "--answer-field", "label",
                                      "--ensemble", "logits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    _, records = read_report(out)
    for rows in records.values():
        assert {r["prediction"] for r in rows} <= {"neg", "pos"}
