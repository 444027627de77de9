"""Packed rows that hold a batch's common prompt prefix once: the same loss and gradients as each
example in full, with less work."""

import json

import pytest
import torch

from tests.test_perf_varlen import lora_model
from tunelab.data import Example, batch_tokens, collate_packed
from tunelab.data.collate import MIN_SHARED_PREFIX, shared_prefix_length
from tunelab.models import load_model
from tunelab.train.objectives.causal_lm import CausalLMObjective
from tunelab.train.varlen_attention import segment_bounds

PREFIX = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]


def chat_like(lengths: list[int], seed: int = 0, prompt: int = 6, weights: list[float] | None = None) -> list[Example]:
    """Examples that start with ``PREFIX``, then ``prompt`` own unsupervised tokens, then a supervised answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        own = torch.randint(30, 200, (n,), generator=g).tolist()
        ids = PREFIX + own
        labels = [-100] * (len(PREFIX) + min(prompt, n)) + own[prompt:]
        out.append(Example(input_ids=ids, labels=labels, weight=1.0 if weights is None else weights[i]))
    return out


def loss_and_grads(objective, model, batch):
    model.zero_grad()
    loss, stats = objective(model, batch)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_shared_prefix_stops_before_the_first_supervised_label():
    examples = chat_like([9, 14, 10])
    assert shared_prefix_length(examples) == len(PREFIX)
    # an example supervising its third token shortens what can be shared below the minimum
    early = Example(input_ids=PREFIX + [40, 41], labels=[-100, -100, 13, *PREFIX[3:], 40, 41])
    assert shared_prefix_length([*examples, early]) == 0
    # one example alone shares nothing
    assert shared_prefix_length(examples[:1]) == 0
    # every example keeps a token of its own
    short = Example(input_ids=PREFIX[:MIN_SHARED_PREFIX], labels=[-100] * MIN_SHARED_PREFIX)
    assert shared_prefix_length([short, *examples]) == 0  # it would leave at most MIN - 1 to share


def test_shared_layout_holds_the_prefix_once():
    examples = chat_like([9, 14, 10])
    plain, shared = collate_packed(examples), collate_packed(examples, share_prefix=True)
    p = len(PREFIX)
    assert shared["input_ids"].shape[1] == plain["input_ids"].shape[1] - 2 * p
    assert shared["segment_prefix"].tolist() == [-1, 0, 0, 0]
    assert batch_tokens(shared) == batch_tokens(plain) == sum(len(e.input_ids) for e in examples)
    # the same supervised targets in the same order
    assert shared["labels"][shared["labels"] != -100].tolist() == plain["labels"][plain["labels"] != -100].tolist()
    # suffix positions continue from the prefix; segments are the prefix and each suffix
    assert shared["segment_bounds"].tolist() == [0, p, p + 9, p + 23, p + 33]
    assert "segment_bounds" not in collate_packed(chat_like([9]), share_prefix=True)
    assert segment_bounds(plain["position_ids"]).tolist() == [0, p + 9, 2 * p + 23, 3 * p + 33]


def test_prefix_groups_share_each_groups_own_prefix():
    first, second = chat_like([9, 14], seed=0), [Example([7] * len(PREFIX) + e.input_ids[len(PREFIX):], e.labels) for e in chat_like([10, 12], seed=1)]
    grouped = collate_packed([*first, *second], share_prefix=True, group_size=2)
    p = len(PREFIX)
    assert grouped["segment_prefix"].tolist() == [-1, 0, 0, -1, 3, 3]
    assert grouped["segment_bounds"].tolist() == [0, p, p + 9, p + 23, 2 * p + 23, 2 * p + 33, 2 * p + 45]
    assert "segment_bounds" not in collate_packed([*first, *second], share_prefix=True)  # nothing common to all four
    from tunelab.data.collate import example_index

    assert example_index(grouped)[0, [0, p, p + 9, p + 23, 2 * p + 23, 2 * p + 33]].tolist() == [-1, 0, 1, -1, 2, 3]


def test_prefix_groups_equal_full_examples_in_loss_and_gradients():
    model = lora_model()
    objective = CausalLMObjective(model, shared_prefix=True)
    first, second = chat_like([9, 14], seed=0), [Example([7] * len(PREFIX) + e.input_ids[len(PREFIX):], e.labels) for e in chat_like([10, 12], seed=1)]
    examples = [*first, *second]
    loss, _, grads = loss_and_grads(objective, model, collate_packed(examples))
    grouped_loss, _, grouped_grads = loss_and_grads(objective, model, collate_packed(examples, share_prefix=True, group_size=2))
    assert grouped_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert all(torch.allclose(grouped_grads[n], g, atol=1e-5) for n, g in grads.items())


@pytest.mark.parametrize("fused_loss", [True, False])
def test_shared_prefix_equals_full_examples_in_loss_and_gradients(fused_loss):
    model = lora_model()
    examples = chat_like([9, 30, 4, 17], weights=[1.0, 2.0, 0.5, 1.0])
    objective = CausalLMObjective(model, fused_loss=fused_loss, shared_prefix=True)
    assert objective.shared_prefix
    loss_a, stats_a, grads_a = loss_and_grads(objective, model, collate_packed(examples))
    loss_b, stats_b, grads_b = loss_and_grads(objective, model, collate_packed(examples, share_prefix=True))
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert stats_a["tokens"] == stats_b["tokens"] and stats_a["correct"] == stats_b["correct"]
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5) for k in grads_a)


def test_a_suffix_does_not_see_another_examples_suffix():
    model = lora_model().eval()
    objective = CausalLMObjective(model, shared_prefix=True)
    a, b = chat_like([10, 10], seed=0), chat_like([10, 10], seed=5)
    only_second = [Example(input_ids=e.input_ids, labels=[-100] * len(e.labels)) for e in (a[0], b[0])]
    with torch.no_grad():
        loss_a, _ = objective(model, collate_packed([only_second[0], a[1]], share_prefix=True))
        loss_b, _ = objective(model, collate_packed([only_second[1], a[1]], share_prefix=True))
    assert torch.allclose(loss_a, loss_b, atol=1e-6)


def test_models_without_per_example_attention_refuse_a_shared_batch():
    bloom = load_model("tiny-bloom").model
    objective = CausalLMObjective(bloom, shared_prefix=True)
    assert not objective.shared_prefix
    with pytest.raises(ValueError, match="shared prefix"):
        objective(bloom, collate_packed(chat_like([9, 10]), share_prefix=True))


def test_training_shares_the_prefix_and_counts_every_examples_tokens(tmp_path, monkeypatch):
    """The trainer's batches share the chat template's prefix; the tokens it reports are the
    examples' own, so tokens/s stays comparable with an unshared run."""
    from tests.train_helpers import recipe_for, train, write_chat_data
    from tunelab.train.prepare import prepare

    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    system = {"role": "system", "content": "Answer in one word."}
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({"messages": [system, *r["messages"]]}) + "\n" for r in rows))
    recipe = (f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 4, dropout: 0.0}}}}\n"
              "train: {epochs: 1, batch_size: 8, precision: fp32}\n")
    prepared = prepare(recipe_for(tmp_path, recipe))
    assert "segment_bounds" in prepared.collate(prepared.data.train[:8])
    shared = train(tmp_path, recipe)
    monkeypatch.setattr("tunelab.data.collate.shared_prefix_length", lambda examples: 0)
    assert "segment_bounds" not in prepared.collate(prepared.data.train[:8])
    unshared = train(tmp_path, recipe, f"output_dir={tmp_path / 'unshared'}")
    assert shared.tokens_seen == unshared.tokens_seen > 0
    assert shared.final_train_loss == pytest.approx(unshared.final_train_loss, rel=1e-4)
