"""Registries: how a recipe name becomes a plug-in (a method, an objective, a sampler, a callback).

A technique is one module plus one ``register`` call; the recipe schema, the CLI's errors and the
training loop all read the registries, so nothing else changes. Every registration bumps a global
version, which is how the recipe schema knows to rebuild itself with the new plug-in's section.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterator
from typing import Generic, TypeVar

from tunelab.errors import UserError

T = TypeVar("T")

_versions = itertools.count(1)
_version = 0


def version() -> int:
    """Changes whenever any registry changes (the recipe schema caches on it)."""
    return _version


class Registry(Generic[T]):
    """Plug-ins of one kind by recipe name, in registration order."""

    def __init__(self, kind: str, recipe_key: str):
        self.kind = kind
        self.recipe_key = recipe_key
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; registering a name twice replaces the first (tests, reloads)."""
        global _version
        self._entries[name] = entry
        _version = next(_versions)
        return entry

    def get(self, name: str) -> T:
        """The plug-in called ``name``, or a one-line error naming the recipe key and the choices."""
        if name not in self._entries:
            guess = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
            hint = f"did you mean '{guess[0]}'?" if guess else f"registered: {', '.join(self._entries)}"
            raise UserError(f"unknown {self.kind} '{name}'", where=self.recipe_key, hint=hint)
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))
