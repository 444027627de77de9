"""Registries: how a recipe name becomes a plug-in (a method, an objective, a sampler, a callback).

A technique is one module plus one ``register`` call; the recipe schema, the CLI's errors and the
training loop all read the registries, so nothing else changes. Every registration bumps a global
version, which is how the recipe schema knows to rebuild itself with the new plug-in's section.
"""

from __future__ import annotations

import difflib
import itertools
import sys
from collections.abc import Iterator
from typing import Generic, TypeVar

from tunelab.errors import UserError

T = TypeVar("T")

_versions = itertools.count(1)
_version = 0
_registries: list[Registry] = []


def version() -> int:
    """Changes whenever any registry changes (the recipe schema caches on it)."""
    return _version


class Registry(Generic[T]):
    """Plug-ins of one kind by recipe name, in registration order."""

    def __init__(self, kind: str, recipe_key: str):
        self.kind = kind
        self.recipe_key = recipe_key
        self._entries: dict[str, T] = {}
        self._modules: dict[str, str] = {}  # name -> the module outside tunelab that registered it
        _registries.append(self)

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; registering a name twice replaces the first (tests, reloads)."""
        global _version
        self._entries[name] = entry
        caller = _registering_module()
        if caller is not None:
            self._modules[name] = caller
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


def _registering_module() -> str | None:
    """The module whose top-level code made this registration (plug-ins register as their module
    is imported), or None when that module is tunelab's own."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != "<module>":
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return None if not name or name == "tunelab" or name.startswith("tunelab.") else name


def external_plugin_modules() -> list[str]:
    """Modules outside tunelab that registered plug-ins in this process: a child process that
    trains a recipe (``tunelab.jobs``) imports them too, so its recipe schema knows the same
    sections. ``__main__`` is left out (a spawned child re-runs the main module itself)."""
    return sorted({m for registry in _registries for m in registry._modules.values() if m not in ("__main__", "__mp_main__")})
