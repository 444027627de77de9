"""Row formats: detect which one a file uses and turn each row into a ``Record``.

A ``Record`` is what the model will see, before tokenization: a conversation (``sft``), a text
(``text``), or a text and its label (``classification``). Every check on a row's content lives
here and raises a ``UserError`` that names the row's ``file:line`` and the fix.

Formats (by the fields present, after ``data.columns`` renaming):

- ``chat``: ``messages`` = [{role: system|user|assistant, content, weight?: 0|1}, ...]; Cohere's
  chat fine-tuning roles (``System``/``User``/``Chatbot``, any case) read as system/user/assistant;
  a user turn's content may be OpenAI's list of text and ``image_url`` parts (``data.images``)
- any sft or text row may name ``image``/``images`` (``data.images``): vision-language training
- ``prompt_completion``: ``prompt``, ``completion``
- ``instruction`` (Alpaca): ``instruction``, ``input`` (optional), ``output``
- ``classification``: ``text``, ``label``
- ``text``: ``text`` (continued pretraining)
- ``preference``: ``chosen`` + ``rejected`` (+ ``prompt``); ``openai_preference``: ``input`` +
  ``preferred_output`` + ``non_preferred_output`` (DPO data, see ``preference_rows``)
- ``multi_label`` (``text`` + ``labels``, or Cohere's ``label`` as a list), ``pairs``, ``tagged``,
  ``choices``: the rows of the shapes in ``head_rows``
- ``rerank`` (Cohere): ``query`` + ``relevant_passages`` (+ ``hard_negatives``), read as pairs
- ``fields``: any fields, turned into prompts/answers/texts by ``data.prompt_template`` and
  ``data.completion_template``
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from tunelab.data.config import DataConfig
from tunelab.data.head_rows import HEAD_SHAPES, head_record
from tunelab.data.images import content_text, shorthand_images, with_leading_images
from tunelab.data.preference_rows import PREFERENCE_FORMATS, preference_record
from tunelab.data.prompting import Message, qa_messages, render
from tunelab.data.records import Record, missing_field, string_field
from tunelab.errors import UserError

#: What one example holds, which decides how its rows are read and encoded ("task" names other things:
#: the eval task, a multi-task run's entries, the model class is its "model_task").
Shape = Literal[
    "sft", "classification", "text", "multi_label", "regression", "token_classification", "pairs", "sentences", "multiple_choice",
    "preference",
]

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {  # detection order: the first match wins
    **PREFERENCE_FORMATS,
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
    "pairs": ("anchor", "positive"),
    "rerank": ("query", "relevant_passages"),
    "tagged": ("tokens", "tags"),
    "choices": ("question", "choices"),
    "multi_label": ("text", "labels"),
    "classification": ("text", "label"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
#: Role names other formats use for ours (lower-cased first): Cohere's chat fine-tuning data says Chatbot.
ROLE_ALIASES = {"chatbot": "assistant"}
FORMATS_HINT = (
    "expected prompt+chosen+rejected | messages | prompt+completion | instruction+output | text+label | text | text+labels | "
    "anchor+positive | query+relevant_passages | tokens+tags | question+choices"
)


def rename_columns(fields: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``data.columns`` ({their_name: our_name})."""
    return {columns.get(name, name): value for name, value in fields.items()}


def detect_format(fields: Mapping[str, Any]) -> str | None:
    """The first format whose required fields are all present, or None."""
    for name, required in FORMAT_FIELDS.items():
        if all(fields.get(f) is not None for f in required):
            return "multi_label" if name == "classification" and isinstance(fields["label"], list) else name
    return None


