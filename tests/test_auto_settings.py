"""``train.epochs: auto`` and ``train.lr: auto``: the rule, and a run that uses it."""

import json

import pytest
import yaml

from tests.train_helpers import train, write_chat_data
from tunelab.methods.config import MethodConfig
from tunelab.train.auto_settings import (
    LEARNING_RATES,
    PREFERENCE_LEARNING_RATES,
    auto_batch_size,
    auto_epochs,
    resolve,
    what_trains,
)
from tunelab.train.config import TrainConfig


@pytest.mark.parametrize(("examples", "epochs"), [(5000, 1), (300, 1), (299, 2), (100, 3), (40, 8), (10, 10), (0, 10)])
def test_small_splits_get_more_passes_up_to_a_cap(examples, epochs):
    assert auto_epochs(examples) == epochs


@pytest.mark.parametrize(("examples", "batch"), [(5000, 8), (128, 8), (127, 7), (40, 2), (10, 1)])
def test_the_service_batch_is_eight_but_leaves_small_files_sixteen_steps(examples, batch):
    assert auto_batch_size(examples) == batch


def test_dpo_keeps_the_adapter_rate_and_full_fine_tuning_gets_the_published_one():
    lora = MethodConfig(lora={"r": 4})
    assert resolve(TrainConfig(), lora, 300, objective="dpo")[0].lr == resolve(TrainConfig(), lora, 300)[0].lr
    full, notes = resolve(TrainConfig(), MethodConfig(), 300, objective="dpo")
    assert full.lr == PREFERENCE_LEARNING_RATES["full"] and "dpo" in notes[-1]


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ({}, "full"),
        ({"lora": {"r": 8}}, "lora"),
        ({"ia3": {}}, "ia3"),
        ({"head": {"type": "classification"}}, "head_only"),  # a classifier head freezes the body by default
        ({"head": {"type": "classification"}, "lora": {"r": 8}}, "lora"),
        ({"head": {"type": "classification"}, "freeze": {"base": False}}, "full"),
        ({"bottleneck": {}}, "bottleneck"),
    ],
)
def test_the_learning_rate_follows_what_trains(method, kind):
    assert what_trains(MethodConfig(**method)) == kind


def test_numbers_stay_and_max_steps_makes_epochs_moot():
    given, notes = resolve(TrainConfig(epochs=2, lr=1e-3), MethodConfig(), 50)
    assert (given.epochs, given.lr, notes) == (2, 1e-3, [])
    stepped, notes = resolve(TrainConfig(max_steps=7), MethodConfig(lora={"r": 4}), 50)
    assert stepped.lr == LEARNING_RATES["lora"] and len(notes) == 1 and notes[0].startswith("lr auto")


def test_a_run_without_train_settings_uses_the_rule_and_keeps_auto_in_its_recipe(tmp_path, capsys):
    data = write_chat_data(tmp_path / "d.jsonl", n=60)  # 54 training rows after the 10% validation split
    summary = train(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 4}}}}\n", "train.batch_size=16")
    out = capsys.readouterr().out
    assert "epochs auto -> 6 (54 training examples" in out and "lr auto -> 0.0005 (lora)" in out
    assert summary.steps == 6 * (54 // 16)  # six passes of three full batches
    assert (summary.epochs, summary.lr) == (6, 5e-4)  # summary.json records what auto chose
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["train"]["epochs"] == "auto" and saved["train"]["lr"] == "auto"
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("lr", 0) for r in logged if r["type"] == "train") == pytest.approx(5e-4, rel=0.01)  # cosine from 5e-4


def test_resuming_an_auto_run_with_more_epochs_extends_it_and_as_many_does_not(tmp_path):
    from tunelab.errors import UserError
    from tunelab.train.run import load_run_recipe, run_training

    data = write_chat_data(tmp_path / "d.jsonl", n=60)
    recipe = f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 4}}}}\ntrain: {{batch_size: 16, save_every: 3}}\n"
    assert train(tmp_path, recipe).steps == 18  # auto: 6 passes of 3 batches
    with pytest.raises(UserError, match="the run is complete"):
        run_training(load_run_recipe(tmp_path / "run", ("train.epochs=6",)), resume=True, show_progress=False)
    extended = run_training(load_run_recipe(tmp_path / "run", ("train.epochs=7",)), resume=True, show_progress=False)
    assert extended.steps == 21
