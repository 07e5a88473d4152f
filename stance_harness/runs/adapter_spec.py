"""One `--adapter [NAME=]PATH` argument, parsed: torch-free, so the options' start-up checks and
the plugin's test ids read it without loading the adapter machinery (runs/adapters.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stance_harness.core.errors import HarnessError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no '.': a NAME is one component of a metric's name


@dataclass(frozen=True)
class AdapterSpec:
    """One `--adapter` argument: the directory, and the name its metrics are namespaced by."""

    name: str
    path: Path
    text: str  # as given, for messages


def parse_adapter_spec(text) -> AdapterSpec:
    """`NAME=PATH` (the namespace is NAME) or `PATH` (the directory's name). A PATH that exists
    as given is taken whole, even if it holds '='."""
    if isinstance(text, AdapterSpec):
        return text
    text = str(text)
    head, equals, tail = text.partition("=")
    if equals and not Path(text).expanduser().exists():
        if not _NAME_RE.match(head):
            raise HarnessError(f"--adapter {text}: {head!r} is not a NAME for NAME=PATH; use letters, digits, '_' "
                               f"and '-' (it names the metrics, e.g. curious-v2.ece)")
        if not tail:
            raise HarnessError(f"--adapter {text}: no PATH after '='; write NAME=PATH, e.g. curious-v2=adapters/mine")
        return AdapterSpec(head, Path(tail).expanduser(), text)
    path = Path(text).expanduser()
    return AdapterSpec(path.name or path.resolve().name, path, text)
