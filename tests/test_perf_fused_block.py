"""The fused decoder-block halves compute what the block computes, forward and backward, and step
aside wherever they would not."""

import pytest
import torch

from tests.test_perf_fused_mlp import adapted, assert_the_same_masks_fused_or_not, relative_error
from tests.test_perf_shared_prefix import chat_like, loss_and_grads
from tunelab.data import collate_packed
from tunelab.data.collate import pad_packed_row
from tunelab.train.fused_block import _AttentionHalf, _MlpHalf, fused_blocks
from tunelab.train.objectives.causal_lm import CausalLMObjective


@pytest.fixture
def calls(monkeypatch):
    """How many times each half ran."""
    counted = {"attention": 0, "mlp": 0}
    for name, function in (("attention", _AttentionHalf), ("mlp", _MlpHalf)):
        original = function.apply

        def apply(*args, _name=name, _original=original):
            counted[_name] += 1
            return _original(*args)

        monkeypatch.setattr(function, "apply", apply)
    return counted


def packed_row(lengths=(9, 30, 4, 17)):
    """A shared-prefix row padded to a multiple of 16: a prefix, suffixes and a padding segment."""
    return pad_packed_row(collate_packed(chat_like(list(lengths)), share_prefix=True), 16)


def test_a_model_trains_the_same_through_the_fused_blocks(calls):
    model = adapted()
    objective = CausalLMObjective(model, shared_prefix=True)
    batch = packed_row()
    loss, _, grads = loss_and_grads(objective, model, batch)
    with fused_blocks(model) as patched:
        calls.update(attention=0, mlp=0)  # not the install-time probe
        fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    layers = len(model.base_model.model.model.layers)
    assert patched == layers
    # the last block's MLP runs sliced to the read positions (last_block), outside the fused half
    assert calls == {"attention": layers, "mlp": layers - 1}
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert relative_error(fused_grads, grads) < 1e-5
    assert all("forward" not in vars(m) for m in model.modules())  # restored


def test_under_bf16_autocast_it_stays_within_bf16_rounding_of_the_unfused_block():
    model = adapted()
    objective = CausalLMObjective(model, shared_prefix=True)
    batch = packed_row()
    reference, _, reference_grads = loss_and_grads(objective, model, batch)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own_loss, _, own_grads = loss_and_grads(objective, model, batch)
        with fused_blocks(model):
            fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    assert all(g.dtype == torch.float32 for g in fused_grads.values())
    assert fused_loss.item() == pytest.approx(reference.item(), rel=1e-2)

    def error(grads):
        return sum((grads[n] - g).norm() ** 2 for n, g in reference_grads.items()) ** 0.5

    assert error(fused_grads) <= 1.5 * error(own_grads)


def test_with_bit_dropout_it_draws_the_masks_the_unfused_block_draws(calls):
    """q, k, v, o, gate, up, down: each adapter's mask drawn in the unfused order, so one seed gives
    a fused and an unfused step the same masks (and they matter)."""
    assert_the_same_masks_fused_or_not(fused_blocks, packed_row())
    layers = len(adapted().base_model.model.model.layers)
    # two fused steps, plus the install probe's one call of each half
    assert calls == {"attention": 2 * layers + 1, "mlp": 2 * (layers - 1) + 1}


def test_it_steps_aside_for_peft_s_own_dropout_and_long_segments(calls, monkeypatch):
    model = adapted(dropout=0.1)
    objective = CausalLMObjective(model, shared_prefix=True)
    with fused_blocks(model):
        calls.update(attention=0, mlp=0)
        objective(model, packed_row())  # training mode, no bit_dropout: nn.Dropout's masks are peft's to draw
        assert calls == {"attention": 0, "mlp": 0}
        model.eval()  # no dropout: fused
        objective(model, packed_row())
        assert calls["attention"] > 0
        calls.update(attention=0, mlp=0)
        monkeypatch.setattr("tunelab.train.varlen_attention.MATH_BELOW", 8)  # the 30-token example now goes to sdpa
        objective(model, packed_row((9, 30, 5, 17)))  # another row: layouts are cached per row
        assert calls == {"attention": 0, "mlp": 0}


def test_a_block_whose_forward_differs_keeps_its_own():
    model = adapted()
    layer_type = type(model.base_model.model.model.layers[0])

    class ScaledResidual(layer_type):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states, *args, **kwargs) * 0.5

    for layer in model.base_model.model.model.layers:
        layer.__class__ = ScaledResidual
    with fused_blocks(model) as patched:
        assert patched == 0