def resolve_format(cfg: DataConfig, rows: Iterable[tuple[Mapping[str, Any], str]], shape: Shape) -> str:
    """``data.format``, or the format most rows match (one odd row does not decide for the file)."""
    if cfg.format != "auto":
        return cfg.format
    counts: Counter[str] = Counter()
    first: tuple[Mapping[str, Any], str] | None = None
    for fields, where in rows:
        first = first or (fields, where)
        detected = detect_format(fields)
        if detected:
            counts[detected] += 1
    if counts:
        return counts.most_common(1)[0][0]
    templated = cfg.prompt_template and (cfg.completion_template or shape != "sft")
    if templated:
        return "fields"
    fields, where = first or ({}, None)
    raise UserError(
        f"cannot tell the data format from the fields {', '.join(fields) or '(none)'}",
        where=where,
        hint=f"{FORMATS_HINT}; rename yours with data.columns {{their_name: our_name}} or set data.format",
    )


def check_settings(cfg: DataConfig, fmt: str, shape: Shape) -> None:
    """Reject settings that this format/shape combination would silently ignore."""
    if (fmt in PREFERENCE_FORMATS) != (shape == "preference"):
        if shape == "preference":
            raise UserError(
                f"objective dpo trains on preference rows, but the rows are {fmt}",
                hint="give each row prompt + chosen + rejected (or OpenAI's input + preferred_output + non_preferred_output)",
            )
        raise UserError(
            f"the rows are preference pairs ({fmt}), which only a preference objective trains on",
            hint="set objective: {name: dpo}, or give SFT rows (messages, or prompt + completion)",
        )
    if fmt == "rerank" and shape != "pairs":
        raise UserError(
            f"the rows are Cohere rerank rows (query + relevant_passages), which train an embedding model, but this run builds '{shape}' examples",
            hint="set method.head: {type: embedding} (contrastive InfoNCE with the hard negatives), e.g. on minilm-l6",
        )
    if shape == "preference":
        if cfg.completion_template or cfg.few_shot or cfg.train_on_prompt:
            raise UserError(
                "data.completion_template, data.few_shot and data.train_on_prompt do not apply to preference rows",
                hint="remove them: the answers come from chosen and rejected, and only they are scored",
            )
        return
    if fmt == "chat" and (cfg.prompt_template or cfg.completion_template):
        raise UserError(
            "data.prompt_template/completion_template build turns from row fields, but chat rows already hold their messages",
            hint="remove them, or use prompt/completion rows",
        )
    if shape != "sft":
        for name in ("completion_template", "system_prompt"):
            if getattr(cfg, name):
                raise UserError(
                    f"data.{name} applies to sft data only (this run builds '{shape}' examples)", hint=f"remove data.{name}"
                )
        if cfg.few_shot:
            raise UserError(
                f"data.few_shot applies to sft data only (this run builds '{shape}' examples)", hint="set data.few_shot: 0"
            )
        if fmt in ("chat", "prompt_completion", "instruction") and not cfg.prompt_template:
            raise UserError(
                f"'{shape}' examples need a 'text' field{' and a label' if shape == 'classification' else ''}, but the rows are {fmt}",
                hint="set data.prompt_template to build the text from row fields, or map a column with data.columns",
            )
    elif fmt in ("text", "classification", "fields") and not (cfg.prompt_template and cfg.completion_template):
        raise UserError(
            f"sft needs a prompt and an answer per row, but the rows are {fmt}",
            hint="use chat, prompt/completion or instruction rows, or set data.prompt_template and "
            "data.completion_template (e.g. '{label}') to build them from fields",
        )


def to_record(fields: Mapping[str, Any], fmt: str, shape: Shape, cfg: DataConfig, where: str) -> Record:
    """Validate one row and reduce it to a Record for ``shape`` (with its images, ``data.images``)."""
    record = _record(fields, fmt, shape, cfg, where)
    leading = shorthand_images(fields, where)
    if not leading and not record.images:
        return record
    if shape not in ("sft", "text"):
        raise UserError(f"the row has images, which only sft and text examples read (this run builds '{shape}' examples)", where=where, hint="remove the images, or train a vision-language model on chat or text rows")
    if leading and record.messages is not None:
        first_user = next(i for i, m in enumerate(record.messages) if m["role"] == "user")
        record.messages[first_user] = {**record.messages[first_user], "content": with_leading_images(record.messages[first_user]["content"], len(leading))}
    elif leading:
        record.text = with_leading_images(record.text or "", len(leading))
    record.images = leading + (record.images or [])
    return record


