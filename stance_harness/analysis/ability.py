"""General ability before and after adaptation, in the terms continual learning uses.

A probe set (stance_harness/probesets/*.yaml) holds short prompts in families (factual, arithmetic,
instruction) whose replies are checked by rules that accept a correct answer said in a full
sentence ("The capital of Australia is Canberra.") and not by whole-string match. Scoring the
base's and the adapted model's replies gives, per probe, 1 (correct) or 0: the paired unit. From
those:

- retention per family: adapted accuracy / base accuracy (None where the base got none right);
- backward transfer (BWT): the mean over families of adapted − base accuracy, as GEM and
  mammoth define it for earlier tasks (negative: forgotten);
- regressions: the probes the base answered correctly and the adapted model does not, with
  both replies; gains the other way round;
- a pattern name for the per-family drops: "none", "minimal", "selective" or "broad" (rules
  in `forgetting_pattern`), and a selectivity index: the largest family drop minus the mean drop.

Pure: replies in, numbers out. Generating the replies is the run's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stance_harness.core.errors import HarnessError

PROBESETS_DIR = Path(__file__).resolve().parent.parent / "probesets"
DEFAULT_PROBESET = "general-ability"
RULE_KEYS = ("accept", "reject", "number", "max_words")
# A family "drops" when its accuracy falls by more than this; under it, the change is noise-sized
# for a family of about ten probes (one probe is 0.08-0.125).
DROP = 0.10

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_RE = re.compile(r"-?\d+(?:[.,]\d+)?|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class AbilityProbe:
    id: str
    family: str
    prompt: str
    accept: tuple[str, ...] = ()
    reject: tuple[str, ...] = ()
    number: float | None = None
    max_words: int | None = None


@dataclass(frozen=True)
class ProbeSet:
    name: str
    version: int
    probes: tuple[AbilityProbe, ...] = field(default_factory=tuple)

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(p.family for p in self.probes))


def load_probeset(name_or_path: str | Path = DEFAULT_PROBESET) -> ProbeSet:
    """A probe set by name (stance_harness/probesets/NAME.yaml) or path, validated field by field."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROBESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROBESETS_DIR.glob("*.yaml"))
        raise HarnessError(f"unknown probe set {str(name_or_path)!r}: no file {path}. Known: {', '.join(known)}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("families"), dict):
        raise HarnessError(f"{path}: a probe set is a mapping with 'version' and 'families' (family -> list of probes)")
    probes, seen = [], set()
    for family, items in data["families"].items():
        if not isinstance(items, list) or not items:
            raise HarnessError(f"{path}: family {family!r} must be a non-empty list of probes")
        for i, item in enumerate(items):
            where = f"{path}: {family}[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("prompt"), str):
                raise HarnessError(f"{where}: each probe needs a string 'id' and 'prompt'")
            unknown = set(item) - {"id", "prompt", *RULE_KEYS}
            if unknown:
                raise HarnessError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                                   f"allowed: id, prompt, {', '.join(RULE_KEYS)}")
            if item["id"] in seen:
                raise HarnessError(f"{where}: id {item['id']!r} is used twice")
            seen.add(item["id"])
            if "accept" not in item and "number" not in item:
                raise HarnessError(f"{where}: a probe needs a rule that can accept: 'accept' or 'number'")
            probes.append(AbilityProbe(
                id=item["id"], family=str(family), prompt=item["prompt"],
                accept=tuple(str(a) for a in item.get("accept", ())), reject=tuple(str(r) for r in item.get("reject", ())),
                number=float(item["number"]) if "number" in item else None,
                max_words=int(item["max_words"]) if "max_words" in item else None,
            ))
    return ProbeSet(name=path.stem, version=int(data.get("version", 1)), probes=tuple(probes))


def _says(reply: str, phrase: str) -> bool:
    """`phrase` appears in `reply` as whole words, case-insensitively."""
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", reply, re.IGNORECASE) is not None


def numbers_in(text: str) -> list[float]:
    """The numbers a text states, in order: digits ("56", "1,000" as 1000, "2.5") and the words zero..twenty."""
    found = []
    for token in _NUMBER_RE.findall(text):
        word = token.lower()
        if word in _NUMBER_WORDS:
            found.append(float(_NUMBER_WORDS[word]))
        elif re.fullmatch(r"-?\d{1,3}(,\d{3})+", token):
            found.append(float(token.replace(",", "")))
        else:
            found.append(float(token.replace(",", ".")))
    return found


