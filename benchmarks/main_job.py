"""The README's main command (`./dev.sh suites`) as a new user meets it: a fresh clone, empty caches.

Clones the repository (its committed HEAD) into a temporary folder, points the harness at empty
caches there (STANCE_HARNESS_CACHE for the embedded models, STANCE_HARNESS_RUN_CACHE for the run
store), and prints, from that one run:
- the wall time of set-up (`./dev.sh` building .venv) and of pytest;
- the share of pytest's wall time in training (Σ train_seconds of the runs report.json says were
  trained), model building (Σ build_seconds of the cache's embedded models), analyses (time inside
  the harness's analysis stages) and reporting (pytest_sessionfinish, where the reports are written),
  the last two timed by the plugin benchmarks/main_job_timer.py;
- the number of runs trained and their optimizer steps per second (Σ steps / Σ train_seconds).

    python benchmarks/main_job.py [--suites-args "-k locus"] [--no-setup [--venv .venv]] [--keep DIR]

--keep DIR keeps the clone and its caches; run again with the same DIR for the warm figures.

--no-setup reuses an existing virtual environment (default: this checkout's .venv) instead of
letting dev.sh build one; then pytest is started the way dev.sh starts it (same environment,
`python -m pytest suites/ ARGS`), without dev.sh, which would install into the reused .venv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# what dev.sh exports before it starts pytest
DEV_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}


class MainJobError(Exception):
    """A step of the benchmark could not run; the message says which and why."""


def summarise(report: dict, models_dir: Path, timings: dict, pytest_seconds: float,
              present_before: frozenset = frozenset()) -> dict:
    """The figures of one run: report.json's runs, the records of the models built in it (those not
    in `present_before`, the cache's entries before pytest started), the timer's phases."""
    trained = [run for run in report.get("runs", {}).values() if run.get("origin") == "trained"]
    train_seconds = sum(run.get("train_seconds") or 0.0 for run in trained)
    steps = sum((run.get("instruments") or {}).get("steps") or 0 for run in trained)
    build_seconds = 0.0
    built = []
    for record in sorted(models_dir.glob("*/stance_harness.json")):
        if record.parent.name in present_before:
            continue
        seconds = json.loads(record.read_text()).get("build_seconds")
        if seconds is not None:
            build_seconds += seconds
            built.append(record.parent.name)
    phases = {"training": train_seconds, "model building": build_seconds,
              "analyses": timings.get("analyses", 0.0), "reporting": timings.get("reporting", 0.0)}
    return {
        "pytest_s": pytest_seconds,
        "phases_s": phases,
        "shares": {name: seconds / pytest_seconds if pytest_seconds > 0 else None for name, seconds in phases.items()},
        "tests_loop_s": timings.get("tests"),
        "runs_trained": len(trained),
        "steps": steps,
        "steps_per_s": steps / train_seconds if train_seconds > 0 else None,
        "models_built": built,
        "tests": len(report.get("tests", [])),
        "exit_code": report.get("exit_code"),
    }


def clone(repo: Path, into: Path) -> Path:
    target = into / "clone"
    done = subprocess.run(["git", "clone", "--quiet", str(repo), str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        raise MainJobError(f"git clone {repo} failed: {done.stderr.strip()}")
    return target


def timed(command: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, int]:
    """Wall seconds and exit code of `command`, its output appended to `log`."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - started, code


def latest_report(clone_dir: Path) -> dict:
    reports = clone_dir / "reports"
    latest = reports / "latest"
    if not latest.exists():
        raise MainJobError(f"pytest wrote no report: {latest} is missing (see the log)")
    return json.loads((reports / latest.read_text().strip() / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the repository to clone (default: this checkout)")
    parser.add_argument("--suites-args", default="", help='pytest arguments after suites/, one string: "-k locus -x"')
    parser.add_argument("--no-setup", action="store_true", help="reuse --venv instead of letting dev.sh build .venv")
    parser.add_argument("--venv", type=Path, default=REPO / ".venv", help="the environment --no-setup reuses")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one, "
                        "removed); a second call with the same folder reuses its clone and caches: a warm run")
    args = parser.parse_args(argv)
    if args.no_setup and not (args.venv / "bin" / "python").exists():
        raise MainJobError(f"--no-setup: {args.venv / 'bin' / 'python'} does not exist; name an environment "
                           f"with --venv, or leave --no-setup out to let dev.sh build one")

    work = args.keep or Path(tempfile.mkdtemp(prefix="main-job-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        clone_dir = work / "clone" if (work / "clone" / ".git").exists() else clone(args.repo.resolve(), work)
        log = work / "main_job.log"
        env = {**os.environ, **DEV_ENV,
               "STANCE_HARNESS_CACHE": str(work / "cache"), "STANCE_HARNESS_RUN_CACHE": str(work / "runs"),
               "MAIN_JOB_TIMINGS": str(work / "timings.json"),
               # the clone's harness (not the reused environment's editable install) and the timer plugin
               "PYTHONPATH": os.pathsep.join([str(clone_dir), str(clone_dir / "benchmarks")])}
        suites_args = ["-p", "main_job_timer", *shlex.split(args.suites_args)]
        if args.no_setup:
            setup_s = None
            command = [str(args.venv / "bin" / "python"), "-m", "pytest", "suites/", *suites_args]
        else:
            # dev.sh builds .venv first, then starts pytest: --version times the set-up alone
            setup_s, code = timed(["./dev.sh", "suites", "--version"], clone_dir, env, log)
            if code != 0:
                raise MainJobError(f"set-up failed (exit {code}); see {log}")
            command = ["./dev.sh", "suites", *suites_args]
        print(f"main_job: {shlex.join(command)} in {clone_dir}", flush=True)
        models = work / "cache" / "models"
        present = frozenset(p.name for p in models.iterdir()) if models.is_dir() else frozenset()
        (work / "timings.json").unlink(missing_ok=True)
        pytest_s, code = timed(command, clone_dir, env, log)
        figures = summarise(latest_report(clone_dir), models,
                            json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {},
                            pytest_s, present)
        figures["setup_s"] = setup_s
        figures["pytest_exit_code"] = code
        figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(render(figures, args))
        print(json.dumps(figures))
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def render(figures: dict, args) -> str:
    setup = "reused " + str(args.venv) if figures["setup_s"] is None else f"{figures['setup_s']:.1f} s"
    lines = [f"set-up: {setup}",
             f"pytest: {figures['pytest_s']:.1f} s wall, exit code {figures['pytest_exit_code']}, "
             f"{figures['tests']} tests, peak RSS {figures['peak_rss_bytes'] / 2**30:.2f} GiB"]
    for name, seconds in figures["phases_s"].items():
        share = figures["shares"][name]
        lines.append(f"  {name}: {seconds:.1f} s" + (f" ({share:.1%} of pytest)" if share is not None else ""))
    rate = figures["steps_per_s"]
    lines.append(f"runs trained: {figures['runs_trained']}, {figures['steps']} optimizer steps, "
                 + (f"{rate:.2f} steps/s" if rate is not None else "no steps"))
    if figures["models_built"]:
        lines.append(f"models built: {', '.join(figures['models_built'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MainJobError as err:
        print(f"main_job: {err}", file=sys.stderr)
        sys.exit(2)
