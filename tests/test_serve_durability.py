"""The service survives being killed: SIGKILL mid-job, restart, the job resumes from its last
checkpoint and succeeds; a second server on the same data directory refuses to start; pause and
resume; cancelling a running job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.serve_helpers import (
    TINY_JOBS,
    chat_rows,
    free_port,
    running_server,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
#: Long enough to kill mid-way: 300 tiny steps, a checkpoint every 25.
LONG_JOBS = {**TINY_JOBS, "train": {**TINY_JOBS["train"], "max_steps": 300, "save_every": 25}}


def start_server(data_dir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "tests.serve_helpers", str(data_dir), str(port), json.dumps(LONG_JOBS)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.models.list()
            return process
        except Exception:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read()[-2000:]}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def last_step(client: OpenAI, job_id: str) -> int:
    events = client.fine_tuning.jobs.list_events(job_id, limit=50).data
    return max((e.data["step"] for e in events if e.type == "metrics" and e.data and "train_loss" in e.data), default=0)


def api(port: int) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


@pytest.mark.slow
def test_sigkill_mid_job_then_restart_resumes_and_succeeds(tmp_path):
    port = free_port()
    server = start_server(tmp_path, port)
    try:
        client = api(port)
        f = client.files.create(file=("train.jsonl", chat_rows(24)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, suffix="durable")
        until(lambda: last_step(client, job.id) >= 60, timeout=180)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    metrics = tmp_path / "runs" / job.id / "metrics.jsonl"
    size = metrics.stat().st_size
    time.sleep(3)
    assert metrics.stat().st_size == size, "the training process outlived the killed server"

    port = free_port()
    server = start_server(tmp_path, port)
    try:
        client = api(port)
        done = wait_for(client, job.id, timeout=240)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500)]
        assert "The server restarted; the job continues from its last checkpoint" in messages
        steps = [record["step"] for record in map(json.loads, metrics.read_text().splitlines()) if record.get("type") == "train"]
        assert steps[-1] == 300
        # a second server on the same data directory refuses to start, with one clear line
        refused = subprocess.run([sys.executable, "-m", "tunelab.cli", "serve", "--data-dir", str(tmp_path), "--port", str(free_port())],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert refused.returncode != 0 and "another tunelab server is using" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)


def test_pause_resume_and_cancel_a_running_job(tmp_path):
    with running_server(tmp_path, job_defaults=LONG_JOBS) as url:
        strict = OpenAI(base_url=url, api_key="none", max_retries=0, _strict_response_validation=True)
        loose = OpenAI(base_url=url, api_key="none", max_retries=0)  # "paused" is outside the SDK's status enum
        f = strict.files.create(file=("train.jsonl", chat_rows(24)), purpose="fine-tune")
        job = strict.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
        wait_for(strict, job.id, ("running",))
        until(lambda: last_step(strict, job.id) >= 30)
        assert loose.fine_tuning.jobs.pause(job.id).status == "paused"
        time.sleep(2)
        paused_at = last_step(strict, job.id)
        time.sleep(2)
        assert last_step(strict, job.id) == paused_at  # stopped
        assert loose.fine_tuning.jobs.resume(job.id).status == "queued"
        wait_for(strict, job.id, ("running",))
        until(lambda: last_step(strict, job.id) > paused_at + 5)
        cancelled = strict.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled"
        until(lambda: strict.fine_tuning.jobs.retrieve(job.id).finished_at is not None)
        assert last_step(strict, job.id) < 300
