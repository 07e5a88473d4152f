"""The harness's command-line options, declared once: each is a field of `HarnessOptions` whose
metadata holds its flag, its help, how the flag's text becomes the field's value (`parse`) and
what is checked once every option is parsed (`check`).

From these fields come the plugin's `pytest_addoption` (`add_options`), the start-up parsing and
checks (`HarnessOptions.from_config`: a bad value stops the session before any model loads, with
a message naming the option) and the options page of the docs (`options_table`). Nothing here
imports torch: the plugin imports this module when pytest loads it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stance_harness.core.errors import HarnessError
from stance_harness.core.files import check_writable_directory
from stance_harness.core.metrics import is_declared
from stance_harness.models.loading import DEFAULT_MODEL, ModelArgs, check_model_available
from stance_harness.report import gate, store
from stance_harness.runs import executors_ray  # noqa: F401 - registers "ray" in EXECUTORS (Ray loads when it trains)
from stance_harness.runs.adapter_spec import parse_adapter_spec
from stance_harness.runs.planning import DEFAULT_EXECUTOR, EXECUTORS
from stance_harness.runs.residency import parse_bytes
from stance_harness.stances import load_stance

GROUP = "stance-harness"
GROUP_DESCRIPTION = "stance-harness: hypotheses about fine-tuning"
CHAT_TEMPLATE_CHOICES = ("auto", "none")  # batches.CHAT_TEMPLATE_CHOICES; not imported here: it imports torch
LAUNCHER_CHOICES = ("accelerate",)  # distributed.LAUNCHERS; not imported here: it imports torch
INCONCLUSIVE_CHOICES = ("fail", "skip", "pass")
TRAIN_WORKERS_ENV = "STANCE_HARNESS_TRAIN_WORKERS"
_UNSET = object()


def positive_int(text: str) -> int:
    """argparse type of --seeds: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def option(flag: str, help: str, *, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
           given: Any = _UNSET, metavar: str | None = None, type: Callable | None = None,
           choices: tuple | None = None, action: str | None = None, nargs: str | None = None,
           parse: Callable[[Any, dict], Any] | None = None, check: Callable[[HarnessOptions], None] | None = None,
           writes: bool = False):
    """A field that a command-line flag sets. `default` is the field's value where HarnessOptions is
    built in code; `given` what the flag holds when the command line leaves it out (default: the
    same); `parse(text, raw)` turns the flag's value into the field's (`raw`: every flag's value by
    field name, and rootdir); `check(options)` refuses a bad value once all are parsed."""
    if given is _UNSET:
        given = [] if default_factory is list else default
    metadata = {"flag": flag, "help": help, "given": given, "metavar": metavar, "type": type, "choices": choices,
                "action": action, "nargs": nargs, "parse": parse, "check": check, "writes": writes}
    return field(default=default, default_factory=default_factory, metadata=metadata)


# -- what the checks do (each names its option) ---------------------------------------------------
def _model_available(o: HarnessOptions) -> None:
    # unknown names and missing weights stop the run now, not once per test
    check_model_available(o.model, o.model_args)


def _stance_dirs_exist(o: HarnessOptions) -> None:
    for directory in o.stance_dirs:
        if not Path(directory).is_dir():
            raise HarnessError(f"--stance-dir {directory}: no such directory")


def _reports_dir_writable(o: HarnessOptions) -> None:
    if o.reports_dir is not None:
        check_writable_directory(o.reports_dir, "--reports-dir")


def _at_least(flag: str, name: str, least: int | float, note: str = ""):
    def check(o: HarnessOptions) -> None:
        if getattr(o, name) < least:
            raise HarnessError(f"{flag} must be >= {least}{note}")
    return check


def _processes(o: HarnessOptions) -> None:
    _at_least("--num-processes", "num_processes", 1)(o)
    if o.num_processes > 1 and o.launcher is None:
        raise HarnessError(f"--num-processes {o.num_processes} needs --launcher accelerate")


def _train_workers(text: int | None, raw: dict) -> int | None:
    """--train-workers, else $STANCE_HARNESS_TRAIN_WORKERS; None: as many as the machine allows."""
    value, where = text, "--train-workers"
    if value is None and os.environ.get(TRAIN_WORKERS_ENV, "").strip():
        value, where = os.environ[TRAIN_WORKERS_ENV].strip(), f"${TRAIN_WORKERS_ENV}"
        try:
            value = int(value)
        except ValueError:
            raise HarnessError(f"{where}={value!r} is not a whole number (0: no training ahead)") from None
    if value is not None and value < 0:
        raise HarnessError(f"{where} must be >= 0 (0: no training ahead), got {value}")
    return value


