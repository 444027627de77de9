"""Multi-stage recipes: stage N trains from stage N-1's model, in one run directory, and resumes
inside the right stage."""

import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import write_chat_data
from tunelab.errors import UserError
from tunelab.models import load_model
from tunelab.recipe import load_recipe
from tunelab.train import run as run_module
from tunelab.train.callbacks import Callback
from tunelab.train.run import load_run_recipe, run_training


def write_text_data(path: Path, n: int = 64) -> Path:
    path.write_text("".join(json.dumps({"text": f"record {i}: the answer is {'yes' if i % 3 else 'no'}."}) + "\n" for i in range(n)))
    return path


#: Continued pretraining (full fine-tuning on raw text), then SFT with LoRA on chat rows.
STAGED = """model: {{name: tiny-llama}}
train: {{batch_size: 4, precision: fp32, warmup_steps: 1, max_steps: 6}}
stages:
  - name: pretrain
    data: {{train: {text}, format: text}}
    train: {{lr: 0.001}}
  - name: sft
    data: {{train: {chat}}}
    method: {{lora: {{r: 4, target_modules: all-linear}}}}
    train: {{lr: 0.01, max_steps: 5}}
"""

#: The same two stages as two ordinary recipes, the second naming the first's run as its model.
BY_HAND_1 = """model: {{name: tiny-llama}}
data: {{train: {text}, format: text}}
train: {{batch_size: 4, precision: fp32, warmup_steps: 1, max_steps: 6, lr: 0.001}}
"""
BY_HAND_2 = """model: {{name: {previous}}}
data: {{train: {chat}}}
method: {{lora: {{r: 4, target_modules: all-linear}}}}
train: {{batch_size: 4, precision: fp32, warmup_steps: 1, max_steps: 5, lr: 0.01}}
"""


def staged_recipe(tmp_path: Path, run_dir: Path, *overrides: str):
    text, chat = write_text_data(tmp_path / "text.jsonl"), write_chat_data(tmp_path / "chat.jsonl")
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED.format(text=text, chat=chat))
    return load_recipe(path, [f"output_dir={run_dir}", *overrides])


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's model as plain weights (adapters merged): what it computes."""
    from tunelab.methods.artifacts import merge_methods

    model = merge_methods(load_model(str(run_dir)).model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_a_two_stage_recipe_equals_the_two_recipes_run_by_hand(tmp_path):
    staged = run_training(staged_recipe(tmp_path, tmp_path / "staged"), show_progress=False)
    run_dir = tmp_path / "staged"
    stage1, stage2 = run_dir / "stages" / "01-pretrain", run_dir / "stages" / "02-sft"
    assert staged.run_dir == str(stage2) and staged.steps == 5
    # Each stage is an ordinary run directory whose recipe names the previous stage as its model.
    assert load_recipe(stage2 / "recipe.yaml").model.name == str(stage1.resolve())
    assert (stage1 / "final" / "model").is_dir(), "full fine-tuning saves a whole model"
    assert (stage2 / "final" / "adapter").is_dir(), "the LoRA stage saves only its adapter"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [Path(s["run_dir"]).name for s in summary["stages"]] == ["01-pretrain", "02-sft"]
    assert [s["steps"] for s in summary["stages"]] == [6, 5]

    text, chat = tmp_path / "text.jsonl", tmp_path / "chat.jsonl"
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "r.yaml").write_text(BY_HAND_1.format(text=text))
    run_training(load_recipe(tmp_path / "h1" / "r.yaml", [f"output_dir={tmp_path / 'hand1'}"]), show_progress=False)
    (tmp_path / "h2").mkdir()
    (tmp_path / "h2" / "r.yaml").write_text(BY_HAND_2.format(previous=tmp_path / "hand1", chat=chat))
    run_training(load_recipe(tmp_path / "h2" / "r.yaml", [f"output_dir={tmp_path / 'hand2'}"]), show_progress=False)

    assert_same_weights(trained_weights(stage1), trained_weights(tmp_path / "hand1"))
    final = trained_weights(run_dir)  # RUN_DIR/final is the last stage's model
    assert_same_weights(final, trained_weights(tmp_path / "hand2"))
    assert not all(torch.equal(final[k], v) for k, v in trained_weights(stage1).items()), "stage 2 trained"


