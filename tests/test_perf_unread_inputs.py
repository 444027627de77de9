"""Packed rows without the input tokens no supervised target reads: each example's tail after its
last supervised token (a chat template's newline after the end-of-turn token) and, but for the
row's last example, that token itself (its label moves to the next segment's free first slot).
The loss and gradients are those of the full examples, with less work."""

import pytest
import torch

from tests.test_perf_shared_prefix import PREFIX, chat_like, loss_and_grads
from tests.test_perf_varlen import lora_model
from tunelab.data import Example, batch_tokens, collate_packed
from tunelab.data.collate import pad_packed_row, supervised_end
from tunelab.train.objectives.causal_lm import CausalLMObjective


def with_tails(examples: list[Example], tails: list[int]) -> list[Example]:
    """``examples`` followed by ``tails[i]`` unsupervised tokens each (an end-of-turn newline, a footer)."""
    return [Example(input_ids=e.input_ids + [5] * t, labels=e.labels + [-100] * t, weight=e.weight) for e, t in zip(examples, tails)]


def targets(batch: dict[str, torch.Tensor]) -> list[int]:
    labels = batch["labels"][0]
    return labels[labels != -100].tolist()


def test_a_row_leaves_out_what_no_target_reads():
    examples = with_tails(chat_like([9, 14, 10]), [1, 0, 3])
    assert [supervised_end(e) for e in examples] == [len(e.input_ids) - t for e, t in zip(examples, [1, 0, 3])]
    assert supervised_end(Example(input_ids=[1, 2, 3], labels=[-100] * 3)) == 3  # nothing supervised: kept whole
    for share in (False, True):
        full, trimmed = collate_packed(examples, share), collate_packed(examples, share, drop_unread_inputs=True)
        # the tails (4 tokens) and the first two examples' last supervised inputs
        assert trimmed["input_ids"].shape[1] == full["input_ids"].shape[1] - 4 - 2
        assert targets(trimmed) == targets(full)  # every target, in the same order
        # throughput still counts every token the examples hold, padded or not
        assert batch_tokens(trimmed) == batch_tokens(full) == sum(len(e.input_ids) for e in examples)
        assert batch_tokens(pad_packed_row(trimmed, 16)) == batch_tokens(full)
    # the moved label sits in the next example's first slot: what the previous position predicts
    trimmed = collate_packed(examples, drop_unread_inputs=True)
    second_start = len(examples[0].input_ids) - 1 - 1
    assert trimmed["position_ids"][0, second_start] == 0
    assert trimmed["labels"][0, second_start] == examples[0].labels[-2]
    assert trimmed["input_ids"][0, second_start - 1] == examples[0].input_ids[-3]


def test_a_segment_keeps_a_token_and_the_last_example_keeps_its_own():
    one = Example(input_ids=PREFIX + [40, 41], labels=[-100] * len(PREFIX) + [-100, 41])
    single = Example(input_ids=PREFIX + [42], labels=[-100] * len(PREFIX) + [42])  # a one-token suffix, supervised
    row = collate_packed([one, single, one], share_prefix=True, drop_unread_inputs=True)
    # the prefix stops a token short so that `single` keeps one of its own; 41 and 42 moved, the last example whole
    assert row["segment_bounds"].diff().tolist() == [len(PREFIX) - 1, 2, 1, 3]
    assert targets(row) == [41, 42, 41]
    two = Example(input_ids=[7, 42], labels=[-100, 42])
    assert collate_packed([two, two], drop_unread_inputs=True)["input_ids"][0].tolist() == [7, 7, 42]  # a token each, at least
    alone = collate_packed([one], drop_unread_inputs=True)
    assert alone["input_ids"][0].tolist() == one.input_ids


@pytest.mark.parametrize("fused_loss", [True, False])
@pytest.mark.parametrize("layout", [{}, {"share_prefix": True}, {"share_prefix": True, "group_size": 2}])
def test_the_loss_and_gradients_are_the_full_examples(fused_loss, layout):
    model = lora_model()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: A's gradient would be zero on both sides
            torch.nn.init.normal_(param, std=0.05)
    examples = with_tails(chat_like([9, 30, 4, 17], weights=[1.0, 2.0, 0.5, 3.0]), [2, 1, 0, 5])
    objective = CausalLMObjective(model, fused_loss=fused_loss, shared_prefix=True)
    assert objective.drops_unread_inputs
    loss_a, stats_a, grads_a = loss_and_grads(objective, model, collate_packed(examples, **layout))
    trimmed = pad_packed_row(collate_packed(examples, drop_unread_inputs=True, **layout), 16)
    loss_b, stats_b, grads_b = loss_and_grads(objective, model, trimmed)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert stats_a["tokens"] == stats_b["tokens"] and stats_a["correct"] == stats_b["correct"]
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5) for k in grads_a)
    assert any(g.abs().sum() > 0 for k, g in grads_a.items() if "lora_A" in k)


def test_training_rows_leave_out_the_unread_inputs(tmp_path):
    """The trainer's causal-LM rows leave them out; a teacher cache's objective, which keys examples
    by their full tokens, keeps them."""
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
    assert row["input_ids"].shape[1] == collate_packed(examples, share_prefix=True)["input_ids"].shape[1] - sum(tails) - 7
    assert batch_tokens(row) == sum(len(e.input_ids) for e in examples)
    assert not getattr(LogitDistillation, "drops_unread_inputs", False)
