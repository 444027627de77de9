"""Every head learns its toy task from a recipe, on an encoder and a decoder, and reloads as saved."""

import json
import random
from pathlib import Path

import pytest

from tests.train_helpers import train
from tunelab.models import load_run

COLORS = ["red", "green", "blue"]
FILLER = ["the", "a", "film", "plot", "actor", "scene"]
FAST = "train: {{lr: {lr}, max_steps: {steps}, batch_size: 16, schedule: constant, precision: fp32, eval_before: true}}\n"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def filler(rng: random.Random, n: int = 3) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(n))


def run(tmp_path: Path, model: str, head: str, data: Path, lr: float = 0.003, steps: int = 40, extra: str = ""):
    return train(
        tmp_path,
        f"model: {{name: {model}}}\ndata: {{train: {data}, val_fraction: 0.2{extra}}}\nmethod: {{head: {head}}}\n"
        + FAST.format(lr=lr, steps=steps),
    )


def test_multi_label_head_learns_label_sets(tmp_path, model="tiny-llama"):
    rng = random.Random(0)
    rows = []
    for i in range(200):
        present = [c for c in COLORS if rng.random() < 0.4]
        words = present + [rng.choice(FILLER) for _ in range(3)]
        rng.shuffle(words)
        rows.append({"text": f"{i} " + " ".join(words), "labels": present})
    summary = run(tmp_path, model, "{type: multi_label}, freeze: {base: false}", write_rows(tmp_path / "d.jsonl", rows), lr=0.01, steps=60)
    before, after = summary.eval_before, summary.eval_after
    assert after["eval_f1_micro"] > before["eval_f1_micro"] + 0.25, (before, after)
    assert after["eval_exact_match"] > 3 / 8  # all three decisions right; chance is 1/8
    model_back, _, manifest = load_run(tmp_path / "run")
    assert model_back.config.num_labels == 3 and manifest["label_names"] == sorted(COLORS)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_regression_head_learns_a_count(tmp_path, model):
    rng = random.Random(1)
    rows = []
    for i in range(200):
        k = rng.randint(0, 3)
        words = ["good"] * k + [rng.choice(FILLER) for _ in range(4 - k)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": float(k)})
    summary = run(tmp_path, model, "{type: regression}, freeze: {base: false}", write_rows(tmp_path / "d.jsonl", rows), steps=60)
    assert summary.eval_after["eval_pearson"] > 0.5, summary.eval_after
    assert summary.eval_after["eval_rmse"] < 0.8 * summary.eval_before["eval_rmse"]
    model_back, _, _ = load_run(tmp_path / "run")
    assert model_back.config.num_labels == 1


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_token_classification_head_tags_words(tmp_path, model):
    rng = random.Random(2)
    animals = ["cat", "dog", "cow", "owl"]
    rows = []
    for _ in range(200):
        words = [rng.choice(animals + COLORS) for _ in range(5)]
        rows.append({"tokens": words, "tags": ["ANIMAL" if w in animals else "COLOR" for w in words]})
    summary = run(tmp_path, model, "{type: token_classification}, freeze: {base: false}", write_rows(tmp_path / "d.jsonl", rows), steps=40)
    assert summary.eval_after["eval_accuracy"] > 0.95, summary.eval_after
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"]
    model_back, _, _ = load_run(tmp_path / "run")
    assert model_back.config.id2label == {0: "ANIMAL", 1: "COLOR"}


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_multiple_choice_head_picks_the_right_answer(tmp_path, model):
    rng = random.Random(3)
    rows = []
    for i in range(160):
        n = rng.choice([3, 4])  # rows may differ in their number of choices
        choices = [f"{filler(rng, 2)} bad" for _ in range(n)]
        answer = rng.randrange(n)
        choices[answer] = f"{filler(rng, 2)} good"
        rows.append({"question": f"#{i} which one is good?", "choices": choices, "label": answer})
    summary = run(tmp_path, model, "{type: multiple_choice}, freeze: {base: false}", write_rows(tmp_path / "d.jsonl", rows), steps=40)
    assert summary.eval_after["eval_accuracy"] > 0.9, summary.eval_after  # chance is about 0.3
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"]


def test_frozen_base_trains_only_the_head(tmp_path):
    rng = random.Random(4)
    rows = [{"text": f"{filler(rng)} {'good' * k}", "label": float(k)} for k in (0, 1) for _ in range(40)]
    summary = run(tmp_path, "tiny-bert", "{type: regression}", write_rows(tmp_path / "d.jsonl", rows), steps=5)
    assert summary.trainable_params == 64 + 1  # the regression output layer of tiny-bert
    loaded, _, _ = load_run(tmp_path / "run")  # head weights saved apart from the base and restored
    assert loaded.config.num_labels == 1
