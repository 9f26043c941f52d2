"""One registry for every kind of named entry (verifiers, domains, adapters, generator
back-ends, advantage estimators, policy losses, KL estimators, divergences, head specs,
IFEval checkers): a second entry under a name is refused, and an unknown name is an
error that lists the known ones. Standard library only, so the pure-math modules and the
sandboxed verifier workers can use it.

`builtins` are modules that register the built-in entries when imported; they are
imported on the first look-up, so importing the module that owns a registry stays cheap.
In a registry made with `imports=True` (adapters, verifiers) a name of the form
`package.module:function` is not looked up but imported (engine.plugins): the user's own.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Sequence, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, *, builtins: Sequence[str] = (), imports: bool = False):
        self.kind = kind  # what an entry is, for messages: "verifier", "policy loss"
        self.imports = imports  # `package.module:function` names are imported
        self._builtins = tuple(builtins)
        self._loaded = not self._builtins
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name already taken is a ValueError."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            old = self._entries[name]
            by = f" (by {old.__module__})" if callable(old) and hasattr(old, "__module__") else ""
            raise ValueError(f"{self.kind} {name!r} is already registered{by}")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: `@REGISTRY.register("name")`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        """The entry under `name`; an unknown name is a KeyError listing the known ones.
        With `imports`, `package.module:function` is imported (a PluginError, also a
        KeyError, says why it cannot be)."""
        if self.imports and isinstance(name, str) and ":" in name:
            from engine.plugins import load_object

            return load_object(name, self.kind)
        self._load_builtins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: a builtin module may look an entry up as it loads
            try:
                for module in self._builtins:
                    importlib.import_module(module)
            except BaseException:
                self._loaded = False
                raise
