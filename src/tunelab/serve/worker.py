"""Runs queued fine-tuning jobs: one ``tunelab train`` pipeline per job, each in its own process.

A job goes ``validating_files → queued → running → succeeded | failed | cancelled`` (``paused``
is OpenAI's extension). Its run directory is ``<data-dir>/runs/<job id>``: an ordinary tunelab
run, inspectable with the normal CLI. The training process streams every metrics record back
(``tunelab.jobs.run_in_subprocess``); each becomes a ``metrics`` event. Cancel and pause stop the
process after its current step with a checkpoint; resume continues from it. When the server
starts, jobs that were queued or running when it last stopped are queued again and resume from
their last checkpoint, so none is left "running" forever.

Concurrent jobs divide the cores between them (``train.threads``), so two jobs never
oversubscribe the machine.
"""

from __future__ import annotations

import csv
import io
import queue
import threading
import traceback
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.errors import UserError
from tunelab.rundir import checkpoint_step, list_checkpoints
from tunelab.serve.context import ORGANIZATION, ServeSettings
from tunelab.serve.files import file_path, save_file
from tunelab.serve.jobs import CHECKPOINT, FINISHED, KIND, add_event
from tunelab.serve.store import Store, new_id, now
from tunelab.serve.validation import FileProblem, check_training_file, count_examples

RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def run_dir_of(data_dir: Path, job_id: str) -> Path:
    return data_dir / "runs" / job_id


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's ``ft:{base}:{org}:{suffix}:{8 characters}`` (empty suffix slot when none)."""
    return f"ft:{base}:{ORGANIZATION}:{suffix or ''}:{job_id[-8:]}"


