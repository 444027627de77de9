"""Zero- and few-shot prompts built from data: one template, the same for every system compared.

An item's prompt is ``eval.prompt_template`` filled from its row (``tunelab.data.prompting``).
With k shots, k solved rows drawn reproducibly from a separate pool come first: in chat format
as earlier user/assistant turns through the tokenizer's chat template (the way a fine-tuned model
saw its training data), in plain format as "prompt answer" paragraphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.images import shorthand_images, with_leading_images
from tunelab.data.prompting import (
    build_messages,
    few_shot_pool_sample,
    qa_messages,
    render,
)
from tunelab.data.readers import Row
from tunelab.data.templates import render_chat, resolve_chat_template
from tunelab.errors import UserError

PLAIN_SEPARATOR = " "  # between a plain prompt and its answer, so "Answer:" + " yes" reads as text


@dataclass(frozen=True)
class PromptBuilder:
    """Renders an item (and its demonstrations) into the text the model continues."""

    tokenizer: Any
    template: str
    format: str  # "chat" | "plain"
    system: str | None = None
    chat_template_name: str = "auto"

    @property
    def add_special_tokens(self) -> bool:
        """A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)."""
        return self.format == "plain"

    def prompt(self, row: Row) -> str:
        """The item's prompt text, after an image marker per image the row names (``image``/``images``)."""
        return with_leading_images(render(self.template, row.fields, row.where), len(shorthand_images(row.fields, row.where)))

    def context(self, row: Row, shots: Sequence[tuple[Row, str]] = ()) -> str:
        """The full text before the answer: system, demonstrations (row, answer), then the item."""
        if self.format == "plain":
            parts = [self.system] if self.system else []
            parts += [self.prompt(shot) + PLAIN_SEPARATOR + answer for shot, answer in shots]
            return "\n\n".join([*parts, self.prompt(row)])
        template, _ = resolve_chat_template(self.tokenizer, self.chat_template_name)
        demos = [qa_messages(self.prompt(shot), answer) for shot, answer in shots]
        messages = build_messages(self.system, demos, qa_messages(self.prompt(row)))
        return render_chat(self.tokenizer, messages, template, add_generation_prompt=True, where=row.where)

    def continuation(self, answer: str) -> str:
        """How an answer follows the context (for likelihood scoring)."""
        return PLAIN_SEPARATOR + answer if self.format == "plain" else answer


def draw_shots(pool: Sequence[Row], k: int, seed: int, item_index: int, same_file: bool) -> list[Row]:
    """k demonstrations for item ``item_index``: seeded per item, never the item itself."""
    if k and not pool:
        raise UserError(f"{k}-shot evaluation needs a pool of solved examples", hint="pass --pool FILE (or set eval.pool / data.train)")
    return few_shot_pool_sample(pool, k, seed=f"{seed}/{item_index}", exclude_index=item_index if same_file else None)
