"""Prompt engineering as data: prompt templates, few-shot sampling and chat message assembly.

Fine-tuning and zero-/few-shot evaluation must build prompts the same way, or an evaluation
measures a different prompt than the one trained on. Both call these functions; nothing here
knows about tokenizers or files.

Messages are plain dicts ``{"role": "system"|"user"|"assistant", "content": str}`` with an
optional ``"weight"`` (1: the turn is learned, 0: context only), the shape chat templates accept.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from tunelab.errors import UserError

Message = dict[str, Any]
T = TypeVar("T")


def template_fields(template: str) -> list[str]:
    """The row fields a template names, in order (``{text}`` -> ``text``; ``{{`` is a literal brace)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(
            f"bad prompt template {template!r}: {exc}", hint="write {field} for a row field and {{ }} for braces"
        ) from None
    return [name.split(".")[0].split("[")[0] for _, name, _, _ in parsed if name is not None]


def render(template: str, row: Mapping[str, Any], where: str) -> str:
    """Fill ``template``'s ``{placeholders}`` from ``row``; a missing field is a UserError at ``where``."""
    for name in template_fields(template):
        if name == "" or name.isdigit():
            raise UserError(
                f"prompt template {template!r} has a positional placeholder '{{{name}}}'",
                hint="name a row field, e.g. {text}",
            )
        if name not in row or row[name] is None:
            raise UserError(
                f"prompt template needs field '{name}', but the row has only: {', '.join(row) or 'no fields'}",
                where=where,
                hint="fix the placeholder, or map a column to it with data.columns",
            )
    try:
        return template.format_map(row)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise UserError(f"cannot fill prompt template {template!r}: {exc}", where=where) from None


def few_shot_pool_sample(pool: Sequence[T], k: int, seed: int | str, exclude_index: int | None = None) -> list[T]:
    """``k`` distinct items of ``pool`` drawn reproducibly, never the item at ``exclude_index``.

    The same ``(seed, exclude_index)`` always gives the same examples, so a run can be repeated
    and a training example never sees itself as a demonstration. Pass a per-example seed (for
    instance ``f"{seed}/{index}"``) to vary demonstrations across examples. Costs O(k), not
    O(len(pool)), so it is cheap for every example of a large split.
    """
    if k == 0:
        return []
    available = len(pool) - (exclude_index is not None and 0 <= exclude_index < len(pool))
    if k > available:
        raise UserError(
            f"few_shot: {k} needs {k} other training examples, but only {available} are available",
            hint="lower data.few_shot or add training data",
        )
    rng = random.Random(seed)
    picks = [i for i in rng.sample(range(len(pool)), min(k + 1, len(pool))) if i != exclude_index]
    return [pool[i] for i in picks[:k]]


def qa_messages(prompt: str, answer: str | None = None) -> list[Message]:
    """A user turn, followed by the assistant's answer when there is one."""
    messages: list[Message] = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def build_messages(system: str | None, shots: Sequence[Sequence[Message]], example: Sequence[Message]) -> list[Message]:
    """One conversation: a system message, solved demonstrations as earlier turns, then the example.

    A system message in ``example`` itself takes precedence over ``system`` (a row that says
    who the assistant is should not be overridden by a recipe-wide default). Demonstrations lose
    their own system messages and get weight 0: they are context, never learning targets.
    """
    own_system = [dict(m) for m in example if m["role"] == "system"]
    messages = own_system or ([{"role": "system", "content": system}] if system is not None else [])
    for shot in shots:
        messages += [{**m, "weight": 0} for m in shot if m["role"] != "system"]
    messages += [dict(m) for m in example if m["role"] != "system"]
    return messages
