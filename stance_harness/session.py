"""Run-wide state and work: options, loaded models and stances, the runs, the test records, and
at the end the reports, the baseline gate and the terminal table (`finish`, `display`).

The pytest plugin only wires hooks and fixtures to this object, as pytest-benchmark's plugin
does to its BenchmarkSession. Nothing here imports pytest.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stance_harness.core.devices import resolve_device
from stance_harness.models import LoadedModel, ModelArgs, load_model, resolve_model
from stance_harness.core.provenance import environment_info, git_info
from stance_harness.report import gate, store
from stance_harness.report.markdown import render_step_summary
from stance_harness.core.metrics import declared_directions, metrics_from_payload
from stance_harness.report.records import TestRecord, repeat_base
from stance_harness.report.sections import report_id_of
from stance_harness.report.verdicts import VerdictBook, correct_families, correct_for_multiplicity, save_records
from stance_harness.core.errors import HarnessError
from stance_harness.runs.residency import DEFAULT_SHARE, TRAINING_FOOTPRINT, ResidentModels, free_memory
from stance_harness.runs.services import RunServices
from stance_harness.stances import Stance, load_stance

if TYPE_CHECKING:
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.runs.runstore import RunStore

# Training, the run store and the methods import torch: they are imported where first used, so the
# plugin starts (and `pytest --help` or --co answers) without torch.


def plan(*args, **kwargs):
    from stance_harness.runs.training import plan

    return plan(*args, **kwargs)


def train_run(*args, **kwargs):
    from stance_harness.runs.training import train_run

    return train_run(*args, **kwargs)


def launch(*args, **kwargs):
    from stance_harness.runs.distributed import launch

    return launch(*args, **kwargs)


def launch_spec(*args, **kwargs):
    from stance_harness.runs.distributed import launch_spec

    return launch_spec(*args, **kwargs)


TERMINAL_WIDTH = 120  # the stance-harness table's width at most


@dataclass
class HarnessOptions:
    """The harness's command-line options, parsed once into typed values."""

    model: str
    model_args: ModelArgs
    stance_dirs: list[str]
    reports_dir: Path | None  # None: write no reports
    rootdir: Path
    args: list[str]
    analysis_timeout: float | None = None
    repeat: int = 1  # --repeat N
    seeds: int | None = None  # --seeds N: runs per train(...) call without seeds= (over a seeds(N) mark)
    adapters: list[str] = field(default_factory=list)  # --adapter [NAME=]PATH ...
    stance: str | None = None  # --stance: what each --adapter is measured on; None: its provenance's
    save_baseline: str | None = None
    compare_baseline: str | None = None
    fail_on_specs: list[str] = field(default_factory=list)  # --fail-on, as given
    baselines_dir: Path | None = None  # where baselines live: --reports-dir even under --no-reports
    fail_on: list[gate.Rule] = field(default_factory=list)  # parsed by HarnessSession.parse_rules
    inconclusive: str = "fail"  # what pytest makes of an inconclusive claim: fail, skip or pass
    record_verdicts: bool = False  # write what each hypothesis found into verdicts/<model>.json
    run_cache: Path | str | None = None  # the run store, a path or URL; None: $STANCE_HARNESS_RUN_CACHE or the harness cache's runs/
    run_memory: int | None = None  # bytes of adapted models kept in memory; None: half of what is free
    retrain: bool = False  # train every run, even one the store holds
    plan_only: bool = False  # --plan: check every request, train nothing
    verdict_json: str | None = None  # --verdict-json PATH ('-': printed in the terminal summary)
    step_summary: Path | None = field(  # GitHub Actions' job summary file, appended to at the end
        default_factory=lambda: Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY") else None)
    chat_template: str = "auto"  # --chat-template: auto (the tokenizer's, where it has one) or none
    launcher: str | None = None  # --launcher accelerate: runs train data-parallel in --num-processes processes
    num_processes: int = 1
    train_workers: int | None = None  # --train-workers: processes that train the planned runs; 0: none ahead
    executor: str = "local"  # --executor: planning.EXECUTORS' entry that trains them
    ray_address: str | None = None  # --ray-address: the cluster of --executor ray (else $RAY_ADDRESS, else local)


@dataclass(frozen=True)
class PlannedRequest:
    """A request as a test asked for it: the model and stance named as the session loads them,
    and its number of optimizer steps (what an estimate of its training time multiplies)."""

    request: TrainingRequest
    model: str
    stance: str
    steps: int


@dataclass
class HarnessSession:
    options: HarnessOptions
    progress: Callable[[str], None] = lambda _msg: None
    records: dict[str, TestRecord] = field(default_factory=dict)
    run_summaries: dict[str, dict] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    remote_provenance: dict = field(default_factory=lambda: {"models": [], "stances": []})  # from xdist workers
    report_path: Path | None = None  # set by finish()
    payload_cache: dict | None = None
    comparison: gate.Comparison | None = None
    baseline_info: dict | None = None  # the baseline compared with: name, path, report_id, saved
    saved_baseline: Path | None = None
    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _runs: dict = field(default_factory=dict)
    _stances: dict[str, Stance] = field(default_factory=dict)
    verdicts: VerdictBook = field(init=False)
    planned: list[str] = field(default_factory=list)  # run ids --plan checked
    plan_requests: dict = field(default_factory=dict)  # run id -> PlannedRequest, as check_request built it
    planning: bool = False  # the tests run once before the session to gather their requests (planning.py)
    ahead_plan: object = None  # planning.Plan: what was trained ahead, what was stored, what failed
    trained_ahead: set = field(default_factory=set)  # run ids trained ahead this session (loaded even under --retrain)
    ahead_failures: dict = field(default_factory=dict)  # run id -> why training it ahead in a worker failed
    multiplicity: list[dict] = field(default_factory=list)  # the session's claims, Holm-corrected per family
    corrected_failures: list[str] = field(default_factory=list)  # passed alone, failed after the family's Holm
    recorded: list[Path] = field(default_factory=list)  # verdict files written by --record-verdicts
    verdict: dict | None = None  # the session's one-line verdict, set by write_ci_outputs

    def __post_init__(self):
        self.verdicts = VerdictBook(self.options.model)

    @cached_property
    def store(self) -> RunStore:
        from stance_harness.runs.runstore import RunStore

        return RunStore(self.options.run_cache)

    @cached_property
    def resident(self) -> ResidentModels:
        """The memory budget for adapted models; "auto" asks torch whether there is a GPU, so on first use."""
        budget = self.options.run_memory
        if budget is None:
            budget = int(DEFAULT_SHARE * free_memory(resolve_device(self.options.model_args.device)))
        return ResidentModels(budget)

    def parse_rules(self) -> None:
        """Parse --fail-on, once every metric that may be gated is declared (the suites are imported)."""
        self.options.fail_on = gate.parse_rules(self.options.fail_on_specs)

    # -- models and stances ---------------------------------------------------------------
    def model(self, name: str | None = None) -> LoadedModel:
        name = name or self.options.model
        if name not in self._models:
            started = time.perf_counter()
            self._models[name] = load_model(name, self.options.model_args, self.progress)
            self.progress(f"loaded model {name} in {time.perf_counter() - started:.1f}s")
        return self._models[name]

    def use_model(self, loaded: LoadedModel) -> None:
        """Use an already loaded model under its name (tests share one across sessions)."""
        self._models[loaded.name] = loaded

    def stance(self, name: str) -> Stance:
        if name not in self._stances:
            self._stances[name] = load_stance(name, self.options.stance_dirs)
        return self._stances[name]

    def model_is_embedded(self) -> bool:
        return resolve_model(self.options.model, self.options.model_args.gguf_file).source == "embedded"

    # -- runs ---------------------------------------------------------------------------------
    def request(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
                examples: int | None = None, recipe=None, instruments=None, task: str | None = None,
                repeat: int = 0, chat_template: str | None = None, processes: int = 1,
                **options) -> TrainingRequest:
        """The validated request for these arguments; `task` None is tasks.DEFAULT_TASK;
        `repeat` (from --repeat) offsets the seed; `chat_template` (auto or none) overrides
        --chat-template for this run."""
        from stance_harness.runs.request import TrainingRequest
        from stance_harness.runs.tasks import DEFAULT_TASK

        return TrainingRequest.build(self.model(model), self.stance(stance), method, examples=examples,
                                     recipe=recipe, instruments=instruments,
                                     task=DEFAULT_TASK if task is None else task, seed_offset=repeat,
                                     options=options, chat_template=chat_template or self.options.chat_template,
                                     processes=processes)

    def processes(self, launcher: str | None, num_processes: int | None) -> int:
        """How many data-parallel processes train a run: a call's launcher= / num_processes=, else
        --launcher / --num-processes; without a launcher, 1."""
        from stance_harness.runs.distributed import LAUNCHERS

        launcher = launcher if launcher is not None else self.options.launcher
        if launcher is None:
            if num_processes not in (None, 1):
                raise HarnessError(f"num_processes={num_processes} needs launcher='accelerate'")
            return 1
        if launcher not in LAUNCHERS:
            raise HarnessError(f"launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
        return num_processes if num_processes is not None else self.options.num_processes

    def planned_steps(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
                      launcher: str | None = None, num_processes: int | None = None, **arguments) -> int:
        """How many optimizer steps this run will take (before training it): what a suite scales
        its schedules by, so a warm-up of 200 of a seed's 1,955 steps keeps its share of any run."""
        request = self.request(method, stance=stance, model=model, processes=self.processes(launcher, num_processes),
                               **arguments)
        return plan(request, self.model(model), self.stance(stance))[0].total_steps

    def check_request(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
                      launcher: str | None = None, num_processes: int | None = None, **arguments) -> TrainingRequest:
        """Build and check a request as training would (task, method, layers, schedule lengths),
        without building a model: what --plan does instead of training."""
        request = self.request(method, stance=stance, model=model, processes=self.processes(launcher, num_processes),
                               **arguments)
        ctx, _ = plan(request, self.model(model), self.stance(stance))
        if request.run_id not in self.planned:
            self.planned.append(request.run_id)  # what --plan would train: one request per seed
            self.plan_requests[request.run_id] = PlannedRequest(request, model or self.options.model, stance,
                                                                ctx.total_steps)
        return request

    def train(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
              launcher: str | None = None, num_processes: int | None = None, **arguments):
        """Train once per identical request; later identical requests get the same Run. With a
        launcher and several processes the run trains data-parallel in worker processes, which
        store it; it is loaded from the store."""
        processes = self.processes(launcher, num_processes)
        request = self.request(method, stance=stance, model=model, processes=processes, **arguments)
        return self.train_request(request, model, stance)

    def train_request(self, request: TrainingRequest, model: str | None, stance: str):
        """`train`'s work for a built request: the run already handed out, else the stored one,
        else trained here (or by the launcher) and stored. A run that failed when trained ahead
        in a worker process fails here, naming it and the worker's error."""
        method = request.method
        if request.run_id not in self._runs:
            if request.run_id in self.ahead_failures:
                raise HarnessError(f"run {request.run_id} ({method}) failed when trained ahead in a worker "
                                   f"process: {self.ahead_failures[request.run_id]}")
            loaded, stance_obj = self.model(model), self.stance(stance)
            # one process trains a request; others asking for it meanwhile wait here, then load it
            with self.store.lock(request.run_id):
                retrain = self.options.retrain and request.run_id not in self.trained_ahead
                run = None if retrain else self.store.load(request, loaded, stance_obj)
                if run is None:
                    self.resident.make_room(TRAINING_FOOTPRINT * loaded.base_bytes)
                    self.progress(f"training {method} on {loaded.name} ({stance}, {request.examples} examples, "
                                  f"task {request.task}) -> {request.run_id}")
                    if request.processes > 1:
                        spec = launch_spec(request, model or self.options.model, self.options.model_args, stance,
                                           self.options.stance_dirs, self.store)
                        launch(spec, self.progress)
                        run = self.store.load(request, loaded, stance_obj)
                        if run is None:
                            raise HarnessError(f"the data-parallel launch of {request.run_id} finished but stored "
                                               f"no run in {self.store.root}")
                    else:
                        run = train_run(request, loaded, stance_obj, self.progress)
                        self.store.save(run)
                elif request.run_id in self.trained_ahead:
                    run.origin = "trained"  # by this session, ahead of its tests, in a worker process
                    self.progress(f"loaded {request.run_id}, trained ahead, from the run store ({self.store.root})")
                else:
                    self.progress(f"loaded {request.run_id} from the run store ({self.store.root})")
            self._runs[request.run_id] = self._attach(run)
        return self._runs[request.run_id]

    def _attach(self, run):
        """Hand a run this session's services: its time limit, its store entry, the memory budget, progress."""
        run.attach(RunServices(store=self.store, residency=self.resident, progress=self.progress,
                               analysis_timeout=self.options.analysis_timeout, sinks=run.sinks))
        if run.model_resident:
            self.resident.touch(run)
        return run

    def adapter_run(self, path: str):
        """A saved adapter or fine-tuned checkpoint (`[NAME=]PATH`) on the --model base, as a Run
        named NAME (loaded once per argument)."""
        from stance_harness.runs.adapters import load_adapter_run, parse_adapter_spec

        spec = parse_adapter_spec(path)
        key = ("adapter", spec.name, str(spec.path.resolve()))
        if key not in self._runs:
            self.progress(f"loading {spec.name} ({spec.path}) onto {self.options.model}")
            self._runs[key] = self._attach(load_adapter_run(self.model(), spec, self.stance,
                                                            self.options.chat_template, self.options.stance))
        return self._runs[key]

    def adopt(self, run) -> None:
        """A run made outside this session (run_from_model, StanceCallback): reported with its base and stance."""
        self._models.setdefault(run.loaded.name, run.loaded)
        self._stances.setdefault(run.stance.name, run.stance)
        self._runs[run.run_id] = self._attach(run)

    def runs(self) -> list:
        return list(self._runs.values())

    # -- results --------------------------------------------------------------------------
    def record(self, nodeid: str) -> TestRecord:
        return self.records.setdefault(nodeid, TestRecord(nodeid))

    def summarise_runs(self) -> None:
        for run in self._runs.values():
            if run.run_id not in self.run_summaries:
                self.run_summaries[run.run_id] = {**run.summary(), "origins": [run.origin]}

    def payload(self, report_id: str | None = None) -> dict:
        """The whole session as report.json holds it."""
        self.summarise_runs()
        models = _unique([m.provenance() for m in self._models.values()] + self.remote_provenance["models"])
        stances = _unique([s.provenance() for s in self._stances.values()] + self.remote_provenance["stances"])
        tests = with_repeats([r.as_dict() for r in self.records.values()])
        self.multiplicity = correct_for_multiplicity(tests)
        return {
            "report_id": report_id or store.new_report_id(),
            "started": self.started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": {
                "model": models[0] if models else {"name": self.options.model},
                "models": models,
                "model_args": dict(self.options.model_args.__dict__),
                "stances": stances,
                "methods": outside_methods(run.get("method") for run in self.run_summaries.values()),
                "git": git_info(self.options.rootdir),
                "environment": environment_info(),
                "args": self.options.args,
                "argv": sys.argv,
            },
            "metric_directions": declared_directions({name for t in tests for name in t["metrics"]}),
            "tests": tests,
            "multiplicity": self.multiplicity,
            "runs": self.run_summaries,
        }

    # -- xdist: a worker hands its results to the controller -----------------------------
    def worker_output(self) -> dict:
        self.summarise_runs()
        return {"tests": [r.as_dict() for r in self.records.values()], "runs": self.run_summaries,
                "models": [m.provenance() for m in self._models.values()],
                "stances": [s.provenance() for s in self._stances.values()]}

    def merge_worker(self, data: dict) -> None:
        for test in data["tests"]:
            self.records[test["nodeid"]] = TestRecord(**test)
        for run_id, summary in data["runs"].items():  # a run two workers used: trained by one, loaded by the other
            known = self.run_summaries.get(run_id)
            if known is not None:
                summary = {**summary, "origins": known.get("origins", []) + summary.get("origins", [])}
            self.run_summaries[run_id] = summary
        self.remote_provenance["models"] += data["models"]
        self.remote_provenance["stances"] += data["stances"]

    # -- the end of the session ------------------------------------------------------------
    def finish(self, interrupted: bool = False, exit_code: int | None = None) -> bool:
        """Compare with the baseline, write the reports (with the gate in them), then save the
        baseline. False when the gate failed. `exit_code` is pytest's so far; the report records
        it as CI will see it, a failed gate included.

        An interrupted session (Ctrl-C) still writes what it has, marked interrupted, and leaves
        `latest` where it was; it records no verdicts, compares with no baseline and saves none."""
        options = self.options
        if not interrupted:
            self.corrected_failures = correct_families(self.records.values(), options.inconclusive, self._recorded_for)
            for record in self.records.values():
                if record.held_for_family and record.verdict == "supported":  # it survived: the record changed
                    record.outcome = "failed"
                    record.message = (f"the verdict on {options.model} changed: recorded inconclusive, now supported "
                                      f"after Holm's correction over its test file (record again with --record-verdicts "
                                      f"if the change is expected)")
                    self.corrected_failures.append(record.nodeid)
        write = bool(self.records) and options.reports_dir is not None
        gating = not interrupted and bool(options.save_baseline or options.compare_baseline)
        recording = not interrupted and options.record_verdicts and bool(self.records)
        payload = self.payload() if (write or gating or recording) else None
        failure = None  # a baseline that vanished since the start: the report is still written, then this raised
        if options.compare_baseline and not interrupted:
            try:
                self.comparison = self._compare(payload)
            except HarnessError as err:
                failure = err
        if payload is not None:
            payload["interrupted"] = interrupted
            if options.compare_baseline and not interrupted:
                payload["gate"] = self.gate_entry(failure)
            if exit_code is not None:  # as the plugin turns it: a failed gate, or a claim that failed its
                # family's Holm correction, fails a session that passed
                payload["exit_code"] = (1 if exit_code == 0 and (not self._gate_passed(failure) or self.corrected_failures)
                                        else exit_code)
            self.payload_cache = payload
        if write:
            self.report_path = store.write_report(options.reports_dir, payload, move_latest=not interrupted,
                                                  progress=self.progress)
        if failure is not None:
            raise failure
        if interrupted:
            return True
        if recording:
            self.recorded = save_records(payload["tests"], options.rootdir, options.model,
                                         payload["provenance"]["model"])
        if options.save_baseline:
            self.saved_baseline = store.save_baseline(options.baselines_dir, options.save_baseline, payload)
        return self.comparison is None or self.comparison.passed

    def _compare(self, payload: dict) -> gate.Comparison:
        stored = store.load_baseline(self.options.baselines_dir, self.options.compare_baseline)
        self.baseline_info = {"kind": "baseline", "name": self.options.compare_baseline,
                               "path": str(store.baseline_path(self.options.baselines_dir,
                                                               self.options.compare_baseline)),
                               "report_id": report_id_of(stored), "saved": stored.get("saved")}
        return gate.compare(metrics_from_payload(stored), metrics_from_payload(payload), self.options.fail_on)

    def gate_entry(self, failure: Exception | None = None) -> dict:
        """report.json's `gate`: the baseline, the rules, every row, passed or failed."""
        baseline = self.baseline_info or {"kind": "baseline", "name": self.options.compare_baseline}
        if failure is not None or self.comparison is None:
            return {"baseline": baseline, "passed": False, "failed": True, "error": str(failure),
                    "summary": f"FAILED: {failure}", "rules": [rule.as_dict() for rule in self.options.fail_on],
                    "rows": [], "regressions": 0, "only_baseline": [], "only_now": [], "notes": []}
        return gate.report_entry(self.comparison, baseline)

    def _gate_passed(self, failure) -> bool:
        return failure is None and (self.comparison is None or self.comparison.passed)

    def _recorded_for(self, record) -> dict | None:
        """The recorded verdict that judges this test, as at its call (none under --record-verdicts)."""
        if self.options.record_verdicts or record.expected is not None:
            return None
        return self.verdicts.recorded(self.options.rootdir / record.nodeid.split("::", 1)[0],
                                      repeat_base(record.nodeid))

    def session_verdict(self, exit_code: int) -> dict:
        """What CI systems read: passed (pytest's exit code is 0), outcome counts, and the gate."""
        tests = [r.as_dict() for r in self.records.values()]
        counts = {}
        for test in tests:
            counts[test["outcome"] or "not run"] = counts.get(test["outcome"] or "not run", 0) + 1
        comparison = self.comparison
        return {
            "passed": exit_code == 0, "exit_code": exit_code, "model": self.options.model,
            "tests": {"total": len(tests), **dict(sorted(counts.items()))},
            "gate": None if comparison is None else {
                "baseline": self.options.compare_baseline, "passed": comparison.passed,
                "summary": comparison.summary(), "rules": [rule.spec for rule in comparison.rules],
                "failures": [{"test": r.test, "metric": r.metric, "verdict": r.verdict, "change": r.change,
                              "allowed": r.allowed} for r in comparison.regressions]},
            "report": str(self.report_path) if self.report_path is not None else None,
        }

    def write_ci_outputs(self, exit_code: int) -> None:
        """--verdict-json, and the Markdown tables appended to $GITHUB_STEP_SUMMARY."""
        options = self.options
        if options.verdict_json is not None:
            self.verdict = self.session_verdict(exit_code)
            if options.verdict_json != "-":
                path = Path(options.verdict_json)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.verdict, default=str) + "\n", encoding="utf-8")
        if options.step_summary is not None and (self.records or self.comparison is not None):
            payload = self.payload_cache or {"tests": [r.as_dict() for r in self.records.values()],
                                             "runs": self.run_summaries}
            text = render_step_summary(payload, self.comparison, self.options.compare_baseline, exit_code,
                                       self.options.model)
            try:
                with open(options.step_summary, "a", encoding="utf-8") as handle:  # other steps append too
                    handle.write(text)
            except OSError as err:  # the job summary is a courtesy: it never fails the session
                print(f"stance-harness: could not append to $GITHUB_STEP_SUMMARY ({err})", file=sys.stderr)

    def display(self, write_line: Callable[[str], None], section: Callable[[str], None]) -> None:
        """The results table, where the report went, the gate's comparison, and --verdict-json -."""
        if not self.records:
            self._display_verdict(write_line)
            return
        from tabulate import tabulate

        from stance_harness.report.sections import terminal_rows

        payload = self.payload_cache or {"tests": [r.as_dict() for r in self.records.values()],
                                         "runs": self.run_summaries}
        section("stance-harness")
        rows = terminal_rows(payload, TERMINAL_WIDTH)  # long ids shortened: the report has them whole
        write_line(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="simple",
                            disable_numparse=True))
        if any(t.get("outcome") == "xfailed" for t in payload["tests"]):
            write_line("XFAIL: a hypothesis refuted as expected on this model (verdicts/ or expected_outcome), "
                       "not a failure; see the report")
        if self.report_path is not None:
            interrupted = (self.payload_cache or {}).get("interrupted")
            write_line(f"report: {self.report_path / 'index.html'}  (markdown: report.md, json: report.json)"
                       + ("  INTERRUPTED: tests marked 'not run' did not run; reports/latest was left as it was"
                          if interrupted else ""))
        if self.comparison is not None:
            section(f"stance-harness: compared with baseline {self.options.compare_baseline!r}", "-")
            write_line(self.comparison.render())
        if self.saved_baseline is not None:
            write_line(f"baseline saved: {self.saved_baseline}")
        only_before = [row for row in self.multiplicity if row["note"]]
        if self.multiplicity:
            families = len({r["family"] for r in self.multiplicity})
            write_line(f"{len(self.multiplicity)} comparative claims in {families} families (test files), Holm-corrected "
                       f"per family: {sum(1 for r in self.multiplicity if r['verdict'] == 'supported')} supported after "
                       f"the correction" + (f", {len(only_before)} supported only before it (now inconclusive): "
                                            + ", ".join(r["test"] for r in only_before) if only_before else ""))
        # decided only at the session's end, so pytest printed no failure for them: their reasons whole
        for nodeid in self.corrected_failures:
            record = self.records.get(nodeid)
            if record is not None and record.outcome == "failed":
                write_line(f"FAILED after the family's correction: {nodeid}: {record.message}")
        for path in self.recorded:
            write_line(f"verdicts recorded: {path}")
        if self.options.plan_only:
            from stance_harness.runs.planning import plan_only_line

            write_line(f"--plan: {len(self.planned)} distinct training requests checked (each seed of a RunSet is one); "
                       + plan_only_line(self))
        self._display_verdict(write_line)

    def _display_verdict(self, write_line: Callable[[str], None]) -> None:
        if self.verdict is not None and self.options.verdict_json == "-":
            write_line(json.dumps(self.verdict, default=str))  # one line starting {"passed": what a CI script reads


def outside_methods(names) -> list[dict]:
    """The code identity (module, package, version, source hash) of each named method from outside the harness."""
    from stance_harness.runs.methods import METHODS, method_code

    found = []
    for name in dict.fromkeys(n for n in names if isinstance(n, str)):
        code = method_code(METHODS.get(name)) if name in METHODS else None
        if code:
            found.append({"name": name, **code})
    return found


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
