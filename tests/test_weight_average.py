"""SWA and EMA: the averaged weights are the average the papers define, they are what the run
evaluates and saves (the live weights kept beside them), and a resumed run averages bit-exactly."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.train_helpers import write_chat_data
from tunelab.errors import UserError
from tunelab.models import load_run
from tunelab.recipe import recipe_from_dict
from tunelab.train.callbacks import Callback, TrainState
from tunelab.train.checkpoint import trainable_parameters
from tunelab.train.run import run_training
from tunelab.train.weight_average import (
    EMAConfig,
    ExponentialMovingAverage,
    StochasticWeightAveraging,
    SWAConfig,
)

TINY = {"model": {"name": "tiny-llama"}, "method": {"lora": {"r": 4}},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 0.01, "threads": 1, "precision": "fp32", "eval_before": False}}


class Snapshots(Callback):
    """The trainable weights after every optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, state: TrainState) -> None:
        self.after[state.step] = {n: p.detach().clone() for n, p in trainable_parameters(state.model).items()}


def _recipe(tmp_path: Path, out: str, callbacks: list[dict[str, Any]], **train: Any) -> Any:
    raw = json.loads(json.dumps(TINY))
    raw["data"] = {"train": str(write_chat_data(tmp_path / "d.jsonl", n=64)), "val_fraction": 0.25}
    raw["output_dir"] = str(tmp_path / out)
    raw["callbacks"] = callbacks
    raw["train"].update(train)
    return recipe_from_dict(raw)


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights a final folder holds, keyed like the live model's."""
    model, _, _ = load_run(folder)
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def _fake_state(model: torch.nn.Module, step: int, total: int) -> TrainState:
    return TrainState(model=model, optimizer=None, run_dir=Path("."), max_steps=total, step=step)  # type: ignore[arg-type]


def test_the_average_of_identical_weights_is_those_weights():
    model = torch.nn.Linear(3, 2)
    swa = StochasticWeightAveraging(SWAConfig(start=1), base_lr=0.1)
    for step in range(1, 6):
        swa.on_step_end(_fake_state(model, step, 5))
    assert swa.count == 4
    assert all(torch.equal(swa.average[n], p.detach()) for n, p in model.named_parameters())


def test_ema_with_decay_zero_is_the_last_weights_and_otherwise_the_recursive_average():
    model = torch.nn.Linear(3, 2)
    last = ExponentialMovingAverage(EMAConfig(decay=0.0, warmup=False))
    ema = ExponentialMovingAverage(EMAConfig(decay=0.9, warmup=False))
    expected = None
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(step)
        for cb in (last, ema):
            cb.on_step_end(_fake_state(model, step, 4))
        w = model.weight.detach().clone()
        expected = w if expected is None else 0.9 * expected + 0.1 * w
    assert torch.equal(last.average["weight"], model.weight.detach())
    assert torch.allclose(ema.average["weight"], expected)


def test_ema_warmup_follows_the_one_plus_n_over_ten_plus_n_rule():
    ema = ExponentialMovingAverage(EMAConfig(decay=0.999, warmup=True))
    assert ema.blend(0) == pytest.approx(1 - 1 / 10)
    assert ema.blend(90) == pytest.approx(1 - 91 / 100)
    assert ema.blend(10**6) == pytest.approx(1 - 0.999)


def test_swa_takes_over_the_learning_rate_from_its_start():
    constant = StochasticWeightAveraging(SWAConfig(start=0.5, lr=0.02, anneal_steps=2), base_lr=0.1)
    assert constant.lr_multiplier(4, 10, 0.7) == 0.7  # before the start: the recipe's schedule
    assert constant.lr_multiplier(5, 10, 0.6) == pytest.approx(0.5 * 0.6 + 0.5 * 0.2)  # annealing
    assert constant.lr_multiplier(9, 10, 0.1) == pytest.approx(0.2)
    cyclic = StochasticWeightAveraging(SWAConfig(start=4, every=3, lr=0.01, schedule="cyclic"), base_lr=0.1)
    assert [round(cyclic.lr_multiplier(s, 12, 1.0), 6) for s in range(4, 10)] == [0.7, 0.4, 0.1, 0.7, 0.4, 0.1]
    assert [s for s in range(1, 13) if cyclic.due(s, 12)] == [7, 10]  # snapshots at the cycles' low ends
    with pytest.raises(UserError, match="swa starts at step 12 but the run has 12 steps"):
        StochasticWeightAveraging(SWAConfig(start=12), 0.1).due(1, 12)


def test_a_swa_run_evaluates_and_saves_the_average_and_keeps_the_live_weights(tmp_path):
    snapshots = Snapshots()
    summary = run_training(_recipe(tmp_path, "run", [{"name": "swa", "start": 4, "every": 2}]), show_progress=False, callbacks=[snapshots])
    run = tmp_path / "run"
    expected = {n: torch.stack([snapshots.after[s][n] for s in (6, 8)]).mean(0) for n in snapshots.after[8]}
    saved, raw = _saved(run / "final"), _saved(run / "final-raw")
    assert saved.keys() == expected.keys()
    for name, value in saved.items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
        assert torch.equal(raw[name], snapshots.after[8][name]), name
    assert {"eval_loss", "eval_raw_loss"} <= set(summary.eval_after)
    assert summary.eval_after["eval_loss"] != summary.eval_after["eval_raw_loss"]


@pytest.mark.parametrize("callback", [{"name": "swa", "start": 0.25, "every": 2, "lr": 0.005}, {"name": "ema", "decay": 0.8}], ids=["swa", "ema"])
def test_cancel_then_resume_averages_bit_exactly(tmp_path, callback):
    run_training(_recipe(tmp_path, "straight", [callback]), show_progress=False)
    cancel = threading.Event()
    recipe = _recipe(tmp_path, "resumed", [callback])

    def sink(record: dict[str, Any]) -> None:
        if record.get("type") == "train" and record["step"] == 3:
            cancel.set()

    assert run_training(recipe, show_progress=False, events=sink, cancel=cancel).stop_reason == "cancelled"
    run_training(recipe, resume=True, show_progress=False)
    for folder in ("final", "final-raw"):
        ours, theirs = _saved(tmp_path / "resumed" / folder), _saved(tmp_path / "straight" / folder)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), folder


def test_two_averages_at_once_are_refused(tmp_path):
    with pytest.raises(UserError, match="two callbacks average weights"):
        run_training(_recipe(tmp_path, "run", [{"name": "swa"}, {"name": "ema"}]), show_progress=False)
