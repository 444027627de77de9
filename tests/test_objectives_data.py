"""Bad rows for the new tasks are one-line errors that name file:line."""

import json

import pytest

from tunelab.data import DataConfig, build_datasets
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer


def build(tmp_path, rows, task, **cfg):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_datasets(DataConfig(train=str(path), val_fraction=0.0, **cfg), byte_tokenizer(encoder_style=True), task=task, seed=0)


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
