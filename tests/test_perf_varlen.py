"""Per-example attention on packed rows: same numbers as the block-diagonal mask, no leakage."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tunelab.data import Example, collate_packed
from tunelab.models import load_model
from tunelab.train.objectives.causal_lm import CausalLMObjective
from tunelab.train.varlen_attention import segment_bounds, supports_varlen


def examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(7, 200, (n,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[-100] * (n // 2) + ids[n // 2 :]))
    return out


def lora_model():
    model = load_model("tiny-llama", seed=1).model
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


def loss_and_grads(objective, model, batch):
    model.zero_grad()
    loss, _ = objective(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_segment_bounds_read_restarting_positions():
    batch = collate_packed(examples([3, 5, 2]))
    assert segment_bounds(batch["position_ids"]).tolist() == [0, 3, 8, 10]


def test_varlen_equals_block_diagonal_mask_in_loss_and_gradients():
    model = lora_model()
    batch = collate_packed(examples([9, 140, 4, 12]))  # short (math kernel) and long (flash) examples
    varlen, masked = CausalLMObjective(model), CausalLMObjective(model, varlen=False)
    assert varlen.varlen and not masked.varlen
    loss_a, grads_a = loss_and_grads(varlen, model, batch)
    loss_b, grads_b = loss_and_grads(masked, model, batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5) for k in grads_a)
    # the model's own attention setting is back after the call
    assert model.get_base_model().config._attn_implementation != "tunelab_varlen_sdpa"


def test_no_attention_across_packed_examples():
    model = lora_model().eval()
    objective = CausalLMObjective(model)
    first, second = examples([10, 10], seed=0), examples([10, 10], seed=5)
    # same second example, different first one: the second one's loss must not change
    a = collate_packed([first[0], first[1]])
    b = collate_packed([second[0], first[1]])
    only_second = {k: v for k, v in a.items()}
    mask_first = a["labels"].clone()
    mask_first[0, :10] = -100
    with torch.no_grad():
        loss_a, _ = objective(model, {**only_second, "labels": mask_first})
        mask_b = b["labels"].clone()
        mask_b[0, :10] = -100
        loss_b, _ = objective(model, {**b, "labels": mask_b})
    assert torch.allclose(loss_a, loss_b, atol=1e-6)


def test_models_without_attention_interface_keep_the_mask_path():
    bloom = load_model("tiny-bloom").model
    assert not supports_varlen(bloom)
    assert not CausalLMObjective(bloom).varlen
    assert supports_varlen(lora_model())


def test_activation_checkpointing_recomputes_the_same_per_example_attention(tmp_path):
    """Checkpointing re-runs each block's forward inside backward; the trainer keeps the packed
    attention mode over the backward pass so the recomputation matches (it used to fall back to
    whole-row attention and fail torch's saved-tensor check)."""
    from tests.train_helpers import train, write_chat_data

    data = write_chat_data(tmp_path / "d.jsonl")
    recipe = (f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 4, dropout: 0.0}}}}\n"
              "train: {max_steps: 3, batch_size: 8, precision: fp32}\n")
    (tmp_path / "plain").mkdir()
    (tmp_path / "checkpointed").mkdir()
    plain = train(tmp_path / "plain", recipe)
    checkpointed = train(tmp_path / "checkpointed", recipe, "train.gradient_checkpointing=true")
    plain_losses = [r["loss"] for r in plain.history if r.get("type") == "train"]
    checkpointed_losses = [r["loss"] for r in checkpointed.history if r.get("type") == "train"]
    assert len(plain_losses) == 3
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)


def reference_attention(query, key, value, bounds, prefix_of):
    """Each segment attended on its own in fp64 math: causal, after its prefix's keys when it has one."""
    parts = []
    for segment, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        ps, pe = (bounds[prefix_of[segment]], bounds[prefix_of[segment] + 1]) if prefix_of[segment] >= 0 else (s, s)
        k = torch.cat([key[:, :, ps:pe], key[:, :, s:e]], dim=2).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        v = torch.cat([value[:, :, ps:pe], value[:, :, s:e]], dim=2).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = query[:, :, s:e] @ k.transpose(-1, -2) / query.shape[-1] ** 0.5
        sees = torch.ones(e - s, pe - ps + e - s, dtype=torch.bool).tril(diagonal=pe - ps)
        parts.append(scores.masked_fill(~sees, float("-inf")).softmax(-1) @ v)
    return torch.cat(parts, dim=2).transpose(1, 2)


