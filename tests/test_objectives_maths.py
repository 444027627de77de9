"""The objectives' losses equal their textbook definitions, computed directly."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from tunelab.data import Example
from tunelab.data.collate_heads import collate_head_batch
from tunelab.data.masking import MaskingCollate
from tunelab.errors import UserError
from tunelab.methods.pooling import pool
from tunelab.train.task_mix import TaskMixConfig, TaskMixSampler, task_shares
from tunelab.train.objectives.losses import (
    class_weight_vector,
    hardest_negatives,
    info_nce,
    triplet_margin,
    weighted_cross_entropy,
)
from tunelab.train.objectives.retrieval import retrieval_metrics

torch.manual_seed(0)
LOGITS = torch.randn(6, 3)
TARGETS = torch.tensor([0, 1, 2, 2, 1, 0])


def test_focal_with_gamma_zero_is_cross_entropy():
    assert torch.allclose(weighted_cross_entropy(LOGITS, TARGETS), F.cross_entropy(LOGITS, TARGETS, reduction="none"))


def test_focal_term_scales_each_example_by_one_minus_p_target_to_the_gamma():
    p = LOGITS.softmax(-1)[torch.arange(6), TARGETS]
    expected = -((1 - p) ** 2) * p.log()
    assert torch.allclose(weighted_cross_entropy(LOGITS, TARGETS, focal_gamma=2.0), expected, atol=1e-6)


def test_class_weights_and_label_smoothing_match_the_definition():
    w = torch.tensor([1.0, 2.0, 0.5])
    eps = 0.1
    logp = LOGITS.log_softmax(-1)
    smoothed = (1 - eps) * F.one_hot(TARGETS, 3) + eps / 3
    expected = -(smoothed * logp * w).sum(-1)  # torch weights each class term by its class weight
    got = weighted_cross_entropy(LOGITS, TARGETS, class_weights=w, label_smoothing=eps)
    assert torch.allclose(got, expected, atol=1e-6)


def test_auto_class_weights_are_inverse_frequency():
    weights = class_weight_vector("auto", ["a", "b"], Counter({0: 90, 1: 10}))
    assert torch.allclose(weights, torch.tensor([100 / (2 * 90), 100 / (2 * 10)]))
    assert torch.allclose(class_weight_vector({"b": 3.0}, ["a", "b"], Counter()), torch.tensor([1.0, 3.0]))
    with pytest.raises(UserError, match="never occurs"):
        class_weight_vector("auto", ["a", "b"], Counter({0: 5}))
    with pytest.raises(UserError, match="unknown labels: c"):
        class_weight_vector({"c": 2.0}, ["a", "b"], Counter())


def test_info_nce_is_cross_entropy_over_the_similarity_matrix():
    a, p, n = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    candidates = torch.cat([p, n])
    expected = torch.stack([-(a[i] @ candidates.T / 0.05).log_softmax(-1)[i] for i in range(4)])
    assert torch.allclose(info_nce(a, candidates, 0.05), expected, atol=1e-5)


def test_triplet_margin_on_cosine_distance_and_batch_hard_negatives():
    a, p, n = (torch.randn(5, 8) for _ in range(3))
    d = lambda x, y: 1 - F.cosine_similarity(x, y, dim=-1)
    assert torch.allclose(triplet_margin(a, p, n, 0.3), (d(a, p) - d(a, n) + 0.3).clamp(min=0), atol=1e-6)
    hard = hardest_negatives(a, p)
    sims = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T
    for i in range(5):
        others = [j for j in range(5) if j != i]
        assert torch.equal(hard[i], p[max(others, key=lambda j: sims[i, j])])


def test_pooling_modes_ignore_padding():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(pool(hidden, mask, "last")[0], hidden[0, 1])
    assert torch.equal(pool(hidden, mask, "cls")[1], hidden[1, 0])


def test_retrieval_recall_and_mrr():
    q = torch.eye(3)
    docs = torch.tensor([[1.0, 0, 0], [0, 0.9, 0.5], [0, 1.0, 0.6]])  # query 1 prefers document 2 to its own
    metrics = retrieval_metrics(q, docs, ks=(1, 2))
    assert metrics["recall@1"] == pytest.approx(2 / 3) and metrics["recall@2"] == 1.0
    assert metrics["mrr"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_masking_is_reproducible_skips_specials_and_masks_about_the_rate():
    collate = MaskingCollate(pad_id=0, mask_id=1, vocab_size=50, special_ids=frozenset({0, 1, 2}), rate=0.15, seed=3)
    examples = [Example([2, *range(10, 40), 2], []) for _ in range(20)]
    first, again = collate(examples), collate(examples)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    chosen = first["labels"] != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # specials never chosen
    assert 0.10 < chosen.float().mean().item() * 32 / 30 < 0.20
    masked = first["input_ids"][chosen]
    assert 0.7 < (masked == 1).float().mean().item() < 0.9  # ~80% become [MASK]


def test_whole_word_masking_masks_words_together():
    collate = MaskingCollate(pad_id=0, mask_id=1, vocab_size=50, special_ids=frozenset({0, 1, 2}), rate=0.3, whole_word=True)
    words = [-1] + [i // 3 for i in range(30)] + [-1]
    labels = collate([Example([2, *range(10, 40), 2], [], word_ids=words) for _ in range(8)])["labels"]
    for row in labels:
        chosen = (row[1:-1] != -100).reshape(10, 3)
        assert all(w.all() or not w.any() for w in chosen[1:])  # ignore the at-least-one fallback word


def test_grouped_batches_mark_missing_negatives():
    batch = collate_head_batch([Example([5], [], group=[[5], [6, 7], None]), Example([8], [], group=[[8], [9], [4]])], pad_id=0)
    assert batch["input_ids"].shape == (6, 2)
    assert batch["group_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["weights"].tolist() == [1.0, 1.0]


def test_task_sampling_shares():
    sizes = [900, 100]
    assert task_shares(sizes, TaskMixConfig(strategy="size")) == pytest.approx([0.9, 0.1])
    assert task_shares(sizes, TaskMixConfig(strategy="uniform")) == pytest.approx([0.5, 0.5])
    t2 = task_shares(sizes, TaskMixConfig(strategy="temperature", temperature=2.0))
    assert t2 == pytest.approx([30 / 40, 10 / 40])  # sqrt(900) : sqrt(100)
    tasks = [0] * 90 + [1] * 10
    batches = TaskMixSampler(tasks, [0.5, 0.5], batch_size=5, seed=0).batches(epoch=0)
    assert len(batches) == 20 and sum(tasks[b[0]] == 1 for b in batches) == 10  # the small task cycles through its data
    assert all(len(b) == 5 and len({tasks[i] for i in b}) == 1 for b in batches)
