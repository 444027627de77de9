"""Bad rows for the new tasks are one-line errors that name file:line."""

import json

import pytest

from tunelab.data import DataConfig, build_datasets
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer


def build(tmp_path, rows, shape, **cfg):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_datasets(DataConfig(train=str(path), val_fraction=0.0, **cfg), byte_tokenizer(encoder_style=True), shape=shape, seed=0)


@pytest.mark.parametrize(
    ("task", "rows", "message"),
    [
        ("classification", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}], r"d.jsonl:2: label 'meh' is not one of the labels"),
        ("regression", [{"text": "a", "label": 1.5}, {"text": "b", "label": "high"}], r"d.jsonl:2: regression target 'label' must be a number"),
        ("pairs", [{"anchor": "a", "positive": "b"}, {"anchor": "c", "positive": ""}], r"d.jsonl:2: contrastive row without a positive"),
        ("pairs", [{"anchor": "a", "positive": "b"}, {"anchor": "c"}], r"d.jsonl:2: contrastive row without a positive"),
        ("token_classification", [{"tokens": ["a", "b"], "tags": ["X"]}], r"d.jsonl:1: 2 tokens but 1 tags"),
        ("multiple_choice", [{"question": "q", "choices": ["a", "b"], "label": 2}], r"d.jsonl:1: label 2 is neither a choice index"),
        ("multi_label", [{"text": "a", "labels": "red"}], r"d.jsonl:1: 'labels' must be a list of strings"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, task, rows, message):
    labels = {"labels": ["pos", "neg"]} if task == "classification" else {}
    with pytest.raises(UserError, match=message) as error:
        build(tmp_path, rows, task, **labels)
    assert "\n" not in str(error.value)


def test_example_weights_come_from_a_column_and_must_be_numbers(tmp_path):
    rows = [{"text": "a", "label": "x", "w": 2.5}, {"text": "b", "label": "y", "w": "0.5"}]
    bundle = build(tmp_path, rows, "classification", weight_column="w")
    assert sorted(e.weight for e in bundle.train) == [0.5, 2.5]
    with pytest.raises(UserError, match=r"d.jsonl:1: example weight 'w' must be a number"):
        build(tmp_path, [{"text": "a", "label": "x", "w": "heavy"}], "classification", weight_column="w")


def test_new_formats_are_detected_from_their_fields(tmp_path):
    pairs = build(tmp_path, [{"anchor": "a", "positive": "b", "negative": "c"}, {"anchor": "d", "positive": "e"}], "pairs")
    assert pairs.report.format == "pairs"
    assert [g is None for g in pairs.train[0].group] in ([False, False, False], [False, False, True])
    tagged = build(tmp_path, [{"tokens": ["big", "cat"], "tags": ["ADJ", "NOUN"]}], "token_classification")
    assert tagged.label_names == ["ADJ", "NOUN"]
    ids, labels = tagged.train[0].input_ids, tagged.train[0].labels
    assert len(ids) == len(labels) and sum(label >= 0 for label in labels) == 2  # first byte of each word; specials unlabeled
    choices = build(tmp_path, [{"question": "q", "choices": ["a", "b", "c"], "label": "b"}], "multiple_choice")
    assert choices.train[0].label == 1 and len(choices.train[0].group) == 3


@pytest.mark.parametrize(
    ("task", "row"),
    [
        ("sft", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        ("sft", {"prompt": "hi", "completion": "hello"}),
        ("classification", {"text": "a", "label": "x"}),
        ("pairs", {"anchor": "a", "positive": "b"}),
        ("token_classification", {"tokens": ["a"], "tags": ["X"]}),
    ],
)
def test_weight_difficulty_and_language_reach_every_data_path(tmp_path, task, row):
    rows = [{**row, "w": 3.0, "level": 2, "lang": "fr"}, {**row, "w": 0.5, "level": "0.5", "lang": "en"}]  # CSV cells arrive as strings
    bundle = build(tmp_path, rows, task, weight_column="w", difficulty_column="level", language_column="lang", dedup=False)
    assert sorted((e.weight, e.difficulty, e.language) for e in bundle.train) == [(0.5, 0.5, "en"), (3.0, 2.0, "fr")]
    with pytest.raises(UserError, match=r"d.jsonl:1: difficulty 'level' must be a number"):
        build(tmp_path, [{**row, "level": "hard"}], task, difficulty_column="level")


def test_sft_weights_scale_each_examples_tokens_in_the_loss():
    """A chat example of weight w adds w times its token losses (weight 0: it teaches nothing)."""
    import torch

    from tunelab.data import IGNORE_INDEX, Example, collate_packed, collate_padded
    from tunelab.models import load_model
    from tunelab.train.objectives.causal_lm import CausalLMObjective

    model = load_model("tiny-llama").model.eval()
    objective = CausalLMObjective(model)
    a = Example([7, 8, 9, 10, 11], [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11])
    b = Example([12, 13, 14, 15], [IGNORE_INDEX, 13, 14, 15])
    with torch.no_grad():
        loss_a = objective(model, collate_packed([a]))[0]
        loss_b = objective(model, collate_packed([b]))[0]
        for collate in (collate_packed, lambda ex: collate_padded(ex, 3)):
            a.weight, b.weight = 2.0, 0.0
            assert torch.allclose(objective(model, collate([a, b]))[0], 2 * loss_a, atol=1e-5)
            a.weight, b.weight = 1.0, 0.5
            assert torch.allclose(objective(model, collate([a, b]))[0], loss_a + 0.5 * loss_b, atol=1e-5)
            a.weight = b.weight = 1.0
            assert "weights" not in collate([a, b])  # unweighted data keeps the plain path
