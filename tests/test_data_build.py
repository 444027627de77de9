"""build_datasets: truncation, dropping, duplicates, the seeded split, labels, and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data import IGNORE_INDEX, DataConfig, build_datasets
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer

TOK = byte_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def qa(i: int, prompt_len: int = 1) -> dict:
    return {"prompt": f"q{i}" * prompt_len, "completion": f"answer {i}"}


def test_long_examples_are_truncated_or_dropped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0), qa(1, prompt_len=40), qa(2, prompt_len=40)])
    short_len = len(build_datasets(DataConfig(train=path, val_fraction=0), TOK, shape="sft", seed=0).train[0].input_ids)
    limit = short_len + 10  # room for the short example, not for the long ones

    right = build_datasets(DataConfig(train=path, val_fraction=0, max_length=limit), TOK, shape="sft", seed=0)
    assert (right.report.train_examples, right.report.truncated, right.report.dropped) == (1, 0, 2)

    left = build_datasets(
        DataConfig(train=path, val_fraction=0, max_length=limit, truncation_side="left"), TOK, shape="sft", seed=0
    )
    assert (left.report.train_examples, left.report.truncated, left.report.dropped) == (3, 2, 0)
    assert all(len(e.input_ids) <= limit for e in left.train)
    learned = sorted(TOK.decode([t for t in e.labels if t != IGNORE_INDEX]) for e in left.train)
    assert learned == [f"answer {i}<|im_end|>" for i in range(3)], "left truncation keeps the answers whole"


def test_right_truncation_that_keeps_part_of_the_answer_is_truncated_not_dropped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a long answer"}])
    full = build_datasets(DataConfig(train=path, val_fraction=0), TOK, shape="sft", seed=0).train[0]
    cut = build_datasets(
        DataConfig(train=path, val_fraction=0, max_length=len(full.input_ids) - 5), TOK, shape="sft", seed=0
    )
    assert (cut.report.truncated, cut.report.dropped) == (1, 0)
    assert cut.train[0].input_ids == full.input_ids[:-5]


def test_classification_truncation_keeps_encoder_special_tokens(tmp_path):
    tok = byte_tokenizer(encoder_style=True)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abcdefgh", "label": "x"}])
    for side, kept in (("right", "abc"), ("left", "fgh")):
        bundle = build_datasets(
            DataConfig(train=path, val_fraction=0, max_length=5, truncation_side=side),
            tok,
            shape="classification",
            seed=0,
        )
        assert tok.decode(bundle.train[0].input_ids) == f"[CLS]{kept}[SEP]"
        assert bundle.report.truncated == 1


def test_duplicates_are_removed_and_counted_including_train_rows_seen_in_validation(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [qa(0), qa(1), qa(0), qa(2), qa(3)])
    val = write_jsonl(tmp_path / "v.jsonl", [qa(3), qa(4), qa(4)])
    report = build_datasets(DataConfig(train=train, validation=val), TOK, shape="sft", seed=0).report
    assert (report.rows_read, report.duplicates_removed) == (8, 3)
    assert (report.train_examples, report.validation_examples) == (3, 2)
    kept = build_datasets(DataConfig(train=train, validation=val, dedup=False), TOK, shape="sft", seed=0).report
    assert (kept.duplicates_removed, kept.train_examples, kept.validation_examples) == (0, 5, 3)


def test_validation_file_that_leaves_nothing_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [qa(0), qa(1)])
    val = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "no answer"}])
    with pytest.raises(UserError, match="no validation examples left"):
        build_datasets(DataConfig(train=train, validation=val, on_bad_row="skip"), TOK, shape="sft", seed=0)


def test_held_out_split_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(20)])
    cfg = DataConfig(train=path, val_fraction=0.25)

    def split(seed):
        bundle = build_datasets(cfg, TOK, shape="sft", seed=seed)
        return [TOK.decode(e.input_ids) for e in bundle.train], [TOK.decode(e.input_ids) for e in bundle.validation]

    train, val = split(0)
    assert (len(train), len(val)) == (15, 5)
    assert not set(train) & set(val)
    assert split(0) == (train, val)
    assert split(1) != (train, val)


def test_too_few_rows_to_hold_out(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0)])
    with pytest.raises(UserError, match="too few to hold out"):
        build_datasets(DataConfig(train=path, val_fraction=0.1), TOK, shape="sft", seed=0)


def cls_bundle(tmp_path, train_rows, val_rows=None, **settings):
    train = write_jsonl(tmp_path / "t.jsonl", train_rows)
    val = write_jsonl(tmp_path / "v.jsonl", val_rows) if val_rows else None
    return build_datasets(DataConfig(train=train, validation=val, **settings), TOK, shape="classification", seed=0)


def test_labels_default_to_sorted_train_labels_integers_numerically(tmp_path):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 2, 0])]
    bundle = cls_bundle(tmp_path, rows, [{"text": "v", "label": 2}])
    assert bundle.label_names == bundle.report.label_names == ["0", "2", "10"]
    assert {TOK.decode(e.input_ids): e.label for e in bundle.train} == {"t0": 2, "t1": 1, "t2": 1, "t3": 0}


def test_declared_labels_fix_the_class_ids(tmp_path):
    bundle = cls_bundle(
        tmp_path, [{"text": "a", "label": "pos"}], [{"text": "b", "label": "neg"}], labels=["pos", "neg", "neutral"]
    )
    assert bundle.label_names == ["pos", "neg", "neutral"]
    assert (bundle.train[0].label, bundle.validation[0].label) == (0, 1)


def test_undeclared_label_is_an_error_at_its_row(tmp_path):
    with pytest.raises(UserError, match="label 'meh' is not one of the labels") as info:
        cls_bundle(
            tmp_path,
            [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}],
            [{"text": "c", "label": "pos"}],
            labels=["pos", "neg"],
        )
    assert info.value.where == f"{tmp_path / 't.jsonl'}:2"
    assert "data.labels" in info.value.hint


def test_validation_label_unseen_in_train_is_an_error_unless_skipped(tmp_path):
    train = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    val = [{"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}]
    with pytest.raises(UserError) as info:
        cls_bundle(tmp_path, train, val)
    assert info.value.where == f"{tmp_path / 'v.jsonl'}:2"
    skipped = cls_bundle(tmp_path, train, val, on_bad_row="skip").report
    assert (skipped.bad_rows_skipped, skipped.validation_examples) == (1, 1)


def test_report_counts_tokens_that_carry_loss(tmp_path):
    bundle = build_datasets(
        DataConfig(train=write_jsonl(tmp_path / "d.jsonl", [qa(0)]), val_fraction=0), TOK, shape="sft", seed=0
    )
    report = bundle.report.as_dict()
    assert report["supervised_tokens"] == len("answer 0") + 1  # the answer's bytes and <|im_end|>
    assert report["tokens"] == len(bundle.train[0].input_ids)
    assert json.loads(json.dumps(report)) == report
