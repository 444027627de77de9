"""Two tasks (classification + contrastive) over one body: both learn, metrics per task, one checkpoint."""

import json
import random

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
        "  task_sampling: {strategy: temperature, temperature: 2}\n"
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


def test_each_step_trains_one_task_at_the_sampled_rate(tmp_path):
    from tunelab.data import Example
    from tunelab.methods.config import TaskSamplingConfig
    from tunelab.train.multitask import schedule_batches, task_shares

    rng = random.Random(0)
    pools = [[Example([rng.randrange(9)], [], label=0) for _ in range(n)] for n in (400, 100)]
    shares = task_shares([400, 100], TaskSamplingConfig(strategy="size"))
    batches = schedule_batches(pools, shares, batch_size=10, seed=0)
    assert [sum(b.task == t for b in batches) for t in (0, 1)] == [40, 10]
    assert json.dumps(sorted(id(e) for b in batches if b.task == 1 for e in b.examples)) == json.dumps(sorted(id(e) for e in pools[1]))
