"""Cohere's fine-tuning files (chat, single/multi-label classification, rerank) read as tunelab's shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data import DataConfig, build_datasets
from tunelab.data.build import split_records
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer

TOK = byte_tokenizer()
ENCODER_TOK = byte_tokenizer(encoder_style=True)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def records(path: str, shape: str, **settings):
    train, validation, report = split_records(DataConfig(train=path, **settings), shape=shape, seed=0)  # type: ignore[arg-type]
    return train, validation, report


def test_cohere_chat_roles_are_system_user_assistant(tmp_path):
    row = {"messages": [{"role": "System", "content": "Be brief."}, {"role": "User", "content": "Hi"},
                        {"role": "Chatbot", "content": "Hello."}, {"role": "user", "content": "Bye"}, {"role": "chatbot", "content": "Bye."}]}
    train, _, report = records(write_jsonl(tmp_path / "chat.jsonl", [row]), "sft", val_fraction=0)
    assert report.format == "chat"
    assert [m["role"] for m in train[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    bundle = build_datasets(DataConfig(train=str(tmp_path / "chat.jsonl"), val_fraction=0), TOK, shape="sft", seed=0)
    assert "<|im_start|>assistant\nHello.<|im_end|>" in TOK.decode(bundle.train[0].input_ids)


def test_an_unknown_role_names_the_line(tmp_path):
    rows = [{"messages": [{"role": "User", "content": "a"}, {"role": "Chatbot", "content": "b"}]},
            {"messages": [{"role": "Narrator", "content": "a"}, {"role": "Chatbot", "content": "b"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(UserError, match="role 'narrator'") as err:
        records(path, "sft", val_fraction=0)
    assert err.value.where == f"{path}:2"


def test_single_and_multi_label_classification_files(tmp_path):
    single = write_jsonl(tmp_path / "single.jsonl", [{"text": "great film", "label": "positive"}, {"text": "dull", "label": "negative"}])
    train, _, report = records(single, "classification", val_fraction=0)
    assert report.format == "classification" and sorted(r.label for r in train) == ["negative", "positive"]
    multi = write_jsonl(tmp_path / "multi.jsonl", [
        {"text": "Oxygen and carbon make up the body.", "label": ["biology", "physics"]}, {"text": "Hello world!", "label": []}])
    train, _, report = records(multi, "multi_label", val_fraction=0)
    assert report.format == "multi_label"
    assert sorted(map(tuple, (r.label for r in train))) == [(), ("biology", "physics")]
    with pytest.raises(UserError, match="'label' is a list: that is multi-label data") as err:
        records(multi, "classification", val_fraction=0, format="classification")
    assert "multi_label" in err.value.hint


def test_rerank_rows_become_pairs_using_every_passage_and_negative(tmp_path):
    row = {"query": "Will Google's monopoly end?", "relevant_passages": ["Can Google's search monopoly be disrupted?"],
           "hard_negatives": ["What is the future of Google?", "When will the Facebook era end?"]}
    bare = {"query": "capital of France", "relevant_passages": ["Paris is the capital of France.", "France's capital: Paris."]}
    train, _, report = records(write_jsonl(tmp_path / "rerank.jsonl", [row, bare]), "pairs", val_fraction=0)
    assert report.format == "rerank"
    texts = sorted(tuple(r.texts) for r in train)
    assert texts == sorted([
        ("Will Google's monopoly end?", "Can Google's search monopoly be disrupted?", "What is the future of Google?"),
        ("Will Google's monopoly end?", "Can Google's search monopoly be disrupted?", "When will the Facebook era end?"),
        ("capital of France", "Paris is the capital of France.", None),
        ("capital of France", "France's capital: Paris.", None),
    ])
    bundle = build_datasets(DataConfig(train=str(tmp_path / "rerank.jsonl"), val_fraction=0), ENCODER_TOK, shape="pairs", seed=0)
    assert len(bundle.train) == 4


def test_a_querys_pairs_stay_on_one_side_of_the_validation_split(tmp_path):
    rows = [{"query": f"q{i}", "relevant_passages": [f"p{i}a", f"p{i}b", f"p{i}c"]} for i in range(20)]
    train, validation, _ = records(write_jsonl(tmp_path / "rerank.jsonl", rows), "pairs", val_fraction=0.2)
    held = {r.texts[0] for r in validation}
    assert held and not held & {r.texts[0] for r in train}
    assert len(validation) == 3 * len(held)


def test_rerank_rows_need_an_embedding_run_and_passages(tmp_path):
    path = write_jsonl(tmp_path / "rerank.jsonl", [{"query": "q", "relevant_passages": ["p"]}])
    with pytest.raises(UserError, match="Cohere rerank rows") as err:
        records(path, "sft", val_fraction=0)
    assert "embedding" in err.value.hint
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"query": "q", "relevant_passages": ["p"]}, {"query": "q2", "relevant_passages": []}])
    with pytest.raises(UserError, match="'relevant_passages' is empty") as err:
        records(empty, "pairs", val_fraction=0)
    assert err.value.where == f"{empty}:2"
