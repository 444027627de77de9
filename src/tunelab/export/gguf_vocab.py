"""The tokenizer half of a GGUF file: vocabulary, token types, merges, special ids, chat template.

llama.cpp tokenizes from these fields alone, so they are written from the run's own tokenizer
(what the model was trained with), not copied from the base file. One field cannot be derived
from a Hugging Face tokenizer: ``tokenizer.ggml.pre`` names the pre-tokenizer regex llama.cpp
applies before BPE. It is taken from the base model's GGUF when the model came from one (the
packaged SmolLM2 did); otherwise ``default`` is written and the export report says so, because
llama.cpp may then split text differently from the Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from tunelab.errors import UserError


@dataclass(frozen=True)
class GgufVocab:
    """Everything llama.cpp needs to tokenize and to format chats like the trained model."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    pre: str
    pre_source: str

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the ``tokenizer.*`` fields to ``writer``."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        if not self.merges:  # a bytes-only vocabulary: readers that derive merges from scores find none
            writer.add_token_scores([0.0] * len(self.tokens))
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def vocab_from_tokenizer(tokenizer: Any, embedding_rows: int, base_gguf: Path | None) -> GgufVocab:
    """Build the GGUF vocabulary of a byte-level BPE tokenizer (GPT-2 style, SmolLM2's kind).

    ``embedding_rows`` may exceed the tokenizer's size (embeddings padded to a multiple): the extra
    rows get unused placeholder tokens so token ids and embedding rows stay aligned.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            "GGUF export handles byte-level BPE tokenizers (GPT-2 / SmolLM2 / Llama 3 style); this model's tokenizer is not one",
            hint="export a plain Hugging Face model with --merge and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    size = len(tokenizer)
    if size > embedding_rows:
        raise UserError(f"the tokenizer has {size} tokens but the model only {embedding_rows} embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    types = [_token_type(added.get(i)) for i in range(size)]
    tokens += [f"[PAD{i}]" for i in range(size, embedding_rows)]
    types += [gguf.TokenType.UNUSED] * (embedding_rows - size)
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model.get("merges", [])]
    pre, pre_source = _pre_tokenizer(base_gguf)
    probe = tokenizer("a").input_ids
    return GgufVocab(
        tokens=tokens,
        types=[int(t) for t in types],
        merges=merges,
        special_ids=_special_ids(tokenizer),
        add_bos=bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        add_eos=bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id,
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        pre=pre,
        pre_source=pre_source,
    )


def _token_type(added: Any) -> gguf.TokenType:
    if added is None:
        return gguf.TokenType.NORMAL
    return gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}
    return {kind: int(token_id) for kind, token_id in ids.items() if token_id is not None}


def _pre_tokenizer(base_gguf: Path | None) -> tuple[str, str]:
    """``(name, where it came from)`` for ``tokenizer.ggml.pre``."""
    if base_gguf is not None:
        field = gguf.GGUFReader(base_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents()), f"base GGUF {base_gguf.name}"
    return "default", "not known (no base GGUF): llama.cpp may pre-tokenize differently"
