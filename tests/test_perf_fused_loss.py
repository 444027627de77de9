"""The chunked LM-head + cross-entropy: the same loss and gradients as the plain path."""

import threading

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from tunelab.data import Example, collate_packed, collate_padded
from tunelab.models import load_model
from tunelab.train.objectives import causal_lm, fused_cross_entropy
from tunelab.train.objectives.causal_lm import CausalLMObjective, fusable_head
from tunelab.train.objectives.fused_cross_entropy import fused_linear_cross_entropy, reused_buffers


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_equals_plain_cross_entropy_in_value_and_gradients(head_trains, weighted):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g, requires_grad=True)
    weight = torch.randn(500, 32, generator=g, requires_grad=head_trains)
    targets = torch.randint(0, 500, (300,), generator=g)
    token_weights = torch.rand(300, generator=g) if weighted else None
    loss, correct = fused_linear_cross_entropy(hidden, weight, targets, token_weights, chunk_rows=64)
    (0.37 * loss).backward()  # any multiple of the summed loss, as the trainer's 1/units

    hidden_ref = hidden.detach().clone().requires_grad_()
    weight_ref = weight.detach().clone().requires_grad_(head_trains)
    logits = F.linear(hidden_ref, weight_ref)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    reference = per_token.sum() if token_weights is None else (per_token * token_weights).sum()
    (0.37 * reference).backward()

    assert torch.allclose(loss, reference, rtol=1e-5)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    assert torch.allclose(hidden.grad, hidden_ref.grad, atol=1e-5)
    if head_trains:
        assert torch.allclose(weight.grad, weight_ref.grad, atol=1e-5)


def test_hits_count_the_first_maximal_class_only_as_argmax_does():
    """Argmax is taken only where the target reaches the row's maximum; a tie with an earlier
    class is argmax's first maximal index, so that row is a miss."""
    weight = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    weight[9] = weight[4]  # classes 4 and 9 score alike on every input
    hidden = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    top = F.linear(hidden, weight).argmax(-1)
    targets = torch.where(top == 4, torch.where(torch.arange(40) % 2 == 0, 4, 9), top)  # ties: half first, half second
    targets[::5] = (targets[::5] + 1) % 12  # and some plain misses
    with torch.no_grad():
        _, correct = fused_linear_cross_entropy(hidden, weight, targets)
    assert (top == 4).any() and int(correct) == int((F.linear(hidden, weight).argmax(-1) == targets).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_buffers_give_the_same_losses_and_gradients_and_are_dropped_on_exit(dtype):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 16, generator=g).to(dtype)
    calls = [(torch.randn(n, 16, generator=g).to(dtype), torch.randint(0, 300, (n,), generator=g)) for n in (50, 130, 20)]

    def run():
        out = []
        for hidden, targets in calls:
            hidden = hidden.clone().requires_grad_()
            loss, correct = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=64)
            loss.backward()
            out.append((loss.detach(), int(correct), hidden.grad))
        return out

    fresh = run()
    with reused_buffers():
        kept = run()
        held = {key: buffer.data_ptr() for key, buffer in fused_cross_entropy._held().items()}
        assert {name for name, _, _ in held} == ({"logits"} if dtype == torch.float32 else {"logits", "scores"}) | {"probabilities"}
        run()  # the same row counts again: nothing reallocated
        assert {key: buffer.data_ptr() for key, buffer in fused_cross_entropy._held().items()} == held
        other_thread = []
        worker = threading.Thread(target=lambda: other_thread.append(fused_cross_entropy._held()))
        worker.start()
        worker.join()
        assert other_thread == [None]  # another thread has its own, none here
    assert fused_cross_entropy._held() is None
    for (loss_a, hits_a, grad_a), (loss_b, hits_b, grad_b) in zip(fresh, kept):
        assert torch.equal(loss_a, loss_b) and hits_a == hits_b and torch.equal(grad_a, grad_b)


def test_fused_without_gradients_returns_the_loss_only():
    hidden, weight = torch.randn(10, 8), torch.randn(20, 8)
    targets = torch.arange(10)
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets)
    assert torch.allclose(loss, F.cross_entropy(hidden @ weight.T, targets, reduction="sum"), rtol=1e-5)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (40, 17, 90):
        ids = torch.randint(7, 200, (n,), generator=g).tolist()
        rows.append(Example(input_ids=ids, labels=ids))  # every token supervised, as in pretraining
    return collate_packed(rows)


def _loss_and_grads(objective, model, batch):
    model.zero_grad()
    loss, stats = objective(model, batch)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False])
def test_objective_fused_equals_unfused_on_a_model(lora):
    """LoRA (frozen, tied head) and full fine-tuning (the tied embedding/head trains)."""
    model = load_model("tiny-llama", seed=1).model
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    fused, plain = CausalLMObjective(model), CausalLMObjective(model, fused_loss=False)
    assert fused.fused_loss and not plain.fused_loss
    batch = _batch()
    loss_a, stats_a, grads_a = _loss_and_grads(fused, model, batch)
    loss_b, stats_b, grads_b = _loss_and_grads(plain, model, batch)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert stats_a["tokens"] == stats_b["tokens"] and stats_a["correct"] == stats_b["correct"]
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5) for k in grads_a)


def test_a_lora_wrapped_head_keeps_the_plain_path():
    model = load_model("tiny-llama", seed=1).model
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    assert fusable_head(model) is None
    assert not CausalLMObjective(model).fused_loss


@pytest.mark.parametrize("packed", [True, False])
def test_logits_sliced_by_a_list_of_positions_equal_the_masked_ones(monkeypatch, packed):
    """transformers before 5.2x cannot slice by a [batch, seq] mask (objectives.causal_lm.MASK_SLICING):
    keeping the union of the rows' positions and masking the logits picks the very same rows."""
    model = load_model("tiny-llama", seed=1).model
    g = torch.Generator().manual_seed(5)
    rows = []
    for n, answer in ((30, 3), (12, 5), (25, 1)):  # each row's answer at its own positions
        ids = torch.randint(7, 200, (n,), generator=g).tolist()
        rows.append(Example(input_ids=ids, labels=[-100] * (n - answer) + ids[n - answer :]))
    batch = collate_packed(rows) if packed else collate_padded(rows, pad_id=0)
    objective = CausalLMObjective(model, fused_loss=False)
    assert objective.sliced_logits
    masked = objective.forward_supervised(model, batch)
    monkeypatch.setattr(causal_lm, "MASK_SLICING", False)
    listed = objective.forward_supervised(model, batch)
    assert masked.logits.shape == (9, model.config.vocab_size)
    assert torch.equal(listed.targets, masked.targets) and torch.allclose(listed.logits, masked.logits, atol=1e-6)
