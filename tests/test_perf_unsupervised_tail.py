"""Packed rows that end each example at its last supervised token: the tokens after it (a chat
template's newline after the end-of-turn token) predict nothing that carries loss, so the loss and
gradients are those of the full examples, with less work."""

import pytest
import torch

from tests.test_perf_shared_prefix import chat_like, loss_and_grads
from tests.test_perf_varlen import lora_model
from tunelab.data import Example, batch_tokens, collate_packed
from tunelab.data.collate import pad_packed_row, supervised_end
from tunelab.train.objectives.causal_lm import CausalLMObjective


def with_tails(examples: list[Example], tails: list[int]) -> list[Example]:
    """``examples`` followed by ``tails[i]`` unsupervised tokens each (an end-of-turn newline, a footer)."""
    return [Example(input_ids=e.input_ids + [5] * t, labels=e.labels + [-100] * t, weight=e.weight) for e, t in zip(examples, tails)]


def test_each_example_ends_at_its_last_supervised_token():
    examples = with_tails(chat_like([9, 14, 10]), [1, 0, 3])
    assert [supervised_end(e) for e in examples] == [len(e.input_ids) - t for e, t in zip(examples, [1, 0, 3])]
    unsupervised = Example(input_ids=[1, 2, 3], labels=[-100] * 3)
    assert supervised_end(unsupervised) == 3  # nothing to end at: kept whole
    for share in (False, True):
        full, trimmed = collate_packed(examples, share), collate_packed(examples, share, drop_unsupervised_tail=True)
        assert trimmed["input_ids"].shape[1] == full["input_ids"].shape[1] - 4
        assert trimmed["labels"][trimmed["labels"] != -100].tolist() == full["labels"][full["labels"] != -100].tolist()
        # throughput still counts every token the examples hold, padded or not
        assert batch_tokens(trimmed) == batch_tokens(full) == sum(len(e.input_ids) for e in examples)
        assert batch_tokens(pad_packed_row(trimmed, 16)) == batch_tokens(full)
    untouched = chat_like([9, 14])  # no tails: the same row as before
    assert collate_packed(untouched, drop_unsupervised_tail=True)["input_ids"].tolist() == collate_packed(untouched)["input_ids"].tolist()
    assert "example_tokens" not in collate_packed(untouched, drop_unsupervised_tail=True)


@pytest.mark.parametrize("fused_loss", [True, False])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_dropping_tails_keeps_the_loss_and_gradients(fused_loss, share_prefix):
    model = lora_model()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: A's gradient would be zero on both sides
            torch.nn.init.normal_(param, std=0.05)
    examples = with_tails(chat_like([9, 30, 4, 17], weights=[1.0, 2.0, 0.5, 1.0]), [2, 1, 0, 5])
    objective = CausalLMObjective(model, fused_loss=fused_loss, shared_prefix=True)
    assert objective.drops_unsupervised_tail
    loss_a, stats_a, grads_a = loss_and_grads(objective, model, collate_packed(examples, share_prefix))
    loss_b, stats_b, grads_b = loss_and_grads(objective, model, collate_packed(examples, share_prefix, drop_unsupervised_tail=True))
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert stats_a["tokens"] == stats_b["tokens"] and stats_a["correct"] == stats_b["correct"]
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5) for k in grads_a)
    assert any(g.abs().sum() > 0 for k, g in grads_a.items() if "lora_A" in k)


def test_training_drops_the_chat_templates_tail(tmp_path):
    """The trainer's causal-LM rows leave out what follows each answer; a teacher cache's objective,
    which keys examples by their full tokens, keeps them."""
    from tests.train_helpers import recipe_for, write_chat_data
    from tunelab.train.objectives.distill import LogitDistillation
    from tunelab.train.prepare import prepare

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    recipe = (f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 4, dropout: 0.0}}}}\n"
              "train: {epochs: 1, batch_size: 8, precision: fp32}\n")
    prepared = prepare(recipe_for(tmp_path, recipe))
    examples = prepared.data.train[:8]
    tails = [len(e.input_ids) - supervised_end(e) for e in examples]
    assert sum(tails) > 0  # the tiny model's ChatML template ends each turn with a newline
    row = prepared.collate(examples)
    assert row["input_ids"].shape[1] == collate_packed(examples, share_prefix=True)["input_ids"].shape[1] - sum(tails)
    assert batch_tokens(row) == sum(len(e.input_ids) for e in examples)
    assert not getattr(LogitDistillation, "drops_unsupervised_tail", False)