def _executor(o: HarnessOptions) -> None:
    entry = EXECUTORS.get(o.executor)  # an unknown name is refused now, listing the known
    if hasattr(entry, "check"):
        entry.check()  # e.g. Ray not installed: said before collection


def _ray_address(o: HarnessOptions) -> None:
    if o.ray_address and o.executor != "ray":
        raise HarnessError(f"--ray-address is for --executor ray, not {o.executor}")


def _adapters(o: HarnessOptions) -> None:
    if not o.adapters:
        return
    names = {}
    for adapter in o.adapters:
        spec = parse_adapter_spec(adapter)
        if spec.name in names:
            raise HarnessError(f"--adapter {names[spec.name]} and {adapter} would both name their metrics "
                               f"{spec.name!r}; give each its own with NAME=PATH")
        names[spec.name] = adapter
    # why: reading an adapter imports torch and peft; only when there is one to read
    from stance_harness.runs.adapters import read_adapter

    for adapter in names.values():  # a bad path or no stance stops the session before the model loads
        read_adapter(adapter).stance_name(o.stance)


def _stance(o: HarnessOptions) -> None:
    if o.stance is not None:
        load_stance(o.stance, o.stance_dirs)


def _verdict_json(o: HarnessOptions) -> None:
    if o.verdict_json in (None, "-"):
        return
    if Path(o.verdict_json).is_dir():
        raise HarnessError(f"--verdict-json {o.verdict_json}: it is a directory; name the file to write")
    check_writable_directory(Path(o.verdict_json).parent, "--verdict-json")


def declare_check_metrics() -> None:
    """Import the checks, which declare the directions of the metrics they record."""
    # why: the checks import torch; only once rules or tests need them
    from stance_harness import checks  # noqa: F401


def _fail_on(o: HarnessOptions) -> None:
    if not o.fail_on_specs:
        return
    declare_check_metrics()  # so rules on the checks' metrics are checked whole now
    if not o.compare_baseline:
        raise HarnessError("--fail-on needs --compare-baseline NAME to compare against")
    for rule in o.fail_on_specs:
        # a rule on a declared metric is checked whole now; one naming a suite's own metric, once
        # collection has imported the suite that declares it (HarnessSession.parse_rules)
        if is_declared(gate.check_rule_syntax(rule)["name"]):
            gate.parse_rule(rule)


def _compare_baseline(o: HarnessOptions) -> None:
    if o.compare_baseline:
        store.load_baseline(o.baselines_dir, o.compare_baseline)


def _save_baseline(o: HarnessOptions) -> None:
    if o.save_baseline:
        store.check_baseline_name(o.save_baseline)


