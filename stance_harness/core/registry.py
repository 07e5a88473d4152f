"""One generic registry, used once per extension point (models, methods, architectures).

Habits taken from lm-evaluation-harness's Registry: duplicates are rejected, and an unknown
name is an error that lists what exists. Added here: close-match suggestions, and plug-ins
(`load_plugins`, e.g. entry points) loaded once, when the registry is first looked into.
"""

from __future__ import annotations

import difflib
import inspect
from importlib import metadata
from typing import Callable, Generic, Iterator, TypeVar

from stance_harness.core.errors import HarnessError

T = TypeVar("T")


class UnknownNameError(HarnessError, KeyError):
    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}.{suggest(name, known)} Known {kind}s: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str, load_plugins: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._load_plugins = load_plugins  # called once, at the first lookup (not at registration)

    def _loaded(self) -> dict[str, T]:
        if self._load_plugins is not None:
            load, self._load_plugins = self._load_plugins, None  # first: a plug-in may look up while loading
            load()
        return self._items

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """`registry.register("x", obj)` or `@registry.register("x")`."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def decorator(target: T) -> T:
            self._add(name, target)
            return target

        return decorator

    def _add(self, name: str, obj: T) -> None:
        if not name or name != name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string without spaces: {name!r}")
        known = self._items.get(name)
        if known is not None and known is not obj and not _same_definition(known, obj):
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
        self._items[name] = obj

    def unregister(self, name: str) -> T:
        """Remove an entry (tests and plugins that register one for a while)."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        items = self._loaded()
        try:
            return items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, list(items)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def names(self) -> list[str]:
        return list(self._loaded())

    def items(self):
        return self._loaded().items()


def _same_definition(known, new) -> bool:
    """The same class (or an instance of it) defined again: a conftest.py imported a second time."""
    a, b = (x if isinstance(x, type) else type(x) for x in (known, new))
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__) and a is not object


def load_entry_points(group: str, kind: str, base: type, register: Callable[[type], object],
                      registered: Callable[[type], bool]) -> None:
    """Each entry point of `group` names a module whose import registers its plug-ins, or a
    subclass of `base`, registered here unless `registered(cls)` says its module did; `kind`
    names them in errors ("method", "judge")."""
    for entry in metadata.entry_points(group=group):
        where = f"{kind} plug-in {entry.name!r} ({entry.value}, from {entry.dist.name if entry.dist else 'unknown'})"
        try:
            target = entry.load()
        except Exception as err:
            raise HarnessError(f"{where}: importing it failed: {type(err).__name__}: {err}") from err
        if isinstance(target, type) and issubclass(target, base):
            if not registered(target):
                try:
                    register(target)
                except (TypeError, ValueError) as err:
                    raise HarnessError(f"{where}: {err}") from None
        elif not inspect.ismodule(target):
            raise HarnessError(f"{where}: names a {type(target).__name__}; it must name a module or a "
                               f"{base.__name__} subclass")
