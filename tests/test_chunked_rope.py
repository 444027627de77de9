"""RoPE's rotate_half by chunk: the same values and gradients, fewer whole-size allocations."""

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_perf_varlen import lora_model
from tunelab.train.chunked_rope import chunked_rotate_half, rotate_half


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_computes_the_same_bits_without_the_slices_backward():
    model = lora_model()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    modeling = sys.modules[type(model.base_model.model).__module__]
    theirs = modeling.rotate_half
    loss_a, grads_a = _loss_and_grads(model, ids)
    with chunked_rotate_half(model) as swapped:
        assert swapped and modeling.rotate_half is rotate_half
        loss = model(input_ids=ids, labels=ids).loss
        with CountOps() as ops:
            loss.backward()
        loss_b, grads_b = _loss_and_grads(model, ids)
    assert modeling.rotate_half is theirs  # put back
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert "slice_backward" not in ops.names


def test_another_rotation_keeps_its_own(monkeypatch):
    model = lora_model()
    modeling = sys.modules[type(model.base_model.model).__module__]

    def interleaved(x):  # GPT-J's rotate_every_two: another formula
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    monkeypatch.setattr(modeling, "rotate_half", interleaved)
    with chunked_rotate_half(model) as swapped:
        assert not swapped and modeling.rotate_half is interleaved