@pytest.mark.parametrize("lengths,prefix_of", [
    ([26, 9, 40, 3, 63], [-1, 0, 0, 0, 0]),  # a shared prefix and its suffixes: one padded call
    ([30, 140, 5, 12, 100], [-1, 0, -1, -1, 0]),  # suffixes past MATH_BELOW with their prefix, and whole examples
    ([200, 7], [-1, -1]),  # a long example first, then a short one
    ([20, 121, 9, 33, 20, 2], [-1, -1, -1, -1, -1, -1]),  # short segments of unlike lengths: padded groups, outputs reordered
])
def test_padded_short_segments_equal_each_segment_alone(lengths, prefix_of):
    """The short segments' single padded call and the long ones' own calls give, in row order,
    each segment's attention alone: outputs and gradients."""
    from tunelab.train.varlen_attention import row_layout, varlen_sdpa

    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, bounds[-1], 16, generator=g, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))
    module = torch.nn.Module().eval()
    out, _ = varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=torch.tensor(bounds), segment_prefix=torch.tensor(prefix_of))
    expected = reference_attention(q, k, v, bounds, prefix_of)
    assert torch.allclose(out, expected, atol=1e-10)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), upstream)
    want = torch.autograd.grad(expected, (q, k, v), upstream)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want))
    layout = row_layout(bounds, prefix_of, torch.device("cpu"))
    assert sum(group.segments for group in layout.groups) == sum(1 for n, p in zip(lengths, prefix_of) if n + (lengths[p] if p >= 0 else 0) < 128)


@pytest.mark.parametrize("lengths,prefix_of", [
    ([26, 9, 40, 3, 20], [-1, 0, 0, 0, 0]),  # padding longer than every real segment
    ([30, 140, 5], [-1, 0, -1]),  # a long suffix too: outputs reordered
])
def test_a_padding_segment_is_not_attended(lengths, prefix_of):
    """A row's trailing padding segment (``pad_packed_row``) leaves every real token's output and
    gradient as in the unpadded row, outputs zeros itself, and does not widen the padded batch."""
    from tunelab.data.collate import PADDING_SEGMENT
    from tunelab.train.varlen_attention import row_layout, varlen_sdpa

    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    padded_bounds, padded_prefix = [*bounds, bounds[-1] + 60], [*prefix_of, PADDING_SEGMENT]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, padded_bounds[-1], 16, generator=g, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))
    module = torch.nn.Module().eval()
    real = bounds[-1]
    padded, _ = varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=torch.tensor(padded_bounds), segment_prefix=torch.tensor(padded_prefix))
    alone, _ = varlen_sdpa(module, q[:, :, :real], k[:, :, :real], v[:, :, :real], None,
                           cu_seq_lens_q=torch.tensor(bounds), segment_prefix=torch.tensor(prefix_of))
    assert torch.equal(padded[:, :real], alone) and not padded[:, real:].any()
    upstream = torch.randn(padded.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(padded, (q, k, v), upstream)
    want = torch.autograd.grad(alone, (q, k, v), upstream[:, :real])
    assert all(torch.allclose(a[:, :, :real], b[:, :, :real], atol=1e-12) and not a[:, :, real:].any() for a, b in zip(got, want))
    with_padding, without = row_layout(padded_bounds, padded_prefix, torch.device("cpu")), row_layout(bounds, prefix_of, torch.device("cpu"))
    shapes = [[(group.segments, group.longest, group.widest) for group in layout.groups] for layout in (with_padding, without)]
    assert shapes[0] == shapes[1] and (with_padding.skipped, without.skipped) == (60, 0)


def test_a_bidirectional_tower_inside_the_model_keeps_plain_attention():
    """A VLM's vision encoder reaches varlen_sdpa through the shared config with the text row's
    keywords; its image patches attend to each other both ways, as plain sdpa does."""
    import torch.nn.functional as F

    from tunelab.train.varlen_attention import varlen_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 17, 8, generator=g) for _ in range(3))  # 2 images, 17 patches each
    tower = torch.nn.Module().eval()
    tower.is_causal = False
    out, _ = varlen_sdpa(tower, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 30, 95]))
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2), atol=1e-6)


def test_segments_of_unlike_lengths_get_their_own_padded_call_when_that_costs_less():
    """One call pads every segment to the longest; another call costs ``CALL_COST_PAIRS``."""
    import itertools
    import random

    from tunelab.train.varlen_attention import CALL_COST_PAIRS, group_segments

    def cost(groups, shapes):
        return sum(CALL_COST_PAIRS + len(g) * max(shapes[i][0] for i in g) * max(shapes[i][1] for i in g) for g in groups)

    chat = [(20, 20)] * 7 + [(121, 121)]  # seven short examples and a long one: 7.8 vs 2.4 ms on SmolLM2
    assert sorted(map(sorted, group_segments(chat))) == [list(range(7)), [7]]
    assert group_segments([(20, 46)] * 8) == [list(range(8))]  # alike: one call
    rng = random.Random(0)
    for _ in range(50):  # the least cost over every split of the key-sorted segments into runs
        shapes = [(q, q + rng.choice([0, 26])) for q in (rng.randint(1, 127) for _ in range(rng.randint(1, 8)))]
        order = sorted(range(len(shapes)), key=lambda i: (shapes[i][1], shapes[i][0]))
        splits = (
            [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))]
            for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r)
        )
        chosen = group_segments(shapes)
        assert sorted(i for g in chosen for i in g) == list(range(len(shapes)))
        assert cost(chosen, shapes) == min(cost(s, shapes) for s in splits)
