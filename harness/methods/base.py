"""What a method is: a validated config plus the pieces it plugs into the one training loop.

A method never owns a loop. It prepares the model (freezing, wrapping), and may contribute
parameter groups, an extra loss term, a per-step schedule, and a view of its own change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import ClassVar

from ..registry import HarnessError, Registry, suggest


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config. Fields carry `metadata={"help": ...}`."""

    @classmethod
    def from_options(cls, method: str, options: dict) -> "MethodConfig":
        allowed = [f.name for f in fields(cls)]
        for key in options:
            if key not in allowed:
                raise HarnessError(
                    f"method {method!r} has no option {key!r}.{suggest(key, allowed)} "
                    f"Its options: {', '.join(allowed) or 'none'}"
                )
        normalised = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return cls(**normalised)

    def as_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, object, str]]:
        out = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, default, f.metadata.get("help", "")))
        return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


class Method:
    """Subclass, set `config_cls`, and register with `@METHODS.register("name")` on an instance."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    summary: ClassVar[str] = ""

    def prepare(self, model, anatomy, config):
        """Freeze or wrap `model` (a fresh copy the run owns); return the model to train."""
        raise NotImplementedError

    def param_groups(self, model, config, recipe) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def extra_loss(self, model, config, step: int):
        return None

    def storage_bytes(self, model, config) -> int:
        """Bytes needed to store the stance: what must be saved besides the base."""
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def effective_deltas(self, model, before: dict, anatomy):
        """(name, W_before, W_after) per matrix as the model sees it; default: the raw params."""
        from ..analysis.deltas import raw_delta_pairs

        return raw_delta_pairs(model, before)

    def target_names(self, model, config) -> list[str]:
        """Raw names of the parameters this method means to change."""
        return [n for n, p in model.named_parameters() if p.requires_grad]


METHODS: Registry[Method] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if not (dataclasses.is_dataclass(cls.config_cls) and issubclass(cls.config_cls, MethodConfig)):
        raise TypeError(f"{cls.__name__}.config_cls must be a MethodConfig dataclass")
    METHODS.register(cls.name, cls())
    return cls
