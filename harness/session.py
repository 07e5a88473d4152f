"""Run-wide state: options, the model cache, the run cache, and the result collector."""

from __future__ import annotations

import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .report.records import TestRecord


@dataclass
class HarnessOptions:
    model: str
    model_args: object  # ModelArgs
    stance_dirs: list[str]
    reports_dir: Path | None  # None: write no reports
    rootdir: Path
    args: list[str]
    analysis_timeout: float | None = None
    repeat: int = 1  # --repeat N
    adapters: list[str] = field(default_factory=list)  # --adapter PATH ...


@dataclass
class HarnessSession:
    options: HarnessOptions
    progress: Callable[[str], None] = lambda _msg: None
    records: dict[str, TestRecord] = field(default_factory=dict)
    run_summaries: dict[str, dict] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    remote_provenance: dict = field(default_factory=lambda: {"models": [], "stances": []})  # from xdist workers
    _models: dict = field(default_factory=dict)
    _runs: dict = field(default_factory=dict)
    _stances: dict = field(default_factory=dict)

    # -- models and stances ---------------------------------------------------------------
    def model(self, name: str | None = None):
        from .models import load_model

        name = name or self.options.model
        if name not in self._models:
            started = time.perf_counter()
            self._models[name] = load_model(name, self.options.model_args, self.progress)
            self.progress(f"loaded model {name} in {time.perf_counter() - started:.1f}s")
        return self._models[name]

    def stance(self, name: str):
        from .stances import load_stance

        if name not in self._stances:
            self._stances[name] = load_stance(name, self.options.stance_dirs)
        return self._stances[name]

    # -- training -------------------------------------------------------------------------
    def train(self, method: str, *, stance: str = "curious-uncertainty", model: str | None = None,
              examples: int | None = None, recipe=None, instruments=None, task: str = "stance-lm",
              repeat: int = 0, **options):
        """Train once per identical request; later identical requests get the same Run.

        `repeat` (from --repeat) offsets the recipe's seed, so each repetition is its own run.
        """
        from .methods import method_config
        from .instruments import InstrumentConfig
        from .training import Recipe, run_id_for, run_training

        loaded = self.model(model)
        stance_obj = self.stance(stance)
        config = method_config(method, options)
        recipe = Recipe.of(recipe)
        if repeat:
            recipe = Recipe.of(recipe, seed=recipe.seed + repeat)
        instruments = InstrumentConfig.of(instruments)
        n = len(stance_obj.training_examples(examples))
        key = run_id_for(loaded, stance_obj, method, config, recipe, n, instruments, task)
        if key not in self._runs:
            self.progress(f"training {method} on {loaded.name} ({stance}, {n} examples, task {task})")
            run = run_training(loaded, stance_obj, method, config, recipe, examples, self.progress, instruments, task)
            run.analysis_timeout = self.options.analysis_timeout
            self._runs[key] = run
        return self._runs[key]

    def runs(self):
        return list(self._runs.values())

    def model_is_embedded(self) -> bool:
        from .models import resolve_model

        return resolve_model(self.options.model).source == "embedded"

    def adapter_run(self, path: str):
        """A saved adapter on the --model base, as a Run (loaded once per path)."""
        from .adapters import load_adapter_run

        key = ("adapter", str(Path(path).resolve()))
        if key not in self._runs:
            self.progress(f"loading adapter {path} onto {self.options.model}")
            run = load_adapter_run(self.model(), path, self.stance)
            run.analysis_timeout = self.options.analysis_timeout
            self._runs[key] = run
        return self._runs[key]

    # -- results --------------------------------------------------------------------------
    def record(self, nodeid: str) -> TestRecord:
        return self.records.setdefault(nodeid, TestRecord(nodeid))

    def summarise_runs(self) -> None:
        for run in self._runs.values():
            if run.run_id not in self.run_summaries:
                self.run_summaries[run.run_id] = run.summary()

    def payload(self, run_id: str) -> dict:
        from .report.writer import environment_info, git_info

        self.summarise_runs()
        models = _unique([m.provenance() for m in self._models.values()] + self.remote_provenance["models"])
        stances = _unique([s.provenance() for s in self._stances.values()] + self.remote_provenance["stances"])
        return {
            "run_id": run_id,
            "started": self.started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": {
                "model": models[0] if models else {"name": self.options.model},
                "models": models,
                "model_args": dict(self.options.model_args.__dict__),
                "stances": stances,
                "git": git_info(self.options.rootdir),
                "environment": environment_info(),
                "args": self.options.args,
                "argv": sys.argv,
            },
            "tests": with_repeats([r.as_dict() for r in self.records.values()]),
            "runs": self.run_summaries,
        }


_REPEAT_PART = re.compile(r"repeat\d+")


def repeat_base(nodeid: str) -> str:
    """The test id without --repeat's part: `test_x[repeat2-lora]` -> `test_x[lora]`; `test_x[repeat0]` -> `test_x`."""
    head, bracket, params = nodeid.partition("[")
    if not bracket or not params.endswith("]"):
        return nodeid
    parts = params[:-1].split("-")
    kept = [p for p in parts if not _REPEAT_PART.fullmatch(p)]
    if len(kept) == len(parts):
        return nodeid
    return head + (f"[{'-'.join(kept)}]" if kept else "")


def with_repeats(tests: list[dict]) -> list[dict]:
    """Under --repeat, each repetition's record gets its group's mean, std, min and max per metric."""
    groups: dict[str, list[dict]] = {}
    for test in tests:
        base = repeat_base(test["nodeid"])
        if base != test["nodeid"]:
            groups.setdefault(base, []).append(test)
    for base, members in groups.items():
        names = dict.fromkeys(k for t in members for k in t["metrics"])
        summary = {"base_nodeid": base, "n": len(members), "metrics": {}}
        for name in names:
            values = [t["metrics"][name] for t in members if isinstance(t["metrics"].get(name), (int, float))]
            if values:
                summary["metrics"][name] = {
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values), "n": len(values)}
        for test in members:
            test["repeats"] = summary
    return tests


def _unique(items: list[dict]) -> list[dict]:
    seen, out = set(), []
    for item in items:
        key = repr(sorted(item.items()))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
