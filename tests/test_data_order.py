"""Curriculum, self-paced and importance samplers: pacing exact, draws pure and resumable, scores right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.train_helpers import write_chat_data, write_label_data
from tunelab.data import Example
from tunelab.errors import UserError
from tunelab.recipe import recipe_from_dict
from tunelab.train.curriculum import (
    CurriculumConfig,
    CurriculumSampler,
    PacingConfig,
    difficulty_order,
    label_rarity,
    pace,
    static_difficulty,
)
from tunelab.train.example_scores import example_losses
from tunelab.train.importance import (
    ImportanceConfig,
    ImportanceSampler,
    sampling_probabilities,
)
from tunelab.train.prepare import prepare
from tunelab.train.run import run_training
from tunelab.train.samplers import SamplerContext, step_batches


@pytest.mark.parametrize(
    ("pacing", "expected"),
    [
        # c0 = 0.2, full at half of training: progress 0, 0.125, 0.25, 0.5, 0.9
        ("linear", [0.2, 0.4, 0.6, 1.0, 1.0]),
        ("root", [0.2, math.sqrt(0.04 + 0.96 * 0.25), math.sqrt(0.04 + 0.96 * 0.5), 1.0, 1.0]),
        ("geometric", [0.2, 0.2**0.75, 0.2**0.5, 1.0, 1.0]),
        ("baby_steps", [0.25, 0.5, 0.75, 1.0, 1.0]),
    ],
)
def test_pacing_functions_follow_their_formulas(pacing, expected):
    cfg = PacingConfig(pacing=pacing, start_fraction=0.2, full_at=0.5, stages=4)
    assert [pace(cfg, p) for p in (0.0, 0.125, 0.25, 0.5, 0.9)] == pytest.approx(expected)


def _curriculum(n=40, batch=4, total=20, per_step=2, **pacing):
    scores = [float((i * 7) % n) for i in range(n)]  # a permutation of 0..n-1: example i's rank is known
    sampler = CurriculumSampler(n, batch, seed=3, pacing=PacingConfig(**pacing), scores=scores)
    sampler.bind(total, per_step)
    return sampler, scores


@pytest.mark.parametrize("pacing", ["linear", "root", "geometric", "baby_steps"])
def test_every_batch_comes_from_exactly_the_pool_the_pacing_admits(pacing):
    sampler, scores = _curriculum(pacing=pacing, start_fraction=0.1, full_at=0.8)
    n, steps_per_epoch = 40, 10 // 2
    cfg = PacingConfig(pacing=pacing, start_fraction=0.1, full_at=0.8)
    seen_pools = set()
    for epoch in range(2):
        batches = sampler.batches(epoch)
        for k, batch in enumerate(batches):
            step = epoch * steps_per_epoch + k // 2
            pool = max(8, math.ceil(pace(cfg, step / 20) * n - 1e-9))  # never less than a step's 2 x 4
            assert sampler.pool_size(step) == pool and sampler.describe(step)["pool"] == pool
            assert len(set(batch)) == 4 and all(scores[i] < pool for i in batch), (step, pool, batch)
            seen_pools.add(pool)
    assert min(seen_pools) == max(8, math.ceil(pace(cfg, 0) * n - 1e-9)) and len(seen_pools) > 2  # it starts small and grows


def test_the_draw_is_a_pure_function_of_seed_epoch_and_batch():
    a, _ = _curriculum()
    b, _ = _curriculum()
    assert a.batches(1) == b.batches(1) and a.batches(0) != a.batches(1)
    other = CurriculumSampler(40, 4, seed=4, pacing=PacingConfig(), scores=a.scores)
    other.bind(20, 2)
    assert other.batches(0) != a.batches(0)
    # every rank of a data-parallel run takes its share of the same list
    ranks = [step_batches(a.batches(0), 1, grad_accum=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0][0] == a.batches(0)[2] and ranks[1][0] == a.batches(0)[3]


def test_one_process_with_batch_2b_draws_what_two_with_b_draw():
    scores = [float(i % 13) for i in range(40)]
    one = CurriculumSampler(40, 8, seed=5, pacing=PacingConfig(), scores=scores)
    two = CurriculumSampler(40, 4, seed=5, pacing=PacingConfig(), scores=scores)
    one.bind(10, 1)
    two.bind(10, 2)
    big, small = one.batches(1), two.batches(1)
    assert len(big) == 5 and all(big[s] == small[2 * s] + small[2 * s + 1] for s in range(5))
    wide, narrow = ImportanceSampler(40, 8, 5, ImportanceConfig()), ImportanceSampler(40, 4, 5, ImportanceConfig())
    narrow.bind(10, 2)
    for sampler in (wide, narrow):
        sampler.set_scores(0, [float(i) for i in range(40)])
    assert all(wide.batches(0)[s] == narrow.batches(0)[2 * s] + narrow.batches(0)[2 * s + 1] for s in range(5))


def test_anti_curriculum_starts_from_the_hardest_and_ties_are_shuffled():
    assert difficulty_order([3.0, 1.0, 2.0], seed=0) == [1, 2, 0]
    assert difficulty_order([3.0, 1.0, 2.0], seed=0, hardest_first=True) == [0, 2, 1]
    ties = [difficulty_order([1.0] * 20, seed=s) for s in range(3)]
    assert ties[0] != list(range(20)) and ties[0] != ties[1] and sorted(ties[2]) == list(range(20))
    sampler = CurriculumSampler(40, 4, seed=0, pacing=PacingConfig(start_fraction=0.1), scores=[float(i) for i in range(40)], hardest_first=True)
    sampler.bind(20, 1)
    assert all(i >= 36 for i in sampler.batches(0)[0])


def test_static_difficulties():
    examples = [Example([1] * (i + 1), [], label=0 if i < 3 else 1, difficulty=float(-i)) for i in range(4)]
    ctx = SamplerContext(examples, 2, 0)
    assert static_difficulty(CurriculumConfig(difficulty="length"), ctx) == [1.0, 2.0, 3.0, 4.0]
    assert static_difficulty(CurriculumConfig(difficulty="column"), ctx) == [0.0, -1.0, -2.0, -3.0]
    assert label_rarity(examples) == pytest.approx([-math.log(0.75)] * 3 + [-math.log(0.25)])
    assert static_difficulty(CurriculumConfig(difficulty="loss"), ctx) is None  # the trainer scores
    with pytest.raises(UserError, match="data.difficulty_column"):
        static_difficulty(CurriculumConfig(difficulty="column"), SamplerContext([Example([1], [])], 1, 0))
    with pytest.raises(UserError, match="single-label"):
        label_rarity([Example([1], [])])


def test_importance_with_equal_losses_is_uniform_sampling_with_weight_one():
    sampler = ImportanceSampler(30, 5, seed=2, cfg=ImportanceConfig())
    before = sampler.batches(0)
    sampler.set_scores(0, [0.7] * 30)
    assert torch.equal(sampler.probabilities, torch.full((30,), 1 / 30, dtype=torch.float64))
    assert sampler.batches(0) == before  # the same draw as before any score: uniform
    assert all(sampler.weight_of(i) == pytest.approx(1.0, abs=1e-12) for i in range(30))
    generator = torch.Generator().manual_seed(((2 * 1_000_003 + 0) * 1_000_033 + 0) % 2**63)
    assert before[0] == torch.multinomial(torch.ones(30, dtype=torch.float64), 5, replacement=True, generator=generator).tolist()


def test_importance_weights_keep_the_expected_loss_unbiased():
    losses = [0.1, 0.5, 2.0, 4.0, 0.0, 1.4]
    p = sampling_probabilities(losses, uniform_mix=0.2)
    sampler = ImportanceSampler(6, 2, seed=0, cfg=ImportanceConfig(uniform_mix=0.2))
    sampler.set_scores(0, losses)
    assert float(p.sum()) == pytest.approx(1.0)
    expected = sum(float(p[i]) * sampler.weight_of(i) * losses[i] for i in range(6))
    assert expected == pytest.approx(sum(losses) / 6)
    assert max(sampler.weight_of(i) for i in range(6)) <= 1 / 0.2 + 1e-9  # the uniform share bounds weights
    # and the draws follow p: the hardest example comes up most, in proportion
    draws = [i for epoch in range(400) for batch in sampler.batches(epoch) for i in batch]
    frequency = torch.bincount(torch.tensor(draws), minlength=6).double() / len(draws)
    assert torch.allclose(frequency, p, atol=0.02)


# -- in the trainer -------------------------------------------------------------------------------


def _recipe(tmp_path: Path, out: str, sampler: dict, **train):
    data = write_chat_data(tmp_path / "d.jsonl", n=64)
    return recipe_from_dict({
        "model": {"name": "tiny-llama"}, "method": {"lora": {"r": 4}}, "data": {"train": str(data), "val_fraction": 0.25},
        "sampler": sampler, "output_dir": str(tmp_path / out),
        "train": {"max_steps": 8, "batch_size": 4, "lr": 0.01, "threads": 1, "precision": "fp32", "eval_before": False, **train},
    })


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_a_loss_curriculum_scores_with_the_initial_model_and_logs_the_pool(tmp_path):
    recipe = _recipe(tmp_path, "run", {"name": "curriculum", "difficulty": "loss", "start_fraction": 0.25, "full_at": 0.5})
    prepared = prepare(recipe)
    initial = example_losses(prepared.model, prepared.objective, prepared.collate, prepared.data.train)
    run_training(recipe, show_progress=False)
    scores = [json.loads(line) for line in (tmp_path / "run" / "example_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 1 and scores[0]["step"] == 0 and scores[0]["scores"] == pytest.approx(initial, rel=1e-6)
    assert len(set(initial)) > 10  # the scores tell examples apart
    assert [r["pool"] for r in _records(tmp_path / "run", "train")] == [12, 21, 30, 39, 48, 48, 48, 48]


def test_a_teacher_scores_like_the_model_it_is(tmp_path):
    """The teacher here is the base model the LoRA run starts from, so its losses are the run's own initial ones."""
    own = _recipe(tmp_path, "own", {"name": "curriculum", "difficulty": "loss"})
    teacher = _recipe(tmp_path, "teacher", {"name": "curriculum", "difficulty": "loss", "model": "tiny-llama"})
    run_training(own, show_progress=False)
    assert prepare(teacher).sampler.scores == pytest.approx(json.loads((tmp_path / "own" / "example_scores.jsonl").read_text())["scores"], rel=1e-5)


