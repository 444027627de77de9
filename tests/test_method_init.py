"""``method.init``: the parameters other methods add start as the strategy says, adapters still
start as the identity, and ``from_model`` copies a trained run's added parameters."""

import pytest
import torch

from tests.train_helpers import train, write_label_data
from tunelab.errors import UserError
from tunelab.methods import apply_methods
from tunelab.methods.initialise import plain_name
from tunelab.models import load_model
from tunelab.recipe import recipe_from_dict

IDS = torch.tensor([[5, 9, 17, 3, 22, 41]])


def applied(method: dict, model_task: str = "causal-lm", **load_kwargs):
    torch.manual_seed(0)
    base = load_model("tiny-llama", model_task, **load_kwargs).model
    section = recipe_from_dict({"method": method}).method
    return base, apply_methods(base, section, model_task=model_task)


def named(model: torch.nn.Module, fragment: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if fragment in n]


@pytest.mark.parametrize("strategy", ["normal", "xavier", "orthogonal", "kaiming"])
def test_redrawn_lora_still_starts_as_the_base_model(strategy):
    torch.manual_seed(1)
    reference = load_model("tiny-llama").model
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    _, model = applied({"lora": {"r": 4, "target_modules": "all-linear"}, "init": {"strategy": strategy, "std": 0.5}})
    a, b = named(model, "lora_A"), named(model, "lora_B")
    assert a and all(bool((w == 0).all()) for w in b), "B stays zero: the adapter starts as the identity"
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-6)
    first = a[0].detach()
    if strategy == "normal":
        assert abs(first.std().item() - 0.5) < 0.1
    if strategy == "orthogonal":  # r x d with r < d: orthonormal rows
        assert torch.allclose(first @ first.T, torch.eye(first.shape[0]), atol=1e-5)
    if strategy == "xavier":
        bound = (6 / sum(first.shape)) ** 0.5
        assert first.abs().max() <= bound and first.abs().max() > bound / 2


def test_head_strategies_and_zeros_refused_for_adapters():
    _, model = applied({"head": {"type": "classification"}, "init": {"strategy": "zeros"}}, "sequence-classification", num_labels=3)
    head = named(model, "score")
    assert head and all(bool((w == 0).all()) for w in head)
    _, model = applied({"head": {"type": "classification"}, "init": {"strategy": "orthogonal"}}, "sequence-classification", num_labels=3)
    w = named(model, "score")[0].detach()
    assert torch.allclose(w @ w.T, torch.eye(3), atol=1e-5)
    with pytest.raises(UserError, match="never get a gradient"):
        applied({"lora": {"r": 4}, "init": {"strategy": "zeros"}})
    with pytest.raises(UserError, match="no method here adds parameters"):
        applied({"init": {"strategy": "normal"}})


def test_from_model_copies_a_trained_runs_head_and_adapter(tmp_path):
    data = write_label_data(tmp_path / "d.jsonl")
    train(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\n"
          "method: {lora: {r: 4, target_modules: all-linear}, head: {type: classification}}\n"
          "train: {lr: 0.01, batch_size: 8, max_steps: 4, precision: fp32}\n")
    trained = load_model(str(tmp_path / "run"), "sequence-classification").model
    source = {plain_name(n): p.detach() for n, p in trained.named_parameters() if "original_module" not in n}
    _, model = applied({"lora": {"r": 4, "target_modules": "all-linear"}, "head": {"type": "classification"},
                        "init": {"from_model": str(tmp_path / "run")}}, "sequence-classification", num_labels=2)
    copied = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n, _ in copied) and any("score" in n for n, _ in copied)
    for name, param in copied:
        assert torch.equal(param.detach(), source[plain_name(name)]), name
    assert any(not bool((p == 0).all()) for n, p in copied if "lora_B" in n), "the trained B was copied, not a fresh zero"
