"""Take the answer out of generated text before scoring, so a chatty but correct reply counts.

Which rule fits is a property of the task (``eval.extract``): a short-answer QA set wants the
first line, a multiple-choice set prompted with lettered options wants the letter, anything else
a user-supplied regular expression.
"""

from __future__ import annotations

import re

from tunelab.errors import UserError

# Option letters, most explicit first: "(B)"; "answer is B" / "Option: B"; a reply that starts with
# "B." / "B)" / "B:" or is just "B". A bare capital inside a sentence ("I think") is not an answer.
_CHOICE_LETTER = (
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?i:answer|option|choice)\s*(?:is|:)?\s*([A-Z])\b"),
    re.compile(r"^([A-Z])(?:[).:]|$)"),
)


def extract_answer(text: str, how: str, pattern: str | None = None) -> str:
    """The answer in ``text`` by rule ``how`` (none | first_line | regex | choice_letter); '' if absent."""
    text = text.strip()
    if how == "none":
        return text
    if how == "first_line":
        return text.splitlines()[0].strip() if text else ""
    if how == "choice_letter":
        match = next(filter(None, (p.search(text) for p in _CHOICE_LETTER)), None)
        return match.group(1) if match else ""
    if how == "regex":
        try:
            match = re.search(pattern or "", text)
        except re.error as exc:
            raise UserError(f"bad eval.extract_pattern {pattern!r}: {exc}") from None
        if match is None:
            return ""
        return (match.group(1) if match.groups() else match.group(0)).strip()
    raise ValueError(f"unknown extraction rule {how!r}")
