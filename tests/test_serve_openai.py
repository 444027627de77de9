"""``tunelab serve`` driven by the real ``openai`` client, strict response validation on."""

import re

import openai
import pytest
from openai import OpenAI

from tests.serve_helpers import chat_rows, running_server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve"), api_keys={"sk-test": "alice", "sk-other": "bob"}) as url:
        yield url


def client(url: str, key: str = "sk-test", strict: bool = True) -> OpenAI:
    return OpenAI(base_url=url, api_key=key, max_retries=0, _strict_response_validation=strict)


def test_files_upload_list_page_content_delete(server):
    c = client(server)
    data = chat_rows(12)
    uploaded = [c.files.create(file=(f"train{i}.jsonl", data), purpose="fine-tune") for i in range(3)]
    f = uploaded[0]
    assert f.id.startswith("file-") and f.purpose == "fine-tune" and f.bytes == len(data) and f.filename == "train0.jsonl" and f.status
    first = c.files.list(limit=1)
    assert first.has_more is True
    ids = [x.id for x in c.files.list(limit=1)]  # iterating fetches every page with after=
    assert set(ids) >= {u.id for u in uploaded} and len(ids) == len(set(ids))
    assert c.files.retrieve(f.id).id == f.id
    assert c.files.content(f.id).read() == data
    assert c.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_bad_uploads_and_auth_get_the_envelope(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as bad:
        c.files.create(file=("x.jsonl", b"not json\n"), purpose="fine-tune")
    assert bad.value.type == "invalid_request_error" and "Line 1" in bad.value.message
    with pytest.raises(openai.AuthenticationError) as denied:
        client(server, key="sk-wrong").files.list()
    assert denied.value.code == "invalid_api_key"
    # a path in the filename is only a label
    f = c.files.create(file=("../../etc/passwd.jsonl", chat_rows(10)), purpose="fine-tune")
    assert f.filename == "passwd.jsonl"
    # another key's records are invisible
    with pytest.raises(openai.NotFoundError):
        client(server, key="sk-other").files.retrieve(f.id)


def test_create_job_validation_is_400_with_the_param(server):
    c = client(server)
    f = c.files.create(file=("t.jsonl", chat_rows(12)), purpose="fine-tune")
    cases = [
        ({"model": "tiny-llama", "training_file": "file-nope"}, "training_file"),
        ({"model": "no-such-model", "training_file": f.id}, "model"),
        ({"model": "tiny-llama", "training_file": f.id, "suffix": "x" * 65}, "suffix"),
        ({"model": "tiny-llama", "training_file": f.id, "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
         "method.supervised.hyperparameters.n_epochs"),
    ]
    for arguments, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            c.fine_tuning.jobs.create(**arguments)
        assert bad.value.param == param, (arguments, bad.value.param)


def test_too_few_examples_fail_the_job_asynchronously(server):
    c = client(server)
    f = c.files.create(file=("small.jsonl", chat_rows(7)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    assert job.status in ("validating_files", "queued", "failed")
    job = wait_for(c, job.id)
    assert job.status == "failed" and job.error.code == "invalid_n_examples" and job.error.param == "training_file"


def test_job_lifecycle_events_checkpoints_models_and_chat(server):
    c = client(server)
    train = c.files.create(file=("train.jsonl", chat_rows(24)), purpose="fine-tune")
    valid = c.files.create(file=("valid.jsonl", chat_rows(10, seed=1)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id, validation_file=valid.id, suffix="demo", seed=7,
                                    metadata={"team": "nlp"},
                                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-") and job.method.type == "supervised"
    assert job.hyperparameters.batch_size == "auto" and job.seed == 7 and job.metadata == {"team": "nlp"}
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error
    assert re.fullmatch(r"ft:tiny-llama:[^:]*:demo:[A-Za-z0-9]{8}", job.fine_tuned_model)
    assert job.finished_at and job.trained_tokens > 0 and job.hyperparameters.n_epochs == 2
    assert isinstance(job.hyperparameters.batch_size, int)
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "nlp"})] == [job.id]

    csv_text = c.files.content(job.result_files[0]).read().decode()
    assert csv_text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"

    events = list(c.fine_tuning.jobs.list_events(job.id, limit=3))
    assert events[0].message == "Fine-tuning job successfully completed"  # newest first, paged by 3
    assert len({e.id for e in events}) == len(events)
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert metrics and {"step", "train_loss", "train_mean_token_accuracy"} <= set(metrics[0].data)
    assert any(e.type == "metrics" and "valid_loss" in e.data for e in events)

    checkpoints = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and all(k.id.startswith("ftckpt_") for k in checkpoints)
    assert all(k.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{k.step_number}") for k in checkpoints)

    assert job.fine_tuned_model in [m.id for m in c.models.list()]
    assert c.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model  # colons in the path

    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "#3 say yes"}]
    reply = c.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=5, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.completion_tokens <= 5

    chunks = list(c.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same text either way

    step_model = checkpoints[-1].fine_tuned_model_checkpoint
    assert c.chat.completions.create(model=step_model, messages=messages, max_tokens=3).choices[0].message.role == "assistant"

    # the client asks for base64 by default and decodes it; strict validation only accepts floats
    vector = client(server, strict=False).embeddings.create(model=job.fine_tuned_model, input="hello").data[0].embedding
    assert len(vector) == 64 and abs(sum(v * v for v in vector) - 1) < 1e-4
    floats = c.embeddings.create(model="tiny-llama", input=["a", "b"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]

    assert c.models.delete(job.fine_tuned_model).deleted is True
    with pytest.raises(openai.NotFoundError) as gone:
        c.chat.completions.create(model=job.fine_tuned_model, messages=messages)
    assert gone.value.code == "model_not_found"


def test_cancel_a_finished_job_is_400(server):
    c = client(server)
    f = c.files.create(file=("small.jsonl", chat_rows(5)), purpose="fine-tune")
    job = wait_for(c, c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id).id)
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(job.id)


def test_the_async_client_uploads_lists_and_streams(server):
    import asyncio

    from openai import AsyncOpenAI

    async def flow() -> tuple[str, list[str], str]:
        c = AsyncOpenAI(base_url=server, api_key="sk-test", max_retries=0, _strict_response_validation=True)
        f = await c.files.create(file=("a.jsonl", chat_rows(10)), purpose="fine-tune")
        ids = [x.id async for x in c.files.list(limit=2)]
        stream = await c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                 temperature=0, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        plain = await c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        assert plain.choices[0].message.content == text
        return f.id, ids, text

    file_id, ids, _ = asyncio.run(flow())
    assert file_id in ids


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    import json
    import urllib.request

    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    request = urllib.request.Request(f"{server}/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer sk-test", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("req_")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events[:-1])


def test_upload_size_limit_is_413_and_422_never_leaks(tmp_path):
    with running_server(tmp_path, max_upload_bytes=100) as url:
        c = client(url, key="none")
        with pytest.raises(openai.APIStatusError) as big:
            c.files.create(file=("big.jsonl", chat_rows(10)), purpose="fine-tune")
        assert big.value.status_code == 413 and big.value.code == "file_too_large"
        with pytest.raises(openai.BadRequestError) as missing:  # FastAPI would say 422
            c.chat.completions.create(model="tiny-llama", messages=[])
        assert missing.value.param == "messages"


def test_legacy_hyperparameters_legacy_completions_and_the_request_id(server):
    c = client(server)
    f = c.files.create(file=("t.jsonl", chat_rows(12)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, hyperparameters={"n_epochs": 1, "batch_size": 4})
    assert job.method.type == "supervised" and job.hyperparameters.n_epochs == 1 and job.hyperparameters.learning_rate_multiplier == "auto"
    job = wait_for(c, job.id)
    assert job.status == "succeeded" and job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.supervised.hyperparameters.batch_size == 4

    done = c.completions.create(model=job.fine_tuned_model, prompt="Once upon", max_tokens=4, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 4
    # OpenAI's own stream chunks carry finish_reason null, which the client's Completion type forbids:
    # only a non-strict client reads a legacy stream (from OpenAI too)
    lenient = client(server, strict=False)
    streamed = list(lenient.completions.create(model=job.fine_tuned_model, prompt="Once upon", max_tokens=4, temperature=0, stream=True))
    assert all(chunk.object == "text_completion" for chunk in streamed)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == done.choices[0].text

    raw = c.with_raw_response.models.list()
    assert raw.headers["x-request-id"].startswith("req_") and raw.parse().data


def test_image_content_parts_are_refused_not_silently_dropped(server):
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match="image content parts are not served"):
        client(server).chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": parts}], max_tokens=2)
