"""The options are declared once, as HarnessOptions' fields: pytest's parser, the start-up parsing
and checks, and the docs' options table all come from them. Parsed here on a fake pytest config
(no pytester): the catalogue of bad values with their messages is tests/test_bad_inputs.py."""

import dataclasses
import re
import types
from pathlib import Path

import pytest

from stance_harness.core.errors import HarnessError
from stance_harness.options import (GROUP, TRAIN_WORKERS_ENV, HarnessOptions, add_options, flags, given_defaults,
                                    options_table)


def parse(tmp_path: Path, **given) -> HarnessOptions:
    values = {**given_defaults(), **{f"--{k.replace('_', '-')}": v for k, v in given.items()}}
    config = types.SimpleNamespace(getoption=values.__getitem__, rootpath=tmp_path,
                                   invocation_params=types.SimpleNamespace(args=("-x", "suites")))
    return HarnessOptions.from_config(config)


class _Recorder:
    def __init__(self):
        self.calls = []

    def getgroup(self, name, description=""):
        self.group = (name, description)
        return self

    def addoption(self, *names, **attrs):
        self.calls.append((names, attrs))


def test_every_flag_reaches_pytest_with_its_default_help_and_choices():
    parser = _Recorder()
    add_options(parser)
    assert parser.group[0] == GROUP
    assert [names for names, _ in parser.calls] == [(f.metadata["flag"],) for f in flags()]
    attrs = {names[0]: a for names, a in parser.calls}
    assert attrs["--inconclusive"]["choices"] == ("fail", "skip", "pass") and attrs["--inconclusive"]["default"] == "fail"
    assert attrs["--analysis-timeout"]["type"] is float and attrs["--analysis-timeout"]["default"] == 600.0
    assert attrs["--fail-on"]["action"] == "extend" and attrs["--fail-on"]["nargs"] == "+"
    assert "%%" in attrs["--fail-on"]["help"]  # argparse formats help with %: a literal % is doubled
    assert attrs["--stance-dir"]["default"] == [] and attrs["--stance-dir"]["default"] is not attrs["--adapter"]["default"]


def test_the_real_parser_holds_exactly_the_declared_flags_and_defaults(pytestconfig):
    """What pytest registered for this very session (the plugin's entry point) is the spec."""
    registered = {name for option in pytestconfig._parser.getgroup(GROUP).options for name in option.names()}
    assert registered == {f.metadata["flag"] for f in flags()}
    parsed = vars(pytestconfig._parser.parse_known_args([]))
    for flag, default in given_defaults().items():
        assert parsed[flag.lstrip("-").replace("-", "_")] == default, flag


def test_the_options_table_lists_every_option_once():
    table = options_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = [re.match(r"\| `(--[a-z-]+)", row)[1] for row in rows]
    assert listed == [f.metadata["flag"] for f in flags()] and len(listed) == 27
    assert "| `--inconclusive {fail|skip|pass}` | `fail` |" in table
    assert "| `--retrain` | off |" in table and "| `--analysis-timeout SECONDS` | `600.0` |" in table
    assert "ece:+0.01" in table and "%%" not in table  # argparse's escaping is not in the docs
    # a | inside help would split the Markdown cell: escaped
    model_args = next(row for row in rows if row.startswith("| `--model-args"))
    assert model_args.count(" | ") == 2 and "float32&#124;bfloat16" in model_args


def test_the_table_check_sees_a_missing_option(monkeypatch):
    """The check above can fail: a flag left out of the spec is missing from the table."""
    import stance_harness.options as options

    kept = [f for f in flags() if f.metadata["flag"] != "--retrain"]
    monkeypatch.setattr(options, "flags", lambda: kept)
    assert "--retrain" not in options_table() and len(options_table().splitlines()) == 2 + 26


def test_defaults_parse_to_the_values_a_session_uses(tmp_path, monkeypatch):
    monkeypatch.delenv(TRAIN_WORKERS_ENV, raising=False)
    options = parse(tmp_path)
    assert options.model == "tiny-qwen2" and options.model_args.device == "auto"
    assert options.reports_dir == tmp_path / "reports" == options.baselines_dir
    assert options.rootdir == tmp_path and options.args == ["-x", "suites"]
    assert (options.analysis_timeout, options.repeat, options.seeds, options.num_processes) == (600.0, 1, None, 1)
    assert options.run_cache is None and options.run_memory is None and options.train_workers is None
    assert options.fail_on_specs == [] and options.fail_on == [] and options.judge_model is None


