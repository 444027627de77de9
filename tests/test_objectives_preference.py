"""DPO: preference rows in every shape people have, the losses against a hand computation from
separate forward passes, the reference model, and training that widens the held-out margin."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.train_helpers import recipe_for, train
from tunelab.data import (
    IGNORE_INDEX,
    build_datasets,
    collate_packed,
    collate_padded,
    pad_packed_row,
    preference_sequences,
)
from tunelab.data.config import DataConfig
from tunelab.errors import UserError
from tunelab.models import load_model
from tunelab.train.prepare import prepare

RECIPE = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.2{data_extra}}}\nmethod: {{{method}}}\n"
    "objective: {{name: dpo{objective}}}\ntrain: {{epochs: {epochs}, batch_size: 8, lr: 0.005, precision: fp32, eval_every: 12}}\n"
)


def write_pairs(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Prompts that say which of two answers is preferred: a rule a tiny model can learn and that
    generalises to held-out prompts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = ("yes", "no") if rng.random() < 0.5 else ("no", "yes")
        rows.append({"prompt": f"#{i} pick {good}", "chosen": good.upper(), "rejected": bad.upper()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_text(data: Path, *, method: str = "lora: {r: 8}", objective: str = "", epochs: int = 1, data_extra: str = "") -> str:
    return RECIPE.format(data=data, method=method, objective=objective, epochs=epochs, data_extra=data_extra)


SHAPES = {
    "trl strings": {"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No."},
    "trl conversational": {
        "prompt": [{"role": "user", "content": "Is water wet?"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    "trl implicit prompt": {
        "chosen": [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "No."}],
    },
    "openai": {
        "input": {"messages": [{"role": "user", "content": "Is water wet?"}]},
        "preferred_output": [{"role": "assistant", "content": "Yes."}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    },
}


def _examples(tmp_path: Path, rows: list[dict], **data) -> list:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_model("tiny-llama").tokenizer
    return build_datasets(DataConfig(train=str(path), val_fraction=0.0, dedup=False, **data), tokenizer, shape="preference", seed=0).train


def test_every_preference_row_shape_gives_the_same_pair(tmp_path):
    encoded = {name: _examples(tmp_path, [row] * 2)[0] for name, row in SHAPES.items()}
    first = encoded["trl strings"]
    for name, example in encoded.items():
        assert (example.group, example.group_labels) == (first.group, first.group_labels), name
    chosen_ids, rejected_ids = first.group
    chosen_labels, rejected_labels = first.group_labels
    prompt = next(i for i, label in enumerate(chosen_labels) if label != IGNORE_INDEX)
    assert chosen_ids[:prompt] == rejected_ids[:prompt] and all(label == IGNORE_INDEX for label in rejected_labels[:prompt])
    assert chosen_ids != rejected_ids  # the answers differ, and only they are learned
    tokenizer = load_model("tiny-llama").tokenizer
    assert "Yes." in tokenizer.decode([t for t in chosen_labels if t != IGNORE_INDEX])
    assert "No." in tokenizer.decode([t for t in rejected_labels if t != IGNORE_INDEX])


def test_a_prompt_template_builds_the_prompt_from_row_fields(tmp_path):
    rows = [{"article": "The cat sat.", "good": "A cat sat.", "bad": "A dog sat."}] * 2
    example = _examples(tmp_path, rows, prompt_template="Summarize: {article}", columns={"good": "chosen", "bad": "rejected"})[0]
    tokenizer = load_model("tiny-llama").tokenizer
    assert "Summarize: The cat sat." in tokenizer.decode(example.group[0])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"chosen": "a", "rejected": "b"}, "has no 'prompt'"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant messages only"),
        ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "share no prompt"),
        ({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}, "non-empty list"),
    ],
)
def test_bad_preference_rows_are_named_by_line(tmp_path, row, message):
    with pytest.raises(UserError, match=message) as caught:
        _examples(tmp_path, [row])
    assert "rows.jsonl:1" in str(caught.value)


def test_preference_rows_with_an_sft_objective_and_sft_rows_with_dpo_say_what_to_change(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=20)
    with pytest.raises(UserError, match="objective: {name: dpo}"):
        prepare(recipe_for(tmp_path, recipe_text(pairs).replace("objective: {name: dpo}\n", "")))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}) + "\n" for i in range(20)))
    with pytest.raises(UserError, match="objective dpo trains on preference rows"):
        prepare(recipe_for(tmp_path, recipe_text(chat)))


def _sequence_logp(model: torch.nn.Module, ids: list[int], labels: list[int]) -> torch.Tensor:
    """One sequence alone, the plain way: the summed log-probability of its supervised tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    return -F.cross_entropy(logits[keep], targets[keep], reduction="sum")


def _hand_loss(kind: str, beta: float, policy: list[torch.Tensor], reference: list[torch.Tensor], lengths: list[int], smoothing: float = 0.0) -> float:
    total = 0.0
    for i in range(0, len(policy), 2):
        h = float((policy[i] - reference[i]) - (policy[i + 1] - reference[i + 1]))
        if kind == "sigmoid":
            total += -(1 - smoothing) * math.log(torch.sigmoid(torch.tensor(beta * h)).item()) - smoothing * math.log(torch.sigmoid(torch.tensor(-beta * h)).item())
        elif kind == "ipo":
            avg = float((policy[i] - reference[i]) / lengths[i] - (policy[i + 1] - reference[i + 1]) / lengths[i + 1])
            total += (avg - 1 / (2 * beta)) ** 2
        else:
            total += max(0.0, 1 - beta * h)
    return total


