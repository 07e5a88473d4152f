"""The `stance-harness` command: compare reports against baselines, save baselines, rebuild and list reports.

    stance-harness compare A B [--fail-on RULE ...]   A: the baseline side, B: the current side
    stance-harness save NAME [REPORT]                 keep REPORT's metrics as baseline NAME
    stance-harness report REPORT                      rebuild REPORT's index.html and report.md
    stance-harness list                               reports (newest first), then baselines
    stance-harness cache list|show KEY|prune          the run store: finished runs that sessions load
    stance-harness new NAME [--dir suites] [--force]  write suites/test_NAME.py, a hypothesis to start from

A, B and REPORT are a baseline name, a report id, `latest`, or a path to a report.json/baseline file.
Exit status: 0 passed, 1 a regression (compare) or an incomplete rebuild (report), 2 a usage
error (unknown report, bad rule, a file `new` would overwrite). A user's mistake prints one line
on stderr, never a traceback.

Adding a subcommand: write `_NAME_arguments(parser)` and a `@command("NAME", help, _NAME_arguments)`
function `(args) -> int`; `--reports-dir` comes with every subcommand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tabulate import tabulate

from stance_harness import __version__
from stance_harness.core.errors import HarnessError
from stance_harness.core.files import atomic_write
from stance_harness.core.metrics import declare_from_report
from stance_harness.report.findings import findings
from stance_harness.report.findings import table_rows as findings_table
from stance_harness.report.gate import check_rule_syntax, compare, parse_rules, report_entry
from stance_harness.report.model import load_report
from stance_harness.report.sections import reply_order
from stance_harness.report.store import (
    check_baseline_name,
    figure_counts,
    latest_report,
    list_baselines,
    list_reports,
    load_baseline,
    load_source,
    report_id_of,
    save_baseline,
    write_index,
    write_report_files,
)
from stance_harness.scaffold import write_hypothesis

PROG = "stance-harness"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(HarnessError):
    """A bad command line (argparse's complaints), reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and sys.exit(2)
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# name -> (help, add arguments, run)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        if name in _COMMANDS:
            raise ValueError(f"subcommand {name!r} is already defined")
        _COMMANDS[name] = (help, arguments, run)
        return run

    return register


def _version() -> str:
    try:
        return version("stance-harness")
    except PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Compare, save, list and rebuild stance-harness reports; "
                                            "scaffold new hypotheses.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    common = _Parser(add_help=False)
    common.add_argument("--reports-dir", metavar="DIR", type=Path, default=Path("reports"),
                        help="the reports directory (default: ./reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, arguments, run) in _COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        arguments(subparser)
        subparser.set_defaults(handler=run)
    return parser


def _reports_dir(args) -> Path:
    return Path(args.reports_dir)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- compare --------------------------------------------------------------------------------
def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", metavar="A", help="the baseline side: a baseline name, report id, `latest` or a path")
    p.add_argument("current", metavar="B", help="the current side, the same kinds as A")
    p.add_argument("--fail-on", metavar="RULE", nargs="+", action="extend", default=[],
                   help="METRIC:[+|-]TOLERANCE[%%][@ci], e.g. ece:+0.01, behavior_shift:-10%%, ece:+0.01@ci; "
                        "without rules every shared metric is listed and nothing fails")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the comparison as JSON")
    p.add_argument("--write-report", action="store_true",
                   help="write the gate into report B: its report.json gets a `gate` entry, and its report.md and "
                        "index.html are rebuilt to open with it (red when it failed)")


@command("compare", "compare two reports or baselines; fail on regressions", _compare_arguments)
def cmd_compare(args) -> int:
    import stance_harness.checks  # noqa: F401 - why: declares the helpers' metrics; imports torch, not at start-up

    for spec in args.fail_on:
        check_rule_syntax(spec)  # a malformed rule is a usage error before anything is loaded
    root = _reports_dir(args)
    baseline, current = load_source(args.baseline, root), load_source(args.current, root)
    if args.write_report and current.kind != "report":
        raise HarnessError(f"--write-report writes the gate into report B, but {args.current!r} is a baseline "
                           "(metrics only); name a report: a report id, `latest` or a report's path")
    for side in (baseline, current):
        declare_from_report(side.data)  # the directions of the suites' own metrics, as the reports recorded them
    result = compare(baseline.metrics, current.metrics, parse_rules(args.fail_on))
    print(f"baseline: {baseline.label}\nnow:      {current.label}\n")
    print(result.render())
    if args.json is not None:
        document = {"baseline": baseline.label, "now": current.label, **result.as_dict()}
        atomic_write(args.json, json.dumps(document, indent=2, default=str) + "\n")
    if args.write_report:
        name = baseline.data.get("name", args.baseline) if baseline.kind == "baseline" else args.baseline
        side = {"kind": baseline.kind, "name": name, "path": str(baseline.path),
                "report_id": report_id_of(baseline.data), "saved": baseline.data.get("saved")}
        payload = {**current.data, "gate": report_entry(result, side)}
        try:
            payload = load_report(payload).to_dict()  # before writing anything: one it cannot read stays as it was
        except HarnessError as err:
            raise HarnessError(f"{current.path}: {err}; the gate was not written into it") from None
        in_root = current.path.parent.parent.resolve() == root.resolve()
        write_report_files(current.path.parent, payload, root if in_root else None)
        if in_root:  # the index lists the reports directory's own reports only
            write_index(root)
        print(f"\ngate written into {current.path.parent} (report.json, report.md, index.html)")
    return EXIT_OK if result.passed else EXIT_FAILED


# -- save -----------------------------------------------------------------------------------
def _save_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the baseline's name: letters, digits, '.', '_' and '-'")
    p.add_argument("source", metavar="REPORT", nargs="?", default="latest",
                   help="the report to keep (a report id, `latest`, a path, or another baseline); default: latest")


@command("save", "save a report's metrics as a named baseline", _save_arguments)
def cmd_save(args) -> int:
    check_baseline_name(args.name)
    root = _reports_dir(args)
    source = load_source(args.source, root)
    path = save_baseline(root, args.name, source.data)
    tests = source.metrics
    counted = sum(1 for metrics in tests.values() if metrics)
    print(f"saved baseline {args.name!r} from {source.label}: {len(tests)} tests, {counted} with metrics -> {path}")
    return EXIT_OK


# -- report ---------------------------------------------------------------------------------
def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("report", metavar="REPORT", help="a report id, `latest`, or a report directory")
    p.add_argument("--findings", action="store_true",
                   help="print the findings (one row per claim: estimate, interval, margin, verdict, what changed) "
                        "instead of rebuilding the pages")
    p.add_argument("--replies", metavar="RUN",
                   help="print a run's replies, base and adapted, the probes that moved most first; RUN is a run id "
                        "(or its unique start) from the report")


def _report_source(args):
    source = load_source(args.report, _reports_dir(args))
    if source.kind != "report":
        raise HarnessError(f"{args.report!r} is a baseline, not a report: baselines keep metrics only")
    return source, load_report(source.data)


def print_findings(report) -> int:
    rows = findings_table(findings(report.to_dict()), width=FINDINGS_WIDTH)
    print(f"findings of report {report.report_id} ({report.model_name or '?'}), one row per claim:")
    if not rows:
        print("no test checked a claim")
        return EXIT_OK
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="simple", disable_numparse=True))
    if report.changes:
        print(f"\nchanges since {report.changes.get('previous')}: {len(report.changes.get('rows') or [])}")
    return EXIT_OK


