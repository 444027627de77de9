"""LoRA dropout from random bits: a Bernoulli mask with the asked-for rate, the expectation kept,
the gradient through the same mask, and peft's adapters trained through it."""

import pytest
import torch

from tests.test_perf_fused_mlp import adapted
from tests.test_perf_shared_prefix import chat_like, loss_and_grads
from tunelab.data import collate_packed
from tunelab.train.bit_dropout import BitDropout, bit_dropout, keep_mask
from tunelab.train.objectives.causal_lm import CausalLMObjective


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_each_element_is_dropped_at_the_rate_asked_for(p):
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([4000, 64]), p, torch.device("cpu"))
    dropped = 1 - keep.float()
    sd = (p * (1 - p) / keep.numel()) ** 0.5
    assert dropped.mean().item() == pytest.approx(p, abs=4 * sd)
    for lane in range(4):  # each of the four 16-bit lanes of a drawn 64-bit word
        assert dropped.view(-1, 4)[:, lane].mean().item() == pytest.approx(p, abs=8 * sd)
    assert scale * (1 - round(p * 2**16) / 2**16) == pytest.approx(1.0, abs=1e-12)  # the expectation kept


def test_forward_and_backward_use_one_mask_and_a_seed_repeats_it():
    x = torch.randn(300, 40, dtype=torch.float64) + 5  # nonzero everywhere
    layer = BitDropout(0.2)
    torch.manual_seed(1)
    x1 = x.clone().requires_grad_()
    out = layer(x1)
    upstream = torch.randn_like(x)
    out.backward(upstream)
    kept = out != 0
    scale = 2**16 / (2**16 - round(0.2 * 2**16))
    assert torch.allclose(out[kept], x[kept] * scale) and torch.equal(x1.grad, torch.where(kept, upstream * scale, 0))
    torch.manual_seed(1)
    assert torch.equal(layer(x), out.detach())
    assert torch.equal(layer.eval()(x), x)


def test_checkpointing_recomputes_the_same_masks():
    layer, weight = BitDropout(0.3), torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(50, 16, dtype=torch.float64)

    def block(x):
        return layer(x @ weight).tanh() @ weight

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(2)
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        grads.append(torch.autograd.grad(out.sum(), weight)[0])
    assert torch.equal(grads[0], grads[1])


def test_peft_s_adapters_train_through_it_and_get_their_dropout_back():
    model = adapted(dropout=0.3)
    model.train()
    objective = CausalLMObjective(model)
    batch = collate_packed(chat_like([9, 30, 4, 17]))
    originals = [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p == 0.3]
    with bit_dropout(model) as swapped:
        assert swapped == len(originals) and not any(type(m) is torch.nn.Dropout and m.p == 0.3 for m in model.modules())
        losses = []
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            losses.append(loss_and_grads(objective, model, batch))
    (loss, _, grads), (again, _, grads_again), (other, _, _) = losses
    assert torch.equal(loss, again) and all(torch.equal(grads[n], grads_again[n]) for n in grads)  # a seed repeats the masks
    assert other.item() != pytest.approx(loss.item(), rel=1e-4)  # and they matter
    assert [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p == 0.3] == originals
