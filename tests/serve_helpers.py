"""Start ``tunelab serve`` in-process on a free loopback port for the API tests."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from tunelab.serve.app import create_app
from tunelab.serve.context import ServeSettings

#: Jobs on the tiny model: a few quick steps, a checkpoint every 2.
TINY_JOBS = {"train": {"batch_size": 4, "save_every": 2, "precision": "fp32", "threads": 1}, "method": {"lora": {"r": 4}}}


@contextlib.contextmanager
def running_server(data_dir: Path, **settings: object) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/v1``) of a server over ``data_dir``, stopped on exit."""
    options = {"job_defaults": TINY_JOBS, **settings}
    app = create_app(ServeSettings(data_dir=data_dir, **options))  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chat_rows(n: int = 24, seed: int = 0) -> bytes:
    """OpenAI chat fine-tuning rows whose answer follows from the prompt."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(["yes", "no"])
        rows.append({"messages": [{"role": "system", "content": "Answer in one word."},
                                  {"role": "user", "content": f"#{i} say {word}"}, {"role": "assistant", "content": word.upper()}]})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def wait_for(client, job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"), timeout: float = 240):
    """The job once its status is one of ``statuses``; a job that ends otherwise fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if job.status in ("succeeded", "failed", "cancelled"):
            raise AssertionError(f"job {job_id} ended {job.status} while waiting for {statuses}: {job.error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status}")
        time.sleep(0.3)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(data_dir: str, port: int, defaults_json: str) -> None:
    """The server as its own process (``python -m tests.serve_helpers DIR PORT DEFAULTS``), for
    tests that kill it."""
    app = create_app(ServeSettings(data_dir=Path(data_dir), job_defaults=json.loads(defaults_json)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    import sys

    serve_forever(sys.argv[1], int(sys.argv[2]), sys.argv[3])