def check_reply(probe: AbilityProbe, reply: str) -> tuple[bool, str]:
    """(correct, why) for one reply under the probe's rules."""
    if probe.max_words is not None and len(reply.split()) > probe.max_words:
        return False, f"{len(reply.split())} words, more than {probe.max_words}"
    wrong = [r for r in probe.reject if _says(reply, r)]
    if wrong:
        return False, f"says {wrong[0]!r}"
    if probe.number is not None:
        own = set(numbers_in(probe.prompt))
        stated = [n for n in numbers_in(reply) if n not in own]
        if not stated:
            return False, "states no number"
        if stated[0] != probe.number:
            return False, f"says {stated[0]:g}, not {probe.number:g}"
        return True, f"says {probe.number:g}"
    named = [a for a in probe.accept if _says(reply, a)]
    if not named:
        return False, f"does not say {' or '.join(repr(a) for a in probe.accept)}"
    return True, f"says {named[0]!r}"


def score(probeset: ProbeSet, replies: list[str]) -> list[tuple[bool, str]]:
    if len(replies) != len(probeset.probes):
        raise HarnessError(f"probe set {probeset.name!r} has {len(probeset.probes)} probes, got {len(replies)} replies")
    return [check_reply(p, r) for p, r in zip(probeset.probes, replies)]


def forgetting_pattern(drops: dict[str, float]) -> str:
    """A name for per-family accuracy drops (base − adapted; positive is a loss):
    "none" no family drops by more than DROP and none falls at all on average;
    "minimal" no family drops by more than DROP;
    "broad" at least half the families drop by more than DROP;
    "selective" some, fewer than half, do."""
    if not drops:
        return "none"
    dropped = [f for f, d in drops.items() if d > DROP]
    if not dropped:
        return "none" if sum(drops.values()) <= 0 else "minimal"
    return "broad" if 2 * len(dropped) >= len(drops) else "selective"


def summarize(probeset: ProbeSet, base_replies: list[str], adapted_replies: list[str]) -> dict:
    """Retention, backward transfer, regressions and the pattern, with per-probe units for paired checks."""
    base, adapted = score(probeset, base_replies), score(probeset, adapted_replies)
    families: dict[str, dict] = {}
    for probe, (b, _), (a, _) in zip(probeset.probes, base, adapted):
        fam = families.setdefault(probe.family, {"probes": 0, "base_correct": 0, "adapted_correct": 0})
        fam["probes"] += 1
        fam["base_correct"] += b
        fam["adapted_correct"] += a
    for fam in families.values():
        fam["base_accuracy"] = fam["base_correct"] / fam["probes"]
        fam["adapted_accuracy"] = fam["adapted_correct"] / fam["probes"]
        fam["retention"] = fam["adapted_accuracy"] / fam["base_accuracy"] if fam["base_correct"] else None
    drops = {f: v["base_accuracy"] - v["adapted_accuracy"] for f, v in families.items()}
    mean_drop = sum(drops.values()) / len(drops)
    rows = [{"id": p.id, "family": p.family, "prompt": p.prompt, "base_reply": br, "adapted_reply": ar,
             "base_correct": b, "adapted_correct": a, "base_why": bw, "adapted_why": aw}
            for p, br, ar, (b, bw), (a, aw) in zip(probeset.probes, base_replies, adapted_replies, base, adapted)]
    n = len(rows)
    return {
        "probeset": probeset.name, "version": probeset.version, "probes": n,
        "base_accuracy": sum(r["base_correct"] for r in rows) / n,
        "adapted_accuracy": sum(r["adapted_correct"] for r in rows) / n,
        "families": families,
        "backward_transfer": -mean_drop,
        "selectivity": max(drops.values()) - mean_drop,
        "pattern": forgetting_pattern(drops),
        "regressions": [r for r in rows if r["base_correct"] and not r["adapted_correct"]],
        "gains": [r for r in rows if r["adapted_correct"] and not r["base_correct"]],
        "per_unit": [float(r["adapted_correct"]) - float(r["base_correct"]) for r in rows],
        "unit": "probe", "unit_ids": [r["id"] for r in rows], "rows": rows,
    }
