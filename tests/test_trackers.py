"""Experiment trackers: what each tracker's own reader finds is what metrics.jsonl holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.train_helpers import train, write_chat_data
from tunelab.errors import UserError
from tunelab.report.trackers import scalars_of

RUN = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.1}}\n"
    "method: {{lora: {{r: 4, target_modules: all-linear}}}}\n"
    "train: {{lr: 0.01, batch_size: 8, precision: fp32, max_steps: {steps}, eval_every: 3, report_to: [{tracker}]}}\n"
)


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def test_records_become_scalars_named_by_type():
    scalars, step = scalars_of({"type": "eval", "step": 4, "eval_loss": 1.5, "eval_accuracy": 0.75, "note": "x", "ok": True})
    assert step == 4 and scalars == {"eval/loss": 1.5, "eval/accuracy": 0.75}
    assert scalars_of({"type": "train", "step": 2, "loss": 2, "lr": 1e-3})[0] == {"train/loss": 2.0, "train/lr": 1e-3}


def test_tensorboard_event_file_holds_the_runs_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_chat_data(tmp_path / "d.jsonl")
    summary = train(tmp_path, RUN.format(data=data, steps=6, tracker="tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(train_losses(tmp_path / "run"))
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 3, 6]
    assert events.Scalars("final/steps")[-1].value == summary.steps == 6
    assert "recipe" in "".join(events.Tags()["tensors"])


def test_mlflow_run_holds_metrics_params_and_resumes_the_same_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_chat_data(tmp_path / "d.jsonl")
    train(tmp_path, RUN.format(data=data, steps=4, tracker="mlflow"), "train.save_every=2")
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["method.lora.r"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert history == pytest.approx(train_losses(tmp_path / "run"))
    assert client.get_experiment(run.info.experiment_id).name == "recipe"
    (tmp_path / "got").mkdir()
    logged_recipe = client.download_artifacts(run_id, "recipe.yaml", str(tmp_path / "got"))
    assert "lora" in open(logged_recipe).read()
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, never ./mlruns in the working directory

    from tests.train_helpers import recipe_for
    from tunelab.train.run import run_training

    run_training(recipe_for(tmp_path, RUN.format(data=data, steps=6, tracker="mlflow")), resume=True, show_progress=False)
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == run_id
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_trackio_project_holds_the_runs_metrics(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    (tmp_path / "recipe.yaml").write_text(RUN.format(data=data, steps=4, tracker="trackio") + f"output_dir: {tmp_path / 'run'}\n")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(tmp_path / "recipe.yaml"), "--no-progress"],
                   env=env, check=True, capture_output=True, text=True)
    read = (
        "import json, trackio; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps([{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in S.get_logs('recipe', 'run')]))"
    )
    out = subprocess.run([sys.executable, "-c", read], env=env, check=True, capture_output=True, text=True).stdout
    logs = json.loads(out.strip().splitlines()[-1])
    logged = {r["step"]: r["train/loss"] for r in logs if "train/loss" in r}
    assert logged == pytest.approx(train_losses(tmp_path / "run"))
    assert any("final/steps" in r for r in logs)


def test_a_missing_tracker_package_is_a_one_line_error(tmp_path, monkeypatch):
    from tunelab.cli import cli

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    data = write_chat_data(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="report_to names mlflow, but its package is not installed") as err:
        train(tmp_path, RUN.format(data=data, steps=2, tracker="mlflow"))
    assert "pip install mlflow-skinny" in err.value.hint
    assert not (tmp_path / "run").exists()  # refused before the model loaded or anything was written
    (tmp_path / "r.yaml").write_text(RUN.format(data=data, steps=2, tracker="mlflow"))
    result = CliRunner().invoke(cli, ["recipe", "validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "report_to names mlflow" in result.output


def test_an_unknown_tracker_is_refused_at_validation(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="report_to"):
        train(tmp_path, RUN.format(data=data, steps=2, tracker="wandb"))


def test_final_figures_name_the_run_and_each_base_row(tmp_path):
    from tunelab.report.trackers import final_scalars

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    systems = [{"system": "smollm2-135m 0-shot", "shots": 0, "scores": {"accuracy": 0.56}},
               {"system": "smollm2-135m 3-shot", "shots": 3, "scores": {"accuracy": 0.6}},
               {"system": str(run), "shots": 0, "scores": {"accuracy": 0.85, "f1_macro": 0.8}}]
    (run / "eval" / "eval.json").write_text(json.dumps({"systems": systems}))
    final = final_scalars({"steps": 56, "final_train_loss": 0.19, "eval_after": {"eval_loss": 0.15}, "stop_reason": "completed"}, run)
    assert final == {"final/steps": 56.0, "final/final_train_loss": 0.19, "final/eval_after/loss": 0.15, "task_base_0shot/accuracy": 0.56,
                     "task_base_3shot/accuracy": 0.6, "task/accuracy": 0.85, "task/f1_macro": 0.8}
