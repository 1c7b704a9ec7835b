"""One generic registry for criteria, architectures and datasets.

Registration sits beside the code it registers (``@CRITERIA.register("taylor")``); unknown names
fail with the list of known ones and a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from secateurs.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object mapping with aliases and helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator (or plain call) registering ``obj`` under ``name`` and ``aliases``."""

        def add(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return add

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[name] = obj
        self._aliases.update({alias: name for alias in aliases})

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (resolving aliases); raises with suggestions."""
        key = name.strip().lower()
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        known = sorted(self._entries)
        close = difflib.get_close_matches(key, [*known, *self._aliases], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(known)}.")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __len__(self) -> int:
        return len(self._entries)
