"""Two tasks (classification + contrastive) over one body: both learn, metrics per task, one checkpoint."""

import json
import os
import subprocess
import sys

import torch

from tests.test_objectives_contrastive import write_pairs
from tests.train_helpers import train, write_label_data
from tunelab.train.multitask import load_multitask


def test_two_tasks_share_a_body_and_both_learn(tmp_path):
    labels = write_label_data(tmp_path / "cls.jsonl", n=160)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=160)
    summary = train(
        tmp_path,
        "model: {name: tiny-bert}\ndata: {val_fraction: 0.2}\n"
        "method:\n  tasks:\n"
        f"    sentiment: {{data: {{train: {labels}}}, head: {{type: classification}}, weight: 1.0}}\n"
        f"    paraphrase: {{data: {{train: {pairs}}}, head: {{type: embedding}}, weight: 0.5}}\n"
        "sampler: {name: task_mix, strategy: temperature, temperature: 2}\n"
        "train: {lr: 0.003, max_steps: 60, batch_size: 16, schedule: constant, precision: fp32}\n",
    )
    before, after = summary.eval_before, summary.eval_after
    assert after["eval_sentiment_accuracy"] > 0.8, after
    assert after["eval_paraphrase_mrr"] > before["eval_paraphrase_mrr"] + 0.1, (before, after)
    assert summary.data["tasks"]["sentiment"]["format"] == "classification"

    models = load_multitask(tmp_path / "run")
    assert set(models) == {"sentiment", "paraphrase"}
    sentiment_body = models["sentiment"].bert.state_dict()
    paraphrase_body = models["paraphrase"].body.state_dict()
    assert all(torch.equal(sentiment_body[k], paraphrase_body[k]) for k in paraphrase_body)  # one shared body


def test_each_step_trains_one_task_at_the_sampled_rate():
    from tunelab.train.task_mix import TaskMixConfig, TaskMixSampler, task_shares

    tasks = [0] * 400 + [1] * 100
    sampler = TaskMixSampler(tasks, task_shares([400, 100], TaskMixConfig(strategy="size")), batch_size=10, seed=0)
    epoch0, epoch1 = sampler.batches(0), sampler.batches(1)
    assert [sum(tasks[b[0]] == t for b in epoch0) for t in (0, 1)] == [40, 10]
    assert sorted(i for b in epoch0 if tasks[b[0]] == 1 for i in b) == list(range(400, 500))  # each of task 1's examples once
    assert epoch0 == sampler.batches(0) and epoch0 != epoch1  # pure in (seed, epoch), fresh each epoch


def test_multi_task_ddp_two_processes_equal_one_process_accumulating(tmp_path):
    """Two processes may train different tasks in one step (DDP finds the unused head); the result
    equals one process accumulating the same two micro-batches."""
    labels = write_label_data(tmp_path / "cls.jsonl", n=96)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=96)
    recipe = (
        "model: {{name: tiny-bert}}\ndata: {{val_fraction: 0.2}}\nmethod:\n  dropout: {{hidden: 0.0, attention: 0.0}}\n  tasks:\n"
        f"    sentiment: {{{{data: {{{{train: {labels}}}}}, head: {{{{type: classification}}}}}}}}\n"
        f"    paraphrase: {{{{data: {{{{train: {pairs}}}}}, head: {{{{type: embedding}}}}}}}}\n"
        "train: {{lr: 0.003, max_steps: 4, batch_size: 8, grad_accum: {accum}, precision: fp32, eval_before: false, threads: 1}}\noutput_dir: {out}\n"
    )
    (tmp_path / "one.yaml").write_text(recipe.format(accum=2, out=tmp_path / "one"))
    (tmp_path / "two.yaml").write_text(recipe.format(accum=1, out=tmp_path / "two"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "--no-progress", str(tmp_path / "one.yaml")], check=True, env=env, capture_output=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541", "-m", "tunelab.cli", "train", "--no-progress"]
    proc = subprocess.run([*launcher, str(tmp_path / "two.yaml")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = load_multitask(tmp_path / "one"), load_multitask(tmp_path / "two")
    for task in ("sentiment", "paraphrase"):
        a, b = one[task].state_dict(), two[task].state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), task
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "train" for r in records) == 4
