"""Prompts are built from the template and a seeded pool, the same way every time."""

from __future__ import annotations

import pytest

from tunelab.data.readers import Row
from tunelab.errors import UserError
from tunelab.evaluate.extract import extract_answer
from tunelab.evaluate.generation import cut_at_stop
from tunelab.evaluate.prompts import PromptBuilder, draw_shots
from tunelab.models.tiny import byte_tokenizer

POOL = [Row({"q": f"question {i}", "a": f"answer {i}"}, f"pool.jsonl:{i + 1}") for i in range(10)]
ITEM = Row({"q": "what is it?"}, "eval.jsonl:1")


def test_plain_prompt_puts_demonstrations_before_the_item():
    builder = PromptBuilder(byte_tokenizer(), "Q: {q}\nA:", "plain", system="Answer briefly.")
    text = builder.context(ITEM, [(POOL[0], "answer 0"), (POOL[1], "answer 1")])
    assert text == "Answer briefly.\n\nQ: question 0\nA: answer 0\n\nQ: question 1\nA: answer 1\n\nQ: what is it?\nA:"
    assert builder.continuation("yes") == " yes" and builder.add_special_tokens


def test_chat_prompt_uses_turns_and_ends_with_the_generation_prompt():
    builder = PromptBuilder(byte_tokenizer(), "Q: {q}", "chat")
    text = builder.context(ITEM, [(POOL[0], "answer 0")])
    assert text == (
        "<|im_start|>user\nQ: question 0<|im_end|>\n<|im_start|>assistant\nanswer 0<|im_end|>\n"
        "<|im_start|>user\nQ: what is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert builder.continuation("yes") == "yes" and not builder.add_special_tokens


def test_shots_are_reproducible_per_item_and_exclude_the_item_itself():
    first = draw_shots(POOL, 5, seed=0, item_index=3, same_file=True)
    assert first == draw_shots(POOL, 5, seed=0, item_index=3, same_file=True)
    assert POOL[3] not in first and len({r.where for r in first}) == 5
    assert first != draw_shots(POOL, 5, seed=0, item_index=4, same_file=True)  # items get different demonstrations
    assert first != draw_shots(POOL, 5, seed=1, item_index=3, same_file=True)


def test_few_shot_without_pool_is_a_user_error():
    with pytest.raises(UserError, match="needs a pool"):
        draw_shots([], 1, seed=0, item_index=0, same_file=False)


def test_missing_template_field_names_the_row():
    builder = PromptBuilder(byte_tokenizer(), "{question}", "plain")
    with pytest.raises(UserError, match="eval.jsonl:1"):
        builder.context(ITEM)


@pytest.mark.parametrize(
    ("text", "how", "pattern", "answer"),
    [
        ("  Paris\nIt is the capital.", "first_line", None, "Paris"),
        ("The answer is (B) because...", "choice_letter", None, "B"),
        ("Answer: C.", "choice_letter", None, "C"),
        ("B", "choice_letter", None, "B"),
        ("D) ten", "choice_letter", None, "D"),
        ("I think a cat", "choice_letter", None, ""),  # a capital inside a sentence is not an option letter
        ("The total is 42 apples", "regex", r"(\d+)", "42"),
        ("no number", "regex", r"(\d+)", ""),
        ("  as is  ", "none", None, "as is"),
    ],
)
def test_answer_extraction(text, how, pattern, answer):
    assert extract_answer(text, how, pattern) == answer


def test_generation_is_cut_at_the_first_stop_string():
    assert cut_at_stop("yes\nQuestion: next", ["\nQuestion", "\n"]) == "yes"
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"
