"""Contrastive embeddings learn to retrieve, and save as plain transformers + sentence-transformers."""

import json
import random

import pytest
import torch

from tests.train_helpers import train
from tunelab.models import load_run
from tunelab.train.embedding_artifacts import load_embedder

WORDS = ["cat", "dog", "sun", "sea", "red", "big", "old", "new", "hot", "owl", "fig", "ice"]
CODES = {w: w[::-1].upper() + "Q" for w in WORDS}  # the positive renders each word differently


def write_pairs(path, n=240, negatives=False, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 2)
        row = {"anchor": " ".join(words), "positive": " ".join(CODES[w] for w in words)}
        if negatives:
            row["negative"] = " ".join(CODES[w] for w in rng.sample([w for w in WORDS if w not in words], 2))
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def embedding_run(tmp_path, loss, data, extra=""):
    return train(
        tmp_path,
        f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
        f"method: {{head: {{type: embedding{extra}}}}}\nobjective: {{name: {loss}}}\n"
        "train: {lr: 0.003, max_steps: 40, batch_size: 16, schedule: constant, precision: fp32}\n",
    )


@pytest.mark.parametrize(("loss", "negatives"), [("infonce", True), ("triplet", False)])
def test_contrastive_training_improves_retrieval(tmp_path, loss, negatives):
    summary = embedding_run(tmp_path, loss, write_pairs(tmp_path / "p.jsonl", negatives=negatives))
    before, after = summary.eval_before, summary.eval_after
    assert after["eval_mrr"] > before["eval_mrr"] + 0.15, (before, after)
    assert after["eval_recall@5"] > 5 * 5 / 48  # five times chance among ~48 held-out pairs


def test_simcse_loss_falls_on_single_sentences(tmp_path):
    rng = random.Random(1)
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.sample(WORDS, 3))}) + "\n" for _ in range(200)))
    summary = embedding_run(tmp_path, "simcse", data)
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"] - 0.3, summary


def test_saved_embedding_model_loads_with_transformers_and_sentence_transformers(tmp_path):
    embedding_run(tmp_path, "infonce", write_pairs(tmp_path / "p.jsonl", n=64), extra=", projection: 16, pooling: mean")
    embedder, tokenizer = load_embedder(tmp_path / "run")
    texts = ["cat dog", "sun sea"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = embedder(batch["input_ids"], batch["attention_mask"])
    assert ours.shape == (2, 16) and torch.allclose(ours.norm(dim=-1), torch.ones(2))
    body, _, manifest = load_run(tmp_path / "run")  # the plain transformers body, as every run loads
    assert manifest["model_task"] == "base" and type(body).__name__ == "BertModel"
    sentence_transformers = pytest.importorskip("sentence_transformers")
    st = sentence_transformers.SentenceTransformer(str(tmp_path / "run" / "final" / "model"), device="cpu")
    assert torch.allclose(torch.tensor(st.encode(texts)), ours, atol=1e-5)
