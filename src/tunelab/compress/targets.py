"""Which linear layers a compression step touches, chosen by name patterns.

The output head is excluded by default: it is usually tied to the input embeddings, and
compressing it changes every token's logit at once, which costs far more quality than its share
of the weights. A pattern that matches nothing is an error, because a typo would otherwise
silently compress nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from tunelab.errors import UserError
from tunelab.methods.base import added_module_ids


def linear_layers(model: nn.Module, patterns: Iterable[str] = (), *, linear_types: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Module]:
    """Linear layers whose names match any regex in ``patterns`` (default: all but the output head).

    Modules a method added (LoRA matrices, bottleneck adapters, a task head's projection) are
    never candidates: compression acts on the base weights.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    added = added_module_ids(model)
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, linear_types) and id(m) not in added}
    patterns = list(patterns)
    if not patterns:
        return {name: m for name, m in candidates.items() if m is not head}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        regex = compile_pattern(pattern)
        hits = {name: m for name, m in candidates.items() if regex.search(name)}
        if not hits:
            example = next(iter(candidates), "model.layers.0.mlp.up_proj")
            raise UserError(f"layer pattern {pattern!r} matches no linear layer", hint=f"names look like {example!r}")
        chosen.update(hits)
    return {name: chosen[name] for name in candidates if name in chosen}


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A user's regex, or a one-line error when it does not compile."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"bad layer pattern {pattern!r}: {exc}", hint="patterns are regular expressions, e.g. 'mlp\\.'") from None


def matching(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """The subset of ``names`` matched by any pattern; each pattern must match at least one name."""
    names = list(names)
    found: set[str] = set()
    for pattern in patterns:
        regex = compile_pattern(pattern)
        hits = {n for n in names if regex.search(n)}
        if not hits:
            raise UserError(f"layer pattern {pattern!r} matches none of the layers being compressed")
        found |= hits
    return found
