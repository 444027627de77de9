"""Reading files: every supported layout, and every kind of bad input named at file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.data import DataConfig, build_datasets
from tunelab.data.bad_rows import BadRows
from tunelab.data.readers import read_rows
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(3)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fields(path: Path) -> list[dict]:
    return [row.fields for row in read_rows(path, BadRows("error"))]


def build(path: Path, **settings) -> object:
    cfg = DataConfig(train=str(path), val_fraction=0, **settings)
    return build_datasets(cfg, byte_tokenizer(), shape="sft", seed=0)


def error_of(path: Path, **settings) -> UserError:
    with pytest.raises(UserError) as info:
        build(path, **settings)
    assert "\n" not in str(info.value), "user errors are one line"
    return info.value


# --- layouts ----------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    rows = read_rows(path, BadRows("error"))
    assert [r.fields for r in rows] == ROWS[:2]
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"]


def test_json_array_rows_know_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    rows = read_rows(path, BadRows("error"))
    assert [r.fields for r in rows] == ROWS
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:6", f"{path}:10"]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    assert fields(write_jsonl(tmp_path / "d.json", ROWS)) == ROWS


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"a, with comma",b\n"multi\nline",c\n', encoding="utf-8")
    (tmp_path / "d.tsv").write_text("prompt\tcompletion\nx\ty\n", encoding="utf-8")
    rows = read_rows(tmp_path / "d.csv", BadRows("error"))
    assert [r.fields for r in rows] == [
        {"prompt": "a, with comma", "completion": "b"},
        {"prompt": "multi\nline", "completion": "c"},
    ]
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2", "3"]
    assert fields(tmp_path / "d.tsv") == [{"prompt": "x", "completion": "y"}]


def test_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    rows = read_rows(tmp_path / "d.parquet", BadRows("error"))
    assert [r.fields for r in rows] == ROWS
    assert rows[2].where.endswith("d.parquet:row 3")


def test_folder_of_shards_in_name_order(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:1])
    (tmp_path / "part-1.csv").write_text("prompt,completion\nquestion 1,answer 1\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS[2:]), tmp_path / "part-2.parquet")
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    assert fields(tmp_path) == ROWS


# --- bad input, error mode --------------------------------------------------------------------


def test_malformed_json_line_names_file_line_and_fix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"prompt": "x", \n', encoding="utf-8")
    err = error_of(path)
    assert err.where == f"{path}:2"
    assert "malformed JSON" in err.message and "on_bad_row: skip" in err.hint


def test_non_utf8_byte_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    err = error_of(path)
    assert err.where == f"{path}:2" and "UTF-8" in err.message


def test_non_utf8_byte_in_csv_names_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\na,b\ncaf\xe9,x\n")
    err = error_of(path)
    assert err.where == f"{path}:3" and "UTF-8" in err.message


def test_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "only a prompt"}])
    err = error_of(path)
    assert err.where == f"{path}:2"
    assert "missing column 'completion'" in err.message and "data.columns" in err.hint


def test_short_csv_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nlonely\n", encoding="utf-8")
    err = error_of(path)
    assert err.where == f"{path}:3" and "1 fields but the header has 2" in err.message


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    err = error_of(path)
    assert err.where == str(path) and "empty" in err.message


def test_csv_with_header_only_has_no_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\n", encoding="utf-8")
    assert "no rows" in error_of(path).message


def test_chat_without_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    err = error_of(path)
    assert err.where == f"{path}:1" and "no assistant turn" in err.message


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  "stray string"\n]', encoding="utf-8")
    err = error_of(path)
    assert err.where == f"{path}:3" and "expected a JSON object" in err.message


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": \n]', encoding="utf-8")
    err = error_of(path)
    assert err.where == f"{path}:4" and "malformed JSON" in err.message


def test_missing_file_and_unknown_type(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.jsonl").message
    (tmp_path / "d.xlsx").write_bytes(b"x")
    assert "unsupported data file type '.xlsx'" in error_of(tmp_path / "d.xlsx").message


def test_unset_train_file():
    with pytest.raises(UserError, match="data.train is not set"):
        build_datasets(DataConfig(), byte_tokenizer(), shape="sft", seed=0)


# --- bad input, skip mode ---------------------------------------------------------------------


def test_skip_mode_counts_every_kind_of_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps(ROWS[0]).encode(),
        b'{"prompt": "broken',  # malformed JSON
        b'{"prompt": "caf\xe9", "completion": "x"}',  # not UTF-8
        json.dumps({"prompt": "no completion"}).encode(),  # missing column
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),  # chat without answer
        b"[1, 2]",  # not an object
        json.dumps(ROWS[1]).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = build(path, on_bad_row="skip").report
    assert report.rows_read == 7
    assert report.bad_rows_skipped == 5
    assert report.train_examples == 2
    assert report.bad_row_samples[0].startswith(f"{path}:2: malformed JSON")


def test_skip_mode_never_returns_zero_examples(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"broken\n{"also": broken}\n', encoding="utf-8")
    err = error_of(path, on_bad_row="skip")
    assert "no training examples left" in err.message and "bad rows skipped 2" in err.hint
