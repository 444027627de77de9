"""Calibration: a few batches of real text and the statistics compression criteria need from them.

Wanda and the structured criteria weigh each weight by how large its input is on real text (the
per-feature L2 norm of a layer's inputs); Taylor importance weighs it by the gradient of a loss.
Both come from the same few token chunks, which are cut from text disjoint from the held-out
text used to measure perplexity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import UserError
from tunelab.userfiles import read_user_text


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a file: fortune cookies split on ``%`` lines, else paragraphs split on blank lines."""
    raw = read_user_text(path, "text file")
    lines = raw.splitlines()
    separator = "%" if "%" in (line.strip() for line in lines) else ""
    texts, current = [], []
    for line in [*lines, separator]:
        if line.strip() == separator:
            if "\n".join(current).strip():
                texts.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    if not texts:
        raise UserError("no text in file", where=str(path))
    return texts[:limit]


def token_chunks(tokenizer, texts: list[str], length: int, count: int) -> torch.Tensor:
    """``count`` rows of ``length`` tokens cut from the texts joined by EOS (fewer if the text runs out)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + eos)
        if len(ids) >= length * count:
            break
    rows = min(count, len(ids) // length)
    if rows == 0:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than one chunk of {length}", hint="use a longer file")
    return torch.tensor(ids[: rows * length]).view(rows, length)


def input_norms(model: nn.Module, layers: Mapping[str, nn.Module], chunks: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Per input feature, the L2 norm of each layer's inputs over all calibration tokens."""
    sums = _input_statistic(model, layers, chunks, batch_size, lambda x: x.pow(2).sum(0), torch.add)
    return {name: total.sqrt() for name, total in sums.items()}


def input_absmax(model: nn.Module, layers: Mapping[str, nn.Module], chunks: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Per input feature, the largest magnitude each layer's input reaches on the calibration tokens."""
    return _input_statistic(model, layers, chunks, batch_size, lambda x: x.abs().amax(0), torch.maximum)


def _input_statistic(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    chunks: torch.Tensor,
    batch_size: int,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``combine`` over batches of ``reduce(inputs as [tokens, features])``, for each layer."""
    totals = {name: torch.zeros(layer.in_features) for name, layer in layers.items()}

    def record(name: str, inputs: torch.Tensor) -> None:
        totals[name] = combine(totals[name], reduce(inputs.flatten(0, -2)))

    _forward_recording_inputs(model, layers, chunks, batch_size, record)
    return totals


def _forward_recording_inputs(
    model: nn.Module, layers: Mapping[str, nn.Module], chunks: torch.Tensor, batch_size: int, record: Callable[[str, torch.Tensor], None]
) -> None:
    """Run the calibration chunks through ``model``, handing each layer's input (detached, float)
    to ``record(layer_name, input)``."""

    def hook(name: str):
        def pre(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            record(name, args[0].detach().float())

        return pre

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        _forward_all(model, chunks, batch_size)
    finally:
        for handle in handles:
            handle.remove()


def input_magnitude_quantiles(
    model: nn.Module, layers: Mapping[str, nn.Module], chunks: torch.Tensor, fraction: float, batch_size: int = 4, sample: int = 1 << 20
) -> tuple[dict[str, float], dict[str, float]]:
    """Per layer, the ``fraction`` quantile of its input magnitudes on the calibration tokens (the
    TEAL threshold below which that fraction of inputs falls; 0 for ``fraction`` 0), and the
    fraction of inputs at or below it (for 0: the inputs that are exactly zero).

    Magnitudes are kept at a fixed stride, at most ``sample`` per layer, so memory stays bounded.
    """
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    per_batch = max(1, sample // max(1, -(-len(chunks) // batch_size)))

    def record(name: str, inputs: torch.Tensor) -> None:
        values = inputs.abs().flatten()
        seen[name].append(values[:: max(1, -(-values.numel() // per_batch))])

    _forward_recording_inputs(model, layers, chunks, batch_size, record)
    thresholds, below = {}, {}
    for name, parts in seen.items():
        values = torch.cat(parts)
        thresholds[name] = float(torch.kthvalue(values, max(1, round(fraction * values.numel()))).values) if fraction > 0 else 0.0
        below[name] = float((values <= thresholds[name]).float().mean())
    return thresholds, below


def closed_fractions(model: nn.Module, activations: Mapping[str, nn.Module], chunks: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Per ReLU-family activation module, the fraction of its inputs at or below 0 on the
    calibration tokens: the channels it closes (exact zeros, or a floored ReLU's floors)."""
    closed = {name: [0, 0] for name in activations}

    def record(name: str, inputs: torch.Tensor) -> None:
        closed[name][0] += int((inputs <= 0).sum())
        closed[name][1] += inputs.numel()

    _forward_recording_inputs(model, activations, chunks, batch_size, record)
    return {name: count / max(1, total) for name, (count, total) in closed.items()}


def taylor_importance(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    chunks: torch.Tensor,
    teacher: nn.Module | None = None,
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``Σ_batches |w · ∂L/∂w|`` of every weight.

    ``L`` is the language-model loss on the calibration text, or with a ``teacher`` the KL from the
    teacher's next-token distribution (knowledge-driven pruning: keep what the teacher relies on).
    """
    scores = {name: torch.zeros_like(layer.weight, dtype=torch.float32) for name, layer in layers.items()}
    requires = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    try:
        for batch in chunks.split(batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()
            if teacher is None:
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            else:
                with torch.no_grad():
                    target = teacher(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
                loss = F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
            loss.backward()
            for name, layer in layers.items():
                scores[name] += (layer.weight.detach() * layer.weight.grad).abs().float()
                layer.weight.grad = None
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return scores


def block_influence(model: nn.Module, blocks: nn.ModuleList, chunks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Per decoder block, ``1 - cos(input, output)`` of its hidden states, averaged over tokens.

    ShortGPT's Block Influence (Men et al. 2024): a block whose output points the same way as its
    input changes little and is the cheapest to remove.
    """
    totals = torch.zeros(len(blocks))
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int):
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return record

    def post(i: int):
        def record(_module: nn.Module, _args: tuple, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            totals[i] += (1 - F.cosine_similarity(inputs[i].float(), out.detach().float(), dim=-1)).sum()

        return record

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        _forward_all(model, chunks, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return totals / chunks.numel()


def _forward_all(model: nn.Module, chunks: torch.Tensor, batch_size: int) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in chunks.split(batch_size):
                model(input_ids=batch)
    finally:
        model.train(was_training)
