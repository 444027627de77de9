"""Turn validated records into tokenized ``Example``s for one shape, counting truncation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tunelab.data.bundle import IGNORE_INDEX, Example
from tunelab.data.chat_masking import tokenize_chat
from tunelab.data.clip import char_budget, clip_record
from tunelab.data.config import DataConfig
from tunelab.data.formats import Record, Shape
from tunelab.data.head_encode import encode_head_example
from tunelab.data.head_rows import HEAD_SHAPES
from tunelab.data.images import IMAGE_MARKER, load_image
from tunelab.data.labels import label_id
from tunelab.data.prompting import Message, build_messages
from tunelab.data.tokenize import tokenize_for_classification, tokenize_text, truncate
from tunelab.errors import UserError
from tunelab.models.vision import ImageInputs


def learned_tokens(example: Example) -> int:
    """Tokens that produce a loss term: labels after the first, since causal LMs predict token t+1
    from token t and the first token is never a target."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


@dataclass
class Encoder:
    """Encodes records for ``shape``; ``truncated``/``dropped`` count what ``max_length`` did."""

    tokenizer: PreTrainedTokenizerBase
    cfg: DataConfig
    shape: Shape
    chat_template: str | None = None
    label_index: dict[str, int] | None = None
    #: A vision-language model's image inputs (None: the model reads text only).
    images: ImageInputs | None = None
    truncated: int = 0
    dropped: int = 0
    #: Texts cut by characters before tokenizing (``tunelab.data.clip``); each is also truncated.
    clipped: int = 0
    #: The shortest ``max_length`` that would have kept something to learn in a dropped example.
    shortest_needed: int | None = None
    _declared_labels: bool = field(init=False)
    _char_budget: int = field(init=False)

    def __post_init__(self) -> None:
        self._declared_labels = self.cfg.labels is not None
        self._char_budget = char_budget(self.tokenizer, self.cfg.max_length)

    def encode(self, record: Record, shots: Sequence[Record] = ()) -> Example | None:
        """The example for ``record`` (``shots`` as demonstrations), or None when truncation left
        nothing to learn."""
        cfg = self.cfg
        record, clipped = clip_record(record, self._char_budget, cfg.truncation_side)
        self.clipped += clipped
        if self.shape in HEAD_SHAPES:
            example, cut = encode_head_example(self.tokenizer, cfg, self.shape, record, self.label_index, self._declared_labels)
            self.truncated += cut
            return example
        if self.shape == "classification":
            assert self.label_index is not None, "classification needs a label map"
            ids, cut = tokenize_for_classification(
                self.tokenizer, record.text or "", cfg.max_length, cfg.truncation_side
            )
            self.truncated += cut
            return Example(ids, [], label=label_id(record, self.label_index, self._declared_labels))
        if self.shape == "preference":
            return self._encode_preference(record, clipped)
        if self.shape == "text":
            ids = tokenize_text(self.tokenizer, self._placeholders(record.text or ""))
            labels = list(ids)
        else:
            assert record.messages is not None, "sft needs messages"
            messages = build_messages(cfg.system_prompt, [s.messages or [] for s in shots], record.messages)
            messages = [{**m, "content": self._placeholders(m["content"])} for m in messages]
            ids, labels = self._tokenize_chat(messages, record.where, cfg.train_on_prompt)
        if self.images is None:
            if record.images:
                raise UserError("the row has images, but the model reads text only", where=record.where, hint="train a vision-language model (a LLaVA-style folder, or one from `tunelab vlm assemble`)")
            return self._fit(ids, labels, clipped)
        return self._fit_with_images(record, ids, labels, clipped)

    def _placeholders(self, text: str) -> str:
        """``text`` with each image marker replaced by the model's own image placeholder token."""
        return text.replace(IMAGE_MARKER, self.images.placeholder) if self.images is not None else text

    def _fit_with_images(self, record: Record, ids: list[int], labels: list[int], clipped: bool) -> Example | None:
        """``_fit`` after each placeholder is expanded to the image's feature count; the image
        pixels are read here, once, and ride with the example."""
        assert self.images is not None
        images = record.images or []
        found = ids.count(self.images.token_id)
        if found != len(images):
            raise UserError(
                f"the row has {len(images)} image(s) but its text holds {found} image placeholder(s) {self.images.placeholder!r}",
                where=record.where, hint="give each image one content part (or one image field); do not write the placeholder in text",
            )
        ids, labels = self.images.expand(ids, labels, IGNORE_INDEX)
        example = self._fit(ids, labels, clipped)
        if example is None or not images:
            return example
        needed = len(images) * self.images.tokens_per_image
        if example.input_ids.count(self.images.token_id) != needed:
            raise UserError(
                f"data.max_length = {self.cfg.max_length} cuts into the row's image tokens ({self.images.tokens_per_image} per image)",
                where=record.where, hint=f"raise data.max_length to at least {len(ids)}",
            )
        example.pixel_values = self.images.pixel_values([load_image(ref, record.where) for ref in images])
        return example

    def _tokenize_chat(self, messages: list[Message], where: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
        assert self.chat_template is not None, "chat examples need a template"
        return tokenize_chat(self.tokenizer, messages, self.chat_template, train_on_prompt=train_on_prompt, where=where)

    def _fit(self, ids: list[int], labels: list[int], clipped: bool) -> Example | None:
        """``ids``/``labels`` cut to ``max_length``, or None (counted as dropped) when nothing
        learned is left."""
        cfg = self.cfg
        full_labels = labels
        ids, labels, cut = truncate(ids, labels, cfg.max_length, cfg.truncation_side)
        example = Example(ids, labels)
        if learned_tokens(example) == 0:
            self.dropped += 1
            needed = None if clipped else _length_to_learn(full_labels, cfg.truncation_side)  # a clipped text's is unknown
            if needed is not None:
                self.shortest_needed = min(needed, self.shortest_needed or needed)
            return None
        self.truncated += cut
        return example

    def _encode_preference(self, record: Record, clipped: bool) -> Example | None:
        """The prompt followed by each answer, each cut to ``max_length`` on its own; only the
        answers are supervised. The example is the chosen sequence, with both in ``group``."""
        assert record.messages is not None and record.chosen is not None and record.rejected is not None
        prompt = build_messages(self.cfg.system_prompt, [], record.messages)
        pair = []
        for answer in (record.chosen, record.rejected):
            ids, labels = self._tokenize_chat([*prompt, *answer], record.where, False)
            example = self._fit(ids, labels, clipped)
            if example is None:
                return None
            pair.append(example)
        chosen, rejected = pair
        return Example(chosen.input_ids, chosen.labels, group=[chosen.input_ids, rejected.input_ids], group_labels=[chosen.labels, rejected.labels])

    def template_overhead(self) -> int:
        """Tokens the chat template adds around one empty user turn and answer (0 outside sft)."""
        if self.shape != "sft" or self.chat_template is None:
            return 0
        empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        ids, _ = tokenize_chat(self.tokenizer, empty, self.chat_template, train_on_prompt=True, where="template")
        return len(ids)


def _length_to_learn(labels: list[int], side: str) -> int | None:
    """The shortest cut of ``labels`` (from ``side``) that keeps one learned token (the first
    label is never a target), or None when even the whole sequence has none."""
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX and i > 0]
    if not learned:
        return None
    return learned[0] + 1 if side == "right" else len(labels) - learned[-1] + 1
