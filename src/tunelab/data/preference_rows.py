"""Preference rows: a prompt, the answer people preferred and the one they rejected (DPO data).

The shapes preference data already comes in, so nobody has to convert theirs:

- TRL's explicit prompt: ``prompt`` + ``chosen`` + ``rejected``, each a string, or the prompt a
  list of messages and the answers lists of assistant messages (conversational).
- TRL's implicit prompt: ``chosen`` + ``rejected`` are whole conversations; the prompt is the
  messages they share before they differ, and each answer is what follows.
- OpenAI's DPO fine-tuning format: ``input.messages`` + ``preferred_output`` +
  ``non_preferred_output`` (lists of assistant messages).

``data.prompt_template`` builds the prompt from row fields instead (for example
``"Summarize: {article}"``), and ``data.system_prompt`` applies as for SFT rows. A record keeps
the prompt in ``messages`` (assistant turns in it are context, weight 0) and the two answers in
``chosen``/``rejected``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunelab.data.config import DataConfig
from tunelab.data.prompting import Message, qa_messages, render
from tunelab.data.records import Record, missing_field
from tunelab.errors import UserError

PREFERENCE_FORMATS = {"preference": ("chosen", "rejected"), "openai_preference": ("input", "preferred_output", "non_preferred_output")}
ROLES = ("system", "user", "assistant")


def preference_record(fields: Mapping[str, Any], fmt: str, cfg: DataConfig, where: str) -> Record:
    """Validate one preference row of format ``fmt`` into a prompt and two answers."""
    if fmt == "openai_preference":
        source = fields.get("input")
        if not isinstance(source, dict) or "messages" not in source:
            raise UserError("'input' must be an object with 'messages'", where=where, hint='e.g. {"input": {"messages": [{"role": "user", "content": "..."}]}, ...}')
        prompt = _messages(source["messages"], "input.messages", where)
        chosen = _answer(fields.get("preferred_output"), "preferred_output", where)
        rejected = _answer(fields.get("non_preferred_output"), "non_preferred_output", where)
    elif cfg.prompt_template:
        prompt = qa_messages(render(cfg.prompt_template, fields, where))
        chosen, rejected = _answer(fields.get("chosen"), "chosen", where), _answer(fields.get("rejected"), "rejected", where)
    elif fields.get("prompt") is not None:
        value = fields["prompt"]
        prompt = qa_messages(value) if isinstance(value, str) else _messages(value, "prompt", where)
        chosen, rejected = _answer(fields.get("chosen"), "chosen", where), _answer(fields.get("rejected"), "rejected", where)
    else:
        prompt, chosen, rejected = _split_implicit(fields, where)
    if prompt[-1]["role"] != "user":
        raise UserError("the prompt must end with a user turn, which both answers reply to", where=where)
    if [m["content"] for m in chosen] == [m["content"] for m in rejected]:
        raise UserError("the chosen and rejected answers are identical, so there is no preference to learn", where=where, hint="remove the row")
    return Record(where, messages=[{**m, "weight": 0} for m in prompt], chosen=chosen, rejected=rejected)


def _split_implicit(fields: Mapping[str, Any], where: str) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL's implicit prompt: the leading messages both conversations share, then each answer."""
    for name in ("chosen", "rejected"):
        if fields.get(name) is None:
            raise missing_field(name, fields, where)
        if isinstance(fields[name], str):
            raise UserError(
                f"'{name}' is a string but the row has no 'prompt'",
                where=where,
                hint="add a 'prompt' field, set data.prompt_template, or give whole conversations (lists of messages) as chosen and rejected",
            )
    chosen_all = _messages(fields["chosen"], "chosen", where)
    rejected_all = _messages(fields["rejected"], "rejected", where)
    shared = 0
    while shared < min(len(chosen_all), len(rejected_all)) and chosen_all[shared] == rejected_all[shared]:
        shared += 1
    while shared and chosen_all[shared - 1]["role"] == "assistant":  # the answers start at an assistant turn
        shared -= 1
    if shared == 0:
        raise UserError("'chosen' and 'rejected' share no prompt: their first messages differ", where=where, hint="give both the same user turn(s) before the answers, or add a 'prompt' field")
    prompt = chosen_all[:shared]
    return prompt, _answer(chosen_all[shared:], "chosen", where), _answer(rejected_all[shared:], "rejected", where)


def _answer(value: Any, name: str, where: str) -> list[Message]:
    """An answer: a string, or a non-empty list of assistant messages."""
    if value is None:
        raise UserError(f"missing column '{name}'", where=where, hint=f"add it, or map yours with data.columns: {{their_name: {name}}}")
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, name, where)
    if any(m["role"] != "assistant" for m in messages):
        raise UserError(f"'{name}' must hold assistant messages only (the answer to the prompt)", where=where)
    return messages


def _messages(value: Any, name: str, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise UserError(f"'{name}' must be a non-empty list of {{role, content}} objects", where=where)
    messages = []
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise UserError(f"{name} message {n} needs a role ({', '.join(ROLES)}) and a string 'content'", where=where)
        messages.append({"role": message["role"], "content": message["content"]})
    return messages
