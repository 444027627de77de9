"""The fused decoder-block halves compute what the block computes, forward and backward, and step
aside wherever they would not."""

import contextlib

import pytest
import torch

from tests.test_perf_fused_mlp import adapted, assert_the_same_masks_fused_or_not, relative_error
from tests.test_perf_shared_prefix import chat_like, loss_and_grads
from tunelab.data import collate_packed
from tunelab.data.collate import pad_packed_row
from tunelab.train.frozen_precision import cast_frozen, restore
from tunelab.train.fused_block import _AttentionHalf, _FusedLayer, _MlpHalf, fused_blocks
from tunelab.train.objectives.causal_lm import CausalLMObjective
from tunelab.train.stacked_projections import ProjectionStack


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


def distance(grads, reference):
    """The gradients' Euclidean distance from the reference's, over every parameter."""
    return sum((grads[n] - g).norm() ** 2 for n, g in reference.items()) ** 0.5


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
        with fused_blocks(model) as patched:  # installed under autocast: the probe still compares in fp32
            assert patched == len(model.base_model.model.model.layers)
            fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    assert all(g.dtype == torch.float32 for g in fused_grads.values())
    assert fused_loss.item() == pytest.approx(reference.item(), rel=1e-2)

    assert distance(fused_grads, reference_grads) <= 1.5 * distance(own_grads, reference_grads)


def stacked_layers(model) -> int:
    """How many decoder layers hold projection stacks right now (``stacked_projections``)."""
    return sum(1 for m in model.modules() if isinstance(vars(m).get("forward"), _FusedLayer) and vars(m)["forward"].stacks)


@pytest.fixture
def stack_calls(monkeypatch):
    """How many times a projection stack computed a forward."""
    counted = [0]
    original = ProjectionStack.forward

    def forward(self, x):
        counted[0] += 1
        return original(self, x)

    monkeypatch.setattr(ProjectionStack, "forward", forward)
    return counted


def test_with_frozen_weights_in_bf16_the_stacked_blocks_stay_within_bf16_rounding():
    """As the trainer runs them: frozen weights cast to bf16 after the blocks are patched, so the
    projections run stacked; the loss and gradients as close to fp32 as the unfused block's."""
    model = adapted()
    objective = CausalLMObjective(model, shared_prefix=True)
    batch = packed_row()
    reference, _, reference_grads = loss_and_grads(objective, model, batch)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        changed = cast_frozen(model, torch.bfloat16)
        own_loss, _, own_grads = loss_and_grads(objective, model, batch)
        restore(changed)
        with fused_blocks(model):
            changed = cast_frozen(model, torch.bfloat16)
            fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
            assert stacked_layers(model) == len(model.base_model.model.model.layers)
            restore(changed)

    assert abs(fused_loss.item() - reference.item()) <= 1.5 * abs(own_loss.item() - reference.item()) + 1e-3 * abs(reference.item())
    assert distance(fused_grads, reference_grads) <= 1.5 * distance(own_grads, reference_grads)


def test_stacked_blocks_train_as_the_unfused_blocks_over_several_steps(stack_calls):
    """fp32 (frozen weights in the compute dtype: stacked): three AdamW steps end at the unfused run's
    adapters, so each step's updated adapters reach the stacks (which every step uses, not only the
    one that built them); afterwards every frozen weight is unchanged and owns its storage again."""
    batch = packed_row()

    def train(fused: bool) -> dict[str, torch.Tensor]:
        model = adapted()
        objective = CausalLMObjective(model, shared_prefix=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)  # as the trainer
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        with fused_blocks(model) if fused else contextlib.nullcontext():
            for _ in range(3):
                optimizer.zero_grad()
                objective(model, batch)[0].backward()
                optimizer.step()
            layers = len(model.base_model.model.model.layers)
            assert stacked_layers(model) == (layers if fused else 0)
            assert stack_calls[0] >= (3 * 2 * layers if fused else 0)  # q/k/v and o, every step
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen[name])
                assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    assert relative_error(train(True), train(False)) < 1e-5


def test_with_bit_dropout_it_draws_the_masks_the_unfused_block_draws(calls):
    """q, k, v, o, gate, up, down: each adapter's mask drawn in the unfused order, so one seed gives
    a fused and an unfused step the same masks (and they matter)."""
    assert_the_same_masks_fused_or_not(fused_blocks, packed_row())
    layers = len(adapted().base_model.model.model.layers)
    # two fused steps, plus the install probe's one call of each half
    assert calls == {"attention": 2 * layers + 1, "mlp": 2 * (layers - 1) + 1}


def test_it_steps_aside_for_peft_s_own_dropout(calls):
    model = adapted(dropout=0.1)
    objective = CausalLMObjective(model, shared_prefix=True)
    with fused_blocks(model):
        calls.update(attention=0, mlp=0)
        objective(model, packed_row())  # training mode, no bit_dropout: nn.Dropout's masks are peft's to draw
        assert calls == {"attention": 0, "mlp": 0}
        model.eval()  # no dropout: fused
        objective(model, packed_row())
        assert calls["attention"] > 0


@pytest.mark.parametrize("row", ["mixed", "one example"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_long_segments_go_through_flash_attention_inside_the_fused_block(calls, monkeypatch, precision, row):
    """Segments of ``MATH_BELOW`` keys or more (here 8: the prefix, a suffix continuing it, whole
    examples; or a row that is one long example) take torch's flash kernel inside the fused half,
    as ``varlen_sdpa`` runs them for the unfused layer: fp32 equal to it, bf16 as close to fp32 as it."""
    monkeypatch.setattr("tunelab.train.varlen_attention.MATH_BELOW", 8)
    model = adapted()
    objective = CausalLMObjective(model, shared_prefix=True)
    batch = packed_row((9, 30, 5, 17)) if row == "mixed" else collate_packed(chat_like([30]))
    reference, _, reference_grads = loss_and_grads(objective, model, batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        own_loss, _, own_grads = loss_and_grads(objective, model, batch)
    with fused_blocks(model):
        calls.update(attention=0, mlp=0)
        with autocast:
            fused_loss, _, fused_grads = loss_and_grads(objective, model, batch)
    layers = len(model.base_model.model.model.layers)
    assert calls["attention"] == layers
    if precision == "fp32":
        assert fused_loss.item() == pytest.approx(reference.item(), rel=1e-6)
        assert relative_error(fused_grads, reference_grads) < 1e-5
    else:
        assert abs(fused_loss.item() - reference.item()) <= 1.5 * abs(own_loss.item() - reference.item()) + 1e-3 * abs(reference.item())
        assert distance(fused_grads, reference_grads) <= 1.5 * distance(own_grads, reference_grads)


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