def test_self_paced_rescoring_follows_training(tmp_path):
    run_training(_recipe(tmp_path, "run", {"name": "self_paced", "refresh_every": 3}), show_progress=False)
    scored = _records(tmp_path / "run", "scores")
    assert [r["step"] for r in scored] == [0, 3, 6]
    assert scored[-1]["score_median"] < scored[0]["score_median"]  # the model learns, the scores follow
    thresholds = [r["loss_threshold"] for r in _records(tmp_path / "run", "train")]
    assert all(t is not None for t in thresholds)


def test_importance_sampling_trains_and_logs_its_weights(tmp_path):
    summary = run_training(_recipe(tmp_path, "run", {"name": "importance", "refresh_every": 4}), show_progress=False)
    assert summary.stop_reason == "completed"
    train = _records(tmp_path / "run", "train")
    assert all(r["max_weight"] <= 5.0 and 0 < r["effective_fraction"] <= 1 for r in train)


def test_a_column_curriculum_without_the_column_is_refused(tmp_path):
    data = write_label_data(tmp_path / "d.jsonl", n=32)
    recipe = recipe_from_dict({
        "model": {"name": "tiny-bert"}, "method": {"head": {"type": "classification"}}, "data": {"train": str(data)},
        "sampler": {"name": "curriculum", "difficulty": "column"}, "train": {"max_steps": 1, "threads": 1},
        "output_dir": str(tmp_path / "run"),
    })
    with pytest.raises(UserError, match="data.difficulty_column"):
        run_training(recipe, show_progress=False)


