"""The router of a hierarchical-adapter model: which family's stack answers a prompt that names no task.

Feature: the prompt's mean last hidden state under the shared stack (the base model when there is
no shared adapter), L2-normalised. Each family's centroid is that feature averaged over some of its
training prompts; a prompt goes to the family of the nearest centroid (cosine). One forward pass
per prompt, no extra parameters, nothing to train -- and its accuracy is measured beside the stacks'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from tunelab.data import IGNORE_INDEX, Example
from tunelab.errors import UserError
from tunelab.methods.hierarchy_stacks import hierarchy_of, use_stack


@torch.no_grad()
def prompt_embeddings(model: torch.nn.Module, prompts: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """``[len(prompts), hidden]``: each prompt's mean last hidden state, L2-normalised."""
    device = next(model.parameters()).device
    out = []
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin : begin + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(list(p)), 1
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False).hidden_states[-1]
        weights = mask.to(device).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def prompt_tokens(example: Example) -> list[int]:
    """The tokens of ``example`` that the loss does not supervise (its prompt), else all of them."""
    prompt = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    return prompt or list(example.input_ids)


def compute_centroids(model: torch.nn.Module, examples: Sequence[Example], per_family: int) -> None:
    """Set the router's centroids from up to ``per_family`` prompts of each family (``example.task``
    is the family's index); a family without examples gets a zero centroid and is never chosen
    over one with a positive similarity."""
    state = hierarchy_of(model)
    if state is None:
        raise ValueError("compute_centroids needs a model with method.hierarchy")
    was_training = model.training
    model.eval()
    prompts = [[prompt_tokens(e) for e in examples if e.task == index][:per_family] for index in range(len(state.families))]
    with use_stack(model, None):
        means = [prompt_embeddings(model, members).mean(0) if members else None for members in prompts]
    model.train(was_training)
    width = next(m.numel() for m in means if m is not None)
    state.centroids = torch.stack([torch.nn.functional.normalize(m, dim=0) if m is not None else torch.zeros(width) for m in means])


def route(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> list[str]:
    """The family whose centroid is nearest (cosine) to each prompt's embedding."""
    state = hierarchy_of(model)
    if state is None:
        raise ValueError("route needs a model with method.hierarchy")
    if state.centroids is None:
        raise UserError("this hierarchical run has no router (it was saved without centroids)", hint="name each row's task (eval.task_field)")
    with use_stack(model, None):
        scores = prompt_embeddings(model, prompts) @ state.centroids.T
    return [state.families[i] for i in scores.argmax(-1).tolist()]


def routed(model: torch.nn.Module, prompt: Sequence[int]) -> contextlib.AbstractContextManager:
    """For as long as the context lasts, ``model`` runs with the stack the router picks for
    ``prompt`` when it has hierarchical adapters (generation, chat, serving); otherwise nothing changes."""
    if hierarchy_of(model) is None:
        return contextlib.nullcontext()
    return use_stack(model, route(model, [prompt])[0])
