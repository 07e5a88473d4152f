"""What a session found, and what is made of it at the end: the test records, the payload that
report.json holds, the reports, the baseline gate, the verdict records, an xdist worker's hand-over
to the controller, the CI outputs (--verdict-json, $GITHUB_STEP_SUMMARY) and the terminal table.

`SessionOutcome` is the half of `session.HarnessSession` that turns records into these; the other
half (session.py) provides the models, stances and runs the tests use. Nothing here imports pytest.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tabulate import tabulate

from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import declared_directions, metrics_from_payload
from stance_harness.core.provenance import environment_info, git_info
from stance_harness.options import HarnessOptions
from stance_harness.report import gate, store
from stance_harness.report.markdown import render_step_summary
from stance_harness.report.records import TestRecord, repeat_base
from stance_harness.report.sections import report_id_of, terminal_rows
from stance_harness.report.verdicts import VerdictBook, correct_families, correct_for_multiplicity, save_records

TERMINAL_WIDTH = 120  # the stance-harness table's width at most


@dataclass
class SessionOutcome:
    """The records of a session's tests and what the end of the session makes of them."""

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
    verdicts: VerdictBook = field(init=False)
    multiplicity: list[dict] = field(default_factory=list)  # the session's claims, Holm-corrected per family
    corrected_failures: list[str] = field(default_factory=list)  # passed alone, failed after the family's Holm
    recorded: list[Path] = field(default_factory=list)  # verdict files written by --record-verdicts
    verdict: dict | None = None  # the session's one-line verdict, set by write_ci_outputs

    def __post_init__(self):
        self.verdicts = VerdictBook(self.options.model)

    # -- what the provision side (session.HarnessSession) hands over ---------------------------
    def runs(self) -> list:
        """The runs the tests were handed."""
        return []

    def inputs_provenance(self) -> tuple[list[dict], list[dict]]:
        """The provenance of the models and of the stances this process loaded."""
        return [], []

    def plan_summary(self) -> str | None:
        """Under --plan, the line saying what was checked and what training the rest would take."""
        return None

    def parse_rules(self) -> None:
        """Parse --fail-on, once every metric that may be gated is declared (the suites are imported)."""
        self.options = replace(self.options, fail_on=gate.parse_rules(self.options.fail_on_specs))

    # -- results --------------------------------------------------------------------------
    def record(self, nodeid: str) -> TestRecord:
        return self.records.setdefault(nodeid, TestRecord(nodeid))

    def summarise_runs(self) -> None:
        for run in self.runs():
            if run.run_id not in self.run_summaries:
                self.run_summaries[run.run_id] = {**run.summary(), "origins": [run.origin]}

    def payload(self, report_id: str | None = None) -> dict:
        """The whole session as report.json holds it."""
        self.summarise_runs()
        models, stances = self.inputs_provenance()
        models = _unique(models + self.remote_provenance["models"])
        stances = _unique(stances + self.remote_provenance["stances"])
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
        models, stances = self.inputs_provenance()
        return {"tests": [r.as_dict() for r in self.records.values()], "runs": self.run_summaries,
                "models": models, "stances": stances}

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
        plan_line = self.plan_summary()
        if plan_line is not None:
            write_line(plan_line)
        self._display_verdict(write_line)

    def count_corrected_as_failed(self, stats: dict[str, list]) -> None:
        """Tests that passed alone and failed their family's Holm correction count as failed in
        pytest's own summary line too (`stats`: the terminal reporter's reports by outcome)."""
        for key in ("passed", "xfailed"):
            for report in list(stats.get(key, [])):
                if report.nodeid in self.corrected_failures and report.when == "call":
                    stats[key].remove(report)
                    report.outcome = "failed"
                    report.longrepr = self.records[report.nodeid].message
                    if hasattr(report, "wasxfail"):
                        del report.wasxfail
                    stats.setdefault("failed", []).append(report)

    def _display_verdict(self, write_line: Callable[[str], None]) -> None:
        if self.verdict is not None and self.options.verdict_json == "-":
            write_line(json.dumps(self.verdict, default=str))  # one line starting {"passed": what a CI script reads


def outside_methods(names) -> list[dict]:
    """The code identity (module, package, version, source hash) of each named method from outside the harness."""
    from stance_harness.runs.methods import METHODS, method_code  # why: the methods import torch; only at the end

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

