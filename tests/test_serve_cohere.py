"""``tunelab serve``'s Cohere routes driven by the real ``cohere`` client: runs trained from Cohere's
own fine-tuning formats (classification, multi-label, rerank) serve classify, embed and rerank;
any generative model serves chat."""

from __future__ import annotations

import json
import random

import cohere
import httpx
import pytest
import torch

from tests.serve_helpers import running_server
from tests.train_helpers import train

HEAD_RUN = (
    "model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0}}\nmethod: {{head: {{type: {head}}}}}\n"
    "train: {{lr: 0.003, batch_size: 8, max_steps: 6, precision: fp32, eval_before: false}}\n"
)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs trained from Cohere-format files: single-label, multi-label, rerank."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("cohere_runs")
    single = [{"text": f"{w} film {i}", "label": "positive" if w == "great" else "negative"} for i in range(40) for w in [rng.choice(["great", "awful"])]]
    multi = [{"text": f"topic {i} {' '.join(ls)}", "label": ls} for i in range(40) for ls in [rng.sample(["biology", "physics", "maths"], rng.randint(0, 2))]]
    rerank = [{"query": f"question {i}", "relevant_passages": [f"answer {i}"], "hard_negatives": [f"answer {i + 1}"]} for i in range(40)]
    made = {}
    for name, head, rows in (("classifier", "classification", single), ("tagger", "multi_label", multi), ("embedder", "embedding", rerank)):
        folder = root / f"{name}-source"
        folder.mkdir()
        data = write(folder / "data.jsonl", rows)
        train(folder, HEAD_RUN.format(data=data, head=head))
        made[name] = (folder / "run").rename(root / name)  # the server names a --model directory by its folder
    return made


@pytest.fixture(scope="module")
def server(tmp_path_factory, runs):
    models = tuple(str(path) for path in runs.values())
    with running_server(tmp_path_factory.mktemp("serve"), api_keys={"sk-test": "alice"}, extra_models=models) as url:
        yield url.removesuffix("/v1")


def client(root: str, key: str = "sk-test") -> cohere.ClientV2:
    return cohere.ClientV2(api_key=key, base_url=root, max_retries=0)


def test_chat_answers_like_openai_chat_completions(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    reply = client(server).chat(model="tiny-llama", messages=messages, max_tokens=12, temperature=0.0, seed=1)
    openai_style = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                              json={"model": "tiny-llama", "messages": messages, "max_tokens": 12, "temperature": 0.0}).json()
    assert reply.message.content[0].text == openai_style["choices"][0]["message"]["content"]
    assert reply.finish_reason in ("COMPLETE", "MAX_TOKENS") and reply.usage.tokens.output_tokens <= 12


def test_chat_stream_events_add_up_to_the_reply(server):
    co = client(server)
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = co.chat(model="tiny-llama", messages=messages, max_tokens=10, temperature=0.0).message.content[0].text
    events = list(co.chat_stream(model="tiny-llama", messages=messages, max_tokens=10, temperature=0.0))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message-start", "content-start"] and kinds[-2:] == ["content-end", "message-end"]
    assert "".join(e.delta.message.content.text for e in events if e.type == "content-delta") == whole
    assert events[-1].delta.finish_reason == "MAX_TOKENS"