FINDINGS_WIDTH = 120  # the terminal table's columns at most
REPLY_WIDTH = 32  # with PROBE_WIDTH: the table fits in 120 columns
PROBE_WIDTH = 28


def print_replies(report, run_id: str) -> int:
    matches = [r for r in report.runs if r == run_id] or [r for r in report.runs if r.startswith(run_id)]
    if len(matches) != 1:
        known = ", ".join(report.runs) or "none"
        raise HarnessError(f"--replies {run_id!r} names {'no' if not matches else 'more than one'} run of report "
                           f"{report.report_id}; its runs: {known}")
    run = report.runs[matches[0]]
    replies = (run.get("measurements") or {}).get("replies")
    rows = replies.get("rows") if isinstance(replies, dict) else replies
    rows = [r for r in rows or [] if isinstance(r, dict)]
    if not rows:
        raise HarnessError(f"run {matches[0]} of report {report.report_id} has no replies: a suite measures them with "
                           "run.replies() (causal LMs only)")

    def cut(text, width: int) -> str:  # the length said, within the width
        text = " ".join(str(text or "").split())
        if len(text) <= width:
            return text
        said = f"… ({len(text)} chars)"
        return text[: width - len(said)] + said

    table = [[cut(r.get("probe"), PROBE_WIDTH), cut(r.get("base_reply"), REPLY_WIDTH),
              cut(r.get("adapted_reply"), REPLY_WIDTH), r.get("margin_change"), "yes" if r.get("changed") else "no"]
             for r in reply_order(rows)]
    print(f"replies of run {matches[0]} ({sum(1 for r in rows if r.get('changed'))} of {len(rows)} changed), "
          "the probes that moved most first:")
    print(tabulate(table, headers=["probe", "base reply", "adapted reply", "margin Δ", "changed"],
                   tablefmt="simple", floatfmt="+.3f"))
    return EXIT_OK


