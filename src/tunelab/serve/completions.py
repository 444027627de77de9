"""``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``.

Generation is handed to the model's batcher (``tunelab.serve.batching``: requests waiting for
the same model and adapter are decoded together) and awaited in a worker thread, so the event
loop stays free; streamed responses are Server-Sent Events ending in ``data: [DONE]``, as the
``openai`` client reads them.
"""

from __future__ import annotations

import base64
import json
import queue
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Literal, Union

import anyio
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.data.images import IMAGE_PART_TYPES
from tunelab.serve.batching import pieces
from tunelab.serve.context import caller, state
from tunelab.serve.decoding import Piece, Sampling
from tunelab.serve.errors import bad_request, envelope
from tunelab.serve.inference import LoadedModel, public
from tunelab.serve.store import new_id

router = APIRouter()


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The sampling fields chat and legacy completions share; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int | None, top_logprobs: int | None) -> Sampling:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 4:
            raise bad_request("stop holds at most 4 sequences.", param="stop")
        return Sampling(max_tokens=max_tokens or 256, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                        stop=tuple(s for s in stops if s), top_logprobs=top_logprobs)


class ChatRequest(GenerationRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(GenerationRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of OpenAI's content-part list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        if any(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES for part in content):  # never answer as if unseen
            raise bad_request("image content parts are not served yet; ask a vision-language run with `tunelab generate --image`.", param="messages")
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    raise bad_request("message content must be a string or a list of content parts.", param="messages")


def chat_ids(loaded: LoadedModel, messages: list[dict[str, Any]]) -> torch.Tensor:
    from tunelab.generate import encode_prompt

    turns = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"messages[{index}].role must be system, developer, user, assistant or tool.", param=f"messages[{index}].role")
        turns.append({"role": "system" if role == "developer" else role, "content": _text_of(message.get("content"))})
    return encode_prompt(loaded.tokenizer, turns)


def _logprobs_content(parts: list[Piece]) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
            for piece in parts for lp in piece.logprobs]


def collect(out: queue.Queue) -> list[Piece]:
    """Every piece of a submitted request (blocking: run it in a worker thread)."""
    return list(pieces(out))


def _seeded(sampling: Sampling, choice: int) -> Sampling:
    """Choice i of ``n`` draws with seed + i (each reproducible, and different from the others)."""
    return sampling if sampling.seed is None or choice == 0 else replace(sampling, seed=sampling.seed + choice)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(chunks: Iterator[dict[str, Any]]) -> Iterator[str]:
    try:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as exc:  # headers are sent: the client raises an APIError from this event
        yield f"data: {json.dumps(envelope(f'{type(exc).__name__}: {exc}', type='server_error'))}\n\n"
    yield "data: [DONE]\n\n"


def _stream(loaded: LoadedModel, ids: torch.Tensor, sampling: Sampling) -> Iterator[Piece]:
    yield from pieces(loaded.batcher.submit(loaded, ids, sampling))


@router.get("/models")
def list_models(request: Request, owner: str | None = Depends(caller)) -> dict[str, Any]:
    return {"object": "list", "data": state(request).models.listing(owner)}


