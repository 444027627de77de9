"""The service with an older ``openai`` client (1.x): users upgrade slowly, and the wire shapes must
hold for the versions they have. The client lives outside the test venv (``scripts/setup.sh
--test`` installs it into ``.venv/openai-1x``), so the flow runs in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_helpers import running_server

CLIENT = Path(__file__).resolve().parents[1] / ".venv" / "openai-1x"


@pytest.mark.skipif(not (CLIENT / "openai").is_dir(), reason="the 1.x openai client is not installed: run scripts/setup.sh --test")
def test_the_whole_flow_with_an_openai_1x_client(tmp_path):
    with running_server(tmp_path) as url:
        env = {**os.environ, "PYTHONPATH": str(CLIENT)}
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("openai_1x_flow.py")), url], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok 1.")