@command("report", "rebuild a report's pages (index.html, runs/, report.md) from its report.json alone, "
                   "or print its findings or a run's replies", _report_arguments)
def cmd_report(args) -> int:
    root = _reports_dir(args)
    source, report = _report_source(args)
    if args.findings:
        return print_findings(report)
    if args.replies:
        return print_replies(report, args.replies)
    report_dir = source.path.parent
    in_root = report_dir.parent.resolve() == root.resolve()
    print(f"writing {report_dir / 'report.md'}, {report_dir / 'index.html'} and {len(report.runs)} run page(s)",
          flush=True)  # drawing a cold report's figures takes a while: say what is happening first
    started = time.perf_counter()
    cache = write_report_files(report_dir, report.to_dict(), root if in_root else None)
    print(f"wrote them in {time.perf_counter() - started:.1f}s ({figure_counts(cache)})"
          + (f" (migrated from report format {report.migrated_from})" if report.migrated_from else ""))
    if in_root:
        write_index(root)
        print(f"wrote {root / 'index.html'}")
    return EXIT_OK


# -- list -----------------------------------------------------------------------------------
def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", action="store_true",
                   help="list the registered methods instead: the harness's and those of installed plug-ins "
                        "(entry point group stance_harness.runs.methods), with where each comes from")


def list_methods() -> int:
    from stance_harness.runs.methods import METHODS, method_code  # why: torch; only this subcommand needs it

    rows = []
    for name, method in METHODS.items():
        code = method_code(method)
        origin = "stance-harness" if code is None else (
            f"{code['package']} {code['version']}" if code["package"] else f"module {code['module']}")
        doc = (type(method).__doc__ or "").strip().splitlines()
        rows.append([name, origin, doc[0] if doc else ""])
    print(tabulate(rows, headers=["method", "from", "description"], tablefmt="simple", disable_numparse=True))
    return EXIT_OK


def _model_names(payload: dict) -> str:
    prov = payload.get("provenance") or {}
    models = prov.get("models") or ([prov["model"]] if isinstance(prov.get("model"), dict) else [])
    names = [str(m.get("name")) for m in models if isinstance(m, dict) and m.get("name")]
    return ", ".join(dict.fromkeys(names)) or "-"


def _outcome_counts(tests) -> tuple[int, int, int]:
    outcomes = [t.get("outcome") for t in tests if isinstance(t, dict)] if isinstance(tests, list) else []
    passed = sum(1 for o in outcomes if o == "passed")
    failed = sum(1 for o in outcomes if o in ("failed", "error"))
    return passed, failed, len(outcomes) - passed - failed


