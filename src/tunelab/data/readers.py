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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.bad_rows import BadRows
from tunelab.errors import UserError

#: The largest row a reader accepts: anything longer is a mistake (a whole corpus on one line);
#: texts are cut to a multiple of data.max_length before tokenizing anyway (``tunelab.data.clip``).
MAX_ROW_BYTES = 16 * 2**20


@dataclass
class Row:
    """One record as read from disk: its fields and its location."""

    fields: dict[str, Any]
    where: str


def read_rows(path: str | Path, bad_rows: BadRows, setting: str | None = None) -> list[Row]:
    """All rows of a data file, or of every data file in a folder (sorted by name); ``setting``
    names what the user set the path with (``data.train``, ``--data``) for a missing file."""
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
        raise UserError("data file not found", where=str(path), hint=f"check {setting or 'the path'}")
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
    """The reader the content calls for when it has a binary signature (a Parquet file named
    ``.jsonl`` is still Parquet), else the one its name calls for."""
    reader = READERS.get(path.suffix.lower())
    if reader is None or not path.is_file():
        return reader
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError:
        return reader
    if magic == b"PAR1":
        return read_parquet
    if magic[:2] == b"\x1f\x8b":
        raise UserError("the file is gzip-compressed", where=str(path), hint=f"decompress it first (gunzip -c {path.name} > data{path.suffix})")
    return reader


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
    """One JSON object per line; blank lines are ignored. Read line by line, so a huge line is
    refused (``MAX_ROW_BYTES``) without ever being held in memory."""
    return _jsonl_rows(path, _lines(path), bad_rows)


def _lines(path: Path) -> Iterator[tuple[int, bytes | int]]:
    """``(line number, bytes)`` per line, or ``(line number, size)`` for a line over ``MAX_ROW_BYTES``.

    Lines end at ``\n``, ``\r\n`` or ``\r`` (never inside a JSON string: JSON escapes those; a
    ``str.splitlines`` would also split on U+2028, which JSON allows unescaped)."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise UserError(f"cannot read file ({exc.strerror or exc.__class__.__name__})", where=str(path)) from None
    lineno, content = 0, False
    with fh:
        while raw := fh.readline(MAX_ROW_BYTES + 1):
            if lineno == 0:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is legal but not data
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while not raw.endswith(b"\n"):  # skip the rest of the line, a megabyte at a time
                    raw = fh.readline(1 << 20)
                    if not raw:
                        break
                    size += len(raw)
                lineno += 1
                content = True
                yield lineno, size
                continue
            for part in raw.splitlines() or [b""]:
                lineno += 1
                content = content or bool(part.strip())
                yield lineno, part
    if not content:
        raise UserError("file is empty", where=str(path), hint="add examples or point data.train at another file")


def _jsonl_rows(path: Path, lines: Iterable[tuple[int, bytes | int]], bad_rows: BadRows) -> list[Row]:
    rows = []
    for lineno, raw in lines:
        where = f"{path}:{lineno}"
        if isinstance(raw, int):
            bad_rows.handle(_too_long(where, raw))
            continue
        if not raw.strip():
            continue
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


def _too_long(where: str, size: int) -> UserError:
    return UserError(
        f"row of {size / 2**20:,.0f} MB is over the {MAX_ROW_BYTES // 2**20} MB limit for one row",
        where=where,
        hint="split the text into several rows (only the first few thousand tokens of a row are ever used)",
    )


def read_json(path: Path, bad_rows: BadRows) -> list[Row]:
    """A JSON array of objects; a ``.json`` file that is not an array is read as JSON Lines."""
    with path.open("rb") as fh:
        if not fh.read(4096).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
            return read_jsonl(path, bad_rows)
    data = _read_bytes(path)
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
    csv.field_size_limit(MAX_ROW_BYTES)  # the default (128K characters) rejects ordinary long documents
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
        if "field larger than field limit" in str(exc):
            raise _too_long(f"{path}:{reader.line_num}", MAX_ROW_BYTES + 1) from None
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
    rows = []
    for i, record in enumerate(records, 1):
        size = sum(len(v) for v in record.values() if isinstance(v, (str, bytes)))
        if size > MAX_ROW_BYTES:
            bad_rows.handle(_too_long(f"{path}:row {i}", size))
        else:
            rows.append(Row(record, f"{path}:row {i}"))
    return rows


READERS: dict[str, Callable[[Path, BadRows], list[Row]]] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
}