@pytest.mark.parametrize(("kind", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_the_losses_equal_a_hand_computation_from_each_sequence_alone(tmp_path, kind, smoothing):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=20)
    objective = f", beta: 0.3, loss: {kind}, label_smoothing: {smoothing}"
    prepared = prepare(recipe_for(tmp_path, recipe_text(pairs, objective=objective)))
    model = prepared.model.eval()  # no dropout: the two computations must see the same model
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference (LoRA's B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    examples = prepared.data.train[:4]
    sequences = preference_sequences(examples)
    policy = [_sequence_logp(model, s.input_ids, s.labels) for s in sequences]
    with model.disable_adapter():
        reference = [_sequence_logp(model, s.input_ids, s.labels) for s in sequences]
    lengths = [sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in sequences]
    expected = _hand_loss(kind, 0.3, policy, reference, lengths, smoothing)
    assert abs(expected) > 1e-3
    packed_loss, stats = prepared.objective(model, prepared.collate(examples))
    padded_loss, _ = prepared.objective(model, collate_padded(sequences, 0)) if prepared.objective.collation == "packed" else (packed_loss, None)
    assert "attention_mask" not in prepared.collate(examples)  # the tiny Llama packs pairs into one row
    assert packed_loss.item() == pytest.approx(expected, rel=1e-4)
    assert padded_loss.item() == pytest.approx(expected, rel=1e-4)
    assert stats["pairs"] == 4 and prepared.objective.units(prepared.collate(examples)) == 4
    assert stats["reward_correct"] == sum(float(policy[i] - reference[i]) > float(policy[i + 1] - reference[i + 1]) for i in range(0, 8, 2))


def test_a_shared_prefix_and_the_sft_term_keep_the_loss_exact(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    system = "You are a careful assistant who picks the answer the prompt asks for. "
    pairs.write_text("".join(json.dumps({"prompt": f"{system}#{i} pick yes", "chosen": "YES", "rejected": "NO"}) + "\n" for i in range(20)))
    prepared = prepare(recipe_for(tmp_path, recipe_text(pairs, objective=", beta: 0.3, sft_weight: 0.5")))
    model = prepared.model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    examples = prepared.data.train[:3]
    batch = prepared.collate(examples)
    assert batch["segment_prefix"].tolist() == [-1, 0, 0, -1, 3, 3, -1, 6, 6]  # each pair's prompt is held once
    sequences = preference_sequences(examples)
    policy = [_sequence_logp(model, s.input_ids, s.labels) for s in sequences]
    with model.disable_adapter():
        reference = [_sequence_logp(model, s.input_ids, s.labels) for s in sequences]
    lengths = [sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in sequences]
    expected = _hand_loss("sigmoid", 0.3, policy, reference, lengths) + sum(0.5 * -float(policy[i]) / lengths[i] for i in range(0, 6, 2))
    loss, _ = prepared.objective(model, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # unshared; shared batch-wide; each padded to a multiple of 64 tokens (the padding is no pair)
    layouts = (collate_packed(sequences), collate_packed(sequences, share_prefix=True), pad_packed_row(batch, 64), pad_packed_row(collate_packed(sequences), 64))
    for layout in layouts:
        assert prepared.objective(model, layout)[0].item() == pytest.approx(expected, rel=1e-4)
        assert prepared.objective.units(layout) == 3


def test_full_fine_tuning_loads_the_reference_once_and_starts_at_log_two(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=20)
    prepared = prepare(recipe_for(tmp_path, recipe_text(pairs, method="")))
    assert prepared.objective.reference is not None and prepared.objective.reference is not prepared.model
    assert not any(p.requires_grad for p in prepared.objective.reference.parameters())
    loss, stats = prepared.objective(prepared.model, prepared.collate(prepared.data.train[:4]))
    assert loss.item() == pytest.approx(4 * math.log(2), abs=1e-5)
    assert stats["margin_sum"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("method", ["lora: {r: 8}", ""])
def test_dpo_widens_the_margin_on_held_out_pairs(tmp_path, method):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    summary = train(tmp_path, recipe_text(pairs, method=method, objective=", beta: 0.5", epochs=3))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    before, after = evals[0], evals[-1]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-5) and before["eval_reward_margin"] == pytest.approx(0, abs=1e-6)
    assert after["eval_reward_margin"] > 0.3 and after["eval_reward_accuracy"] >= 0.9 and after["eval_loss"] < 0.6
    assert (Path(summary.run_dir) / "final").is_dir()


def test_held_out_pairs_are_a_two_option_choice_whose_answer_is_the_chosen_one():
    from tunelab.data.readers import Row
    from tunelab.evaluate.items import correct_option, options

    row = Row({"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No."}, "pairs.jsonl:1")
    opts = options(row, None, "choices")
    assert opts == ["Yes.", "No."] and correct_option(row, opts, "answer") == 0
    with pytest.raises(UserError, match="no field 'answer'"):  # shared options are not the pair's
        correct_option(row, ["no", "yes"], "answer")


def test_held_out_pairs_never_share_a_prompt_with_training_pairs(tmp_path):
    rows = [{"prompt": f"question {q}", "chosen": f"good {k}", "rejected": f"bad {k}"} for q in range(20) for k in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_datasets(DataConfig(train=str(path), val_fraction=0.2), load_model("tiny-llama").tokenizer, shape="preference", seed=1)
    prompt = lambda example: tuple(example.group[0][: next(i for i, t in enumerate(example.group_labels[0]) if t != IGNORE_INDEX)])  # noqa: E731
    train_prompts, val_prompts = {prompt(e) for e in data.train}, {prompt(e) for e in data.validation}
    assert len(data.validation) == 12 and len(val_prompts) == 4 and not train_prompts & val_prompts
