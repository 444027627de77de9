"""A new technique is one module plus one registration: this file is that module.

It defines a toy method, a toy objective that asks for an auxiliary (teacher) model, a toy sampler
and a toy callback, registers them, and trains a tiny model with a recipe that names them; then
drives runs from a program through the job API (events, cancellation, exact resume, a child
process). Nothing under ``src/`` knows about any of them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from tests.train_helpers import write_chat_data
from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.methods import Method, MethodContext, register_method
from tunelab.models import load_model
from tunelab.recipe import recipe_from_dict
from tunelab.rundir import list_checkpoints
from tunelab.train.callbacks import Callback, TrainState, register_callback
from tunelab.train.objectives import ObjectiveContext, register_objective
from tunelab.train.objectives.causal_lm import CausalLMObjective
from tunelab.train.run import run_training
from tunelab.train.samplers import SamplerContext, chunk, register_sampler


# -- a toy method: a trainable bias on the output logits ------------------------------------------


class LogitBias(torch.nn.Module):
    def __init__(self, vocab: int, init: float):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.full((vocab,), init))


class LogitBiasConfig(Section):
    init: float = Field(0.0, description="Initial bias of every token's logit.")


@register_method
class LogitBiasMethod(Method):
    key = "logit_bias"
    Config = LogitBiasConfig
    order = 58

    def apply(self, model: torch.nn.Module, cfg: LogitBiasConfig, ctx: MethodContext) -> torch.nn.Module:
        head = model.get_output_embeddings()
        added = LogitBias(head.out_features, cfg.init)
        model.add_module("logit_bias", added)
        head.register_forward_hook(lambda module, args, out: out + added.bias.to(out.dtype))
        return model

    def added_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [m for m in model.modules() if isinstance(m, LogitBias)]

    def save(self, model: torch.nn.Module, cfg: LogitBiasConfig, directory: Path) -> list[str]:
        save_file({"bias": self.added_modules(model)[0].bias.detach().contiguous()}, str(directory / "logit_bias.safetensors"))
        return ["logit_bias.safetensors"]

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        model = self.apply(model, LogitBiasConfig(), ctx)
        self.added_modules(model)[0].bias.data.copy_(load_file(str(directory / "logit_bias.safetensors"))["bias"])
        return model


# -- a toy objective with a teacher: causal LM plus a pull towards the teacher's logits -------------


class TeacherPullConfig(Section):
    teacher: str = "tiny-llama"
    weight: float = Field(0.1, ge=0)


class TeacherPull:
    name = "teacher_pull"
    collation = "padded"

    def __init__(self, cfg: TeacherPullConfig, ctx: ObjectiveContext):
        self.cfg, self.teacher, self.base = cfg, ctx.auxiliary_model(cfg.teacher), CausalLMObjective(ctx.model, sliced_logits=False, varlen=False)
        self.teacher_calls = 0

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.base.units(batch)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits, targets, picked = self.base.supervised_logits(model, batch)  # the student's supervised positions
        loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][picked]
        self.teacher_calls += 1
        pull = (logits.float() - teacher.float()).pow(2).mean(-1).sum()
        stats = {"loss_sum": float(loss_sum.detach()), "tokens": int(targets.numel()), "correct": int((logits.argmax(-1) == targets).sum())}
        return loss_sum + self.cfg.weight * pull, {**stats, "pull_sum": float(pull.detach())}

    def summarize(self, stats: dict[str, Any]) -> dict[str, float]:
        return {**self.base.summarize(stats), "pull": stats.get("pull_sum", 0.0) / max(1, stats.get("tokens", 0))}


BUILT: list[TeacherPull] = []


@register_objective("teacher_pull", TeacherPullConfig)
def _teacher_pull(cfg: TeacherPullConfig, ctx: ObjectiveContext) -> TeacherPull:
    BUILT.append(TeacherPull(cfg, ctx))
    assert ctx.auxiliary_model(cfg.teacher) is BUILT[-1].teacher  # loaded once per run
    return BUILT[-1]


# -- a toy sampler: the training file's order, back to front ---------------------------------------


class ReverseConfig(Section):
    pass


class ReverseSampler:
    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def num_batches(self) -> int:
        return self.n // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        return chunk(list(range(self.n))[::-1], self.batch_size)


@register_sampler("reverse", ReverseConfig)
def _reverse(cfg: ReverseConfig, ctx: SamplerContext) -> ReverseSampler:
    return ReverseSampler(len(ctx.examples), ctx.batch_size)


# -- a toy callback: records every event, and its state travels in checkpoints ---------------------


class EventLogConfig(Section):
    tag: str = "log"


class EventLog(Callback):
    def __init__(self, cfg: EventLogConfig):
        self.cfg, self.events, self.first_ids, self.grad_norms = cfg, [], [], []

    def on_train_start(self, state: TrainState) -> None:
        self.events.append("train_start")

    def on_epoch_start(self, state: TrainState) -> None:
        self.events.append("epoch_start")

    def on_step_start(self, state: TrainState, batches: list[dict[str, torch.Tensor]]) -> None:
        self.events.append("step_start")
        self.first_ids.append(hash(tuple(batches[0]["input_ids"].flatten().tolist())))

    def on_after_backward(self, state: TrainState) -> None:
        self.events.append("after_backward")
        self.grad_norms.append(sum(float(p.grad.norm()) for p in state.model.parameters() if p.grad is not None))

    def on_step_end(self, state: TrainState) -> None:
        self.events.append("step_end")
        assert state.loss is not None and state.lr is not None

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.events.append("eval")

    def on_epoch_end(self, state: TrainState) -> None:
        self.events.append("epoch_end")

    def on_train_end(self, state: TrainState) -> None:
        self.events.append("train_end")

    def state_dict(self) -> dict[str, Any]:
        return {"tag": self.cfg.tag, "steps": self.events.count("step_end")}


LOGS: list[EventLog] = []


@register_callback("event_log", EventLogConfig)
def _event_log(recipe: Any, cfg: EventLogConfig | None) -> EventLog | None:
    if cfg is None:
        return None
    LOGS.append(EventLog(cfg))
    return LOGS[-1]


# -- the run ------------------------------------------------------------------------------------


def toy_recipe(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    return {
        "model": {"name": "tiny-llama"},
        "data": {"train": str(data), "val_fraction": 0.25},
        "method": {"lora": {"r": 4}, "logit_bias": {"init": 0.0}},
        "objective": {"name": "teacher_pull", "weight": 0.05},
        "sampler": {"name": "reverse"},
        "callbacks": [{"name": "event_log", "tag": "toy"}],
        "train": {"max_steps": 6, "batch_size": 4, "lr": 0.01, "threads": 1, "precision": "fp32", "eval_every": 3},
        "output_dir": str(tmp_path / "run"),
        **extra,
    }


def test_toy_plugins_train_from_a_recipe_that_names_them(tmp_path):
    summary = run_training(recipe_from_dict(toy_recipe(tmp_path)), show_progress=False)
    assert summary.stop_reason == "completed" and summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"]
    assert "eval_pull" in summary.eval_after and BUILT[-1].teacher_calls > 0
    assert not any(p.requires_grad for p in BUILT[-1].teacher.parameters())

    log = LOGS[-1]
    assert log.events[:4] == ["train_start", "epoch_start", "step_start", "after_backward"]
    assert log.events.count("step_end") == 6 and log.events.count("eval") == 2 and log.events[-1] == "train_end"
    assert all(g > 0 for g in log.grad_norms)
    run = Path(summary.run_dir)
    ckpt = list_checkpoints(run)[-1]
    assert torch.load(ckpt / "callbacks.pt", weights_only=False)["EventLog"] == {"tag": "toy", "steps": 6}

    # the run directory holds the toy method's file and loads back with it
    manifest = json.loads((run / "final" / "tunelab_model.json").read_text())
    assert "logit_bias.safetensors" in manifest["files"] and "adapter/" in manifest["files"]
    loaded = load_model(str(run)).model
    assert any(isinstance(m, LogitBias) for m in loaded.modules())
    assert float(next(m for m in loaded.modules() if isinstance(m, LogitBias)).bias.detach().abs().sum()) > 0


def test_a_plug_in_section_is_validated_like_any_other(tmp_path):
    with pytest.raises(UserError, match="method.logit_bias.int"):
        recipe_from_dict({"method": {"logit_bias": {"int": 1.0}}})
    with pytest.raises(UserError, match="objective.teacher_pull.focal_gamma"):
        recipe_from_dict({"objective": {"name": "teacher_pull", "focal_gamma": 2}})
    with pytest.raises(UserError, match="callbacks"):
        recipe_from_dict({"callbacks": [{"name": "no_such_callback"}]})


def test_sampler_decides_the_data_order(tmp_path):
    reverse = run_training(recipe_from_dict(toy_recipe(tmp_path, output_dir=str(tmp_path / "a"))), show_progress=False)
    assert reverse.stop_reason == "completed"
    reversed_ids = LOGS[-1].first_ids
    shuffled = toy_recipe(tmp_path, output_dir=str(tmp_path / "b"))
    shuffled["sampler"] = {"name": "shuffle"}
    run_training(recipe_from_dict(shuffled), show_progress=False)
    assert LOGS[-1].first_ids != reversed_ids


LORA = {"model": {"name": "tiny-llama"}, "method": {"lora": {"r": 4}}, "train": {"max_steps": 8, "batch_size": 4, "lr": 0.01, "threads": 1, "precision": "fp32", "eval_before": False}}


def _recipe(tmp_path: Path, out: str, **sections: Any) -> Any:
    data = write_chat_data(tmp_path / "d.jsonl", n=64)
    raw = json.loads(json.dumps(LORA))
    raw["data"] = {"train": str(data), "val_fraction": 0.25}
    raw["output_dir"] = str(tmp_path / out)
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return recipe_from_dict(raw)


def cancelling_sink(records: list[dict[str, Any]], cancel: threading.Event, *, at_step: int) -> Any:
    """An event sink that keeps every record and asks the run to stop once step ``at_step`` is logged."""

    def sink(record: dict[str, Any]) -> None:
        records.append(record)
        if record.get("type") == "train" and record["step"] == at_step:
            cancel.set()

    return sink


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / "trainable.safetensors"))


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"compress": {"qat": {"quantize": "int8", "group_size": 32, "targets": ["mlp"]}}},
        {"compress": {"gradual": {"sparsity": 0.5, "every": 2, "targets": ["mlp"]}}},
        {"compress": {"lottery": {"rounds": 2, "rate": 0.3, "targets": ["mlp"]}}},
        {"train": {"eval_every": 2, "early_stopping": {"patience": 10}}},
        {"sampler": {"name": "curriculum", "difficulty": "loss", "pacing": "root"}},
        {"sampler": {"name": "self_paced", "refresh_every": 2}},
        {"sampler": {"name": "importance", "refresh_every": 2}},
    ],
    ids=["plain", "qat", "gradual_pruning", "lottery_ticket", "early_stopping", "curriculum", "self_paced", "importance"],
)
def test_cancel_then_resume_is_bit_exact(tmp_path, sections):
    straight = run_training(_recipe(tmp_path, "straight", **sections), show_progress=False)
    events: list[dict[str, Any]] = []
    cancel = threading.Event()
    recipe = _recipe(tmp_path, "resumed", **sections)
    first = run_training(recipe, show_progress=False, events=cancelling_sink(events, cancel, at_step=3), cancel=cancel)
    assert first.stop_reason == "cancelled" and first.steps == 3
    assert [e["step"] for e in events if e["type"] == "train"] == [1, 2, 3] and events[-1]["type"] == "done"
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = run_training(recipe, resume=True, show_progress=False)
    assert resumed.steps == straight.steps == 8
    ours, theirs = _final_state(tmp_path / "resumed"), _final_state(tmp_path / "straight")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_runs_without_output_dir_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {**LORA, "data": {"train": str(write_chat_data(tmp_path / "d.jsonl", n=32)), "val_fraction": 0.25}}
    raw["train"] = {**LORA["train"], "max_steps": 1}
    a = run_training(recipe_from_dict(raw), show_progress=False)
    b = run_training(recipe_from_dict(raw), show_progress=False)
    assert a.run_dir != b.run_dir and Path(a.run_dir).parent == Path(b.run_dir).parent == Path("runs")


def test_recipe_from_a_dict_resolves_paths_and_reports_key_paths(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    recipe = recipe_from_dict({"data": {"train": "d.jsonl"}}, base=tmp_path)
    assert recipe.data.train == str(data)
    with pytest.raises(UserError, match=r"^recipe: 'train.lr' = -1"):
        recipe_from_dict({"train": {"lr": -1}})


def test_run_in_a_child_process_streams_events_and_cancels(tmp_path):
    from tunelab.jobs import run_in_subprocess
    from tunelab.plugins import external_plugin_modules

    recipe = _recipe(tmp_path, "child")
    seen: list[dict[str, Any]] = []
    cancel = threading.Event()
    # The child is a fresh interpreter: it imports this module, which registered the plug-ins the
    # recipe names, without being told (tunelab.plugins.external_plugin_modules).
    assert "tests.test_plugin_spine" in external_plugin_modules()
    done = run_in_subprocess(recipe, events=cancelling_sink(seen, cancel, at_step=2), cancel=cancel)
    assert done["stop_reason"] == "cancelled" and 2 <= done["steps"] < 8
    assert [r["step"] for r in seen if r["type"] == "train"][:2] == [1, 2]
    finished = run_in_subprocess(recipe, resume=True)
    assert finished["steps"] == 8 and finished["stop_reason"] == "completed"
    with pytest.raises(UserError, match="nothing to resume: no run was started here"):
        run_in_subprocess(_recipe(tmp_path, "never-ran"), resume=True)
