"""Stances as data: one YAML file per stance, validated with errors that name file and field."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .registry import HarnessError, suggest

_SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")


class StanceFileError(HarnessError):
    def __init__(self, path: Path | str, field: str, problem: str):
        self.path, self.field = str(path), field
        super().__init__(f"{path}: field '{field}': {problem}")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str  # written in the stance
    neutral: str  # the same prompt answered without the stance


@dataclass(frozen=True)
class Probe:
    prompt: str
    stance: str  # a stance-marked continuation
    neutral: str  # a neutral continuation


@dataclass(frozen=True)
class Stance:
    name: str
    version: str
    description: str
    markers: tuple[str, ...]
    examples: tuple[Example, ...]
    probes: tuple[Probe, ...]
    path: str = ""

    def training_examples(self, n: int | None = None) -> tuple[Example, ...]:
        if n is None:
            return self.examples
        if isinstance(n, bool) or not isinstance(n, int):
            raise HarnessError(f"examples must be a whole number of training examples (1..{len(self.examples)}), "
                               f"got {n!r}")
        if not 1 <= n <= len(self.examples):
            raise HarnessError(
                f"stance {self.name!r} has {len(self.examples)} training examples; asked for {n} "
                f"(allowed: 1..{len(self.examples)})"
            )
        return self.examples[:n]

    def provenance(self) -> dict:
        return {"name": self.name, "version": self.version, "path": self.path,
                "examples": len(self.examples), "probes": len(self.probes)}

    def identity(self) -> dict:
        """Name, version and a hash of the content: an edited file without a version bump is still new."""
        content = json.dumps([self.description, self.markers, [asdict(e) for e in self.examples],
                              [asdict(p) for p in self.probes]], sort_keys=True)
        return {"name": self.name, "version": self.version,
                "content": hashlib.sha256(content.encode()).hexdigest()[:16]}


def _text(path, field, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StanceFileError(path, field, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _records(path, field, value, cls, keys) -> tuple:
    if not isinstance(value, list) or not value:
        raise StanceFileError(path, field, "must be a non-empty list")
    out = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise StanceFileError(path, where, f"must be a mapping with keys {', '.join(keys)}")
        missing = [k for k in keys if k not in item]
        extra = [k for k in item if k not in keys]
        if extra:  # first: a misspelt key explains the missing one
            raise StanceFileError(path, f"{where}.{extra[0]}", f"is not a known key.{suggest(str(extra[0]), list(keys))} (allowed: {', '.join(keys)})")
        if missing:
            raise StanceFileError(path, f"{where}.{missing[0]}", "is missing")
        out.append(cls(**{k: _text(path, f"{where}.{k}", item[k]) for k in keys}))
    return tuple(out)


TOP_LEVEL_KEYS = ("name", "version", "description", "markers", "examples", "probes")


def parse_stance(data, path: Path | str) -> Stance:
    if not isinstance(data, dict):
        raise StanceFileError(path, "<top>", f"must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise StanceFileError(path, str(key), f"is not a known key.{suggest(str(key), list(TOP_LEVEL_KEYS))} (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    for key in TOP_LEVEL_KEYS:
        if key not in data:
            raise StanceFileError(path, key, "is missing")
    name = _text(path, "name", data["name"])
    stem = Path(path).stem
    if stem and name != stem:
        raise StanceFileError(path, "name", f"is {name!r} but the file is named {stem!r}; they must match")
    version = data["version"]
    if not isinstance(version, str) or not _SEMVER.match(version):
        raise StanceFileError(path, "version", f"must be a quoted semver string like \"1.0.0\", got {version!r}")
    markers = data["markers"]
    if not isinstance(markers, list) or not markers:
        raise StanceFileError(path, "markers", "must be a non-empty list of phrases")
    markers = tuple(_text(path, f"markers[{i}]", m).lower() for i, m in enumerate(markers))
    examples = _records(path, "examples", data["examples"], Example, ("prompt", "response", "neutral"))
    probes = _records(path, "probes", data["probes"], Probe, ("prompt", "stance", "neutral"))
    seen = {e.prompt for e in examples}
    for i, probe in enumerate(probes):
        if probe.prompt in seen:
            raise StanceFileError(path, f"probes[{i}].prompt", "repeats a training prompt; probes must be held out")
    return Stance(name, version, _text(path, "description", data["description"]), markers, examples, probes, str(path))


def load_stance_file(path: Path | str) -> Stance:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HarnessError(f"stance file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise StanceFileError(path, "<file>", f"is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                                              f"save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as exc:
        raise StanceFileError(path, "<yaml>", f"is not valid YAML: {exc}") from None
    return parse_stance(data, path)


def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """safe_load, refusing YAML aliases: a stance needs none, and an alias bomb expands a few
        lines into gigabytes."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "stance files may not use YAML aliases (*name); "
                                                  "write the value out", event.start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


class _LazyLoader:
    """The loader class, made on first use (PyYAML is imported only when a stance loads)."""

    _cls = None

    def __new__(cls, stream):
        if cls._cls is None:
            cls._cls = _no_alias_loader()
        return cls._cls(stream)


_NoAliasLoader = _LazyLoader


def stance_dirs(extra: list[str | Path] = ()) -> list[Path]:
    """Where stance files are looked up: `extra` (--stance-dir, which must exist), then
    $STANCE_HARNESS_STANCES, ./stances and the harness's own."""
    for d in extra:
        if not Path(d).is_dir():
            raise HarnessError(f"--stance-dir {d}: no such directory")
    dirs = [Path(d) for d in extra]
    if os.environ.get("STANCE_HARNESS_STANCES"):
        dirs += [Path(d) for d in os.environ["STANCE_HARNESS_STANCES"].split(os.pathsep)]
    dirs += [Path.cwd() / "stances", Path(__file__).resolve().parent.parent / "stances"]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def stance_files(extra: list[str | Path] = ()) -> dict[str, list[Path]]:
    """Every stance file by name, in search order; a name with two files is ambiguous."""
    found: dict[str, list[Path]] = {}
    for directory in stance_dirs(extra):
        for path in sorted(directory.glob("*.yaml")):
            found.setdefault(path.stem, []).append(path)
    return found


def available_stances(extra: list[str | Path] = ()) -> dict[str, Path]:
    return {name: paths[0] for name, paths in stance_files(extra).items()}


def load_stance(name_or_path: str | Path, extra_dirs: list[str | Path] = ()) -> Stance:
    """A stance by name (looked up in the stance dirs) or by a path to its YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        return load_stance_file(candidate)
    known = stance_files(extra_dirs)
    name = str(name_or_path)
    if name not in known:
        dirs = ", ".join(str(d) for d in stance_dirs(extra_dirs)) or "none found"
        raise HarnessError(
            f"unknown stance {name!r}.{suggest(name, list(known))} "
            f"Known stances: {', '.join(known) or 'none'} (searched: {dirs})"
        )
    if len(known[name]) > 1:  # a user's stance shadowing another is an error, not a silent pick
        raise HarnessError(f"stance {name!r} is defined in {len(known[name])} places: "
                           f"{', '.join(str(p) for p in known[name])}. Rename one, or name the file to use "
                           f"(stance='{known[name][0]}')")
    return load_stance_file(known[name][0])
