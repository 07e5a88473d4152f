"""Stances as data: one YAML file per stance, validated with errors that name file and field.

A stance's training examples are in the YAML file (`examples`: prompt, response, neutral) or in
a JSONL file it names (`examples_file`) in TRL's formats: `{"messages": [...]}` or
`{"prompt": ..., "completion": ...}`, as strings or as lists of messages. A bad row's error
names the file, the line and the field. Probes are always in the YAML file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from stance_harness.core.registry import HarnessError, suggest

_SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")


class StanceFileError(HarnessError):
    def __init__(self, path: Path | str, field: str, problem: str):
        self.path, self.field = str(path), field
        super().__init__(f"{path}: field '{field}': {problem}")


class ExamplesFileError(StanceFileError):
    """A bad row of a JSONL examples file: names the file, the line (from 1) and the field."""

    def __init__(self, path: Path | str, line: int, field: str, problem: str):
        self.line = line
        HarnessError.__init__(self, f"{path}, line {line}: field '{field}': {problem}")
        self.path, self.field = str(path), field


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant
    content: str
    loss: bool = False  # the training loss counts this turn's tokens (assistant turns to learn)


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str  # written in the stance
    neutral: str = ""  # the same prompt answered without the stance; "" where the data has none (JSONL)
    messages: tuple[Message, ...] = ()  # the whole conversation, where the data gave one

    def conversation(self) -> tuple[Message, ...]:
        """The turns training sees: the data's conversation, or the prompt and the response to learn."""
        return self.messages or (Message("user", self.prompt), Message("assistant", self.response, loss=True))

    def record(self) -> dict:
        """The example as JSON (what the stance's content hash covers)."""
        if self.messages:
            return {"messages": [asdict(m) for m in self.messages]}
        return {"prompt": self.prompt, "response": self.response, "neutral": self.neutral}


@dataclass(frozen=True)
class Probe:
    prompt: str
    stance: str  # a stance-marked continuation
    neutral: str  # a neutral continuation


@dataclass(frozen=True)
class LabelledReply:
    reply: str
    label: int  # 1: the reply is in the stance; 0: it is not
    prompt: str = ""  # what the reply answers, where given (a model judge reads it)


@dataclass(frozen=True)
class Stance:
    name: str
    version: str
    description: str
    markers: tuple[str, ...]
    examples: tuple[Example, ...]
    probes: tuple[Probe, ...]
    path: str = ""
    examples_file: str = ""  # the JSONL file the examples came from, if any
    examples_digest: str = ""  # sha256 of that file's bytes
    # For judges only, so outside `identity()`: adding them does not re-key runs (a judge's own key has them).
    judge_rubric: str = ""  # the model judge's rubric; "": stance_harness.judges.RUBRIC
    labelled: tuple[LabelledReply, ...] = ()  # replies labelled by people, to measure judges against

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
        found = {"name": self.name, "version": self.version, "path": self.path,
                 "examples": len(self.examples), "probes": len(self.probes)}
        if self.examples_file:
            found["examples_file"] = {"path": self.examples_file, "sha256": self.examples_digest}
        return found

    def identity(self) -> dict:
        """Name, version and a hash of the content: an edited file without a version bump is still new.
        Examples from a JSONL file add that file's digest."""
        content = json.dumps([self.description, self.markers, [e.record() for e in self.examples],
                              [asdict(p) for p in self.probes]], sort_keys=True)
        found = {"name": self.name, "version": self.version,
                 "content": hashlib.sha256(content.encode()).hexdigest()[:16]}
        if self.examples_file:
            found["examples_file"] = self.examples_digest
        return found


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
# examples_file: the examples in a JSONL file instead; judge_rubric, labelled_replies: for judges
ALL_KEYS = TOP_LEVEL_KEYS + ("examples_file", "judge_rubric", "labelled_replies")
RUBRIC_FIELDS = ("description", "prompt", "reply")
LABELLED_KEYS = ("reply", "label", "prompt")


