"""Hostile or mistaken input ends in one line that names the file, line or key and the fix, with
memory bounded whatever a file holds."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.train_helpers import recipe_for, write_chat_data
from tunelab.cli import cli
from tunelab.data import DataConfig, build_datasets
from tunelab.data.bad_rows import BadRows
from tunelab.data.chat_masking import tokenize_chat
from tunelab.data.readers import MAX_ROW_BYTES, read_rows
from tunelab.data.templates import resolve_chat_template
from tunelab.data.tokenize import truncate
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer
from tunelab.train import loop
from tunelab.train.run import run_training

TOK = byte_tokenizer()


def chat(i: int, user: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": user or f"#{i} say yes"}, {"role": "assistant", "content": "YES"}]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_line_over_the_row_limit_is_refused_by_line_number_without_reading_it_whole(tmp_path):
    path = tmp_path / "d.jsonl"
    with path.open("w") as fh:
        fh.write(json.dumps(chat(0)) + "\n")
        fh.write(json.dumps(chat(1, "word " * (60 * 2**20 // 5))) + "\n")  # 60 MB on line 2
        fh.write(json.dumps(chat(2)) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: row of 60 MB is over the 16 MB limit") as caught:
        read_rows(path, BadRows("error", setting="data.on_bad_row"))
    assert "data.on_bad_row: skip" in caught.value.hint
    skipping = BadRows("skip")
    tracemalloc.start()
    rows = read_rows(path, skipping)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["1", "3"] and skipping.count == 1
    assert peak < 2.5 * MAX_ROW_BYTES < 60 * 2**20  # bounded by the limit, never the whole line


def test_a_long_text_is_cut_by_characters_before_tokenizing_without_changing_the_example(tmp_path):
    long_prompt = "".join(f"w{i} " for i in range(40_000))  # ~250K characters, thousands of tokens
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0, long_prompt), chat(1)])
    cfg = DataConfig(train=path, val_fraction=0, max_length=48, truncation_side="left")
    bundle = build_datasets(cfg, TOK, shape="sft", seed=0)
    assert bundle.report.clipped == 1 and bundle.report.truncated == 1
    template, _ = resolve_chat_template(TOK, "auto")
    ids, labels = tokenize_chat(TOK, [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "YES"}], template,
                                train_on_prompt=False, where="x")
    expected, _, _ = truncate(ids, labels, 48, "left")
    assert expected in [e.input_ids for e in bundle.train]  # the same tokens as tokenizing everything first


def test_no_examples_left_says_why_and_what_to_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(i, f"#{i} " + "long prompt " * 3) for i in range(6)])
    with pytest.raises(UserError) as caught:
        build_datasets(DataConfig(train=path, val_fraction=0, max_length=40), TOK, shape="sft", seed=0)
    text = str(caught.value)
    assert "6 had nothing to learn within data.max_length = 40" in text and "the chat template alone takes" in text
    needed = int(text.split("raise data.max_length to at least ")[1].split(",")[0])
    assert build_datasets(DataConfig(train=path, val_fraction=0, max_length=needed), TOK, shape="sft", seed=0).train  # the fix works

    dup = write_jsonl(tmp_path / "dup.jsonl", [chat(0)] * 20)
    with pytest.raises(UserError, match=r"dup.jsonl: only 1 usable rows: .* \(after removing 19 duplicate rows\) .*data.dedup: false"):
        build_datasets(DataConfig(train=dup, val_fraction=0.1), TOK, shape="sft", seed=0)


def test_too_few_examples_for_a_batch_names_the_file_and_where_the_rows_went(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(0)] * 19 + [chat(1), chat(2)])
    recipe = recipe_for(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0}}\n"
                                  "method: {lora: {r: 2}}\ntrain: {batch_size: 8, threads: 1, precision: fp32}\n")
    with pytest.raises(UserError, match=r"d.jsonl: only 3 training examples, fewer than .* duplicates removed 18"):
        run_training(recipe, show_progress=False)


def test_files_are_read_by_what_they_are_not_what_they_are_called(tmp_path):
    parquet = tmp_path / "really_parquet.jsonl"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]), parquet)
    assert [r.fields["text"] for r in read_rows(parquet, BadRows("error"))] == ["a", "b"]
    gz = tmp_path / "d.jsonl"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n'))
    with pytest.raises(UserError, match=r"d.jsonl: the file is gzip-compressed — decompress it first"):
        read_rows(gz, BadRows("error"))


def test_cli_messages_name_what_the_user_typed(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    (tmp_path / "r.txt").write_text("a\nb\n")
    result = CliRunner().invoke(cli, ["metrics", "--metric", "bleu", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt")])
    assert result.exit_code == 2 and "p.txt has 3 predictions but" in result.output and "r.txt has 2 references" in result.output
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-llama", "--data", str(tmp_path / "missing.jsonl"), "--task", "generation"])
    assert result.exit_code == 2 and "check --data" in result.output and "data.train" not in result.output


def test_validate_checks_what_train_checks(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    result = CliRunner().invoke(cli, ["recipe", "validate", str(tmp_path / "empty.yaml")])
    assert result.exit_code == 2 and "data.train is not set: this recipe cannot train" in result.output
    assert CliRunner().invoke(cli, ["recipe", "validate", "--for", "eval", str(tmp_path / "empty.yaml")]).exit_code == 0
    (tmp_path / "r.yaml").write_text("data: {train: nope.jsonl}\n")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), f"output_dir={tmp_path / 'out'}"])
    assert result.exit_code == 2 and "nope.jsonl: data file not found" in result.output and "loading" not in result.output


def test_a_schedule_of_more_than_a_day_is_announced_with_its_eta(tmp_path, capsys):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    recipe = recipe_for(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 2}}}}\n"
                                  "train: {epochs: 1000000000, batch_size: 4, threads: 1, precision: fp32}\n")

    class StopSoon(loop.Callback):
        def on_step_end(self, state):
            state.should_stop = state.step >= 5

    run_training(recipe, show_progress=False, callbacks=[StopSoon()])
    err = capsys.readouterr().err
    assert re.search(r"warning: 2,999,999,99\d more steps at [\d.]+ s/step will take about [\d,]+ days \(train.epochs=1e\+09", err)
    assert "Ctrl-C stops with a checkpoint" in err
