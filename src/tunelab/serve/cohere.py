"""Cohere's inference API over tunelab's models, for users moving off Cohere's retired fine-tuning:
``POST /v2/chat`` (streamed as Cohere's server-sent events), ``/v2/embed`` and ``/v1/embed``,
``/v2/rerank`` and ``/v1/rerank``, and ``/v1/classify``; the real ``cohere`` client works unchanged
(``cohere.ClientV2(base_url="http://127.0.0.1:8000", api_key=KEY)``).

- chat: any generative model the server knows (base aliases, ``--model`` runs, fine-tuned
  models), through the same batcher as ``/v1/chat/completions``. Cohere's defaults apply
  (temperature 0.3, p 0.75). Tools, documents (RAG) and structured output are refused with a
  400 rather than ignored.
- embed: a sentence-transformers model (all-MiniLM-L6-v2, or a run trained with an embedding
  head, e.g. on Cohere rerank rows) with its own pooling, or a causal LM's mean-pooled hidden
  states; unit length; ``input_type`` is accepted (tunelab's models were not trained with Cohere's
  input-type prompts, so it changes nothing); float embeddings only.
- rerank: the same embeddings; ``relevance_score`` = (cosine + 1) / 2, best first, ``top_n`` kept.
- classify: a run with a classification head (single- or multi-label, e.g. trained on Cohere's
  classification files); few-shot ``examples`` are refused: fine-tune a classifier instead.
Errors use Cohere's body, ``{"message": ...}`` (see ``errors.api_error_handler``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal, Union

import anyio
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.serve.batching import pieces
from tunelab.serve.completions import chat_ids, collect
from tunelab.serve.context import caller, state
from tunelab.serve.decoding import Sampling
from tunelab.serve.errors import bad_request
from tunelab.serve.store import new_id

router = APIRouter()  # mounted at the root: its paths carry Cohere's /v1 or /v2 (errors.COHERE_PATHS)
FINISH_REASONS = {"stop": "COMPLETE", "length": "MAX_TOKENS"}
UNSUPPORTED_CHAT = ("tools", "documents", "response_format", "citation_options", "tool_choice")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.3, ge=0, le=2)
    p: float = Field(0.75, gt=0, le=1)
    seed: int | None = None
    stop_sequences: list[str] | None = Field(None, max_length=5)
    stream: bool = False


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    texts: list[str] = Field(min_length=1, max_length=96)
    input_type: Literal["search_document", "search_query", "classification", "clustering", "image"] | None = None
    embedding_types: list[str] | None = None
    truncate: Literal["NONE", "START", "END"] | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    query: str
    documents: list[Union[str, dict[str, Any]]] = Field(min_length=1, max_length=1000)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    inputs: list[str] = Field(min_length=1, max_length=96)
    examples: list[dict[str, Any]] | None = None


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    tokens = {"input_tokens": prompt, "output_tokens": completion}
    return {"billed_units": tokens, "tokens": tokens}


@router.post("/v2/chat", response_model=None)
async def chat(request: Request, body: ChatRequest, owner: str | None = Depends(caller)) -> Any:
    for name in UNSUPPORTED_CHAT:
        if getattr(body, name, None):
            raise bad_request(f"'{name}' is not supported by tunelab's chat; send plain messages.", param=name)
    loaded = await anyio.to_thread.run_sync(state(request).models.load, body.model, owner)
    ids = chat_ids(loaded, body.messages)
    sampling = Sampling(max_tokens=body.max_tokens or 256, temperature=body.temperature, top_p=body.p, seed=body.seed,
                        stop=tuple(s for s in body.stop_sequences or () if s))
    ident = new_id("chat-")
    if body.stream:
        return StreamingResponse(_events(ident, loaded, ids, sampling), media_type="text/event-stream")
    parts = await anyio.to_thread.run_sync(collect, loaded.batcher.submit(loaded, ids, sampling))
    return {"id": ident, "finish_reason": FINISH_REASONS.get(parts[-1].finish_reason or "stop", "COMPLETE"),
            "message": {"role": "assistant", "content": [{"type": "text", "text": "".join(p.text for p in parts)}]},
            "usage": _usage(ids.shape[1], parts[-1].completion_tokens)}


def _events(ident: str, loaded: Any, ids: torch.Tensor, sampling: Sampling) -> Iterator[str]:
    """Cohere's stream: message-start, content-start, content-delta..., content-end, message-end."""

    def event(payload: dict[str, Any]) -> str:
        return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"

    yield event({"type": "message-start", "id": ident, "delta": {"message": {"role": "assistant", "content": [], "tool_plan": "",
                                                                            "tool_calls": [], "citations": []}}})
    yield event({"type": "content-start", "index": 0, "delta": {"message": {"content": {"type": "text", "text": ""}}}})
    end: dict[str, Any] = {"finish_reason": "ERROR"}
    try:
        for piece in pieces(loaded.batcher.submit(loaded, ids, sampling)):
            if piece.text:
                yield event({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": piece.text}}}})
            if piece.finish_reason:
                end = {"finish_reason": FINISH_REASONS.get(piece.finish_reason, "COMPLETE"), "usage": _usage(ids.shape[1], piece.completion_tokens)}
    except Exception as exc:  # headers are sent: the error travels in message-end
        end = {"finish_reason": "ERROR", "error": f"{type(exc).__name__}: {exc}"}
    yield event({"type": "content-end", "index": 0})
    yield event({"type": "message-end", "delta": end})


async def _embeddings(request: Request, model: str, texts: list[str], owner: str | None) -> tuple[torch.Tensor, int]:
    embedder = await anyio.to_thread.run_sync(state(request).heads.embedder, model, owner)
    return await anyio.to_thread.run_sync(embedder.embed, texts)


def _float_only(types: list[str] | None) -> None:
    if types and any(t != "float" for t in types):
        raise bad_request("tunelab returns float embeddings only; set embedding_types: [\"float\"].", param="embedding_types")


@router.post("/v2/embed")
async def embed_v2(request: Request, body: EmbedRequest, owner: str | None = Depends(caller)) -> dict[str, Any]:
    _float_only(body.embedding_types)
    vectors, tokens = await _embeddings(request, body.model, body.texts, owner)
    return {"id": new_id("embed-"), "response_type": "embeddings_by_type", "embeddings": {"float": vectors.tolist()},
            "texts": body.texts, "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}}


@router.post("/v1/embed")
async def embed_v1(request: Request, body: EmbedRequest, owner: str | None = Depends(caller)) -> dict[str, Any]:
    _float_only(body.embedding_types)
    vectors, tokens = await _embeddings(request, body.model, body.texts, owner)
    by_type = body.embedding_types is not None
    return {"id": new_id("embed-"), "response_type": "embeddings_by_type" if by_type else "embeddings_floats",
            "embeddings": {"float": vectors.tolist()} if by_type else vectors.tolist(), "texts": body.texts,
            "meta": {"api_version": {"version": "1"}, "billed_units": {"input_tokens": tokens}}}


@router.post("/v2/rerank")
@router.post("/v1/rerank")
async def rerank(request: Request, body: RerankRequest, owner: str | None = Depends(caller)) -> dict[str, Any]:
    documents = [d if isinstance(d, str) else str(d.get("text", "")) for d in body.documents]
    vectors, _ = await _embeddings(request, body.model, [body.query, *documents], owner)
    scores = ((vectors[1:] @ vectors[0]).clamp(-1, 1) + 1) / 2
    order = torch.argsort(scores, descending=True, stable=True)[: body.top_n or len(documents)]
    results = [{"index": int(i), "relevance_score": float(scores[i]), **({"document": {"text": documents[i]}} if body.return_documents else {})}
               for i in order]
    return {"id": new_id("rerank-"), "results": results, "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}


@router.post("/v1/classify")
async def classify(request: Request, body: ClassifyRequest, owner: str | None = Depends(caller)) -> dict[str, Any]:
    if body.examples:
        raise bad_request("few-shot 'examples' are not served: fine-tune a classifier on them (a Cohere classification file "
                          "trains one with method.head: {type: classification}) and name its run as the model.", param="examples")
    classifier = await anyio.to_thread.run_sync(state(request).heads.classifier, body.model, owner)
    probabilities = await anyio.to_thread.run_sync(classifier.probabilities, body.inputs)
    kind = "multi-label" if classifier.multi_label else "single-label"
    out = []
    for text, probs in zip(body.inputs, probabilities.tolist()):
        labels = {name: {"confidence": p} for name, p in zip(classifier.labels, probs)}
        if classifier.multi_label:
            chosen = [name for name, p in zip(classifier.labels, probs) if p >= 0.5]
        else:
            chosen = [classifier.labels[max(range(len(probs)), key=probs.__getitem__)]]
        confidences = [labels[name]["confidence"] for name in chosen]
        out.append({"id": new_id("cls-"), "input": text, "prediction": chosen[0] if kind == "single-label" else None,
                    "predictions": chosen, "confidence": confidences[0] if kind == "single-label" else None,
                    "confidences": confidences, "labels": labels, "classification_type": kind})
    return {"id": new_id("classify-"), "classifications": out, "meta": {"api_version": {"version": "1"}}}
