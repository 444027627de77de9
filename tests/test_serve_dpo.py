"""DPO fine-tuning jobs through the real ``openai`` client: OpenAI's preference rows, ``beta``
echoed, the file checked asynchronously, and the same adapter as ``tunelab train`` on the file."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import openai
import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file

from tests.serve_helpers import chat_rows, running_server, wait_for
from tunelab.serve.worker import run_dir_of


def preference_rows(n: int = 16, seed: int = 0) -> bytes:
    """OpenAI DPO rows: the prompt says which answer is preferred."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = ("yes", "no") if rng.random() < 0.5 else ("no", "yes")
        rows.append({"input": {"messages": [{"role": "user", "content": f"#{i} pick {good}"}]},
                     "preferred_output": [{"role": "assistant", "content": good.upper()}],
                     "non_preferred_output": [{"role": "assistant", "content": bad.upper()}]})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_dpo_jobs_echo_beta_train_and_match_tunelab_train(tmp_path):
    with running_server(tmp_path / "serve") as url:
        c = OpenAI(base_url=url, api_key="unused", max_retries=0, _strict_response_validation=True)
        data = preference_rows()
        train = c.files.create(file=("prefs.jsonl", data), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id, seed=3,
                                        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": 0.3}}})
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.3
        auto = c.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id, method={"type": "dpo"})
        assert auto.method.dpo.hyperparameters.beta == "auto"
        sft_rows = c.files.create(file=("chat.jsonl", chat_rows(12)), purpose="fine-tune")
        wrong = c.fine_tuning.jobs.create(model="tiny-llama", training_file=sft_rows.id, method={"type": "dpo"})
        with pytest.raises(openai.BadRequestError) as bad:
            c.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id,
                                      method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}})
        assert bad.value.param == "method.supervised.hyperparameters.beta"

        job = wait_for(c, job.id)
        assert job.status == "succeeded", job.error
        assert job.method.dpo.hyperparameters.beta == 0.3 and job.hyperparameters.n_epochs == 2
        assert isinstance(job.method.dpo.hyperparameters.batch_size, int)
        auto = wait_for(c, auto.id)
        assert auto.status == "succeeded" and auto.method.dpo.hyperparameters.beta == 0.1
        wrong = wait_for(c, wrong.id)
        assert wrong.status == "failed" and wrong.error.code == "invalid_training_file" and "input" in wrong.error.message

        events = list(c.fine_tuning.jobs.list_events(job.id))
        assert any(e.type == "metrics" and "train_loss" in e.data for e in events)
        reply = c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "#2 pick yes"}], max_tokens=3)
        assert reply.choices[0].message.role == "assistant"
        job_adapter = load_file(run_dir_of(tmp_path / "serve", job.id) / "final" / "adapter" / "adapter_model.safetensors")

    # the same training from a recipe file: the job's settings (the test server's job defaults) spelled out
    (tmp_path / "prefs.jsonl").write_bytes(data)
    (tmp_path / "dpo.yaml").write_text(
        "model: {name: tiny-llama}\ndata: {train: prefs.jsonl}\nmethod: {lora: {r: 4}}\nobjective: {name: dpo, beta: 0.3}\n"
        "train: {epochs: 2, batch_size: 4, save_every: 2, precision: fp32, threads: 1}\nseed: 3\noutput_dir: run\n"
    )
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "--no-progress", "dpo.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cli_adapter = load_file(tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors")
    assert cli_adapter.keys() == job_adapter.keys()
    assert all(torch.equal(cli_adapter[k], job_adapter[k]) for k in cli_adapter)
    assert any(v.abs().sum() > 0 for k, v in cli_adapter.items() if "lora_B" in k)  # it trained
