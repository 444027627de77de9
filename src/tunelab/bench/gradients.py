"""Each step's LoRA gradients from either side, for comparing their numerics at the same weights.

peft initialises LoRA B to zero, which makes A's gradient zero too; the recorder sets every B to
the same seeded values on every side first, so both halves of every adapter are compared.
"""

from __future__ import annotations

import re

import torch

ADAPTER = re.compile(r"layers\.\d+\..*lora_[AB]\b.*")


def adapters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters by a name both sides share (what follows ``layers.``), in sorted order."""
    found = {}
    for name, parameter in model.named_parameters():
        match = ADAPTER.search(name)
        if match:
            found[match.group(0)] = parameter
    return dict(sorted(found.items()))


class GradientRecorder:
    """A ``tunelab.bench.sides.Probe``: sets every LoRA B to seeded values, keeps each step's LoRA gradients in fp32."""

    def __init__(self, b_std: float, seed: int) -> None:
        self.b_std, self.seed = b_std, seed
        self.steps: list[dict[str, torch.Tensor]] = []

    def prepare(self, model: torch.nn.Module) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for name, parameter in adapters(model).items():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * self.b_std)

    def after_backward(self, model: torch.nn.Module) -> None:
        self.steps.append({name: p.grad.detach().float().clone() for name, p in adapters(model).items()})


def compare(step: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], parts: tuple[str, ...] = ()) -> tuple[float, float]:
    """Cosine and relative error ||g - ref|| / ||ref|| of the concatenated gradients of the adapters
    whose names contain every one of ``parts`` (all adapters when empty)."""
    names = [n for n in reference if all(p in n for p in parts)]
    missing = set(names) - set(step)
    if missing:
        raise ValueError(f"adapters missing on one side: {sorted(missing)[:3]}")
    got = torch.cat([step[n].flatten() for n in names]).double()
    want = torch.cat([reference[n].flatten() for n in names]).double()
    cosine = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    return cosine, float((got - want).norm() / want.norm())