def test_no_reports_keeps_the_baselines_dir(tmp_path):
    options = parse(tmp_path, no_reports=True, reports_dir="out")
    assert options.reports_dir is None and options.baselines_dir == tmp_path / "out"


def test_values_are_parsed_from_their_text(tmp_path):
    options = parse(tmp_path, model_args="dtype=bfloat16,device=cpu", run_memory="2GiB", run_cache="",
                    save_baseline="main")
    assert options.model_args.dtype == "bfloat16" and options.run_memory == 2 * 2**30
    assert options.run_cache is None and options.save_baseline == "main"


def test_train_workers_come_from_the_environment_when_not_given(tmp_path, monkeypatch):
    monkeypatch.setenv(TRAIN_WORKERS_ENV, " 3 ")
    assert parse(tmp_path).train_workers == 3
    assert parse(tmp_path, train_workers=0).train_workers == 0  # the flag wins
    monkeypatch.setenv(TRAIN_WORKERS_ENV, "many")
    with pytest.raises(HarnessError, match=r"^\$STANCE_HARNESS_TRAIN_WORKERS='many' is not a whole number"):
        parse(tmp_path)
    with pytest.raises(HarnessError, match=r"^--train-workers must be >= 0 \(0: no training ahead\), got -1$"):
        parse(tmp_path, train_workers=-1)


@pytest.mark.parametrize("given, message", [
    ({"repeat": 0}, r"^--repeat must be >= 1$"),
    ({"analysis_timeout": -0.5}, r"^--analysis-timeout must be >= 0 \(0 turns the limit off\)$"),
    ({"num_processes": 0, "launcher": "accelerate"}, r"^--num-processes must be >= 1$"),
    ({"num_processes": 2}, r"^--num-processes 2 needs --launcher accelerate$"),
    ({"ray_address": "auto"}, r"^--ray-address is for --executor ray, not local$"),
    ({"executor": "slurm"}, r"slurm.*local"),
    ({"fail_on": ["ece:+0.01"]}, r"^--fail-on needs --compare-baseline NAME to compare against$"),
    ({"save_baseline": "../x"}, r"^bad baseline name '\.\./x'"),
    ({"run_memory": "lots"}, r"--run-memory 'lots' is not a size"),
])
def test_a_bad_value_is_refused_naming_its_option(tmp_path, given, message):
    with pytest.raises(HarnessError, match=message):
        parse(tmp_path, **given)


def test_a_bad_option_leaves_no_reports_directory_behind(tmp_path):
    """The checks that make a directory (--reports-dir, --verdict-json) run after every other."""
    with pytest.raises(HarnessError, match="no-such-stance"):
        parse(tmp_path, stance="no-such-stance", verdict_json=str(tmp_path / "out" / "v.json"))
    assert not (tmp_path / "reports").exists() and not (tmp_path / "out").exists()
    parse(tmp_path, verdict_json=str(tmp_path / "out" / "v.json"))
    assert (tmp_path / "reports").is_dir() and (tmp_path / "out").is_dir()


def test_a_good_combination_passes_the_checks_that_refuse_its_parts(tmp_path):
    options = parse(tmp_path, num_processes=2, launcher="accelerate")
    assert options.num_processes == 2 and options.launcher == "accelerate"


def test_options_are_frozen_once_parsed(tmp_path):
    options = parse(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.repeat = 3
    assert dataclasses.replace(options, repeat=3).repeat == 3


def test_code_builds_options_positionally_as_before():
    """HarnessOptions(model, model_args, stance_dirs, reports_dir, rootdir, args, ...): the order
    tests, benchmarks and StanceCallback build it in."""
    from stance_harness.models import ModelArgs

    options = HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache="x")
    assert options.reports_dir is None and options.analysis_timeout is None and options.run_cache == "x"
    assert [f.name for f in dataclasses.fields(HarnessOptions)][:6] == [
        "model", "model_args", "stance_dirs", "reports_dir", "rootdir", "args"]
