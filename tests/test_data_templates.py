"""Chat templates: named fallbacks, the model's own (SmolLM2's real one), and their loss masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data import DataConfig, Example, build_datasets
from tunelab.data.chat_masking import tokenize_chat
from tunelab.data.templates import resolve_chat_template
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer

from tests.data_helpers import supervised_runs

ROW = {"prompt": "Capital of France?", "completion": "Paris"}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)




@pytest.mark.parametrize(
    ("template", "rendered", "learned"),
    [
        (
            "chatml",
            "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n",
            "Paris<|im_end|>",
        ),
        (
            "llama3",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis<|eot_id|>",
            "Paris<|eot_id|>",
        ),
        (
            "alpaca",
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nCapital of France?\n\n### Response:\nParis<|endoftext|>\n\n",
            "Paris<|endoftext|>",
        ),
        ("plain", "User: Capital of France?\nAssistant: Paris<|endoftext|>\n", " Paris<|endoftext|>"),
    ],
)
def test_named_templates_render_and_mask(tmp_path, template, rendered, learned):
    tok = byte_tokenizer()
    cfg = DataConfig(train=write_jsonl(tmp_path / "d.jsonl", [ROW]), val_fraction=0, template=template)
    bundle = build_datasets(cfg, tok, shape="sft", seed=0)
    assert bundle.report.template == template
    assert tok.decode(bundle.train[0].input_ids) == rendered
    assert supervised_runs(tok, bundle.train[0]) == [learned]


def test_system_prompt_comes_first_unless_the_row_has_one(tmp_path):
    tok = byte_tokenizer()
    rows = [
        ROW,
        {
            "messages": [
                {"role": "system", "content": "Own."},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    texts = []
    for i, row in enumerate(rows):
        cfg = DataConfig(train=write_jsonl(tmp_path / f"{i}.jsonl", [row]), val_fraction=0, system_prompt="Be exact.")
        texts.append(tok.decode(build_datasets(cfg, tok, shape="sft", seed=0).train[0].input_ids))
    assert texts[0].startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nCapital")
    assert texts[1].startswith("<|im_start|>system\nOwn.<|im_end|>") and "Be exact." not in texts[1]


def test_auto_prefers_the_model_template_and_falls_back_to_chatml():
    with_template, without = byte_tokenizer(), byte_tokenizer(encoder_style=True)
    assert resolve_chat_template(with_template, "auto") == (with_template.chat_template, "model")
    assert resolve_chat_template(without, "auto")[1] == "chatml"
    with pytest.raises(UserError, match="has no chat template"):
        resolve_chat_template(without, "model")


def test_template_that_rewrites_history_is_refused():
    tok = byte_tokenizer()
    # renders only the last message in full: earlier turns change once later ones follow
    tok.chat_template = "{% for m in messages %}{{ m['content'] if loop.last else '...' }}{% endfor %}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(UserError, match="renders earlier turns differently") as info:
        tokenize_chat(tok, messages, tok.chat_template, train_on_prompt=False, where="d.jsonl:1")
    assert info.value.where == "d.jsonl:1" and "data.template: chatml" in info.value.hint


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from tunelab.models import load_model

    return load_model("smollm2-135m").tokenizer


@pytest.mark.slow
def test_smollm2_real_template_masks_assistant_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "user", "content": "Is this review positive or negative? A delight."},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "And: a bore."},
        {"role": "assistant", "content": "negative"},
    ]
    ids, labels = tokenize_chat(tok, messages, tok.chat_template, train_on_prompt=False, where="x")
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    runs = supervised_runs(tok, Example(ids, labels))
    assert runs == ["positive<|im_end|>", "negative<|im_end|>"]
    # the default system prompt SmolLM2's template injects is context, not a target
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)


@pytest.mark.slow
def test_quickstart_data_fits_smollm2_without_loss(smollm2_tokenizer):
    data = Path(__file__).parents[1] / "examples" / "data"
    cfg = DataConfig(
        train=str(data / "rt_sentiment_train.jsonl"), validation=str(data / "rt_sentiment_test.jsonl"), max_length=256
    )
    report = build_datasets(cfg, smollm2_tokenizer, shape="sft", seed=0).report
    assert (report.train_examples, report.validation_examples) == (500, 200)
    assert (report.truncated, report.dropped, report.template) == (0, 0, "model")
    # exactly the answer word's tokens plus <|im_end|> are learned, nothing of the prompt
    per_answer = {
        w: len(smollm2_tokenizer(w, add_special_tokens=False)["input_ids"]) + 1 for w in ("positive", "negative")
    }
    assert per_answer["positive"] == per_answer["negative"]
    assert report.supervised_tokens == per_answer["positive"] * report.train_examples
