"""Chat templates: the model's own, or a named fallback, rendered through the tokenizer.

Fallbacks are written as Jinja chat templates, so every template (the model's and ours) goes
through the same ``tokenizer.apply_chat_template`` path, which is also what inference uses.
Each fallback ends an assistant turn with an end marker (``<|im_end|>``, ``<|eot_id|>``, the
tokenizer's EOS) so the model can learn where to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from tunelab.data.prompting import Message
from tunelab.errors import UserError
from tunelab.models.tiny import CHATML_TEMPLATE

LLAMA3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ALPACA_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + (eos_token or '') + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# The answer's leading space belongs to the assistant turn: "Assistant:" + " answer" tokenizes
# the way generation after the prompt "Assistant:" produces it.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + (eos_token or '') + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "alpaca": ALPACA_TEMPLATE,
    "plain": PLAIN_TEMPLATE,
}


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> tuple[str, str]:
    """``(jinja_source, description)`` for ``data.template`` = auto | model | a named fallback.

    ``auto`` uses the model's own template when the tokenizer has one (the format the model was
    tuned on), else ChatML, the most widely used convention.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # some tokenizers carry several named templates
        own = own.get("default")
    if name in ("auto", "model") and own:
        return own, "model"
    if name == "model":
        raise UserError(
            "data.template is 'model' but this tokenizer has no chat template",
            hint=f"choose one of: {', '.join(NAMED_TEMPLATES)}",
        )
    if name == "auto":
        return NAMED_TEMPLATES["chatml"], "chatml"
    if name not in NAMED_TEMPLATES:
        raise UserError(
            f"unknown chat template '{name}'", hint=f"choose auto, model, or one of: {', '.join(NAMED_TEMPLATES)}"
        )
    return NAMED_TEMPLATES[name], name


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    template: str,
    *,
    add_generation_prompt: bool = False,
    where: str | None = None,
) -> str:
    """The conversation as text (no tokenization); template errors become a UserError at ``where``."""
    plain: list[dict[str, Any]] = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            plain, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as exc:
        raise UserError(
            f"the chat template rejected this conversation ({exc})",
            where=where,
            hint="check the roles' order, or set data.template: chatml",
        ) from None
