"""Read rows from local JSONL, JSON, CSV/TSV and Parquet files, or a folder of such shards.

Every row remembers where it came from (``file:line``; ``file:row N`` for Parquet, which has no
lines), so any later complaint about it can point the user at the exact place to fix. Problems
confined to one row (a malformed JSON line, an undecodable byte, a short CSV row) go through the
``BadRows`` policy; problems with a whole file (missing, empty, unreadable) are always errors.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.bad_rows import BadRows
from tunelab.errors import UserError


@dataclass
class Row:
    """One record as read from disk: its fields and its location."""

    fields: dict[str, Any]
    where: str


def read_rows(path: str | Path, bad_rows: BadRows) -> list[Row]:
    """All rows of a data file, or of every data file in a folder (sorted by name)."""
    path = Path(path).expanduser()
    if path.is_dir():
        shards = sorted(p for p in path.rglob("*") if p.is_file() and _reader_for(p) and not p.name.startswith("."))
        if not shards:
            raise UserError(
                "folder holds no data files",
                where=str(path),
                hint=f"expected files ending in {', '.join(READERS)}",
            )
        return [row for shard in shards for row in _read_file(shard, bad_rows)]
    if not path.exists():
        raise UserError("data file not found", where=str(path), hint="check data.train / data.validation")
    return _read_file(path, bad_rows)


def _read_file(path: Path, bad_rows: BadRows) -> list[Row]:
    reader = _reader_for(path)
    if reader is None:
        raise UserError(
            f"unsupported data file type '{path.suffix}'",
            where=str(path),
            hint=f"use one of {', '.join(READERS)}",
        )
    skipped_before = bad_rows.count
    rows = reader(path, bad_rows)
    if not rows and bad_rows.count == skipped_before:
        raise UserError("file has no rows", where=str(path), hint="add examples or point data.train at another file")
    return rows


def _reader_for(path: Path) -> Callable[[Path, BadRows], list[Row]] | None:
    return READERS.get(path.suffix.lower())


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read file ({exc.strerror or exc.__class__.__name__})", where=str(path)) from None
    if not data.strip():
        raise UserError("file is empty", where=str(path), hint="add examples or point data.train at another file")
    return data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is legal but not part of the data


def _not_utf8(where: str, raw: bytes, exc: UnicodeDecodeError) -> UserError:
    return UserError(
        f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
        where=where,
        hint="re-save the file as UTF-8",
    )


def _object_or_error(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(
            f"expected a JSON object {{...}}, got {type(value).__name__}",
            where=where,
            hint='write one object per row, e.g. {"text": "..."}',
        )
    return value


# ---------------------------------------------------------------------------------------------
# JSON Lines and JSON arrays


def read_jsonl(path: Path, bad_rows: BadRows) -> list[Row]:
    """One JSON object per line; blank lines are ignored."""
    return _jsonl_rows(path, _read_bytes(path), bad_rows)


def _jsonl_rows(path: Path, data: bytes, bad_rows: BadRows) -> list[Row]:
    rows = []
    # bytes.splitlines splits only on \n, \r\n and \r, never inside a JSON string (str.splitlines would
    # also split on U+2028 and friends, which JSON allows unescaped).
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad_rows.handle(_not_utf8(where, raw, exc))
            continue
        try:
            rows.append(Row(_object_or_error(json.loads(text), where), where))
        except json.JSONDecodeError as exc:
            bad_rows.handle(
                UserError(
                    f"malformed JSON: {exc.msg} (column {exc.colno})",
                    where=where,
                    hint="fix or delete this line: each line must be one complete JSON object",
                )
            )
        except UserError as exc:
            bad_rows.handle(exc)
    return rows


def read_json(path: Path, bad_rows: BadRows) -> list[Row]:
    """A JSON array of objects; a ``.json`` file that is not an array is read as JSON Lines."""
    data = _read_bytes(path)
    if not data.lstrip().startswith(b"["):
        return _jsonl_rows(path, data, bad_rows)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _not_utf8(f"{path}:{line}", data, exc) from None
    return _array_rows(path, text, bad_rows)


def _array_rows(path: Path, text: str, bad_rows: BadRows) -> list[Row]:
    """Decode the array element by element so each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    pos = _skip_space(text, text.index("[") + 1)
    while pos < len(text) and text[pos] != "]":
        where = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"malformed JSON: {exc.msg} (column {exc.colno})",
                where=f"{path}:{exc.lineno}",
                hint="fix the JSON there (a JSON file must be one array of objects)",
            ) from None
        try:
            rows.append(Row(_object_or_error(value, where), where))
        except UserError as exc:
            bad_rows.handle(exc)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise UserError(
                "malformed JSON: expected ',' or ']' after an array element",
                where=f"{path}:{text.count(chr(10), 0, pos) + 1}",
                hint="fix the JSON there (a JSON file must be one array of objects)",
            )
    if pos >= len(text) or text[pos + 1 :].strip():
        raise UserError(
            "malformed JSON: the array is not closed, or text follows it",
            where=f"{path}:{text.count(chr(10), 0, min(pos, len(text))) + 1}",
            hint="a JSON file must be exactly one array of objects",
        )
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ---------------------------------------------------------------------------------------------
# CSV / TSV


def read_csv(path: Path, bad_rows: BadRows, delimiter: str = ",") -> list[Row]:
    """A header line naming the fields, then one row per record (quoted fields may span lines)."""
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad byte costs one row,
    # not the whole file; rows holding such a character are reported below.
    text = _read_bytes(path).decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    rows = []
    start = 2  # line 1 is the header
    try:
        for record in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            try:
                rows.append(Row(_csv_fields(record, header, where), where))
            except UserError as exc:
                bad_rows.handle(exc)
    except csv.Error as exc:
        raise UserError(
            f"malformed CSV ({exc})", where=f"{path}:{reader.line_num}", hint="fix the quoting there"
        ) from None
    return rows


def _csv_fields(record: dict[str | None, Any], header: list[str], where: str) -> dict[str, Any]:
    if None in record or any(value is None for value in record.values()):
        found = len(header) + len(record.get(None) or []) - sum(v is None for v in record.values())
        raise UserError(
            f"row has {found} fields but the header has {len(header)}",
            where=where,
            hint="quote values that contain the delimiter",
        )
    for value in record.values():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("not valid UTF-8", where=where, hint="re-save the file as UTF-8") from None
    return dict(record)  # type: ignore[arg-type]  # None keys were rejected above


def read_tsv(path: Path, bad_rows: BadRows) -> list[Row]:
    """Like CSV, tab-separated."""
    return read_csv(path, bad_rows, delimiter="\t")


# ---------------------------------------------------------------------------------------------
# Parquet


def read_parquet(path: Path, bad_rows: BadRows) -> list[Row]:
    """A Parquet table; a row's location is its 1-based row number."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(
            f"not a readable Parquet file ({str(exc).splitlines()[0][:120]})",
            where=str(path),
            hint="re-export the table, or convert it to JSONL",
        ) from None
    return [Row(record, f"{path}:row {i}") for i, record in enumerate(records, 1)]


READERS: dict[str, Callable[[Path, BadRows], list[Row]]] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
}