class CtrlCInStage(Callback):
    """Ctrl-C after ``step`` of the stage whose folder is named ``stage``."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def on_step_end(self, state):
        if state.run_dir.name == self.stage and state.step == self.step:
            raise KeyboardInterrupt


def test_resume_inside_stage_two_is_bit_exact(tmp_path, monkeypatch, capsys):
    run_training(staged_recipe(tmp_path, tmp_path / "straight"), show_progress=False)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(run_module, "callbacks_for", lambda recipe: [CtrlCInStage("02-sft", 3)])
    with pytest.raises(KeyboardInterrupt):
        run_training(staged_recipe(tmp_path, interrupted), show_progress=False)
    assert f"tunelab train --resume {interrupted}" in capsys.readouterr().out
    assert (interrupted / "stages" / "01-pretrain" / "summary.json").exists()
    assert (interrupted / "stages" / "02-sft" / "checkpoints" / "step-0000003").exists()
    assert not (interrupted / "final").exists()
    monkeypatch.undo()

    stage1_before = (interrupted / "stages" / "01-pretrain" / "final" / "model" / "model.safetensors").stat().st_mtime_ns
    resumed = run_training(load_run_recipe(interrupted), resume=True, show_progress=False)
    assert resumed.steps == 5
    assert (interrupted / "stages" / "01-pretrain" / "final" / "model" / "model.safetensors").stat().st_mtime_ns == stage1_before, "stage 1 was not retrained"
    assert_same_weights(trained_weights(interrupted), trained_weights(tmp_path / "straight"))
    with pytest.raises(UserError, match="complete"):
        run_training(load_run_recipe(interrupted), resume=True, show_progress=False)


def test_stage_errors_name_the_stage_key_and_line(tmp_path):
    chat = write_chat_data(tmp_path / "chat.jsonl")
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: {{name: tiny-llama}}\nstages:\n  - name: a\n    data: {{train: {chat}}}\n    train: {{lr: -1}}\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "stages.0.train.lr" in str(err.value) and f"{path}:5" in str(err.value)

    path.write_text(f"model: {{name: tiny-llama}}\nstages:\n  - name: a\n    data: {{train: {chat}}}\n    trian: {{lr: 1}}\n")
    with pytest.raises(UserError, match="stages.0.trian"):
        load_recipe(path)

    path.write_text(f"stages:\n  - name: a\n    data: {{train: {chat}}}\n  - name: a\n    data: {{train: {chat}}}\n")
    with pytest.raises(UserError, match="used twice"):
        load_recipe(path)

    # A later stage's missing data fails before the first stage trains.
    path.write_text(f"model: {{name: tiny-llama}}\nstages:\n  - name: a\n    data: {{train: {chat}}}\n  - name: b\n    data: {{train: missing.jsonl}}\n")
    with pytest.raises(UserError, match="data file not found"):
        run_training(load_recipe(path, [f"output_dir={tmp_path / 'run'}"]), show_progress=False)
    assert not (tmp_path / "run" / "stages").exists()


def test_the_recorded_recipe_finds_a_stages_relative_data_from_the_run_directory(tmp_path):
    """Resume reads RUN_DIR/recipe.yaml: a stage's data path written relative to the recipe file
    must still name the same file from there."""
    from tunelab.recipe import dump_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    write_chat_data(folder / "chat.jsonl")
    (folder / "r.yaml").write_text("model: {name: tiny-llama}\nstages:\n  - name: a\n    data: {train: chat.jsonl}\n")
    recorded = tmp_path / "run" / "recipe.yaml"
    recorded.parent.mkdir()
    recorded.write_text(dump_recipe(load_recipe(folder / "r.yaml")))
    assert Path(load_recipe(recorded).stage_recipes[0].data.train).resolve() == (folder / "chat.jsonl").resolve()
