"""The fused LoRA gated MLP computes what peft's three adapted projections compute, forward and
backward, and steps aside wherever it would not."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.test_perf_shared_prefix import chat_like, loss_and_grads
from tunelab.data import collate_packed
from tunelab.models import load_model
from tunelab.train import fused_mlp
from tunelab.train.bit_dropout import bit_dropout
from tunelab.train.fused_mlp import _FusedLoraMLP, candidates, fused_mlps
from tunelab.train.objectives.causal_lm import CausalLMObjective


def adapted(dropout: float = 0.0, activation: str | None = None, seed: int = 1) -> torch.nn.Module:
    """tiny-llama with LoRA on every linear layer, its B matrices random (not zero) so the
    adapters contribute."""
    model = load_model("tiny-llama", seed=seed).model
    torch.manual_seed(seed)  # peft draws the A matrices from the global generator
    if activation == "relu":
        for layer in model.model.layers:
            layer.mlp.act_fn = torch.nn.ReLU()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        for i, p in enumerate(lora_b):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(i))
    return model


def relative_error(grads, reference):
    """The largest difference of any gradient from its reference, relative to that reference's largest value."""
    return max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in reference.items())


def reseeded(function, seed=0):
    """``function`` drawing the same dropout masks at every call (gradcheck calls it many times)."""
    return lambda *inputs: (torch.manual_seed(seed), function(*inputs))[1]


@pytest.mark.parametrize("rate", [0.0, 0.3])  # LoRA dropout: each adapter's input through a fixed mask
@pytest.mark.parametrize("input_needs_grad", [True, False])  # False: the first block's MLP, with attention frozen
@pytest.mark.parametrize("kind", ["silu", "relu"])
def test_the_hand_written_backward_is_the_gradient(kind, input_needs_grad, rate):
    g = torch.Generator().manual_seed(0)
    hidden, inner, r = 6, 10, 3

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    tensors = (t(2, 3, hidden, grad=input_needs_grad), t(inner, hidden, grad=False), t(r, hidden), t(inner, r), t(inner, hidden, grad=False), t(r, hidden),
               t(inner, r), t(hidden, inner, grad=False), t(r, inner), t(hidden, r))
    settings = (kind, torch.float64, (0.7, 1.3, 0.5), rate)
    assert torch.autograd.gradcheck(reseeded(lambda *inputs: _FusedLoraMLP.apply(*inputs, settings)), tensors, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_model_trains_the_same_through_the_fused_mlp(activation):
    model = adapted(activation=activation)
    objective = CausalLMObjective(model, shared_prefix=True)
    batch = collate_packed(chat_like([9, 30, 4, 17]), share_prefix=True)
    loss, _, grads = loss_and_grads(objective, model, batch)
    with fused_mlps(model) as patched:
        assert patched == len(model.base_model.model.model.layers)
        fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert all(torch.allclose(fused_grads[n], g, atol=1e-6, rtol=1e-4) for n, g in grads.items())
    assert all("forward" not in vars(m) for m in model.modules())  # restored


def test_under_bf16_autocast_it_stays_within_bf16_rounding_of_peft():
    model = adapted()
    objective = CausalLMObjective(model)
    batch = collate_packed(chat_like([9, 30, 4, 17]))
    reference, _, reference_grads = loss_and_grads(objective, model, batch)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_loss, _, peft_grads = loss_and_grads(objective, model, batch)
        with fused_mlps(model):
            fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    assert all(g.dtype == torch.float32 for g in fused_grads.values())
    assert fused_loss.item() == pytest.approx(reference.item(), rel=1e-3)  # bf16 keeps ~3 digits per op

    def error(grads):
        return sum((grads[n] - g).norm() ** 2 for n, g in reference_grads.items()) ** 0.5

    assert error(fused_grads) <= 1.5 * error(peft_grads)


def assert_the_same_masks_fused_or_not(fused, batch=None) -> None:
    """Under ``bit_dropout``, a step through the fused functions (the context ``fused``) and an
    unfused one with the same seed drop the same elements (pipeline stages are compared with one
    process): the same fp32 loss, gradients apart by rounding (the dropout scale is folded into the
    adapter's); and another seed's masks change the gradients."""
    model = adapted(dropout=0.3)
    objective = CausalLMObjective(model, shared_prefix=True)
    batch = batch if batch is not None else collate_packed(chat_like([9, 30, 4, 17]), share_prefix=True)
    with bit_dropout(model):
        torch.manual_seed(4)
        loss, _, grads = loss_and_grads(objective, model, batch)
        with fused(model):
            torch.manual_seed(4)
            fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
            torch.manual_seed(5)
            _, _, other_grads = loss_and_grads(objective, model, batch)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert relative_error(fused_grads, grads) < 1e-5
    # the masks matter: another seed's gradients are far outside the tolerance above (its summed
    # loss can land within 1e-4 of this one's by chance)
    assert relative_error(other_grads, grads) > 1e-3


def test_with_bit_dropout_it_draws_the_masks_the_unfused_mlp_draws():
    assert_the_same_masks_fused_or_not(fused_mlps)


def test_with_peft_s_own_dropout_training_keeps_peft_s_forward_and_its_random_draws(monkeypatch):
    """Masks drawn by peft's ``nn.Dropout`` (``bit_dropout`` off) cannot be drawn here: the
    module's own forward keeps them; eval, where dropout is off, is fused."""
    model = adapted(dropout=0.5)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 5, mlp.gate_proj.base_layer.weight.shape[1])
    calls = []
    monkeypatch.setattr(fused_mlp._FusedLoraMLP, "apply", lambda *args: calls.append(1) or type(mlp).forward(mlp, args[0]))
    with fused_mlps(model), torch.no_grad():
        calls.clear()  # the install probe's call
        model.train()
        torch.manual_seed(3)
        trained = mlp(x)
        assert calls == []
        torch.manual_seed(3)
        assert torch.equal(trained, type(mlp).forward(mlp, x))
        model.eval()
        mlp(x)
        assert calls == [1]


def test_it_steps_aside_for_a_disabled_adapter_a_hooked_layer_and_an_unknown_mlp():
    model = adapted()
    objective = CausalLMObjective(model)
    batch = collate_packed(chat_like([9, 12]))
    with torch.no_grad(), model.disable_adapter():
        base = objective(model, batch)[0]
        with fused_mlps(model):
            assert objective(model, batch)[0].item() == pytest.approx(base.item(), rel=1e-6)

    seen = []
    handle = model.base_model.model.model.layers[1].mlp.up_proj.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with fused_mlps(model):
        objective(model, batch)
    handle.remove()
    assert len(seen) == 1  # the hooked projection's MLP ran its own forward

    class ScaledMLP(type(model.base_model.model.model.layers[0].mlp)):
        def forward(self, x):
            return 2 * super().forward(x)

    mlp = model.base_model.model.model.layers[0].mlp
    mlp.__class__ = ScaledMLP
    assert mlp in candidates(model)
    with fused_mlps(model) as patched:
        assert patched == len(model.base_model.model.model.layers) - 1  # the probe saw the doubling
        assert "forward" not in vars(mlp)