@router.get("/models/{model_id:path}")
def retrieve_model(request: Request, model_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    return public(state(request).models.record(model_id, owner))


@router.delete("/models/{model_id:path}")
def delete_model(request: Request, model_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    state(request).models.delete(model_id, owner)
    return {"id": model_id, "object": "model", "deleted": True}


@router.post("/chat/completions", response_model=None)
async def chat(request: Request, body: ChatRequest, owner: str | None = Depends(caller)) -> Any:
    loaded = await anyio.to_thread.run_sync(state(request).models.load, body.model, owner)
    ids = chat_ids(loaded, body.messages)
    sampling = body.sampling(body.max_completion_tokens or body.max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    ident, created = new_id("chatcmpl-"), int(time.time())
    base = {"id": ident, "created": created, "model": body.model, "system_fingerprint": "tunelab"}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunks() -> Iterator[dict[str, Any]]:
            completion = 0
            for choice in range(body.n):
                yield {**base, "object": "chat.completion.chunk", "choices": [
                    {"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
                for piece in _stream(loaded, ids, _seeded(sampling, choice)):
                    logprobs = {"content": _logprobs_content([piece])} if body.logprobs else None
                    if piece.text or logprobs:
                        yield {**base, "object": "chat.completion.chunk", "choices": [
                            {"index": choice, "delta": {"content": piece.text}, "logprobs": logprobs, "finish_reason": None}]}
                    if piece.finish_reason:
                        completion += piece.completion_tokens
                        yield {**base, "object": "chat.completion.chunk", "choices": [
                            {"index": choice, "delta": {}, "logprobs": None, "finish_reason": piece.finish_reason}]}
            if include_usage:
                yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(ids.shape[1], completion)}

        return StreamingResponse(_sse(chunks()), media_type="text/event-stream")
    runs = [loaded.batcher.submit(loaded, ids, _seeded(sampling, choice)) for choice in range(body.n)]  # all queued: they batch
    choices, completion = [], 0
    for choice, run in enumerate(runs):
        parts = await anyio.to_thread.run_sync(collect, run)
        completion += parts[-1].completion_tokens
        choices.append({"index": choice, "message": {"role": "assistant", "content": "".join(p.text for p in parts), "refusal": None},
                        "logprobs": {"content": _logprobs_content(parts), "refusal": None} if body.logprobs else None,
                        "finish_reason": parts[-1].finish_reason})
    return {**base, "object": "chat.completion", "choices": choices, "usage": _usage(ids.shape[1], completion)}


def _prompts(prompt: Any, tokenizer: Any) -> list[torch.Tensor]:
    """Legacy ``prompt``: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    out = []
    for item in prompt:
        ids = tokenizer(item, return_tensors="pt")["input_ids"] if isinstance(item, str) else torch.tensor([item])
        if ids.shape[1] == 0:
            raise bad_request("prompt must not be empty.", param="prompt")
        out.append(ids)
    return out


@router.post("/completions", response_model=None)
async def complete(request: Request, body: CompletionRequest, owner: str | None = Depends(caller)) -> Any:
    loaded = await anyio.to_thread.run_sync(state(request).models.load, body.model, owner)
    prompts = _prompts(body.prompt, loaded.tokenizer)
    sampling = body.sampling(body.max_tokens, body.logprobs)
    base = {"id": new_id("cmpl-"), "created": int(time.time()), "model": body.model, "object": "text_completion"}

    def legacy_logprobs(parts: list[Piece]) -> dict[str, Any] | None:
        if body.logprobs is None:
            return None
        items = [lp for p in parts for lp in p.logprobs]
        offsets, position = [], 0
        for lp in items:
            offsets.append(position)
            position += len(lp.token)
        return {"tokens": [lp.token for lp in items], "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": [dict(lp.top) for lp in items], "text_offset": offsets}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunks() -> Iterator[dict[str, Any]]:
            completion, index = 0, 0
            for ids in prompts:
                for choice in range(body.n):
                    for piece in _stream(loaded, ids, _seeded(sampling, choice)):
                        completion += piece.completion_tokens if piece.finish_reason else 0
                        yield {**base, "choices": [{"index": index, "text": piece.text, "logprobs": legacy_logprobs([piece]),
                                                    "finish_reason": piece.finish_reason}]}
                    index += 1
            if include_usage:
                yield {**base, "choices": [], "usage": _usage(sum(p.shape[1] for p in prompts), completion)}

        return StreamingResponse(_sse(chunks()), media_type="text/event-stream")
    runs = [(ids, loaded.batcher.submit(loaded, ids, _seeded(sampling, choice))) for ids in prompts for choice in range(body.n)]
    choices, completion = [], 0
    for ids, run in runs:
        parts = await anyio.to_thread.run_sync(collect, run)
        completion += parts[-1].completion_tokens
        text = "".join(p.text for p in parts)
        if body.echo:
            text = loaded.tokenizer.decode(ids[0], skip_special_tokens=True) + text
        choices.append({"index": len(choices), "text": text, "logprobs": legacy_logprobs(parts), "finish_reason": parts[-1].finish_reason})
    return {**base, "choices": choices, "usage": _usage(sum(p.shape[1] for p in prompts), completion)}


def embed_ids(loaded: LoadedModel, batch: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Mean-pooled last hidden states, unit length (OpenAI's embeddings are normalised)."""
    vectors, tokens = [], 0
    with loaded.lock, loaded.activate(), torch.no_grad():
        for ids in batch:
            out = loaded.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
            pooled = out.hidden_states[-1][0].float().mean(0)
            vectors.append(torch.nn.functional.normalize(pooled, dim=0))
            tokens += ids.shape[1]
    return vectors, tokens


@router.post("/embeddings")
async def embeddings(request: Request, body: EmbeddingRequest, owner: str | None = Depends(caller)) -> dict[str, Any]:
    loaded = await anyio.to_thread.run_sync(state(request).models.load, body.model, owner)
    batch = _prompts(body.input, loaded.tokenizer)
    vectors, tokens = await anyio.to_thread.run_sync(embed_ids, loaded, batch)
    data = []
    for index, vector in enumerate(vectors):
        if body.dimensions is not None:
            if body.dimensions > vector.numel():
                raise bad_request(f"dimensions must be at most {vector.numel()} for {body.model}.", param="dimensions")
            vector = torch.nn.functional.normalize(vector[: body.dimensions], dim=0)
        encoded: Any = vector.tolist() if body.encoding_format == "float" else base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