def test_chat_refuses_what_it_would_ignore(server):
    with pytest.raises(cohere.BadRequestError) as err:
        client(server).chat(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "'tools' is not supported" in err.value.body["message"]


def test_classify_serves_a_run_trained_on_a_cohere_classification_file(server, runs):
    from tunelab.models import load_model

    inputs = ["great film 100", "awful film 101"]
    result = cohere.Client(api_key="sk-test", base_url=server, max_retries=0).classify(model="classifier", inputs=inputs)
    loaded = load_model(str(runs["classifier"]))
    for text, item in zip(inputs, result.classifications):
        with torch.no_grad():
            probs = torch.softmax(loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits[0], -1)
        names = loaded.details["manifest"]["label_names"]
        assert item.prediction == names[int(probs.argmax())] and item.classification_type == "single-label"
        assert item.confidence == pytest.approx(float(probs.max()), abs=1e-5)
        assert sum(label.confidence for label in item.labels.values()) == pytest.approx(1.0, abs=1e-5)


def test_classify_multi_label_run(server):
    item = client(server).classify(model="tagger", inputs=["topic 7 biology"]).classifications[0]
    assert item.classification_type == "multi-label" and set(item.labels) == {"biology", "maths", "physics"}
    assert item.predictions == [name for name, label in item.labels.items() if label.confidence >= 0.5]


def test_embed_equals_the_runs_own_embedder_and_v1_batches_merge(server, runs):
    from tunelab.train.embedding_artifacts import load_embedder

    texts = ["question 3", "answer 3"]
    got = client(server).embed(model="embedder", texts=texts, input_type="search_query", embedding_types=["float"]).embeddings.float
    embedder, tokenizer = load_embedder(runs["embedder"])
    for text, vector in zip(texts, got):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = torch.nn.functional.normalize(embedder(ids, torch.ones_like(ids))[0], dim=0)
        assert torch.allclose(torch.tensor(vector), want, atol=1e-5)
    many = [f"text {i}" for i in range(100)]  # the v1 client sends 96 + 4 and merges the replies
    v1 = cohere.Client(api_key="sk-test", base_url=server, max_retries=0).embed(model="embedder", texts=many, input_type="clustering")
    assert len(v1.embeddings) == 100 and v1.embeddings[3] == pytest.approx(
        client(server).embed(model="embedder", texts=["text 3"], input_type="clustering").embeddings.float[0], abs=1e-6)


def test_embed_a_causal_lm_like_openai_embeddings(server):
    got = client(server).embed(model="tiny-llama", texts=["hello there"], input_type="search_document").embeddings.float[0]
    openai_style = httpx.post(f"{server}/v1/embeddings", headers={"Authorization": "Bearer sk-test"},
                              json={"model": "tiny-llama", "input": "hello there"}).json()
    assert got == pytest.approx(openai_style["data"][0]["embedding"], abs=1e-6)


def test_rerank_orders_by_cosine_and_keeps_top_n(server):
    co = client(server)
    docs = ["answer 5", "answer 9", "question 5", "something else"]
    result = co.rerank(model="embedder", query="question 5", documents=docs, top_n=3)
    vectors = torch.tensor(co.embed(model="embedder", texts=["question 5", *docs], input_type="search_query").embeddings.float)
    scores = ((vectors[1:] @ vectors[0]) + 1) / 2
    assert [r.index for r in result.results] == torch.argsort(scores, descending=True)[:3].tolist()
    assert [r.relevance_score for r in result.results] == pytest.approx(sorted(scores.tolist(), reverse=True)[:3], abs=1e-5)


def test_errors_arrive_as_cohere_messages(server):
    co = client(server)
    with pytest.raises(cohere.NotFoundError) as err:
        co.embed(model="no-such-model", texts=["a"], input_type="search_query")
    assert "does not exist" in err.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as err:
        co.classify(model="classifier", inputs=["x"], examples=[{"text": "good", "label": "positive"}])
    assert "fine-tune a classifier" in err.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as err:
        co.classify(model="tiny-llama", inputs=["x"])
    assert "no classification head" in err.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as err:
        co.embed(model="embedder", texts=["a"], input_type="search_query", embedding_types=["int8"])
    assert "float embeddings only" in err.value.body["message"]
    with pytest.raises(cohere.UnauthorizedError):
        client(server, key="sk-wrong").rerank(model="embedder", query="q", documents=["d"])


@pytest.mark.slow
def test_minilm_reranks_the_answer_first(tmp_path):
    with running_server(tmp_path) as url:
        result = client(url.removesuffix("/v1"), key="").rerank(
            model="minilm-l6", query="What is the capital of France?",
            documents=["Berlin is a city in Germany.", "Paris is the capital of France.", "Bananas are yellow."])
    assert result.results[0].index == 1 and result.results[0].relevance_score > result.results[1].relevance_score