def _rubric(path, value) -> str:
    """A format string over RUBRIC_FIELDS that shows the judge the reply."""
    text = _text(path, "judge_rubric", value)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise StanceFileError(path, "judge_rubric", f"is not a valid template ({exc}); write a literal brace as "
                                                    f"{{{{ or }}}}") from None
    for name in fields:
        if name not in RUBRIC_FIELDS:
            raise StanceFileError(path, "judge_rubric", f"has the placeholder {{{name}}}.{suggest(name, list(RUBRIC_FIELDS))}"
                                                        f" (allowed: {', '.join('{' + f + '}' for f in RUBRIC_FIELDS)})")
    if "reply" not in fields:
        raise StanceFileError(path, "judge_rubric", "must show the judge the reply: it has no {reply} placeholder")
    return text


def _labelled(path, value) -> tuple[LabelledReply, ...]:
    field = "labelled_replies"
    if not isinstance(value, list) or not value:
        raise StanceFileError(path, field, "must be a non-empty list of {reply: ..., label: 0 or 1}")
    out = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise StanceFileError(path, where, "must be a mapping with keys reply, label (and optionally prompt)")
        for key in item:
            if key not in LABELLED_KEYS:
                raise StanceFileError(path, f"{where}.{key}", f"is not a known key.{suggest(str(key), list(LABELLED_KEYS))}"
                                                              f" (allowed: {', '.join(LABELLED_KEYS)})")
        for key in ("reply", "label"):
            if key not in item:
                raise StanceFileError(path, f"{where}.{key}", "is missing")
        label = item["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise StanceFileError(path, f"{where}.label", f"must be 0 or 1 (1: the reply is in the stance), got {label!r}")
        prompt = _text(path, f"{where}.prompt", item["prompt"]) if "prompt" in item else ""
        out.append(LabelledReply(_text(path, f"{where}.reply", item["reply"]), int(label), prompt))
    if len({r.label for r in out}) < 2:
        raise StanceFileError(path, field, f"holds only label {out[0].label}; agreement needs replies of both labels")
    return tuple(out)


def parse_stance(data, path: Path | str) -> Stance:
    if not isinstance(data, dict):
        raise StanceFileError(path, "<top>", f"must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in data:
        if key not in ALL_KEYS:
            raise StanceFileError(path, str(key), f"is not a known key.{suggest(str(key), list(ALL_KEYS))} (allowed: {', '.join(ALL_KEYS)})")
    if "examples" in data and "examples_file" in data:
        raise StanceFileError(path, "examples_file", "and 'examples' are both given; keep one")
    for key in TOP_LEVEL_KEYS:
        if key not in data and not (key == "examples" and "examples_file" in data):
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
    examples_file, digest = "", ""
    if "examples_file" in data:
        examples_file = _text(path, "examples_file", data["examples_file"])
        file = Path(path).parent / examples_file  # relative to the stance file
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise StanceFileError(path, "examples_file", f"{file} cannot be read ({exc.strerror or exc})") from None
        examples, digest, examples_file = parse_examples_jsonl(raw, file), hashlib.sha256(raw).hexdigest(), str(file)
    else:
        examples = _records(path, "examples", data["examples"], Example, ("prompt", "response", "neutral"))
    probes = _records(path, "probes", data["probes"], Probe, ("prompt", "stance", "neutral"))
    seen = {m.content for e in examples for m in e.conversation() if m.role == "user"}
    for i, probe in enumerate(probes):
        if probe.prompt in seen:
            raise StanceFileError(path, f"probes[{i}].prompt", "repeats a training prompt; probes must be held out")
    rubric = _rubric(path, data["judge_rubric"]) if "judge_rubric" in data else ""
    labelled = _labelled(path, data["labelled_replies"]) if "labelled_replies" in data else ()
    return Stance(name, version, _text(path, "description", data["description"]), markers, examples, probes, str(path),
                  examples_file, digest, rubric, labelled)


ROW_FORMATS = '{"messages": [...]} or {"prompt": ..., "completion": ...}'


def parse_examples_jsonl(raw: bytes, path: Path | str) -> tuple[Example, ...]:
    """Training examples from JSONL in TRL's formats, one example a line (blank lines skipped).

    - `{"messages": [{"role": ..., "content": ...}, ...]}`: the loss counts every assistant turn;
    - `{"prompt": "...", "completion": "..."}`: the loss counts the completion;
    - `{"prompt": [messages], "completion": [messages]}`: the loss counts the completion's turns.
    Other keys in a row (ids, sources) are ignored, as TRL ignores unused columns."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StanceFileError(path, "<file>", f"is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            examples.append(_jsonl_example(path, number, line))
    if not examples:
        raise StanceFileError(path, "<file>", f"holds no examples; write one JSON object a line: {ROW_FORMATS}")
    return tuple(examples)


def _jsonl_example(path, line: int, text: str) -> Example:
    def fail(field, problem):
        raise ExamplesFileError(path, line, field, problem)

    try:
        row = json.loads(text)
    except ValueError as exc:
        fail("<json>", f"is not valid JSON ({exc})")
    if not isinstance(row, dict):
        fail("<row>", f"must be a JSON object, {ROW_FORMATS}; got a {type(row).__name__}")
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            fail("messages", "and prompt/completion are both given; a row has one format")
        messages = _messages(fail, "messages", row["messages"], loss_on_assistant=True)
    elif "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                fail(key, f"is missing (a row with {'completion' if key == 'prompt' else 'prompt'} needs both)")
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            for key in ("prompt", "completion"):
                if not row[key].strip():
                    fail(key, "must be a non-empty string")
            return Example(prompt, completion)  # as written: the user's data, not trimmed
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            fail("completion" if isinstance(prompt, (str, list)) else "prompt",
                 f"prompt and completion must both be strings or both lists of messages; got "
                 f"{type(prompt).__name__} and {type(completion).__name__}")
        head = _messages(fail, "prompt", prompt, loss_on_assistant=False)
        tail = _messages(fail, "completion", completion, loss_on_assistant=True)
        for i, message in enumerate(tail):
            if message.role != "assistant":
                fail(f"completion[{i}].role", f"is {message.role!r}; a completion holds assistant turns only")
        messages = head + tail
    else:
        fail("<row>", f"has neither 'messages' nor 'prompt'/'completion' (keys: {', '.join(map(str, row)) or 'none'})."
                      f"{suggest(str(next(iter(row), '')), ['messages', 'prompt', 'completion'])} Rows are {ROW_FORMATS}")
    if messages[0].role == "assistant":
        fail("messages[0].role" if "messages" in row else "prompt[0].role",
             "is 'assistant'; a conversation starts with a system or user turn")
    if not any(m.loss for m in messages):
        fail("messages", "has no assistant turn, so there is nothing to learn")
    last = max(i for i, m in enumerate(messages) if m.loss)
    asked = [m.content for m in messages[:last] if m.role != "assistant"]
    return Example(asked[-1] if asked else "", messages[last].content, messages=messages)


def _messages(fail, field: str, value, loss_on_assistant: bool) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        fail(field, "must be a non-empty list of messages ({\"role\": ..., \"content\": ...})")
    out = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            fail(where, f"must be an object with role and content, got {type(item).__name__}")
        for key in ("role", "content"):
            if key not in item:
                fail(f"{where}.{key}", "is missing")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            fail(f"{where}.role", f"is {role!r}; allowed: {', '.join(ROLES)}.{suggest(str(role), list(ROLES))}")
        if not isinstance(content, str) or not content.strip():
            fail(f"{where}.content", f"must be a non-empty string, got {content!r}")
        out.append(Message(role, content, loss=loss_on_assistant and role == "assistant"))
    return tuple(out)


def load_stance_file(path: Path | str) -> Stance:
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