def test_validation_metrics_per_language(tmp_path):
    rows = [{"text": f"{'great' if i % 2 else 'awful'} film {i}", "label": "pos" if i % 2 else "neg", "lang": ["en", "de", "ja"][i % 3]} for i in range(60)]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**r, "lang": "en", "text": r["text"] + " train"}) + "\n" for r in rows[:32]))
    recipe = recipe_from_dict({
        "model": {"name": "tiny-bert"}, "method": {"head": {"type": "classification"}},
        "data": {"train": str(data), "validation": str(tmp_path / "v.jsonl"), "language_column": "lang"},
        "train": {"max_steps": 2, "batch_size": 8, "threads": 1, "precision": "fp32"}, "output_dir": str(tmp_path / "run"),
    })
    after = run_training(recipe, show_progress=False).eval_after
    per_language = {lang: after[f"eval_{lang}_accuracy"] for lang in ("en", "de", "ja")}
    assert sum(per_language.values()) / 3 == pytest.approx(after["eval_accuracy"])  # equal-sized languages
    assert "eval_en_recall_pos" not in after and "eval_recall_pos" in after


def test_a_column_curriculum_without_the_column_is_refused_by_validate(tmp_path):
    from click.testing import CliRunner

    from tunelab.cli import cli

    data = write_label_data(tmp_path / "d.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nsampler: {{name: curriculum, difficulty: column}}\n")
    result = CliRunner().invoke(cli, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 2 and "difficulty: column needs data.difficulty_column" in result.output
    recipe.write_text(recipe.read_text().replace("data: {", "data: {difficulty_column: grade, "))
    assert CliRunner().invoke(cli, ["recipe", "validate", str(recipe)]).exit_code == 0
