"""Sequence-level distillation (Kim & Rush, 2016): the teacher answers every training prompt once,
and the student is trained by ordinary SFT on the teacher's answers instead of the data's.

The teacher's answers are generated greedily, a batch at a time, and appended to a file in the
tunelab cache as they come, so a killed run continues where it stopped; once complete, the file
is renamed into place and every later student of that teacher on that data reuses it. The
validation split keeps the data's own answers (split before any answer is replaced, with the
recipe's seed), so the validation loss still measures the task, not agreement with the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.data.build import split_records
from tunelab.data.config import DataConfig
from tunelab.data.prompting import build_messages
from tunelab.data.records import Record
from tunelab.data.templates import render_chat, resolve_chat_template
from tunelab.errors import UserError
from tunelab.evaluate.generation import generate_batch
from tunelab.generate import GenerationSettings
from tunelab.methods.peft_adapters import merge_adapters
from tunelab.models.cache import cache_root, model_fingerprint


def teacher_answered_data(
    data: DataConfig, *, teacher_name: str, ctx: Any, max_new_tokens: int, batch_size: int
) -> DataConfig:
    """``data`` with the training answers replaced by the teacher's (generated once, cached) and
    the validation split written out with its own answers."""
    train, validation, _ = split_records(data, shape="sft", seed=ctx.seed)
    settings = f"{model_fingerprint(teacher_name, ctx.seed)}|{max_new_tokens}|{data.system_prompt}"
    keys = json.dumps([[r.key() for r in train], [r.key() for r in validation]])
    directory = cache_root() / "teacher_answers" / hashlib.sha256(f"{settings}|{keys}".encode()).hexdigest()[:20]
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "validation.jsonl").exists():
        atomic.write_text(directory / "validation.jsonl", "".join(_row(r.messages or []) for r in validation))
    if not (directory / "train.jsonl").exists():
        teacher, tokenizer = merge_adapters(ctx.auxiliary_model(teacher_name)), ctx.auxiliary_tokenizer(teacher_name)
        template, _ = resolve_chat_template(tokenizer, "auto")  # the teacher is asked in its own format
        _answer_all(teacher, tokenizer, train, template, data.system_prompt, directory, max_new_tokens, batch_size)
    return data.model_copy(update={
        "train": str(directory / "train.jsonl"), "validation": str(directory / "validation.jsonl"), "val_fraction": 0.0,
        "format": "chat", "columns": {}, "prompt_template": None, "completion_template": None,
    })


def _answer_all(
    teacher: Any, tokenizer: Any, records: Sequence[Record], template: str, system_prompt: str | None,
    directory: Path, max_new_tokens: int, batch_size: int,
) -> None:
    """Append the teacher's answer to each record to ``train.partial.jsonl``, resuming after the
    rows already there, then rename it ``train.jsonl``."""
    partial = directory / "train.partial.jsonl"
    done = len(atomic.read_jsonl(partial))
    if done:
        atomic.write_text(partial, "".join(json.dumps(r) + "\n" for r in atomic.read_jsonl(partial)))  # drop a torn last line
        print(f"tunelab: teacher answers: continuing after {done} of {len(records)}", flush=True)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    for start in range(done, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = []
        for record in chunk:
            turns = record.messages or []
            if not turns or turns[-1]["role"] != "assistant":
                raise UserError("sequence-level distillation needs rows that end with an answer", where=record.where)
            prompts.append(render_chat(tokenizer, build_messages(system_prompt, [], turns[:-1]), template, add_generation_prompt=True, where=record.where))
        answers = generate_batch(
            teacher, tokenizer, prompts, settings, add_special_tokens=False, batch_size=batch_size,
            progress=f"teacher answers {start + len(chunk)}/{len(records)}",
        )
        for record, answer in zip(chunk, answers):
            atomic.append_jsonl(partial, {"messages": [*record.messages[:-1], {"role": "assistant", "content": answer.strip()}]})  # type: ignore[index]
    os.replace(partial, directory / "train.jsonl")


def _row(messages: Sequence[dict[str, Any]]) -> str:
    return json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}) + "\n"