@dataclass(frozen=True)
class HarnessOptions:
    """The harness's options, parsed once into typed values; the fields with a flag are its
    command-line options, in the order the start-up checks them (those that make a directory last)."""

    model: str = option("--model", "model alias, hub id (from the local HF cache), local directory or GGUF file "
                        f"(converted once). Default: {DEFAULT_MODEL}", given=DEFAULT_MODEL, metavar="NAME")
    model_args: ModelArgs = option(
        "--model-args", "dtype=float32|bfloat16|float16|auto (auto: the checkpoint's own; not given: the checkpoint's "
        "own on CUDA, float32 on the CPU; what trains stays float32), revision=REV, device=auto|cpu|cuda[:N] (auto: "
        "the first CUDA device, else cpu), device_map=auto (shard the base over the GPUs), trust_remote_code=false, "
        "gguf_file=NAME (a GGUF file in the --model directory)",
        given="", metavar="K=V,...", parse=lambda text, raw: ModelArgs.parse(text), check=_model_available)
    stance_dirs: list[str] = option("--stance-dir", "extra directory of stance YAML files (repeatable); ./stances is "
                                    "always searched", given=[], metavar="DIR", action="append",
                                    check=_stance_dirs_exist)
    reports_dir: Path | None = option(  # None: write no reports
        "--reports-dir", "where reports/<report-id>/ is written, relative to the rootdir. Default: reports",
        given="reports", metavar="DIR", parse=lambda text, raw: None if raw["no_reports"] else raw["rootdir"] / text,
        check=_reports_dir_writable, writes=True)
    rootdir: Path = field(metadata={"from": "pytest's rootdir"})
    args: list[str] = field(metadata={"from": "pytest's command-line arguments"})
    no_reports: bool = option("--no-reports", "write no report files", default=False, action="store_true")
    analysis_timeout: float | None = option(
        "--analysis-timeout", "time limit per post-training analysis stage; an overrun fails naming the stage. "
        "0: no limit. Default: 600", default=None, given=600.0, metavar="SECONDS", type=float,
        check=_at_least("--analysis-timeout", "analysis_timeout", 0, " (0 turns the limit off)"))
    repeat: int = option("--repeat", "run each test that trains N times, with seeds seed, seed+1, ...; the report "
                         "gives mean and spread", default=1, metavar="N", type=int,
                         check=_at_least("--repeat", "repeat", 1))
    seeds: int | None = option(  # runs per train(...) call without seeds= (over a seeds(N) mark)
        "--seeds", "train(...) without seeds= trains N runs with seeds seed, seed+1, ... and returns them as one "
        "RunSet: comparative claims are then about the methods. Overrides a test's seeds(N) mark. Default: the "
        "mark's N, else one run", default=None, metavar="N", type=positive_int)
    launcher: str | None = option("--launcher", "train each run data-parallel through accelerate (DDP) in "
                                  "--num-processes processes; the workers store the run, the test loads it",
                                  default=None, choices=LAUNCHER_CHOICES)
    num_processes: int = option("--num-processes", "processes per run under --launcher; each trains "
                                "per_device_train_batch_size examples per micro-batch. Default: 1",
                                default=1, metavar="N", type=int, check=_processes)
    train_workers: int | None = option(  # 0: no training ahead
        "--train-workers", "after collection, every run the tests ask for is planned and the ones the run store "
        f"lacks are trained first, in N worker processes. Default: ${TRAIN_WORKERS_ENV}, else one per GPU, or "
        "one per core on the CPU; 1: in this process; 0: no training ahead (each run trains when a test asks "
        "for it)", default=None, metavar="N", type=int, parse=_train_workers)
    executor: str = option("--executor", "what trains the planned runs: local (worker processes on this machine) "
                           "or ray (a task per run on a Ray cluster, and a task for each request a test body "
                           "computes; needs the ray extra). Default: local",
                           default=DEFAULT_EXECUTOR, metavar="NAME", check=_executor)
    ray_address: str | None = option("--ray-address", "the Ray cluster of --executor ray (e.g. ray://head:10001 or "
                                     "auto). Default: $RAY_ADDRESS, else a local Ray started for the session with "
                                     "this machine's cores", default=None, metavar="ADDRESS", check=_ray_address)
    stance: str | None = option(  # None: the one each adapter's provenance names
        "--stance", "the stance each --adapter is measured on. Default: the one its stance_harness.json names "
        "(save_adapter writes it); an adapter without either is refused", default=None, metavar="NAME",
        check=_stance)
    adapters: list[str] = option(
        "--adapter", "gate a saved peft adapter (any tuner) or a fully fine-tuned checkpoint (safetensors) on "
        "--model's base without training (repeatable); NAME (default: the directory's name) names its metrics. "
        "Tests that train are skipped, tests using `adapter_run` measure each one", default_factory=list,
        metavar="[NAME=]PATH", action="append", check=_adapters)
    verdict_json: str | None = option(  # '-': printed in the terminal summary
        "--verdict-json", "at the end, write the session's verdict (passed, test counts, the gate's comparison) as "
        "one line of JSON to PATH, or with '-' print it as the last line of the stance-harness summary",
        default=None, metavar="PATH", check=_verdict_json, writes=True)
    fail_on_specs: list[str] = option(  # as given; parsed into fail_on by HarnessSession.parse_rules
        "--fail-on", "regression rules METRIC:[+|-]TOL[%][@ci], e.g. 'ece:+0.01' 'behavior_shift:-10%'; with @ci "
        "only a change whose 95% interval lies wholly past the tolerance fails", default_factory=list,
        metavar="RULE", action="extend", nargs="+", check=_fail_on)
    compare_baseline: str | None = option(
        "--compare-baseline", "compare this session's metrics with baseline NAME; regressions past --fail-on fail "
        "the session", default=None, metavar="NAME", check=_compare_baseline)
    save_baseline: str | None = option("--save-baseline", "store this session's metrics as baseline NAME "
                                       "(reports/baselines/NAME.json)", default=None, metavar="NAME",
                                       check=_save_baseline)
    baselines_dir: Path | None = field(  # where baselines live: --reports-dir even under --no-reports
        default=None, metadata={"from": "--reports-dir", "derive": lambda raw: raw["rootdir"] / raw["reports_dir"]})
    fail_on: list[gate.Rule] = field(default_factory=list, metadata={"from": "--fail-on, parsed after collection"})
    inconclusive: str = option("--inconclusive", "what an inconclusive claim (its interval straddles the margin) "
                               "makes of its test, where no verdict is recorded: fail (default), skip or pass",
                               default="fail", choices=INCONCLUSIVE_CHOICES)
    record_verdicts: bool = option("--record-verdicts", "write what each hypothesis found on --model into "
                                   "verdicts/<model>.json beside its test file; later sessions on that model compare "
                                   "with it, and a changed verdict fails", default=False, action="store_true")
    run_cache: Path | str | None = option(  # None: $STANCE_HARNESS_RUN_CACHE or the harness cache's runs/
        "--run-cache", "the run store: finished runs, loaded instead of trained again; a directory or a URL "
        "(file://, s3://BUCKET/PATH, gs://BUCKET/PATH) that sessions share. Default: $STANCE_HARNESS_RUN_CACHE, "
        "else runs/ in the harness cache (~/.cache/stance-harness)", default=None, metavar="DIR|URL",
        parse=lambda text, raw: text or None)
    run_memory: int | None = option(  # bytes; None: half of what is free
        "--run-memory", "memory for adapted models and the full-precision base they share (e.g. 8GiB); past it "
        "the least recently used is released (the base after the runs built on it) and rebuilt or loaded again "
        "when needed. Default: half of the memory free at start (GPU memory on CUDA)", default=None,
        metavar="SIZE", parse=lambda text, raw: parse_bytes(text) if text else None)
    retrain: bool = option("--retrain", "train every run, even one the run store holds (and store it anew)",
                           default=False, action="store_true")
    plan_only: bool = option("--plan", "check every run the tests ask for (task, method, layers, schedule lengths) "
                             "without building a model or training; each test that trains is skipped once its first "
                             "run is checked. Prints how many runs the store holds and an estimate of the time to "
                             "train the rest", default=False, action="store_true")
    chat_template: str = option("--chat-template", "auto (default): where the tokenizer has a chat template, "
                                "training, probes, generation and calibration use it, and the loss counts only the "
                                "assistant's tokens; none: plain prompt, newline, reply, end of text",
                                default="auto", choices=CHAT_TEMPLATE_CHOICES)
    judge_model: str | None = option("--judge-model", "the model of the model judge (run.judged('model')) where a "
                                     "test names none: an alias, a directory or a hub id in the local cache. "
                                     "Default: smollm2-135m", default=None, metavar="NAME")
    step_summary: Path | None = field(  # GitHub Actions' job summary file, appended to at the end
        default_factory=lambda: Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY")
        else None, metadata={"from": "$GITHUB_STEP_SUMMARY"})

    @classmethod
    def from_config(cls, config) -> HarnessOptions:
        """Every option read from pytest's `config` (getoption, rootpath, invocation_params),
        parsed and checked once: what can be checked before any model loads is."""
        raw = {"rootdir": Path(config.rootpath), "args": list(config.invocation_params.args)}
        raw.update({f.name: config.getoption(f.metadata["flag"]) for f in flags()})
        values = dict(raw)
        for f in flags():
            parse = f.metadata["parse"]
            if parse is not None:
                values[f.name] = parse(raw[f.name], raw)
        for f in dataclasses.fields(cls):
            if "derive" in f.metadata:
                values[f.name] = f.metadata["derive"](raw)
        options = cls(**values)
        for f in sorted(flags(), key=lambda f: f.metadata["writes"]):  # stable: otherwise in field order
            if f.metadata["check"] is not None:
                f.metadata["check"](options)
        return options


