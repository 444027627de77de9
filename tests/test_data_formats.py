"""Each row format becomes the right tokens, with loss exactly on what the model must produce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data import IGNORE_INDEX, DataConfig, Example, build_datasets
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer

from tests.data_helpers import supervised_runs as shared_supervised_runs

TOK = byte_tokenizer()  # lossless bytes + ChatML specials, so decoded text is exact


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def only_example(path: str, shape: str = "sft", tokenizer=TOK, **settings) -> Example:
    bundle = build_datasets(DataConfig(train=path, val_fraction=0, **settings), tokenizer, shape=shape, seed=0)
    assert len(bundle.train) == 1
    return bundle.train[0]


def supervised_runs(example: Example) -> list[str]:
    return shared_supervised_runs(TOK, example)


def text_of(example: Example) -> str:
    return TOK.decode(example.input_ids)


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
}


def test_chat_supervises_each_assistant_turn_and_its_end_marker(tmp_path):
    example = only_example(write_jsonl(tmp_path / "d.jsonl", [CHAT]))
    assert text_of(example) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
    )
    assert supervised_runs(example) == ["4<|im_end|>", "6<|im_end|>"]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True))


def test_weight_zero_turn_is_context_only(tmp_path):
    row = json.loads(json.dumps(CHAT))
    row["messages"][2]["weight"] = 0
    example = only_example(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert supervised_runs(example) == ["6<|im_end|>"]


def test_train_on_prompt_supervises_everything(tmp_path):
    example = only_example(write_jsonl(tmp_path / "d.jsonl", [CHAT]), train_on_prompt=True)
    assert example.labels == example.input_ids


def test_prompt_completion(tmp_path):
    example = only_example(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Capital of France?", "completion": "Paris"}]))
    assert (
        text_of(example) == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
    )
    assert supervised_runs(example) == ["Paris<|im_end|>"]


def test_alpaca_instruction_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    bundle = build_datasets(
        DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0), TOK, shape="sft", seed=0
    )
    by_answer = {supervised_runs(e)[0]: text_of(e) for e in bundle.train}
    assert "<|im_start|>user\nTranslate to French.\n\ncat<|im_end|>" in by_answer["chat<|im_end|>"]
    assert "<|im_start|>user\nSay hi.<|im_end|>" in by_answer["hi<|im_end|>"]
    assert bundle.report.format == "instruction"


def test_raw_text_supervises_every_token_and_ends_with_eos(tmp_path):
    example = only_example(write_jsonl(tmp_path / "d.jsonl", [{"text": "Once upon a time."}]), shape="text")
    assert text_of(example) == "Once upon a time.<|endoftext|>"
    assert example.labels == example.input_ids


def test_classification_rows_map_labels_to_ids(tmp_path):
    rows = [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}]
    bundle = build_datasets(
        DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0), TOK, shape="classification", seed=0
    )
    assert bundle.label_names == ["neg", "pos"]
    assert {TOK.decode(e.input_ids): e.label for e in bundle.train} == {"great": 1, "awful": 0}
    assert all(e.labels == [] for e in bundle.train)


def test_columns_rename_their_fields_to_ours(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Why?", "answer": "Because."}])
    example = only_example(path, columns={"question": "prompt", "answer": "completion"})
    assert supervised_runs(example) == ["Because.<|im_end|>"]
    assert "user\nWhy?<|im_end|>" in text_of(example)


def test_format_is_detected_by_most_rows(tmp_path):
    rows = [{"prompt": "odd row"}, {"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    cfg = DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0, on_bad_row="skip")
    report = build_datasets(cfg, TOK, shape="sft", seed=0).report
    assert (report.format, report.train_examples, report.bad_rows_skipped) == ("prompt_completion", 2, 1)


def test_unknown_fields_are_explained(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"review": "fine", "stars": 4}])
    with pytest.raises(UserError, match="cannot tell the data format from the fields review, stars") as info:
        only_example(path)
    assert "data.columns" in info.value.hint


def test_text_rows_need_templates_for_sft(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "pos"}])
    with pytest.raises(UserError, match="sft needs a prompt and an answer"):
        only_example(path)


def test_templates_turn_any_fields_into_prompt_and_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"review": "Loved it", "sentiment": "positive"}])
    example = only_example(path, prompt_template="Review: {review}\nSentiment?", completion_template="{sentiment}")
    assert "<|im_start|>user\nReview: Loved it\nSentiment?<|im_end|>" in text_of(example)
    assert supervised_runs(example) == ["positive<|im_end|>"]


def test_prompt_template_builds_classification_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"title": "Wow", "body": "so good", "label": 1}])
    example = only_example(path, shape="classification", prompt_template="{title}: {body}")
    assert (TOK.decode(example.input_ids), example.label) == ("Wow: so good", 0)


def test_settings_that_would_be_ignored_are_errors(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(UserError, match="chat rows already hold their messages"):
        only_example(chat, prompt_template="{x}")
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match="few_shot applies to sft data only"):
        only_example(text, shape="text", few_shot=1)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "robot", "content": "x"}], "message 1 has role 'robot'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "message 1 needs a string 'content'"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}],
            "message 2 has weight 0.5",
        ),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "must start with a user turn"),
        ([], "non-empty list"),
    ],
)
def test_malformed_chats_name_the_problem(tmp_path, messages, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    with pytest.raises(UserError, match=message) as info:
        only_example(path)
    assert info.value.where == f"{path}:1"
