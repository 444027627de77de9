"""``data.mixture``: several training files, each with its own format and templates, each row
carrying its source's task; a seeded cap per source; the task_mix sampler over those tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tunelab.data import DataConfig, build_datasets
from tunelab.errors import UserError
from tunelab.models.tiny import byte_tokenizer
from tunelab.recipe import load_recipe
from tunelab.train.preflight import check_trainable
from tunelab.train.samplers import SAMPLERS, SamplerContext
from tunelab.train.task_mix import TaskMixConfig

TOK = byte_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sources(tmp_path: Path) -> list[dict]:
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"film {i}", "label": "good" if i % 2 else "bad"} for i in range(40)])
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "HELLO"}]} for i in range(10)])
    return [
        {"train": reviews, "task": "sentiment", "prompt_template": "Review: {text}\nVerdict?", "completion_template": "{label}", "max_rows": 12},
        {"train": chats},
    ]


def decoded(example) -> str:
    return TOK.decode(example.input_ids)


def test_each_source_keeps_its_format_templates_and_task_and_the_cap_is_a_seeded_sample(tmp_path):
    cfg = DataConfig(mixture=sources(tmp_path), val_fraction=0.0, template="chatml")
    bundle = build_datasets(cfg, TOK, shape="sft", seed=0)
    by_task: dict[str, list] = {}
    for example in bundle.train:
        by_task.setdefault(example.task_name, []).append(example)
    assert {name: len(v) for name, v in by_task.items()} == {"sentiment": 12, "chats": 10}, "max_rows caps a source; the task defaults to the file's name"
    assert all("Review: film" in decoded(e) and "Verdict?" in decoded(e) for e in by_task["sentiment"])
    assert all("hi " in decoded(e) and "Review" not in decoded(e) for e in by_task["chats"])
    assert bundle.report.format == "mixture: sentiment (classification), chats (chat)"
    assert bundle.report.tasks["sentiment"] == {"format": "classification", "rows": 12, "records": 12}

    def sampled(seed: int) -> set[str]:
        return {decoded(e) for e in build_datasets(cfg, TOK, shape="sft", seed=seed).train if e.task_name == "sentiment"}

    assert sampled(0) == sampled(0) and sampled(0) != sampled(1)


def test_task_mix_draws_one_mixture_task_per_batch_at_the_asked_shares(tmp_path):
    bundle = build_datasets(DataConfig(mixture=sources(tmp_path), val_fraction=0.0, template="chatml"), TOK, shape="sft", seed=0)
    sampler = SAMPLERS.get("task_mix").build(TaskMixConfig(strategy="uniform"), SamplerContext(bundle.train, 2, 0))
    batches = sampler.batches(0)
    tasks = [{bundle.train[i].task_name for i in batch} for batch in batches]
    assert all(len(t) == 1 for t in tasks)
    counts = {name: sum(t == {name} for t in tasks) for name in ("sentiment", "chats")}
    assert abs(counts["sentiment"] - counts["chats"]) <= 1, "uniform: each task gets half the batches whatever its size"


def test_mixture_errors_name_the_setting(tmp_path):
    mix = sources(tmp_path)
    with pytest.raises(ValidationError, match="not both"):
        DataConfig(train=mix[1]["train"], mixture=mix)
    with pytest.raises(ValidationError, match="task 'chats'"):
        DataConfig(mixture=[mix[1], mix[1]])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"model: {{name: tiny-llama}}\ndata:\n  mixture:\n    - {{train: reviews.jsonl, prompt_template: '{{text}}', completion_template: '{{label}}'}}\n    - {{train: {tmp_path / 'missing.jsonl'}}}\n")
    recipe = load_recipe(recipe_file)
    assert recipe.data.mixture[0].train == str(tmp_path / "reviews.jsonl"), "a source's path is relative to the recipe"
    with pytest.raises(UserError, match="data file not found") as err:
        check_trainable(recipe)
    assert "data.mixture.1.train" in str(err.value.hint)
