"""The fused LoRA q/k/v projections compute what peft's three adapted layers compute, forward and
backward, and step aside wherever they would not."""

import pytest
import torch

from tests.test_perf_fused_mlp import adapted, assert_the_same_masks_fused_or_not, reseeded
from tests.test_perf_shared_prefix import chat_like, loss_and_grads
from tunelab.data import collate_packed
from tunelab.train.fused_projections import _FusedLoraProjections, fused_projections
from tunelab.train.objectives.causal_lm import CausalLMObjective


@pytest.mark.parametrize("rate", [0.0, 0.3])  # LoRA dropout: each adapter's input through its own fixed mask
@pytest.mark.parametrize("input_needs_grad", [True, False])  # False: the first block, below which nothing learns
def test_the_hand_written_backward_is_the_gradient(input_needs_grad, rate):
    g = torch.Generator().manual_seed(0)
    hidden, r = 6, 3

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    weights = [w for out in (6, 2, 2) for w in (t(out, hidden, grad=False), t(r, hidden), t(out, r))]
    settings = (torch.float64, (0.7, 1.3, 0.5), rate)
    assert torch.autograd.gradcheck(reseeded(lambda x, *ws: _FusedLoraProjections.apply(x, settings, *ws)), (t(2, 3, hidden, grad=input_needs_grad), *weights),
                                    atol=1e-6, rtol=1e-4)


def test_a_model_trains_the_same_through_the_fused_projections(monkeypatch):
    model = adapted()
    objective = CausalLMObjective(model, shared_prefix=True)
    batch = collate_packed(chat_like([9, 30, 4, 17]), share_prefix=True)
    loss, _, grads = loss_and_grads(objective, model, batch)
    calls = []
    original = _FusedLoraProjections.apply
    monkeypatch.setattr(_FusedLoraProjections, "apply", lambda *args: calls.append(1) or original(*args))
    with fused_projections(model) as patched:
        fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    assert patched == len(model.base_model.model.model.layers) == len(calls)
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
        with fused_projections(model):
            fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    assert all(g.dtype == torch.float32 for g in fused_grads.values())
    assert fused_loss.item() == pytest.approx(reference.item(), rel=1e-3)

    def error(grads):
        return sum((grads[n] - g).norm() ** 2 for n, g in reference_grads.items()) ** 0.5

    assert error(fused_grads) <= 1.5 * error(peft_grads)


def test_with_bit_dropout_it_draws_the_masks_the_unfused_projections_draw():
    assert_the_same_masks_fused_or_not(fused_projections)


def test_keys_from_another_input_a_hooked_layer_and_peft_s_dropout_take_peft_s_forward():
    model = adapted(dropout=0.5)
    attention = model.base_model.model.model.layers[0].self_attn
    x, other = torch.randn(1, 5, attention.q_proj.base_layer.weight.shape[1]), torch.randn(1, 5, attention.q_proj.base_layer.weight.shape[1])
    with fused_projections(model), torch.no_grad():
        model.eval()  # dropout off: fused
        q, k_other, v = attention.q_proj(x), attention.k_proj(other), attention.v_proj(x)
        assert torch.allclose(k_other, type(attention.k_proj).forward(attention.k_proj, other), atol=1e-6)
        assert torch.allclose(q, type(attention.q_proj).forward(attention.q_proj, x), atol=1e-6)
        assert torch.allclose(v, type(attention.v_proj).forward(attention.v_proj, x), atol=1e-6)
        model.train()  # peft's nn.Dropout on (no bit_dropout): peft's layers and their random draws
        torch.manual_seed(3)
        trained = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
        torch.manual_seed(3)
        own = [type(p).forward(p, x) for p in (attention.q_proj, attention.k_proj, attention.v_proj)]
        assert all(torch.equal(a, b) for a, b in zip(trained, own))

    model = adapted()
    objective = CausalLMObjective(model)
    batch = collate_packed(chat_like([9, 12]))
    seen = []
    handle = model.base_model.model.model.layers[1].self_attn.v_proj.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with fused_projections(model), torch.no_grad():
        objective(model, batch)
    handle.remove()
    assert len(seen) == 1  # the hooked projection ran its own forward
