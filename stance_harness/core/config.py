"""Configs from user input: one way to turn a mapping into a validated frozen dataclass.

Every config the user writes (recipe, instruments, a method's options, --model-args) comes
through `build_config`, so each refuses an unknown key with the same "did you mean", takes
lists where it stores tuples, and keeps its own checks in its `__post_init__`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from stance_harness.core.registry import HarnessError, suggest

C = TypeVar("C")


def build_config(cls: type[C], value: Any = None, *, what: str, unknown: str,
                 aliases: dict[str, str] | None = None, **overrides) -> C:
    """`cls` from an instance of it, a mapping, or None (the defaults), with `overrides` on top.

    `what` names the config in errors ("recipe"); `unknown` starts the error for a key `cls`
    has no field for ("recipe has no field"); `aliases` map other accepted spellings to field
    names (lr -> learning_rate)."""
    if isinstance(value, cls):
        base = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
    elif value is None:
        base = {}
    elif isinstance(value, dict):
        base = dict(value)
    else:
        raise HarnessError(f"{what} must be a dict (or a {cls.__name__}), got {value!r}")
    base.update(overrides)
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    values = {}
    for key, item in base.items():
        key = (aliases or {}).get(key, key)
        if key not in allowed:
            raise HarnessError(f"{unknown} {key!r}.{suggest(str(key), allowed)} Allowed: {', '.join(allowed) or 'none'}")
        values[key] = tuple(item) if isinstance(item, list) else item
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, item in values.items():
        listed = str(types.get(key, "")).startswith("tuple")
        if isinstance(item, str) and listed and ITEM_TYPES.get(key, str) is str:
            values[key] = item = (item,)  # one name where a list of names goes
        if listed:
            _check_items(what, key, item)
        _check_type(what, key, item, types.get(key))
    return cls(**values)


# What the items of a list field hold, by the field's name: a name means the same in every config
# (the configs keep a bare `tuple` annotation; their source is part of the run key).
ITEM_TYPES = {"layers": int, "kinds": str, "target_modules": str, "interference": str}


def _check_items(what: str, key: str, value) -> None:
    wanted = ITEM_TYPES.get(key)
    if wanted is None or value is None:
        return
    words = "integers (layer indices), e.g. [13, 15]" if wanted is int else "names (strings), e.g. ['q_proj']"
    if not isinstance(value, tuple):
        raise HarnessError(f"{what}: {key} must be a list of {words}, got {value!r}{_type_words(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, wanted):
            raise HarnessError(f"{what}: {key} must be a list of {words}, got {list(value)!r}"
                               f"{': ' + repr(item) + ' is ' + _type_words(item)[2:-1] if item is not None else ''}")


def _type_words(value) -> str:
    """' (a string)': what a wrong value is, for a message; None says itself."""
    if value is None:
        return ""
    words = {str: "a string", int: "an integer", float: "a float", bool: "a bool"}.get(type(value))
    return f" ({words or 'a ' + type(value).__name__})"


_SIMPLE = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "tuple": (tuple,), "dict": (dict,)}
_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string", "tuple": "a list",
          "dict": "a mapping", "None": "None"}


def _check_type(what: str, key: str, value, annotation) -> None:
    """A value of the field's declared type (from its annotation: int, float, bool, str, tuple,
    dict, or one of them "| None"), so a wrong type is a clear error, not a TypeError later."""
    if not isinstance(annotation, str):
        return
    options = [part.strip().split("[")[0] for part in annotation.split("|")]
    if "None" in options and value is None:
        return
    allowed = [t for o in options if o in _SIMPLE for t in _SIMPLE[o]]
    if not allowed or len(allowed) != sum(len(_SIMPLE[o]) for o in options if o != "None" and o in _SIMPLE) or \
            any(o not in _SIMPLE and o != "None" for o in options):
        return  # a type this check does not know: the config's own checks decide
    numeric = bool in allowed or not isinstance(value, bool)  # True is not a number here
    if not (numeric and isinstance(value, tuple(allowed))):
        wanted = " or ".join(_WORDS[o] for o in options)
        raise HarnessError(f"{what}: {key} must be {wanted}, got {value!r}{_type_words(value)}")


def config_fields(cls) -> list[tuple[str, object, str]]:
    """(name, default, help) for each field, for docs and `stance-harness list`."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


def plain(value):
    """A config value as JSON holds it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value
