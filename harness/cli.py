"""The `stance-harness` command: compare runs against baselines, save baselines, rebuild and list reports.

    stance-harness compare A B [--fail-on RULE ...]   A: the baseline side, B: the current side
    stance-harness save NAME [RUN]                    keep RUN's metrics as baseline NAME
    stance-harness report RUN                         rebuild RUN's index.html and report.md
    stance-harness list                               runs (newest first), then baselines
    stance-harness new NAME [--dir suites] [--force]  write suites/test_NAME.py, a hypothesis to start from

A, B and RUN are a baseline name, a run id, `latest`, or a path to a report.json/baseline file.
Exit status: 0 passed, 1 a regression (compare) or an incomplete rebuild (report), 2 a usage
error (unknown run, bad rule, a file `new` would overwrite). A user's mistake prints one line
on stderr, never a traceback.

Adding a subcommand: write `_NAME_arguments(parser)` and a `@command("NAME", help, _NAME_arguments)`
function `(args) -> int`; `--reports-dir` comes with every subcommand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .registry import HarnessError

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
        from importlib.metadata import PackageNotFoundError, version

        return version("stance-harness")
    except (ImportError, PackageNotFoundError):
        from . import __version__

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
    p.add_argument("baseline", metavar="A", help="the baseline side: a baseline name, run id, `latest` or a path")
    p.add_argument("current", metavar="B", help="the current side, the same kinds as A")
    p.add_argument("--fail-on", metavar="RULE", nargs="+", action="extend", default=[],
                   help="METRIC:[+|-]TOLERANCE[%%], e.g. ece:+0.01, behavior_shift:-10%%, acc1:0.02; "
                        "without rules every shared metric is listed and nothing fails")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the comparison as JSON")


@command("compare", "compare two runs or baselines; fail on regressions", _compare_arguments)
def cmd_compare(args) -> int:
    from .report.baseline import compare, load_source, parse_rules

    rules = parse_rules(args.fail_on)  # a bad rule is a usage error before anything is loaded
    root = _reports_dir(args)
    baseline, current = load_source(args.baseline, root), load_source(args.current, root)
    result = compare(baseline.metrics, current.metrics, rules)
    print(f"baseline: {baseline.label}\nnow:      {current.label}\n")
    print(result.render())
    if args.json is not None:
        from .report.writer import atomic_write

        document = {"baseline": baseline.label, "now": current.label, **result.as_dict()}
        atomic_write(args.json, json.dumps(document, indent=2, default=str) + "\n")
    return EXIT_OK if result.passed else EXIT_FAILED


# -- save -----------------------------------------------------------------------------------
def _save_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the baseline's name: letters, digits, '.', '_' and '-'")
    p.add_argument("source", metavar="RUN", nargs="?", default="latest",
                   help="the run to keep (a run id, `latest`, a path, or another baseline); default: latest")


@command("save", "save a run's metrics as a named baseline", _save_arguments)
def cmd_save(args) -> int:
    from .report.baseline import check_baseline_name, load_source, save_baseline

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
    p.add_argument("run", metavar="RUN", help="a run id, `latest`, or a run directory")


@command("report", "rebuild a run's index.html and report.md from its report.json", _report_arguments)
def cmd_report(args) -> int:
    from .report.baseline import load_source
    from .report.writer import atomic_write, render_markdown

    root = _reports_dir(args)
    source = load_source(args.run, root)
    if source.kind != "run":
        raise HarnessError(f"{args.run!r} is a baseline, not a run: baselines keep metrics only, not a report")
    run_dir, payload = source.path.parent, source.data
    try:
        markdown = render_markdown(payload)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise HarnessError(f"{source.path} is incomplete ({type(err).__name__}: {err}); "
                           "was it written by another version of stance-harness?") from None
    atomic_write(run_dir / "report.md", markdown)
    print(f"wrote {run_dir / 'report.md'}")
    try:
        from .report import html
    except ImportError as err:
        print(f"{PROG}: error: cannot write {run_dir / 'index.html'}: the HTML renderer does not load "
              f"({_one_line(err)})", file=sys.stderr)
        return EXIT_FAILED
    html.write_html(run_dir, payload)
    print(f"wrote {run_dir / 'index.html'}")
    html.write_index(root)
    print(f"wrote {root / 'index.html'}")
    return EXIT_OK


# -- list -----------------------------------------------------------------------------------
def _list_arguments(p: argparse.ArgumentParser) -> None:
    pass


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


@command("list", "list runs (newest first) and baselines", _list_arguments)
def cmd_list(args) -> int:
    from tabulate import tabulate

    from .report.baseline import list_baselines, list_runs, load_baseline

    root = _reports_dir(args)
    if not root.is_dir():
        raise HarnessError(f"no reports directory {root} (pass --reports-dir)")
    try:
        latest = (root / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        latest = None
    runs = []
    for run_id in list_runs(root):
        try:
            payload = json.loads((root / run_id / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            payload = f"unreadable: {_one_line(err)[:60]}"
        if not isinstance(payload, dict):
            problem = payload if isinstance(payload, str) else f"unreadable: a JSON {type(payload).__name__}"
            runs.append(("", run_id, ["-", f"({problem})", "", "", "", ""]))
            continue
        passed, failed, other = _outcome_counts(payload.get("tests"))
        runs.append((str(payload.get("started") or ""), run_id,
                     [payload.get("started") or "-", _model_names(payload), passed + failed + other, passed, failed,
                      other]))
    runs.sort(key=lambda entry: entry[:2], reverse=True)  # newest first: by start time, then run id
    rows = [[run_id + (" *" if run_id == latest else ""), *cells] for _, run_id, cells in runs]
    if rows:
        print(f"runs in {root}, newest first (* latest):")
        print(tabulate(rows, headers=["run", "started", "model", "tests", "passed", "failed", "other"],
                       tablefmt="simple", disable_numparse=True))
    else:
        print(f"no runs in {root}")
    print()
    rows = []
    for name in list_baselines(root):
        try:
            data = load_baseline(root, name)
        except HarnessError as err:
            rows.append([name, "", f"(unreadable: {_one_line(err)[:60]})", ""])
            continue
        rows.append([name, data.get("saved") or "-", data.get("run_id") or "-", len(data.get("tests") or {})])
    if rows:
        print(f"baselines in {root / 'baselines'}:")
        print(tabulate(rows, headers=["baseline", "saved", "from run", "tests"], tablefmt="simple",
                       disable_numparse=True))
    else:
        print(f"no baselines in {root / 'baselines'} (save one with `{PROG} save NAME RUN`)")
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
    import shlex

    from .scaffold import write_hypothesis

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
