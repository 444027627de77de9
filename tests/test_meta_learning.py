"""Meta-learning (Reptile, first-order MAML) and ``tunelab adapt``: the meta-gradients are the
published ones, episodes come from one task, and adaptation continues the learned weights."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.train_helpers import train
from tunelab.cli import cli
from tunelab.data import Example
from tunelab.errors import UserError
from tunelab.models import load_model
from tunelab.recipe import recipe_from_dict
from tunelab.train.objectives.meta import EpisodeSampler, MetaConfig, MetaObjective


class Quadratic:
    """A toy objective: each row r of ``batch["target"]`` adds ½‖θ − r‖²; units = rows."""

    def units(self, batch):
        return int(batch["target"].shape[0])

    def __call__(self, model, batch):
        loss = 0.5 * ((model.theta - batch["target"]) ** 2).sum()
        return loss, {"loss_sum": float(loss.detach()), "units": self.units(batch)}

    def summarize(self, stats):
        return {"loss": stats["loss_sum"] / max(1, stats["units"])}


class Point(torch.nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta))


def meta_gradient(algorithm: str, steps: int, lr: float, theta, a, b, support: int = 3, query: int = 2) -> torch.Tensor:
    model = Point(theta)
    batch = {"target": torch.tensor([a] * support + [b] * query)}
    objective = MetaObjective(MetaConfig(algorithm=algorithm, support=support, query=query, inner_steps=steps, inner_lr=lr), Quadratic())
    loss, _ = objective(model, batch)
    loss.backward()
    assert torch.equal(model.theta.detach(), torch.tensor(theta)), "the weights are put back after the inner loop"
    return model.theta.grad / objective.units(batch)  # the trainer divides by the step's units


def test_fomaml_meta_gradient_on_a_quadratic_equals_the_hand_computed_one():
    theta, a, b, lr, k = [1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], 0.3, 4
    # Support loss ½‖θ−a‖²: each SGD step gives φ ← φ − lr(φ − a), so φ_k = a + (1−lr)^k (θ − a);
    # first-order MAML's meta-gradient is the query loss's gradient there: φ_k − b.
    phi = torch.tensor(a) + (1 - lr) ** k * (torch.tensor(theta) - torch.tensor(a))
    assert torch.allclose(meta_gradient("fomaml", k, lr, theta, a, b), phi - torch.tensor(b), atol=1e-6)
    # Reptile's is (θ − φ_k) / (lr·k).
    assert torch.allclose(meta_gradient("reptile", k, lr, theta, a, b), (torch.tensor(theta) - phi) / (lr * k), atol=1e-6)


def test_reptile_with_one_inner_step_is_sgd_on_that_task():
    torch.manual_seed(0)
    model = load_model("tiny-llama").model.train()
    ids = torch.randint(3, 200, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    from tunelab.train.objectives import ObjectiveContext, build_objective

    inner = build_objective("causal_lm", None, ObjectiveContext(model))
    loss_sum, _ = inner(model, batch)
    expected = torch.autograd.grad(loss_sum / inner.units(batch), list(model.parameters()))
    objective = MetaObjective(MetaConfig(algorithm="reptile", support=4, query=0, inner_steps=1, inner_lr=0.05), inner)
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = objective(model, batch)
    (loss / objective.units(batch)).backward()
    for p, b, g in zip(model.parameters(), before, expected, strict=True):
        assert torch.equal(p.detach(), b)
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)


def examples(tasks: dict[str, int]) -> list[Example]:
    return [Example([1, 2], [1, 2], task_name=name) for name, n in tasks.items() for _ in range(n)]


def test_episodes_are_pure_and_each_draws_distinct_rows_of_one_task():
    data = examples({"a": 10, "b": 7, "c": 12})
    sampler = EpisodeSampler(data, support=3, query=2, seed=5)
    assert sampler.num_batches() == len(data) // 5
    first, again, other = sampler.batches(0), EpisodeSampler(data, 3, 2, seed=5).batches(0), sampler.batches(1)
    assert first == again and first != other
    for episode in first + other:
        assert len(episode) == 5 == len(set(episode))
        assert len({data[i].task_name for i in episode}) == 1
    with pytest.raises(UserError, match="fewer training rows"):
        EpisodeSampler(examples({"a": 10, "b": 4}), support=3, query=2, seed=0)
    with pytest.raises(UserError, match="task_column"):
        EpisodeSampler([Example([1], [1])] * 10, support=3, query=2, seed=0)


def write_tasks(path: Path) -> Path:
    """Four tasks, each mapping a prompt word to its own answer word."""
    rows = []
    for t, (word, answer) in enumerate([("red", "APPLE"), ("blue", "SEA"), ("green", "LEAF"), ("gold", "SUN")]):
        rows += [{"task": f"t{t}", "messages": [{"role": "user", "content": f"{i} {word}"}, {"role": "assistant", "content": answer}]} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


META_RUN = """model: {{name: tiny-llama}}
data: {{train: {data}, task_column: task, val_fraction: 0.0}}
method: {{lora: {{r: 4, target_modules: all-linear}}}}
objective: {{name: meta, algorithm: {algorithm}, support: 4, query: 4, inner_steps: 2, inner_lr: 0.05}}
train: {{lr: 0.01, max_steps: 4, precision: fp32, grad_accum: 2}}
"""


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_a_meta_run_trains_and_tunelab_adapt_continues_its_adapter(tmp_path, algorithm):
    data = write_tasks(tmp_path / "tasks.jsonl")
    summary = train(tmp_path, META_RUN.format(data=data, algorithm=algorithm))
    assert summary.steps == 4 and summary.final_train_loss is not None
    run = tmp_path / "run"
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} pink"}, {"role": "assistant", "content": "ROSE"}]}) + "\n" for i in range(4)))

    from tunelab.train.adapt import adaptation_recipe

    recipe = adaptation_recipe(str(run), str(few), 3)
    assert recipe.train.lr == 0.05 and recipe.train.optimizer == "sgd" and recipe.train.momentum == 0 and recipe.train.batch_size == 4
    assert recipe.method.init.from_model == str(run) and recipe.method.lora.r == 4

    result = CliRunner().invoke(cli, ["adapt", str(run), "--data", str(few), "--steps", "3", "--out", str(tmp_path / "adapted"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "adapted" / "summary.json").read_text())["steps"] == 3
    # The adapted adapter moved from the meta-learned one, not from a fresh adapter (B = 0, A drawn
    # anew: two independent draws of A differ by ~1.4x their norm). A, not B, tells them apart: B
    # starts at zero, so 3 steps at the adaptation's lr 0.05 move it by about its meta-learned size
    # (by more or less with each LoRA-dropout draw), while A moves by a few percent.
    from safetensors.torch import load_file

    meta = load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))
    adapted = load_file(str(tmp_path / "adapted" / "final" / "adapter" / "adapter_model.safetensors"))
    assert all(meta[k].abs().sum() > 0 for k in meta if "lora_B" in k)
    downs = [k for k in meta if "lora_A" in k]
    moved = torch.cat([(adapted[k] - meta[k]).flatten() for k in downs]).norm() / torch.cat([meta[k].flatten() for k in downs]).norm()
    assert 0 < moved < 0.5, "3 small steps stay near the meta-learned weights"


def test_meta_objective_refuses_another_sampler_and_adapt_needs_a_step_size(tmp_path):
    data = write_tasks(tmp_path / "tasks.jsonl")
    with pytest.raises(UserError, match="draws its own batches"):
        train(tmp_path, META_RUN.format(data=data, algorithm="reptile") + "sampler: {name: sequential}\n")
    from tunelab.train.adapt import adaptation_recipe

    with pytest.raises(UserError, match="--lr"):
        adaptation_recipe("tiny-llama", str(data), 2)
    assert adaptation_recipe("tiny-llama", str(data), 2, lr=0.1).train.batch_size == 48
    with pytest.raises(Exception, match="query > 0"):
        recipe_from_dict({"objective": {"name": "meta", "algorithm": "fomaml", "query": 0}})