def _record(fields: Mapping[str, Any], fmt: str, shape: Shape, cfg: DataConfig, where: str) -> Record:
    if shape == "preference":
        return preference_record(fields, fmt, cfg, where)
    if shape == "sft":
        if fmt == "chat":
            messages, images = chat_messages(fields.get("messages"), where)
            return Record(where, messages=messages, images=images or None)
        prompt = (
            render(cfg.prompt_template, fields, where) if cfg.prompt_template else _prompt_field(fields, fmt, where)
        )
        answer = (
            render(cfg.completion_template, fields, where)
            if cfg.completion_template
            else _answer_field(fields, fmt, where)
        )
        return Record(where, messages=qa_messages(prompt, answer))
    if shape in HEAD_SHAPES:
        return head_record(fields, shape, cfg, where)
    text = render(cfg.prompt_template, fields, where) if cfg.prompt_template else string_field(fields, "text", where)
    if shape == "text":
        return Record(where, text=text)
    label = fields.get("label")
    if label is None:
        raise missing_field("label", fields, where)
    if isinstance(label, list):
        raise UserError("'label' is a list: that is multi-label data", where=where, hint="set method.head: {type: multi_label}")
    if not isinstance(label, (str, int)):
        raise UserError(f"'label' must be a string or an integer, got {type(label).__name__}", where=where)
    return Record(where, text=text, label=label)


def chat_messages(value: Any, where: str) -> tuple[list[Message], list[str]]:
    """Validated messages with an explicit weight (1 unless the row says 0), and the images their
    content parts hold (``data.images``)."""
    if not isinstance(value, list) or not value:
        raise UserError(
            "'messages' must be a non-empty list of {role, content} objects",
            where=where,
            hint='e.g. [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
        )
    messages = []
    images: list[str] = []
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise UserError(f"message {n} is not an object", where=where, hint='write {"role": ..., "content": ...}')
        role, content, weight = message.get("role"), message.get("content"), message.get("weight", 1)
        if isinstance(role, str):
            role = ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            raise UserError(f"message {n} has role {role!r}", where=where, hint=f"roles are {', '.join(ROLES)}")
        content, parts_images = content_text(content, where, n)
        if parts_images and role != "user":
            raise UserError(f"message {n} ({role}) holds an image; only user turns may", where=where, hint="move the image into the user turn before it")
        images += parts_images
        if weight not in (0, 1):
            raise UserError(
                f"message {n} has weight {weight!r}",
                where=where,
                hint="weight is 1 (learn this turn) or 0 (context only)",
            )
        messages.append({"role": role, "content": content, "weight": int(weight)})
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        raise UserError(
            "chat has no assistant turn, so there is nothing to learn",
            where=where,
            hint='add the answer as {"role": "assistant", "content": "..."}',
        )
    if turns[0] != "user":
        raise UserError("a chat must start with a user turn (after an optional system message)", where=where)
    return messages, images


def _prompt_field(fields: Mapping[str, Any], fmt: str, where: str) -> str:
    if fmt == "instruction":
        instruction = string_field(fields, "instruction", where)
        extra = fields.get("input")
        if extra is not None and not isinstance(extra, str):
            raise UserError(f"'input' must be a string, got {type(extra).__name__}", where=where)
        return f"{instruction}\n\n{extra}" if extra else instruction
    return string_field(fields, "prompt", where)


def _answer_field(fields: Mapping[str, Any], fmt: str, where: str) -> str:
    return string_field(fields, "output" if fmt == "instruction" else "completion", where)


