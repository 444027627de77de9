"""What a fine-tuning file must contain, checked when a job starts (OpenAI fails the job then,
not the upload): at least ``MIN_EXAMPLES`` rows, each an OpenAI chat example (``messages`` with
known roles and an assistant turn) or a legacy ``prompt``/``completion`` pair for supervised
jobs, or OpenAI's preference example (``input.messages``, ``preferred_output``,
``non_preferred_output``) for DPO jobs; nothing else."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIN_EXAMPLES = 10
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
CHAT_KEYS = {"messages", "tools", "parallel_tool_calls", "functions"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}


@dataclass
class FileProblem(Exception):
    """Why a job's file cannot be trained on, as OpenAI reports it in ``job.error``."""

    code: str
    message: str
    param: str

    def as_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "param": self.param}


PREFERENCE_KEYS = {"input", "preferred_output", "non_preferred_output"}


def _check_messages(messages: object, invalid: Callable[[str], FileProblem], name: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise invalid(f"'{name}' must be a non-empty list.")
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message:
            raise invalid(f"message {index} Discriminator 'role' is missing in value")
        if message["role"] not in ROLES:
            raise invalid(f"message {index} has an unknown role '{message['role']}'.")
        if set(message) - MESSAGE_KEYS:
            raise invalid(f"message {index} contains an extra \"{sorted(set(message) - MESSAGE_KEYS)[0]}\".")


def _check_preference_row(row: dict, invalid: Callable[[str], FileProblem]) -> None:
    missing = PREFERENCE_KEYS - set(row)
    if missing:
        raise invalid(f"is missing \"{sorted(missing)[0]}\" (DPO examples hold input, preferred_output and non_preferred_output).")
    if set(row) - PREFERENCE_KEYS:
        raise invalid(f"contains an extra \"{sorted(set(row) - PREFERENCE_KEYS)[0]}\".")
    if not isinstance(row["input"], dict) or set(row["input"]) - CHAT_KEYS:
        raise invalid("'input' must be an object with 'messages' (and optionally 'tools', 'parallel_tool_calls').")
    _check_messages(row["input"].get("messages"), invalid, "input.messages")
    for name in ("preferred_output", "non_preferred_output"):
        _check_messages(row[name], invalid, name)
        if any(m["role"] != "assistant" for m in row[name]):
            raise invalid(f"'{name}' must hold assistant messages only.")
    if row["preferred_output"] == row["non_preferred_output"]:
        raise invalid("'preferred_output' and 'non_preferred_output' are identical.")


def _check_row(row: dict, number: int, param: str, method: str) -> None:
    def invalid(detail: str) -> FileProblem:
        return FileProblem("invalid_training_file", f"The job failed due to an invalid training file. Invalid file format. Example {number}, {detail}", param)

    if not isinstance(row, dict):
        raise invalid("is not a JSON object.")
    if method == "dpo":
        _check_preference_row(row, invalid)
        return
    if "messages" in row:
        extra = set(row) - CHAT_KEYS
        if extra:
            raise invalid(f"contains an extra \"{sorted(extra)[0]}\".")
        messages = row["messages"]
        _check_messages(messages, invalid)
        if not any(m["role"] == "assistant" for m in messages):
            raise invalid("has no assistant message to train on.")
    elif "prompt" in row and "completion" in row:
        if set(row) - {"prompt", "completion"}:
            raise invalid(f"contains an extra \"{sorted(set(row) - {'prompt', 'completion'})[0]}\".")
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise invalid("'prompt' and 'completion' must be strings.")
    else:
        raise invalid("has neither 'messages' nor 'prompt' and 'completion'.")


def count_examples(path: Path) -> int:
    """The non-empty lines of a JSONL file: its examples."""
    with path.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def check_training_file(path: Path, param: str = "training_file", minimum: int = MIN_EXAMPLES, method: str = "supervised") -> int:
    """The number of examples in ``path`` for a ``method`` (supervised | dpo) job; raises
    ``FileProblem`` for what OpenAI would reject."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        _check_row(row, number, param, method)
    if len(rows) < minimum:
        raise FileProblem("invalid_n_examples", f"Training file has {len(rows)} example(s), but must have at least {minimum} examples", param)
    return len(rows)