def flags() -> list[dataclasses.Field]:
    """The fields a command-line flag sets, in the order they are declared (and checked)."""
    return [f for f in dataclasses.fields(HarnessOptions) if "flag" in f.metadata]


def given_defaults() -> dict[str, Any]:
    """What each flag holds when the command line leaves it out, by flag."""
    return {f.metadata["flag"]: _fresh(f.metadata["given"]) for f in flags()}


def _fresh(value):
    return list(value) if isinstance(value, list) else value


def add_options(parser) -> None:
    """pytest_addoption's work: one addoption per flag, under the stance-harness group."""
    group = parser.getgroup(GROUP, GROUP_DESCRIPTION)
    for f in flags():
        meta = f.metadata
        extra = {key: meta[key] for key in ("metavar", "type", "choices", "action", "nargs") if meta[key] is not None}
        group.addoption(meta["flag"], default=_fresh(meta["given"]), help=meta["help"].replace("%", "%%"), **extra)


def options_table() -> str:
    """The options as a Markdown table (docs/reference/options.md is generated from it)."""
    lines = ["| option | default | what it does |", "|---|---|---|"]
    for f in flags():
        meta = f.metadata
        flag = meta["flag"] + (f" {meta['metavar']}" if meta["metavar"] else "")
        if meta["choices"]:
            flag += " {" + "|".join(meta["choices"]) + "}"
        lines.append(f"| `{flag}` | {_shown(meta)} | {meta['help'].replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def _shown(meta) -> str:
    given = meta["given"]
    if meta["action"] == "store_true":
        return "off"
    if given in (None, "", []):
        return "-"
    return f"`{given}`"