class JobWorker:
    """A queue of job ids and ``settings.workers`` threads that train them."""

    def __init__(self, settings: ServeSettings, store: Store, models: Any) -> None:
        self.settings, self.store, self.models = settings, store, models
        self.queue: queue.Queue[tuple[str, bool] | None] = queue.Queue()  # None: a thread's signal to end
        self.stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, name=f"tunelab-job-{i}", daemon=True) for i in range(max(1, settings.workers))]

    def start(self) -> None:
        """Queue again what an earlier server left unfinished, then start the threads."""
        for job in reversed(self.store.all(KIND)):
            if job["status"] in ("validating_files", "queued", "running"):
                resumable = bool(list_checkpoints(run_dir_of(self.settings.data_dir, job["id"])))
                if job["status"] == "running":
                    add_event(self.store, job["id"], "The server restarted; the job continues from its last checkpoint" if resumable
                              else "The server restarted; the job starts again")
                self.queue.put((job["id"], resumable))
        for thread in self._threads:
            thread.start()

    def shutdown(self, timeout: float = 120.0) -> None:
        """Stop training jobs with a checkpoint and leave them ``running``: the next server start
        resumes them. Jobs still queued stay queued."""
        with self._lock:
            for stop in self.stops.values():
                stop.set()
        for _ in self._threads:
            self.queue.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def submit(self, job_id: str, resume: bool = False) -> None:
        self.queue.put((job_id, resume))

    def stop(self, job_id: str, status: str) -> dict[str, Any]:
        """Cancel or pause: a job not yet training changes status at once; a training one stops
        after its current step with a checkpoint (the status is set now, ``finished_at`` when it
        has stopped)."""
        with self._lock:
            running = job_id in self.stops
            if running:
                self.stops[job_id].set()
            changes: dict[str, Any] = {"status": status}
            if status == "cancelled" and not running:
                changes["finished_at"] = now()
            job = self.store.update(KIND, job_id, changes)
        add_event(self.store, job_id, "Fine-tuning job cancelled" if status == "cancelled" else "Fine-tuning job paused")
        return job

    def resume(self, job_id: str) -> dict[str, Any]:
        job = self.store.update(KIND, job_id, {"status": "queued"})
        add_event(self.store, job_id, "Fine-tuning job resumed")
        self.submit(job_id, resume=bool(list_checkpoints(run_dir_of(self.settings.data_dir, job_id))))
        return job

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            job_id, resume = item
            try:
                self._run(job_id, resume)
            except Exception as exc:  # a bug must fail the job, not kill the worker thread
                traceback.print_exc()
                self._fail(job_id, {"code": "server_error", "message": f"{type(exc).__name__}: {exc}", "param": None})

    def _fail(self, job_id: str, error: dict[str, Any]) -> None:
        self.store.update(KIND, job_id, {"status": "failed", "error": error, "finished_at": now()})
        add_event(self.store, job_id, f"Fine-tuning job failed: {error['message']}", level="error")

    def _run(self, job_id: str, resume: bool) -> None:
        job = self.store.get(KIND, job_id)
        if job is None or job["status"] in (*FINISHED, "paused"):
            return  # cancelled or paused while it waited
        try:
            method = job["method"]["type"]
            check_training_file(self._path(job["training_file"]), method=method)
            if job["validation_file"]:
                check_training_file(self._path(job["validation_file"]), "validation_file", minimum=1, method=method)
        except FileProblem as problem:
            self._fail(job_id, problem.as_error())
            return
        if job["status"] == "validating_files":
            self.store.update(KIND, job_id, lambda body: {**body, "status": "queued"} if body["status"] == "validating_files" else body)
            add_event(self.store, job_id, "Files validated, moving job to queued state")
        # imports torch: only once a job runs
        from tunelab.jobs import run_in_subprocess

        recipe = self._recipe(job)
        stop = threading.Event()
        with self._lock:  # a cancel or pause that came in meanwhile wins
            if self.store.get(KIND, job_id)["status"] in (*FINISHED, "paused"):
                return
            self.stops[job_id] = stop
            job = self.store.update(KIND, job_id, {"status": "running"})
        add_event(self.store, job_id, "Fine-tuning job started" if not resume else "Fine-tuning job continues from its last checkpoint")
        try:
            summary = run_in_subprocess(recipe, events=lambda record: self._on_record(job_id, record), cancel=stop, resume=resume)
        except UserError as exc:
            self._fail(job_id, {"code": "invalid_training_file", "message": exc.message, "param": "training_file"})
            return
        except RuntimeError as exc:
            self._fail(job_id, {"code": "training_failed", "message": str(exc), "param": None})
            return
        finally:
            with self._lock:
                self.stops.pop(job_id, None)
        job = self.store.get(KIND, job_id) or job
        if job["status"] == "cancelled":
            self.store.update(KIND, job_id, {"finished_at": now()})
        elif summary.get("stop_reason") == "completed":
            self._succeed(job, summary)
        # else paused, or the server is shutting down: the checkpoint is where it resumes

    def _path(self, file_id: str) -> Path:
        """A job's file on disk; one deleted since the job was created fails the job."""
        record = self.store.get("file", file_id)
        if record is None:
            raise FileProblem("invalid_training_file", f"The file {file_id} was deleted before the job could use it.", "training_file")
        return file_path(self.settings.data_dir, record)

    def _recipe(self, job: dict[str, Any]) -> Any:
        """The recipe a job trains: LoRA on the job's base model and files, its hyperparameters;
        a DPO job trains the ``dpo`` objective (its ``beta``, 0.1 when auto) on OpenAI's
        preference rows."""
        from tunelab.recipe import recipe_from_dict
        from tunelab.train.auto_settings import auto_batch_size, auto_lr

        data_dir = self.settings.data_dir
        hyper = job["hyperparameters"]
        defaults = self.settings.job_defaults
        train: dict[str, Any] = {"epochs": hyper["n_epochs"], "lr": "auto", "save_every": None, **defaults.get("train", {})}
        training_file = self._path(job["training_file"])
        if hyper["batch_size"] != "auto":
            train["batch_size"] = hyper["batch_size"]
        else:
            train.setdefault("batch_size", auto_batch_size(count_examples(training_file)))
        data = {"train": str(training_file), **defaults.get("data", {})}
        if job["validation_file"]:
            data["validation"] = str(self._path(job["validation_file"]))
        raw = {
            "model": {"name": self.models.base_source(job["model"])},
            "data": data,
            "method": defaults.get("method", {"lora": {}}),
            "train": train,
            "seed": job["seed"],
            "output_dir": str(run_dir_of(data_dir, job["id"])),
        }
        objective = None
        if job["method"]["type"] == "dpo":
            beta = job["method"]["dpo"]["hyperparameters"]["beta"]
            objective = "dpo"
            raw["objective"] = {"name": "dpo", **({} if beta == "auto" else {"beta": beta})}
        recipe = recipe_from_dict(raw, name=job["id"])
        if hyper["learning_rate_multiplier"] != "auto":
            lr = hyper["learning_rate_multiplier"] * auto_lr(recipe.method, objective)[0]
            recipe = recipe_from_dict({**raw, "train": {**train, "lr": lr}}, name=job["id"])
        return recipe

    def _on_record(self, job_id: str, record: dict[str, Any]) -> None:
        """A training record as OpenAI's events: ``metrics`` for steps and evaluations."""
        kind = record.get("type")
        if kind == "train":
            data = {"step": record["step"], "total_steps": record.get("total_steps"), "train_loss": record["loss"],
                    "train_mean_token_accuracy": record.get("token_accuracy")}
            add_event(self.store, job_id, f"Step {record['step']}/{record.get('total_steps')}: training loss={record['loss']:.4f}", data=data)
        elif kind == "eval" and "eval_loss" in record:
            data = {"step": record["step"], "valid_loss": record["eval_loss"], "valid_mean_token_accuracy": record.get("eval_token_accuracy")}
            add_event(self.store, job_id, f"Step {record['step']}: validation loss={record['eval_loss']:.4f}", data=data)

    def _succeed(self, job: dict[str, Any], summary: dict[str, Any]) -> None:
        job_id, data_dir = job["id"], self.settings.data_dir
        run_dir = Path(summary["run_dir"])
        owner = self.store.owner_of(KIND, job_id)
        name = model_name(job["model"], job["user_provided_suffix"], job_id)
        self.models.register(name, run_dir, owner=owner, job_id=job_id, base=job["model"])
        add_event(self.store, job_id, f"New fine-tuned model created: {name}")
        result = save_file(self.store, data_dir, self._results_csv(run_dir), f"step_metrics_{job_id}.csv", "fine-tune-results", owner)
        for step, metrics in self._checkpoints(run_dir):
            checkpoint_name = f"{name}:ckpt-step-{step}"
            self.models.register(checkpoint_name, run_dir, owner=owner, job_id=job_id, base=job["model"], checkpoint_step=step)
            self.store.insert(CHECKPOINT, {
                "id": new_id("ftckpt_"), "object": "fine_tuning.job.checkpoint", "created_at": now(),
                "fine_tuned_model_checkpoint": checkpoint_name, "fine_tuning_job_id": job_id, "step_number": step, "metrics": metrics,
            }, parent=job_id, owner=owner)
            add_event(self.store, job_id, f"Checkpoint created at step {step}")
        self.store.update(KIND, job_id, {
            "status": "succeeded", "fine_tuned_model": name, "finished_at": now(), "trained_tokens": summary.get("tokens_seen"),
            "result_files": [result["id"]], **self._chosen_hyperparameters(job, summary),
        })
        add_event(self.store, job_id, "Fine-tuning job successfully completed")

    def _chosen_hyperparameters(self, job: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        """The job's ``hyperparameters`` and ``method`` with every ``"auto"`` replaced by what the
        run used (the epochs the run resolved; batch size and beta from the job's recipe)."""
        recipe = self._recipe(job)
        kind = job["method"]["type"]
        hyper = {**job["method"][kind]["hyperparameters"], "n_epochs": summary.get("epochs") or job["hyperparameters"]["n_epochs"]}
        if hyper["batch_size"] == "auto":
            hyper["batch_size"] = recipe.train.batch_size
        if hyper["learning_rate_multiplier"] == "auto":
            hyper["learning_rate_multiplier"] = 1.0
        if hyper.get("beta") == "auto":
            hyper["beta"] = recipe.objective.beta
        legacy = {key: value for key, value in hyper.items() if key != "beta"}  # the deprecated field has no beta
        return {"hyperparameters": legacy, "method": {"type": kind, kind: {"hyperparameters": hyper}}}

    @staticmethod
    def _metrics_by_step(run_dir: Path) -> dict[int, dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = {}
        for record in atomic.read_jsonl(run_dir / "metrics.jsonl"):
            step = record.get("step")
            if step is None:
                continue
            row = rows.setdefault(int(step), {"step": int(step)})
            if record.get("type") == "train":
                row.update(train_loss=record["loss"], train_accuracy=record.get("token_accuracy"))
            elif record.get("type") == "eval" and "eval_loss" in record:
                row.update(valid_loss=record["eval_loss"], valid_mean_token_accuracy=record.get("eval_token_accuracy"))
        return rows

    def _results_csv(self, run_dir: Path) -> bytes:
        """OpenAI's result file columns. Served as plain CSV (OpenAI base64-encodes it; the
        cookbook decodes that by hand, and a plain file is what everyone else expects)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for step in sorted(rows := self._metrics_by_step(run_dir)):
            writer.writerow({k: ("" if v is None else v) for k, v in rows[step].items()})
        return out.getvalue().encode()

    def _checkpoints(self, run_dir: Path) -> list[tuple[int, dict[str, Any]]]:
        rows = self._metrics_by_step(run_dir)
        found = []
        for folder in list_checkpoints(run_dir):
            step = checkpoint_step(folder)
            row = rows.get(step, {"step": step})
            found.append((step, {"step": step, "train_loss": row.get("train_loss"), "train_mean_token_accuracy": row.get("train_accuracy"),
                                 "valid_loss": row.get("valid_loss"), "valid_mean_token_accuracy": row.get("valid_mean_token_accuracy"),
                                 "full_valid_loss": None, "full_valid_mean_token_accuracy": None}))
        return found
