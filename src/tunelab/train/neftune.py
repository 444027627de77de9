"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023).

Each token's embedding gets noise drawn from ``U(-1, 1) * alpha / sqrt(L * d)``, where ``d`` is the
embedding width and ``L`` the length of the example the token belongs to (the paper's scaling,
which keeps the noise's norm per example fixed): its real length in a padded batch (padding gets
no noise), its segment in a packed row (positions restart at 0 where an example starts; a shared
prompt and the answers that follow it count as one segment). The noise is drawn from torch's
global generator, so it is seeded and a resumed run draws the same; it is off whenever the
embedding module is in eval mode (evaluation, generation). Choose it with
``callbacks: [{name: neftune, alpha: 5}]``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tunelab.config_base import Section
from tunelab.train.callbacks import Callback, TrainState, register_callback


class NEFTuneConfig(Section):
    """Noisy embeddings during training (NEFTune)."""

    alpha: float = Field(5.0, gt=0, description="Noise scale; the paper uses 5-15 (the noise per token is alpha / sqrt(length * width)).")


def token_lengths(shape: tuple[int, int], attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
    """For each token of a ``[B, T]`` batch, the length of its example (0 for padding)."""
    batch, length = shape
    if position_ids is not None and attention_mask is None:
        starts = (position_ids == 0).long()
        starts[:, 0] = 1
        segment = starts.cumsum(1) - 1
        per_segment = torch.zeros(batch, length, dtype=torch.long, device=position_ids.device).scatter_add_(1, segment, torch.ones_like(segment))
        return per_segment.gather(1, segment)
    if attention_mask is not None:
        mask = attention_mask[:, -length:].long()
        return mask.sum(1, keepdim=True) * mask
    return torch.full((batch, length), length, dtype=torch.long)


def embedding_noise(embeddings: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """The noise to add: ``U(-1, 1) * alpha / sqrt(L * d)`` per token, zero where ``L`` is 0."""
    width = embeddings.shape[-1]
    scale = (alpha / torch.sqrt(lengths.clamp_min(1).to(torch.float32) * width)) * (lengths > 0)
    noise = torch.empty_like(embeddings, dtype=torch.float32).uniform_(-1, 1)
    return (noise * scale.unsqueeze(-1)).to(embeddings.dtype)


class NEFTune(Callback):
    """Hooks the input embedding for the run (removed when training ends)."""

    def __init__(self, cfg: NEFTuneConfig):
        self.alpha = cfg.alpha
        self._inputs: dict[str, Any] = {}
        self._handles: list[Any] = []

    def attach(self, model: torch.nn.Module) -> None:
        """Add the noise to ``model``'s input embeddings in training mode."""
        embedding = model.get_input_embeddings()
        self._handles = [
            model.register_forward_pre_hook(self._remember_inputs, with_kwargs=True),
            embedding.register_forward_hook(self._add_noise),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _remember_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._inputs = {key: kwargs.get(key) for key in ("attention_mask", "position_ids")}

    def _add_noise(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lengths = token_lengths(tuple(output.shape[:2]), self._inputs.get("attention_mask"), self._inputs.get("position_ids"))  # type: ignore[arg-type]
        return output + embedding_noise(output, lengths.to(output.device), self.alpha)

    def on_train_start(self, state: TrainState) -> None:
        self.attach(state.model)

    def on_train_end(self, state: TrainState) -> None:
        self.detach()


@register_callback("neftune", NEFTuneConfig)
def _neftune(recipe: Any, cfg: object) -> Callback | None:
    return NEFTune(cfg) if isinstance(cfg, NEFTuneConfig) else None
