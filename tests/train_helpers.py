"""Shared builders for training tests: toy data a tiny model can learn, recipes, runs."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from tunelab.recipe import Recipe, load_recipe
from tunelab.train.callbacks import Callback, TrainState
from tunelab.train.run import RunSummary, run_training


def write_chat_data(path: Path, n: int = 96, seed: int = 0) -> Path:
    """Chat rows whose answer is a fixed function of the prompt (learnable, with varied prompts)."""
    rng = random.Random(seed)
    words = ["yes", "no"]
    rows = []
    for i in range(n):
        word = rng.choice(words)
        rows.append({"messages": [
            {"role": "user", "content": f"#{i} say {word}"},
            {"role": "assistant", "content": word.upper()},
        ]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_label_data(path: Path, n: int = 96, seed: int = 0) -> Path:
    """text+label rows: the sentiment word opens and closes the text (learnable by CLS or last-token heads)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = rng.random() < 0.5
        filler = " ".join(rng.choice(["the", "a", "film", "plot", "actor"]) for _ in range(4))
        word = "great" if good else "awful"
        rows.append({"text": f"{word} {i} {filler} {word}", "label": "pos" if good else "neg"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_for(tmp_path: Path, yaml_text: str, *overrides: str) -> Recipe:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml_text)
    return load_recipe(path, [f"output_dir={tmp_path / 'run'}", *overrides])


#: Callbacks every ``train`` call passes to the job API (tests swap them in with monkeypatch).
EXTRA_CALLBACKS: tuple[Callback, ...] = ()


def train(tmp_path: Path, yaml_text: str, *overrides: str) -> RunSummary:
    return run_training(recipe_for(tmp_path, yaml_text, *overrides), show_progress=False, callbacks=EXTRA_CALLBACKS)


class FinalLogits(Callback):
    """The logits of the model a run trained, on fixed ids, taken after its last optimizer step:
    before any ``on_train_end`` callback changes the model (QAT unwraps there) and before saving."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.logits: torch.Tensor | None = None

    def on_step_end(self, state: TrainState) -> None:
        if state.step == state.max_steps:
            state.model.eval()
            with torch.no_grad():
                self.logits = state.model(input_ids=self.ids).logits
            state.model.train()


def record_final_logits(monkeypatch, ids: torch.Tensor) -> FinalLogits:
    """Register a ``FinalLogits`` for the runs of one test (``monkeypatch`` removes it after)."""
    recorder = FinalLogits(ids)
    monkeypatch.setattr(sys.modules[__name__], "EXTRA_CALLBACKS", (recorder,))
    return recorder
