"""One generic registry for criteria, architectures and datasets.

Registration sits beside the code it registers (``@CRITERIA.register("taylor")``); unknown names
fail with the list of known ones and a did-you-mean suggestion.

A registry may also *declare* an entry: its name, aliases, the module that registers it, and a
few static facts (a summary, unit kinds). Declared names resolve, and ``catalog`` lists them,
without importing their modules (criteria and adapters import torch and transformers: seconds),
so ``secateurs ls`` and name checks stay instant; ``get`` imports the one module it needs.
Registration checks the object against its declaration, so the two cannot drift apart.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from secateurs.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Declared:
    """A registry entry known before its module is imported."""

    module: str
    aliases: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name → object mapping with aliases and helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._declared: dict[str, Declared] = {}

    def declare(
        self, name: str, module: str, *, aliases: tuple[str, ...] = (), **info: Any
    ) -> None:
        """Announce that importing ``module`` registers ``name`` with these aliases and facts
        (``info``: attribute name → value, or the value a method of that name returns)."""
        self._check_free(name, aliases)
        self._declared[name] = Declared(module, tuple(aliases), info)
        self._aliases.update({alias: name for alias in aliases})

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator (or plain call) registering ``obj`` under ``name`` and ``aliases``."""

        def add(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return add

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        declared = self._declared.get(name)
        if declared is None or name in self._entries:
            self._check_free(name, aliases)
        else:
            _check_declaration(self.kind, name, obj, tuple(aliases), declared)
        self._entries[name] = obj
        self._aliases.update({alias: name for alias in aliases})

    def _check_free(self, name: str, aliases: tuple[str, ...]) -> None:
        for key in (name, *aliases):
            if key in self._entries or key in self._declared or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (resolving aliases); raises with suggestions."""
        key = name.strip().lower()
        if key in self._entries or key in self._declared:
            return key
        if key in self._aliases:
            return self._aliases[key]
        known = self.names()
        close = difflib.get_close_matches(key, [*known, *self._aliases], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(known)}.")

    def get(self, name: str) -> T:
        key = self.canonical(name)
        if key not in self._entries:
            self._load(key)
        return self._entries[key]

    def _load(self, name: str) -> None:
        module = self._declared[name].module
        importlib.import_module(module)
        if name not in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is declared in {module}, which did not register it"
            )

    def fact(self, name: str, key: str) -> Any:
        """A declared fact of ``name`` (e.g. its unit kinds), read without importing its module;
        for an entry registered without a declaration, the object's attribute."""
        name = self.canonical(name)
        declared = self._declared.get(name)
        if declared is not None and key in declared.info:
            return declared.info[key]
        value = getattr(self.get(name), key)
        return value() if callable(value) else value

    def names(self) -> list[str]:
        return sorted({*self._entries, *self._declared})

    def items(self) -> Iterator[tuple[str, T]]:
        """Every entry, declared ones imported."""
        for name in self._declared:
            if name not in self._entries:
                self._load(name)
        return iter(sorted(self._entries.items()))

    def loaded(self) -> Iterator[tuple[str, T]]:
        """The entries registered so far (nothing imported)."""
        return iter(sorted(self._entries.items()))

    def catalog(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, declared facts) of every declared entry, without importing anything."""
        return iter(sorted((name, d.info) for name, d in self._declared.items()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (
            name in self._entries or name in self._declared or name in self._aliases
        )

    def __len__(self) -> int:
        return len(self.names())


def _check_declaration(kind: str, name: str, obj: Any, aliases: tuple, declared: Declared) -> None:
    """The registered object must be what its declaration says (aliases and facts)."""
    problems = [f"aliases {aliases} != {declared.aliases}"] if aliases != declared.aliases else []
    for key, value in declared.info.items():
        actual = getattr(obj, key, None)
        actual = actual() if callable(actual) else actual
        if actual != value:
            problems.append(f"{key} {actual!r} != declared {value!r}")
    if problems:
        raise ValueError(
            f"{kind} {name!r} differs from its declaration in the registry's table: "
            f"{'; '.join(problems)}. Update the table beside the registry."
        )
