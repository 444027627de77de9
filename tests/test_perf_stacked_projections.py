"""Stacked LoRA projections (frozen weights and adapter down-projections in one matrix, the
up-projections block-diagonal) compute peft's formula and its gradients, follow the adapters through
optimizer steps, and give the frozen weights their own storage back."""

from dataclasses import replace

import pytest
import torch

from tests.test_perf_fused_mlp import adapted
from tunelab.methods.peft_adapters import lora_parts
from tunelab.train.stacked_projections import ProjectionStack


def qkv_parts(model):
    attention = model.base_model.model.model.layers[0].self_attn
    return [lora_parts(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj")]


def test_the_stack_computes_the_adapted_projections_and_their_gradients():
    model = adapted().double()
    parts = qkv_parts(model)
    x = torch.randn(7, parts[0].weight.shape[1], dtype=torch.float64, requires_grad=True)
    d_outs = [torch.randn(7, p.weight.shape[0], dtype=torch.float64) for p in parts]
    expected = [x @ p.weight.t() + p.scale * (x @ p.a.t()) @ p.b.t() for p in parts]
    wanted = [x] + [t for p in parts for t in (p.a, p.b)]
    expected_grads = torch.autograd.grad(expected, wanted, d_outs)
    stack = ProjectionStack(parts)
    outs, saved = stack.forward(x.detach())
    d_x, grads = stack.backward(saved, d_outs, True)
    assert all(torch.allclose(o, e, atol=1e-12) for o, e in zip(outs, expected))
    assert all(torch.allclose(g, e, atol=1e-12) for g, e in zip([d_x, *grads], expected_grads))
    assert stack.backward(saved, d_outs, False)[0] is None


def test_the_frozen_weights_live_in_the_stack_until_released():
    model = adapted()
    parts = qkv_parts(model)
    before = [p.weight.detach().clone() for p in parts]
    stack = ProjectionStack(parts)
    assert all(p.weight.untyped_storage().data_ptr() == stack.weight.untyped_storage().data_ptr() for p in parts)
    assert stack.current()
    stack.release()
    for part, value in zip(parts, before):
        assert torch.equal(part.weight, value)
        assert part.weight.untyped_storage().nbytes() == part.weight.numel() * part.weight.element_size()
    assert not stack.current()  # re-homed weights retire the stack


def test_an_optimizer_step_reaches_the_stacked_adapters():
    model = adapted()
    parts = qkv_parts(model)
    stack = ProjectionStack(parts)
    x = torch.randn(5, parts[0].weight.shape[1])
    stack.forward(x)
    # the trainer's fused kernel: it updates the parameters without bumping their version counters
    optimizer = torch.optim.AdamW([t for p in parts for t in (p.a, p.b)], lr=0.1, fused=True)
    for p in parts:
        p.a.grad, p.b.grad = torch.ones_like(p.a), torch.ones_like(p.b)
    optimizer.step()
    outs, _ = stack.forward(x)
    with torch.no_grad():
        expected = [x @ p.weight.t() + p.scale * (x @ p.a.t()) @ p.b.t() for p in parts]
    assert all(torch.allclose(o, e, atol=1e-5) for o, e in zip(outs, expected))


@pytest.mark.parametrize("change", ["dtype", "scale", "dropout", "borrowed memory"])
def test_projections_it_cannot_stack(change):
    parts = qkv_parts(adapted(dropout=0.1 if change == "dropout" else 0.0))
    dtype = torch.bfloat16 if change == "dtype" else torch.float32  # the frozen weights are fp32
    if change == "scale":
        parts[1] = replace(parts[1], scale=2 * parts[0].scale)
    if change == "borrowed memory":  # memory torch does not own (a loader's arrays): stacking would not free it
        parts[1].weight.data = torch.from_numpy(parts[1].weight.detach().numpy().copy())
    assert ProjectionStack.fits(qkv_parts(adapted()), torch.float32)
    assert not ProjectionStack.fits(parts, dtype)
