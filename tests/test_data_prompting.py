"""Prompt templates and few-shot demonstrations: filled from row fields, drawn reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data import IGNORE_INDEX, DataConfig, build_datasets
from tunelab.data.prompting import build_messages, few_shot_pool_sample, qa_messages, render
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer


def test_render_fills_placeholders_and_keeps_escaped_braces():
    assert render("Review: {text}\n{{json}} {label}", {"text": "ok", "label": 1}, "f:1") == "Review: ok\n{json} 1"


def test_render_names_the_missing_field_and_row():
    with pytest.raises(UserError) as info:
        render("Q: {question}", {"text": "x"}, "data.jsonl:7")
    assert info.value.where == "data.jsonl:7"
    assert "needs field 'question'" in info.value.message and "has only: text" in info.value.message


def test_render_rejects_positional_placeholders():
    with pytest.raises(UserError, match="positional placeholder"):
        render("Q: {}", {"text": "x"}, "f:1")


def test_few_shot_sample_is_reproducible_distinct_and_never_the_example_itself():
    pool = list(range(20))
    draws = [few_shot_pool_sample(pool, 3, seed=f"0/{i}", exclude_index=i) for i in range(20)]
    assert draws == [few_shot_pool_sample(pool, 3, seed=f"0/{i}", exclude_index=i) for i in range(20)]
    assert all(len(set(d)) == 3 and i not in d for i, d in enumerate(draws))
    assert len({tuple(d) for d in draws}) > 1, "different seeds give different demonstrations"


def test_few_shot_sample_uses_the_whole_pool_when_it_must():
    assert sorted(few_shot_pool_sample(["a", "b", "c"], 2, seed=0, exclude_index=1)) == ["a", "c"]
    assert few_shot_pool_sample(["a"], 0, seed=0, exclude_index=0) == []
    with pytest.raises(UserError, match="few_shot: 3 needs 3 other training examples, but only 2"):
        few_shot_pool_sample(["a", "b", "c"], 3, seed=0, exclude_index=0)


def test_build_messages_orders_system_demonstrations_example():
    shots = [[{"role": "system", "content": "dropped"}, *qa_messages("1+1?", "2")]]
    messages = build_messages("Be exact.", shots, qa_messages("2+2?"))
    assert messages == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "1+1?", "weight": 0},
        {"role": "assistant", "content": "2", "weight": 0},
        {"role": "user", "content": "2+2?"},
    ]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_few_shot_training_examples_learn_only_their_own_answer(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0.25, few_shot=2)
    tok = byte_tokenizer()
    bundle = build_datasets(cfg, tok, shape="sft", seed=0)
    assert build_datasets(cfg, tok, shape="sft", seed=0).train == bundle.train, "same seed, same demonstrations"
    assert build_datasets(cfg, tok, shape="sft", seed=1).train != bundle.train
    for example in bundle.train + bundle.validation:
        text = tok.decode(example.input_ids)
        assert text.count("<|im_start|>user") == 3
        learned = tok.decode([t for t in example.labels if t != IGNORE_INDEX])
        own_answer = text.rsplit("<|im_start|>assistant\n", 1)[1]
        assert learned + "\n" == own_answer
        own_prompt = text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
        assert text.count(own_prompt + "<|im_end|>") == 1, "an example is never its own demonstration"


def test_few_shot_larger_than_the_training_split_is_a_setting_error(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0, few_shot=3)
    with pytest.raises(UserError, match="lower data.few_shot|few_shot: 3"):
        build_datasets(cfg, byte_tokenizer(), shape="sft", seed=0)
