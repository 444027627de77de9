"""Experiment trackers (``train.report_to``): a run's records mirrored to TensorBoard, MLflow or Trackio.

``metrics.jsonl`` stays the run's own record; a tracker receives each record as it is appended
(so its dashboard shows exactly the same numbers), the resolved recipe when the run starts, and
the final figures (the run summary and the task scores of the evaluation after training) at the
end. Every backend writes locally and is an optional extra (``pip install 'tunelab[trackers]'``):

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``).
- ``mlflow``: a run in ``$MLFLOW_TRACKING_URI``, else in the SQLite store ``mlflow.db`` next to the
  run directory (MLflow 3 refuses new file stores; ``mlflow ui --backend-store-uri
  sqlite:///runs/mlflow.db``) with artifacts (the recipe) in ``mlartifacts/`` beside it;
  experiment = the recipe's name; the run id is kept in the run directory so ``--resume``
  continues the same MLflow run.
- ``trackio``: project = the recipe's name, run = the run directory's name, in ``$TRACKIO_DIR``
  (``trackio show``); resumed runs continue the same trackio run.

Records become scalars named ``<type>/<field>`` (``train/loss``, ``eval/loss``: an eval record's
``eval_`` prefix is dropped) at the record's step; text and nested fields are not scalars and stay
in metrics.jsonl only.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tunelab.errors import UserError

TRACKERS = ("tensorboard", "mlflow", "trackio")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny sqlalchemy alembic", "trackio": "trackio"}
_MODULES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic"), "trackio": ("trackio",)}


class Tracker(Protocol):
    #: Where to look, for the run's opening lines (``tensorboard --logdir ...``).
    location: str

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def finish(self, final: dict[str, float]) -> None: ...


def scalars_of(record: dict[str, Any]) -> tuple[dict[str, float], int]:
    """A metrics record's numeric fields as ``{"<type>/<field>": value}`` and its step."""
    kind = str(record.get("type", "record"))
    step = int(record.get("step", 0))
    out = {}
    for key, value in record.items():
        if key in ("type", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key.removeprefix("eval_") if kind == "eval" else key
        out[f"{kind}/{name}"] = float(value)
    return out, step


def final_scalars(summary: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """What a finished run reports once: the summary's numbers (``final/...``, ``final/eval_after/...``)
    and the task scores of ``eval/eval.json`` (``task/<metric>`` for the run,
    ``task_base_<k>shot/<metric>`` for the base model it was compared with, per shot count)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"final/{key}"] = float(value)
        elif isinstance(value, dict) and key.startswith("eval_"):
            out.update({f"final/{key}/{k.removeprefix('eval_')}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
    report = run_dir / "eval" / "eval.json"
    if report.is_file():
        for system in json.loads(report.read_text()).get("systems", []):
            is_run = Path(str(system.get("system", ""))).resolve() == run_dir.resolve()
            prefix = "task" if is_run else f"task_base_{system.get('shots', 0)}shot"
            out.update({f"{prefix}/{k}": float(v) for k, v in system.get("scores", {}).items() if isinstance(v, (int, float))})
    return out


class Trackers:
    """The trackers a run reports to; ``observe`` is chained into the trainer's record sink."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def observe(self, record: dict[str, Any]) -> None:
        scalars, step = scalars_of(record)
        if scalars:
            for tracker in self.trackers:
                tracker.log(scalars, step)

    def chain(self, sink: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None] | None:
        """A record sink feeding these trackers and then ``sink`` (None when there is nothing to feed)."""
        if not self.trackers:
            return sink

        def both(record: dict[str, Any]) -> None:
            self.observe(record)
            if sink is not None:
                sink(record)

        return both

    def finish(self, final: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.finish(final)

    def describe(self) -> str:
        return "; ".join(tracker.location for tracker in self.trackers)


def check_trackers_installed(names: list[str]) -> None:
    """A clear error, before any model loads, when a tracker in ``names`` is not installed."""
    for name in names:
        if not all(map(_importable, _MODULES[name])):
            raise UserError(
                f"train.report_to names {name}, but its package is not installed", where="train.report_to",
                hint=f"pip install {_PACKAGES[name]} (or tunelab[trackers]), or remove {name} from report_to",
            )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def open_trackers(names: list[str], run_dir: Path, project: str, recipe: dict[str, Any], recipe_text: str, start_step: int = 0) -> Trackers:
    """Start every tracker in ``names`` for ``run_dir``; a resumed run starts at ``start_step``."""
    check_trackers_installed(names)
    return Trackers([_OPENERS[name](run_dir, project, recipe, recipe_text, start_step) for name in names])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested recipe as ``{"train.lr": "0.0005", ...}`` (MLflow parameters are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, project: str, recipe: dict[str, Any], recipe_text: str, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run rewinds to its checkpoint: TensorBoard drops what the interrupted run logged after it
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step or None)
        self.location = f"tensorboard --logdir {run_dir / 'tensorboard'}"
        self.writer.add_text("recipe", f"```yaml\n{recipe_text}\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, final: dict[str, float]) -> None:
        step = int(final.get("final/steps", 0))
        self.log(final, step)
        self.writer.close()


class _MLflow:
    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, run_dir: Path, project: str, recipe: dict[str, Any], recipe_text: str, start_step: int) -> None:
        from mlflow.tracking import MlflowClient

        store = run_dir.resolve().parent
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store / 'mlflow.db'}"
        # MLflow's default artifact root is ./mlruns in the working directory: keep the default
        # store's artifacts beside it instead (a tracking server manages its own)
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (store / "mlartifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.location = f"mlflow ui --backend-store-uri {uri}"
        id_file = run_dir / self.RUN_ID_FILE
        if id_file.is_file():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        id_file.write_text(self.run_id)
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in _flat(recipe).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, recipe_text, "recipe.yaml")

    def log(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()])

    def finish(self, final: dict[str, float]) -> None:
        self.log(final, int(final.get("final/steps", 0)))
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    """MLflow metric names allow letters, digits and ``_-./ ``: anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class _Trackio:
    def __init__(self, run_dir: Path, project: str, recipe: dict[str, Any], recipe_text: str, start_step: int) -> None:
        import trackio

        self.location = f"trackio show --project {project}"
        self.run = trackio.init(project=project, name=run_dir.name, config=_flat(recipe), resume="allow", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, final: dict[str, float]) -> None:
        self.run.log(final, step=int(final.get("final/steps", 0)))
        self.run.finish()


_OPENERS: dict[str, Callable[[Path, str, dict[str, Any], str, int], Tracker]] = {
    "tensorboard": _TensorBoard, "mlflow": _MLflow, "trackio": _Trackio,
}