@command("list", "list reports (newest first) and baselines, or with --methods the methods", _list_arguments)
def cmd_list(args) -> int:
    if args.methods:
        return list_methods()
    root = _reports_dir(args)
    if not root.is_dir():
        raise HarnessError(f"no reports directory {root} (pass --reports-dir)")
    try:
        latest = latest_report(root)
    except HarnessError:
        latest = None
    reports = []
    for report_id in list_reports(root):
        try:
            payload = json.loads((root / report_id / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            payload = f"unreadable: {_one_line(err)[:60]}"
        if not isinstance(payload, dict):
            problem = payload if isinstance(payload, str) else f"unreadable: a JSON {type(payload).__name__}"
            reports.append(("", report_id, ["-", f"({problem})", "", "", "", ""]))
            continue
        passed, failed, other = _outcome_counts(payload.get("tests"))
        reports.append((str(payload.get("started") or ""), report_id,
                     [payload.get("started") or "-", _model_names(payload), passed + failed + other, passed, failed,
                      other]))
    reports.sort(key=lambda entry: entry[:2], reverse=True)  # newest first: by start time, then report id
    rows = [[report_id + (" *" if report_id == latest else ""), *cells] for _, report_id, cells in reports]
    if rows:
        print(f"reports in {root}, newest first (* latest):")
        print(tabulate(rows, headers=["report", "started", "model", "tests", "passed", "failed", "other"],
                       tablefmt="simple", disable_numparse=True))
    else:
        print(f"no reports in {root}")
    print()
    rows = []
    for name in list_baselines(root):
        try:
            data = load_baseline(root, name)
        except HarnessError as err:
            rows.append([name, "", f"(unreadable: {_one_line(err)[:60]})", ""])
            continue
        rows.append([name, data.get("saved") or "-", report_id_of(data) or "-", len(data.get("tests") or {})])
    if rows:
        print(f"baselines in {root / 'baselines'}:")
        print(tabulate(rows, headers=["baseline", "saved", "from report", "tests"], tablefmt="simple",
                       disable_numparse=True))
    else:
        print(f"no baselines in {root / 'baselines'} (save one with `{PROG} save NAME REPORT`)")
    return EXIT_OK


# -- cache ----------------------------------------------------------------------------------
def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show", "prune"], help="list entries, show one, or remove entries")
    p.add_argument("key", nargs="?", metavar="KEY", help="the run id to show (show only)")
    p.add_argument("--run-cache", metavar="DIR|URL", default=None,
                   help="the run store, a directory or a URL such as s3://BUCKET/PATH "
                        "(default: $STANCE_HARNESS_RUN_CACHE, else runs/ in the harness cache)")
    p.add_argument("--older-than", metavar="DAYS", type=float, default=None,
                   help="prune only entries last used more than DAYS ago (default: prune everything)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@command("cache", "list, show or prune the run store (finished runs that later sessions load)", _cache_arguments)
def cmd_cache(args) -> int:
    from stance_harness.runs.runstore import RunStore  # why: torch; only this subcommand needs it

    store = RunStore(args.run_cache)
    if args.action == "show":
        if not args.key:
            raise HarnessError("cache show needs KEY, a run id from `stance-harness cache list`")
        print(json.dumps(store.describe(args.key), indent=2, default=str))
        return EXIT_OK
    if args.key:
        raise HarnessError(f"cache {args.action} takes no KEY")
    if args.action == "prune":
        removed = store.prune(args.older_than)
        print(f"removed {len(removed)} entries from {store.root}")
        return EXIT_OK
    entries = store.entries()
    if not entries:
        print(f"no runs in the run store {store.root}")
        return EXIT_OK
    rows = [[e.run_id, e.method or "-", e.model or "-", e.stance or "-", _size(e.bytes), e.measurements,
             dt.datetime.fromtimestamp(e.modified).isoformat(timespec="seconds"),
             "" if e.complete else "incomplete"] for e in entries]
    print(f"run store {store.root}: {len(entries)} entries, {_size(sum(e.bytes for e in entries))}")
    print(tabulate(rows, headers=["run", "method", "model", "stance", "size", "measurements", "last used", ""],
                   tablefmt="simple", disable_numparse=True))
    return EXIT_OK


# -- new ------------------------------------------------------------------------------------
def _new_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the hypothesis' name; normalised to a lower-case identifier "
                                                "(e.g. 'LoRA forgets less' -> test_lora_forgets_less.py)")
    p.add_argument("--dir", metavar="DIR", type=Path, default=Path("suites"),
                   help="where to write test_NAME.py (default: ./suites)")
    p.add_argument("--force", action="store_true", help="overwrite the file if it exists")


@command("new", "write a commented hypothesis file to start from: DIR/test_NAME.py", _new_arguments)
def cmd_new(args) -> int:
    path = write_hypothesis(args.name, args.dir, force=args.force)
    print(f"wrote {path}")
    print(f"run it:  python -m pytest {shlex.quote(path.as_posix())}")
    return EXIT_OK


# -- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "handler", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.handler(args)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    except HarnessError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
