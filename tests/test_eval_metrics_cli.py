"""``tunelab metrics`` scores files from any system and fails on bad input in one line."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from click.testing import CliRunner

from tunelab.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def files(tmp_path):
    preds_txt = tmp_path / "preds.txt"
    preds_txt.write_text("The cat sat on the mat.\n\nhe bought an auto\n")
    preds_jsonl = tmp_path / "preds.jsonl"
    preds_jsonl.write_text("".join(json.dumps({"prediction": p}) + "\n" for p in preds_txt.read_text().splitlines()))
    refs_txt = tmp_path / "refs.txt"
    refs_txt.write_text("The cat is on the mat.\nNothing here.\nhe bought a car\n")
    refs_multi = tmp_path / "refs.jsonl"
    refs_multi.write_text(
        json.dumps({"references": ["A cat sat on the mat."]}) + "\n"
        + json.dumps({"references": ["Empty.", "Still nothing."]}) + "\n"
        + json.dumps({"reference": "he purchased a car"}) + "\n"
    )
    return {"preds_txt": preds_txt, "preds_jsonl": preds_jsonl, "refs_txt": refs_txt, "refs_multi": refs_multi}


def test_text_and_jsonl_predictions_give_the_same_scores(files):
    outputs = [
        json.loads(run("metrics", "--metric", "bleu,chrf", "--predictions", str(files[k]), "--references", str(files["refs_txt"])).output)
        for k in ("preds_txt", "preds_jsonl")
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0]["items"] == 3  # the empty line is an empty prediction, not skipped


def test_several_reference_files_and_lists_merge_per_item(files):
    result = run(
        "metrics", "--metric", "bleu,exact_match", "--predictions", str(files["preds_txt"]),
        "--references", str(files["refs_txt"]), "--references", str(files["refs_multi"]),
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    hyps = files["preds_txt"].read_text().splitlines()
    streams = [
        ["The cat is on the mat.", "Nothing here.", "he bought a car"],
        ["A cat sat on the mat.", "Empty.", "he purchased a car"],
        [None, "Still nothing.", None],
    ]
    assert out["scores"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-6)
    assert out["settings"]["bleu"].startswith("sacrebleu")


def bad_invocations(files, tmp_path):
    """Each mistake a user can make, as the command line they would type and the error they get."""
    preds, refs = str(files["preds_txt"]), str(files["refs_txt"])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("one line\n")
    (tmp_path / "bad.jsonl").write_text('{"answer_text": "x"}\n')
    return {
        "unknown metric": (["--metric", "bleu,blue", "--predictions", preds, "--references", refs], "unknown metric 'blue' — known metrics: accuracy"),
        "references missing": (["--metric", "bleu", "--predictions", preds], "references missing"),
        "empty predictions": (["--metric", "bleu", "--predictions", str(tmp_path / "empty.txt"), "--references", refs], "no predictions to score"),
        "count mismatch": (["--metric", "bleu", "--predictions", preds, "--references", str(tmp_path / "short.txt")], "has 3 predictions but"),
        "no text field": (["--metric", "bleu", "--predictions", str(tmp_path / "bad.jsonl"), "--references", refs], "row has none of the fields prediction, text, output"),
    }


@pytest.mark.parametrize("mistake", ["unknown metric", "references missing", "empty predictions", "count mismatch", "no text field"])
def test_bad_input_is_one_line_exit_2(files, tmp_path, mistake):
    args, message = bad_invocations(files, tmp_path)[mistake]
    result = run("metrics", *args)
    assert result.exit_code == 2
    assert message in result.output and result.output.strip().count("\n") == 0
