"""Fine-tuned models of one base share it: their LoRA adapters are loaded by name onto one copy,
and each answers exactly as the run loaded whole would."""

import json
import urllib.request

from openai import OpenAI

from tests.serve_helpers import chat_rows, running_server, wait_for
from tunelab.generate import encode_prompt
from tunelab.models import load_model
from tunelab.serve.decoding import Sampling, decode

MESSAGES = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "#5 say no"}]


def whole_model_reply(source: str) -> str:
    """The greedy reply of ``source`` (an alias or a run directory) loaded on its own."""
    loaded = load_model(source, "causal-lm")
    loaded.model.eval()
    ids = encode_prompt(loaded.tokenizer, MESSAGES)
    return "".join(p.text for p in decode(loaded.model, loaded.tokenizer, ids, Sampling(max_tokens=8, temperature=0)))


def two_fine_tuned(c: OpenAI, rows: int, **hyperparameters: float) -> list:
    """Two succeeded jobs on tiny-llama, trained on different data (seeds 1 and 2)."""
    jobs = []
    for seed in (1, 2):
        f = c.files.create(file=("t.jsonl", chat_rows(rows, seed=seed)), purpose="fine-tune")
        jobs.append(wait_for(c, c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=seed, hyperparameters=hyperparameters).id))
    assert all(j.status == "succeeded" for j in jobs), [j.error for j in jobs]
    return jobs


def test_two_adapters_on_one_base_answer_like_their_runs(tmp_path):
    with running_server(tmp_path) as url:
        c = OpenAI(base_url=url, api_key="none", max_retries=0, _strict_response_validation=True)
        jobs = two_fine_tuned(c, 24, n_epochs=3, learning_rate_multiplier=20)
        replies = {}
        for name in ("tiny-llama", jobs[0].fine_tuned_model, jobs[1].fine_tuned_model, "tiny-llama", jobs[0].fine_tuned_model):
            r = c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
            assert replies.setdefault(name, r.choices[0].message.content) == r.choices[0].message.content  # switching back and forth
        health = json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/health").read())
        assert health["models_in_memory"] == 1 and health["adapters_in_memory"] == 2  # one base, two adapters
    for job in jobs:
        assert replies[job.fine_tuned_model] == whole_model_reply(str(tmp_path / "runs" / job.id))
    assert replies["tiny-llama"] == whole_model_reply("tiny-llama")
    assert len(set(replies.values())) == 3  # the adapters change the answers: switching is really tested


def test_deleting_an_adapter_leaves_the_base_and_the_other_adapters_answering(tmp_path):
    with running_server(tmp_path) as url:
        c = OpenAI(base_url=url, api_key="none", max_retries=0, _strict_response_validation=True)
        names = [job.fine_tuned_model for job in two_fine_tuned(c, 12)]

        def reply(name: str) -> str:
            return c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4, temperature=0).choices[0].message.content

        before = {name: reply(name) for name in ["tiny-llama", *names]}
        c.models.delete(names[1])  # the adapter used last, so the active one
        assert reply("tiny-llama") == before["tiny-llama"] and reply(names[0]) == before[names[0]]
        c.models.delete(names[0])  # the last adapter: the base goes back to a plain model
        assert reply("tiny-llama") == before["tiny-llama"]
