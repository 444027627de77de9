"""The service driven by an older (1.x) ``openai`` client, run as its own process with that client
on ``PYTHONPATH`` (``scripts/setup.sh --test`` installs it beside the pinned one):

    PYTHONPATH=.venv/openai-1x python tests/openai_1x_flow.py BASE_URL

Only the standard library and that client are imported, so nothing of the test environment's
newer pydantic/httpx mixes in.
"""

from __future__ import annotations

import json
import sys
import time

import openai
from openai import OpenAI


def main(url: str) -> None:
    assert openai.__version__.startswith("1."), openai.__version__
    c = OpenAI(base_url=url, api_key="unused", max_retries=0, _strict_response_validation=True)
    rows = [{"messages": [{"role": "user", "content": f"#{i} say {w}"}, {"role": "assistant", "content": w.upper()}]}
            for i, w in enumerate(["yes", "no"] * 6)]
    f = c.files.create(file=("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()), purpose="fine-tune")
    assert [x.id for x in c.files.list()].count(f.id) == 1
    job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, suffix="old",
                                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    deadline = time.monotonic() + 240
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.3)
        job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id))
    assert list(c.fine_tuning.jobs.checkpoints.list(job.id))
    messages = [{"role": "user", "content": "#1 say no"}]
    reply = c.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=4, temperature=0)
    chunks = list(c.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=4, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply.choices[0].message.content
    assert len(c.embeddings.create(model="tiny-llama", input="hi", encoding_format="float").data[0].embedding) == 64
    try:
        c.models.retrieve("ft:nope")
        raise AssertionError("an unknown model was found")
    except openai.NotFoundError as exc:
        assert exc.code == "model_not_found"
    assert c.models.delete(job.fine_tuned_model).deleted is True
    print("ok", openai.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
