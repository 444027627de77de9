"""Class weighting helps the minority class of an imbalanced task; per-example weights scale losses."""

import json
import random

import torch

from tests.train_helpers import train
from tunelab.data import Example
from tunelab.data.collate_heads import collate_head_batch
from tunelab.train.objectives.classification import ClassificationObjective


def write_imbalanced(path, n=400, seed=0):
    """90% 'common', 10% 'rare'; the cue word 'odd' appears in 70% of rare and 20% of common rows,
    so even the best unweighted classifier says 'common' for every row (P(rare | odd) ≈ 0.28)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rare = rng.random() < 0.1
        cue = rng.random() < (0.7 if rare else 0.2)
        rows.append({"text": f"{i % 7} {'odd' if cue else 'even'} item", "label": "rare" if rare else "common"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_auto_class_weights_raise_minority_recall(tmp_path):
    data = write_imbalanced(tmp_path / "d.jsonl")
    recipe = (
        f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.3, dedup: false}}\nmethod: {{head: {{}}, freeze: {{base: false}}}}\nobjective: {{name: classification, class_weights: {{weights}}}}\n"
        "train: {lr: 0.003, max_steps: 30, batch_size: 32, schedule: constant, precision: fp32}\n"
    )
    (tmp_path / "plain").mkdir()
    (tmp_path / "weighted").mkdir()
    plain = train(tmp_path / "plain", recipe.replace("{weights}", "null"))
    weighted = train(tmp_path / "weighted", recipe.replace("{weights}", "auto"))
    assert plain.eval_after["eval_recall_rare"] < 0.2, plain.eval_after
    assert weighted.eval_after["eval_recall_rare"] > plain.eval_after["eval_recall_rare"] + 0.4, weighted.eval_after


class Logits(torch.nn.Module):
    """A stand-in model whose logits are fixed per input id."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(10, 2)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.table(input_ids[:, 0])})()


def test_example_weights_multiply_each_examples_loss():
    model = Logits()
    examples = [Example([1], [], label=0, weight=2.0), Example([2], [], label=1, weight=0.0), Example([3], [], label=1)]
    loss, _ = ClassificationObjective(["a", "b"])(model, collate_head_batch(examples, pad_id=0))
    per = torch.nn.functional.cross_entropy(model.table(torch.tensor([1, 2, 3])), torch.tensor([0, 1, 1]), reduction="none")
    assert torch.allclose(loss, 2.0 * per[0] + per[2])
