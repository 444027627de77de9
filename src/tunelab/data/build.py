"""``build_datasets``: from the ``data:`` section to tokenized train/validation examples.

read rows -> rename columns -> detect format -> validate rows into records -> drop duplicates
-> split (seeded) -> label map -> few-shot + template + tokenize + mask -> truncate -> report
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from tunelab.data.augment import augment_records, mask_token
from tunelab.data.bad_rows import BadRows
from tunelab.data.bundle import DataBundle, DataReport, Example
from tunelab.data.collate import preference_sequences
from tunelab.data.config import DataConfig
from tunelab.data.encode import Encoder, learned_tokens
from tunelab.data.example_fields import read_example_fields
from tunelab.data.formats import (
    Record,
    Shape,
    check_settings,
    rename_columns,
    resolve_format,
    to_record,
)
from tunelab.data.head_rows import rerank_pairs
from tunelab.data.labels import label_names
from tunelab.data.prompting import few_shot_pool_sample
from tunelab.data.readers import Row, read_rows
from tunelab.data.split import hold_out, remove_duplicates, shuffled
from tunelab.data.templates import resolve_chat_template
from tunelab.errors import UserError
from tunelab.models.vision import ImageInputs

LABELLED_TASKS = ("classification", "multi_label", "token_classification")  # shapes with a label map


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, shape: Shape, seed: int, images: ImageInputs | None = None) -> DataBundle:
    """Read, validate, split, template and tokenize the recipe's data for ``shape``.

    ``shape``: ``sft`` (chat / prompt-completion / instruction, loss on answers), ``text`` (raw
    text, every token learned) or ``classification`` (text + label). Everything dropped or cut on
    the way is counted in the report; ending with no training example is a UserError.
    """
    bad_rows = BadRows(cfg.on_bad_row, setting="data.on_bad_row")
    train, validation, report = split_records(cfg, shape=shape, seed=seed, bad_rows=bad_rows)
    if cfg.augment is not None:  # after the split: validation rows are never augmented
        if any(r.images for r in train):
            raise UserError("data.augment edits words, and these rows hold images whose markers it would move", where="data.augment", hint="remove data.augment for image rows")
        train, augmented = augment_records(train, cfg.augment, seed, mask_token(tokenizer))
        report.augmented = augmented.as_dict()
    encoder = _encoder(cfg, tokenizer, shape, train, report, images)
    train_examples = _encode_all(encoder, train, train, seed, "train", bad_rows, exclude_self=True)
    val_examples = _encode_all(encoder, validation, train, seed, "validation", bad_rows, exclude_self=False)

    report.bad_rows_skipped = bad_rows.count
    report.bad_row_samples = bad_rows.samples
    report.truncated, report.dropped, report.clipped = encoder.truncated, encoder.dropped, encoder.clipped
    report.train_examples, report.validation_examples = len(train_examples), len(val_examples)
    report.tokens = sum(_tokens(e) for e in train_examples)
    report.supervised_tokens = sum(learned_tokens(e) for e in _sequences(train_examples))
    if not train_examples:
        raise _nothing_left(cfg, report, encoder)
    if cfg.validation and not val_examples:
        raise UserError(
            "no validation examples left",
            where=cfg.validation,
            hint="every row was a bad row, a duplicate of another, or had nothing to learn within data.max_length",
        )
    return DataBundle(train_examples, val_examples, report, report.label_names)


def split_records(cfg: DataConfig, *, shape: Shape, seed: int, bad_rows: BadRows | None = None) -> tuple[list[Record], list[Record], DataReport]:
    """The validated, de-duplicated training and validation records (seeded split), before any
    tokenization: what data transforms (a teacher's answers, augmentation) rewrite."""
    bad_rows = bad_rows or BadRows(cfg.on_bad_row, setting="data.on_bad_row")
    if not cfg.train and not cfg.mixture:
        raise UserError("data.train is not set", hint="point it at a JSONL/JSON/CSV/Parquet file or a folder of them")
    sources = _mixture_sources(cfg, seed, bad_rows) if cfg.mixture else [(None, cfg, _renamed(read_rows(cfg.train, bad_rows, "data.train"), cfg.columns))]  # type: ignore[arg-type]
    val_rows = _renamed(read_rows(cfg.validation, bad_rows, "data.validation"), cfg.columns) if cfg.validation else []
    report = DataReport(format="", rows_read=sum(len(rows) for _, _, rows in sources) + len(val_rows) + bad_rows.count)
    if not any(rows for _, _, rows in sources):
        report.bad_rows_skipped = bad_rows.count
        raise _nothing_left(cfg, report)

    train: list[Record] = []
    parts, tasks = [], {}
    for task, own, rows in sources:
        fmt = resolve_format(own, ((r.fields, r.where) for r in rows), shape)
        check_settings(own, fmt, shape)
        records = _records(rows, fmt, shape, own, bad_rows)
        if task is not None:  # a mixture source: its rows are its task's unless they name their own
            for record in records:
                record.task_name = record.task_name or task
            parts.append(f"{task} ({fmt})")
            tasks[task] = {"format": fmt, "rows": len(rows), "records": len(records)}
        train += records
        report.format = fmt
    if cfg.mixture:
        report.format, report.tasks = "mixture: " + ", ".join(parts), tasks
    val_format = resolve_format(cfg, ((r.fields, r.where) for r in val_rows), shape) if cfg.mixture and val_rows else report.format
    validation = _records(val_rows, val_format, shape, cfg, bad_rows)

    if cfg.dedup:
        validation, repeats = remove_duplicates(validation)
        train, train_repeats = remove_duplicates(train, also_seen=(r.key() for r in validation))
        report.duplicates_removed = repeats + train_repeats
    if cfg.validation:
        train = shuffled(train, seed)
    else:
        try:
            train, validation = hold_out(train, cfg.val_fraction, seed)
        except UserError as exc:  # say which file, and when duplicates are why so few rows are left
            removed = f" (after removing {report.duplicates_removed} duplicate rows)" if report.duplicates_removed else ""
            dedup = "; or set data.dedup: false to keep repeats" if report.duplicates_removed else ""
            raise UserError(f"{exc.message}{removed}", where=cfg.train, hint=f"{exc.hint}{dedup}") from None

    return train, validation, report


def _mixture_sources(cfg: DataConfig, seed: int, bad_rows: BadRows) -> list[tuple[str | None, DataConfig, list[Row]]]:
    """Each ``data.mixture`` source as (task name, its settings -- the top-level ``data:`` ones
    where it sets none -- and its rows, a seeded sample of ``max_rows`` kept in file order)."""
    out: list[tuple[str | None, DataConfig, list[Row]]] = []
    for i, source in enumerate(cfg.mixture or []):
        own_settings = source.model_dump(include={"format", "columns", "prompt_template", "completion_template"}, exclude_none=True)
        own = cfg.model_copy(update={**own_settings, "train": source.train, "mixture": None})
        rows = _renamed(read_rows(source.train, bad_rows, f"data.mixture.{i}.train"), own.columns)
        task = source.task_name()
        if source.max_rows is not None and len(rows) > source.max_rows:
            rows = [rows[j] for j in sorted(random.Random(f"{seed}:{task}").sample(range(len(rows)), source.max_rows))]
        out.append((task, own, rows))
    return out


def losses_summary(report: DataReport) -> str:
    """Where the rows went, in one clause (for errors about having too few examples)."""
    return (
        f"rows read {report.rows_read}, bad rows skipped {report.bad_rows_skipped}, duplicates removed "
        f"{report.duplicates_removed}, held out for validation {report.validation_examples}, dropped for length {report.dropped}"
    )


def _nothing_left(cfg: DataConfig, report: DataReport, encoder: Encoder | None = None) -> UserError:
    """Why no training example is left, biggest cause first, with the fix for it."""
    counts = losses_summary(report)
    if encoder is not None and encoder.dropped:
        overhead = encoder.template_overhead()
        template = f"; the chat template alone takes {overhead} tokens" if overhead else ""
        fix = f"raise data.max_length to at least {encoder.shortest_needed}" if encoder.shortest_needed else "raise data.max_length"
        if cfg.truncation_side == "right":
            fix += ", or set data.truncation_side: left to cut long prompts from their start"
        return UserError(
            f"no training examples left: {encoder.dropped} had nothing to learn within data.max_length = {cfg.max_length}{template}",
            where=cfg.train, hint=f"{fix} ({counts})",
        )
    if report.duplicates_removed:
        return UserError(
            f"no training examples left after removing {report.duplicates_removed} duplicate rows", where=cfg.train,
            hint=f"add distinct rows, or set data.dedup: false to keep repeats ({counts})",
        )
    return UserError("no training examples left", where=cfg.train, hint=counts)


def _renamed(rows: list[Row], columns: dict[str, str]) -> list[Row]:
    if not columns:
        return rows
    return [Row(rename_columns(row.fields, columns), row.where) for row in rows]


def _records(rows: Sequence[Row], fmt: str, shape: Shape, cfg: DataConfig, bad_rows: BadRows) -> list[Record]:
    records = []
    for row in rows:
        try:
            expanded = rerank_pairs(row.fields, row.where) if fmt == "rerank" else [row.fields]
            for fields in expanded:
                record = to_record(fields, "pairs" if fmt == "rerank" else fmt, shape, cfg, row.where)
                extra = read_example_fields(fields, cfg, row.where)
                record.weight, record.difficulty, record.language, record.task_name = extra.weight, extra.difficulty, extra.language, extra.task_name
                records.append(record)
        except UserError as exc:
            bad_rows.handle(exc)
    return records


def _encoder(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, shape: Shape, train: Sequence[Record], report: DataReport,
    images: ImageInputs | None = None,
) -> Encoder:
    """The encoder for ``shape``, after the template (sft) or label map (classification) is fixed."""
    if shape in ("sft", "preference"):
        template, report.template = resolve_chat_template(tokenizer, cfg.template)
        return Encoder(tokenizer, cfg, shape, chat_template=template, images=images)
    if shape in LABELLED_TASKS:
        report.label_names = label_names(cfg.labels, train)
        return Encoder(tokenizer, cfg, shape, label_index={name: i for i, name in enumerate(report.label_names)})
    return Encoder(tokenizer, cfg, shape, images=images)


def _encode_all(
    encoder: Encoder,
    records: Sequence[Record],
    pool: Sequence[Record],
    seed: int,
    split: str,
    bad_rows: BadRows,
    *,
    exclude_self: bool,
) -> list[Example]:
    """Encode ``records``, each with its own reproducible draw of ``few_shot`` demonstrations."""
    examples = []
    for i, record in enumerate(records):
        try:
            shots = few_shot_pool_sample(pool, encoder.cfg.few_shot, f"{seed}/{split}/{i}", i if exclude_self else None)
            example = encoder.encode(record, shots)
        except UserError as exc:
            if exc.where is None:  # a setting problem (e.g. few_shot larger than the pool), not a row's
                raise
            bad_rows.handle(exc)
            continue
        if example is not None:
            example.weight, example.difficulty, example.language, example.task_name = record.weight, record.difficulty, record.language, record.task_name
            examples.append(example)
    return examples


def _sequences(examples: Sequence[Example]) -> list[Example]:
    """Each sequence the model reads (both answers of a preference pair)."""
    return [s for e in examples for s in (preference_sequences([e]) if e.group_labels else [e])]


def _tokens(example: Example) -> int:
    return len(example.input_ids) if example.group is None else sum(len(ids) for ids in example.group if ids)
