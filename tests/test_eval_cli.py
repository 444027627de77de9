"""``tunelab eval`` end to end on tiny models: one table of systems, eval.json, predictions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tunelab.cli import cli
from tunelab.evaluate.metrics import score

QA = [
    {"question": "is the sky blue", "answer": "yes", "answers": ["yes", "Yes."]},
    {"question": "is fire cold", "answer": "no", "answers": ["no"]},
    {"question": "do fish swim", "answer": "yes", "answers": ["yes"]},
    {"question": "is ice hot", "answer": "no", "answers": ["no", "No"]},
    {"question": "can birds fly", "answer": "yes", "answers": ["yes"]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def qa(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", QA), write_jsonl(tmp_path / "pool.jsonl", QA[::-1])


def run(*args):
    result = CliRunner().invoke(cli, ["eval", *args])
    return result


def read_report(out):
    report = json.loads((out / "eval.json").read_text())
    records = {s["system"]: [json.loads(line) for line in (out / s["predictions"]).read_text().splitlines()] for s in report["systems"]}
    return report, records


def test_choice_compares_zero_shot_few_shot_and_a_saved_model(qa, tmp_path):
    from tunelab.models import load_model

    saved = tmp_path / "finetuned"
    loaded = load_model("tiny-llama", seed=7)
    loaded.model.save_pretrained(saved)
    loaded.tokenizer.save_pretrained(saved)
    data, pool = qa
    out = tmp_path / "out"
    result = run(
        "--model", "tiny-llama", "--run", str(saved), "--data", data, "--pool", pool, "--task", "choice",
        "--choice", "no", "--choice", "yes", "--shots", "0,2", "--prompt-template", "Q: {question}?", "--metrics", "accuracy,f1",
        "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    report, records = read_report(out)
    assert [s["system"] for s in report["systems"]] == ["tiny-llama 0-shot", "tiny-llama 2-shot", str(saved)]
    for system in report["systems"]:
        rows = records[system["system"]]
        assert len(rows) == len(QA) and system["examples"] == len(QA) and system["examples_per_second"] > 0
        assert system["scores"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        assert set(system["scores"]) == {"accuracy", "f1_macro", "f1_micro", "accuracy_norm"}
    assert report["settings"]["prompt_template"] == "Q: {question}?" and report["settings"]["shots"] == [0, 2]
    assert report["metric_settings"]["f1"] and report["versions"]["transformers"]
    table = (out / "eval.md").read_text()
    assert "| tiny-llama 2-shot |" in table and "examples/s" in table
    assert "tiny-llama 0-shot" in result.output


def test_generation_cuts_at_stop_and_scores_every_reference(qa, tmp_path):
    data, pool = qa
    out = tmp_path / "gen"
    result = run(
        "--model", "tiny-llama", "--data", data, "--pool", pool, "--task", "generation", "--answer-field", "answers",
        "--prompt-template", "Q: {question}?", "--max-new-tokens", "6", "--stop", "\\n", "--metrics", "exact_match,chrf",
        "--format", "plain", "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    report, records = read_report(out)
    rows = records["tiny-llama 0-shot"]
    assert all("\n" not in r["output"] for r in rows)
    expected = score(["exact_match", "chrf"], [r["prediction"] for r in rows], [r["references"] for r in rows])
    assert report["systems"][0]["scores"] == pytest.approx(expected)


def test_perplexity_task_equals_the_perplexity_function(tmp_path):
    from tunelab.evaluate.perplexity import perplexity
    from tunelab.models import load_model

    texts = ["The quick brown fox jumps over the lazy dog.", "A second, somewhat longer line of held-out text."]
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "ppl"
    assert run("--model", "tiny-llama", "--data", data, "--task", "perplexity", "--out", str(out)).exit_code == 0
    report, _ = read_report(out)
    loaded = load_model("tiny-llama")
    expected = perplexity(loaded.model, loaded.tokenizer, texts, max_length=1024, batch_size=8)
    assert report["systems"][0]["scores"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


def test_classification_reads_labels_from_the_trained_head(tmp_path):
    rows = [{"text": f"example {i}" + " long" * 200 * (i == 0), "label": f"LABEL_{i % 2}"} for i in range(6)]  # row 0 > 512 tokens
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    out = tmp_path / "cls"
    result = run("--model", "tiny-bert", "--data", data, "--task", "classification", "--answer-field", "label", "--out", str(out))
    assert result.exit_code == 0, result.output
    report, records = read_report(out)
    predictions = [r["prediction"] for r in records["tiny-bert"]]
    assert set(predictions) <= {"LABEL_0", "LABEL_1"}
    assert report["systems"][0]["scores"] == pytest.approx(score(["accuracy", "f1"], predictions, [[r["label"]] for r in rows]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny-llama", "--task", "choice"], "no evaluation data"),
        (["--model", "tiny-llama", "--data", "DATA", "--metrics", "acuracy"], "unknown metric 'acuracy' — known metrics"),
        (["--model", "tiny-llama", "--data", "DATA", "--task", "perplexity", "--shots", "0,5", "--text-field", "question"], "few-shot prompting does not apply"),
        (["--model", "tiny-llama", "--data", "DATA", "--shots", "1", "--prompt-template", "{question}"], "needs a pool"),
        (["--model", "tiny-llama", "--data", "DATA", "--task", "choice", "--choice", "A", "--choice", "B", "--prompt-template", "{question}"], "qa.jsonl:1: answer 'yes' is neither one of the options"),
        (["--model", "tiny-llama", "--data", "DATA", "--prompt-template", "{passage}"], "qa.jsonl:1: prompt template needs field 'passage'"),
        (["--model", "tiny-llama", "--data", "DATA", "--answer-field", "gold", "--prompt-template", "{question}"], "qa.jsonl:1: row has no field 'gold'"),
        (["--data", "DATA"], "nothing to evaluate"),
    ],
)
def test_bad_input_is_one_line_exit_2(qa, args, message):
    data, _ = qa
    result = run(*[data if a == "DATA" else a for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0


def test_recipe_eval_section_after_training_compares_base_and_run(tmp_path):
    from tunelab.evaluate.pipeline import eval_after_training
    from tunelab.models import load_model
    from tunelab.recipe import load_recipe

    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "model: {name: tiny-llama}\n"
        "data: {train: qa.jsonl, validation: qa.jsonl, prompt_template: 'Q: {question}?'}\n"
        "eval: {task: choice, choices: ['no', 'yes'], shots: [0, 1]}\n"
    )
    run_dir = tmp_path / "run"
    loaded = load_model("tiny-llama", seed=5)
    loaded.model.save_pretrained(run_dir)
    loaded.tokenizer.save_pretrained(run_dir)
    report = json.loads(eval_after_training(load_recipe(recipe_file), run_dir).read_text())
    assert [s["system"] for s in report["systems"]] == ["tiny-llama 0-shot", "tiny-llama 1-shot", str(run_dir)]
    assert report["settings"]["prompt_template"] == "Q: {question}?"  # taken from data: when eval: has none
    assert (run_dir / "eval" / "eval.md").read_text().startswith("# choice evaluation")


def test_after_training_a_classification_head_is_scored_without_a_base_row(tmp_path):
    """The base model has no trained head (it would be drawn at random), so only the run is scored."""
    from tunelab.evaluate.pipeline import eval_after_training
    from tunelab.models import load_model
    from tunelab.recipe import load_recipe

    rows = [{"text": f"{w} day", "label": lab} for w, lab in [("good", "pos"), ("bad", "neg")] * 4]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "model: {name: tiny-bert}\ndata: {train: d.jsonl}\nmethod: {head: {type: classification}}\n"
        "eval: {task: classification, data: d.jsonl, answer_field: label}\n"
    )
    run_dir = tmp_path / "run"
    loaded = load_model("tiny-bert", "sequence-classification", seed=5, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    loaded.model.save_pretrained(run_dir)
    loaded.tokenizer.save_pretrained(run_dir)
    report = json.loads(eval_after_training(load_recipe(recipe_file), run_dir).read_text())
    assert [s["system"] for s in report["systems"]] == [str(run_dir)]
    assert report["systems"][0]["scores"]["accuracy"] in {i / 8 for i in range(9)}


def test_a_source_checkout_without_package_metadata_still_gets_its_report(tmp_path, monkeypatch):
    """Run from ``src/`` on a PYTHONPATH (as on the GPU machine), tunelab has no installed version:
    the report says so instead of failing after the evaluation is done."""
    from importlib.metadata import PackageNotFoundError, version

    from tunelab.evaluate import report

    def no_tunelab(name):
        if name == "tunelab":
            raise PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(report, "version", no_tunelab)
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": "A short line of held-out text."}])
    out = tmp_path / "ppl"
    assert run("--model", "tiny-llama", "--data", data, "--task", "perplexity", "--out", str(out)).exit_code == 0
    versions = read_report(out)[0]["versions"]
    assert versions["tunelab"] == "not installed (run from source)" and versions["torch"] == version("torch")
