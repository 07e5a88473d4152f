"""docs/writing-hypotheses.md and `stance-harness new`: the guide's example and the scaffold pass as
written; every option and subcommand the docs name exists in the code, and the checks table holds
every assertion helper with its signature."""

import inspect
import json
import re
from pathlib import Path

import pytest

import stance_harness
from stance_harness.cli import build_parser, main
from stance_harness.scaffold import normalise_name, render

ROOT = Path(__file__).resolve().parents[1]
GUIDE_PATH = ROOT / "docs" / "writing-hypotheses.md"
GUIDE = GUIDE_PATH.read_text(encoding="utf-8")
# every page a user reads: the README and the docs site, generated reference pages included
DOCS = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]}
CHECKS_PAGE = DOCS["docs/measurements.md"]  # its Checks table says when each helper passes
GATE_PAGE = DOCS["docs/gate.md"]
EXAMPLE_FILE = "test_my_hypothesis.py"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert match, f"{GUIDE_PATH} has no ```python block"
    return match.group(1)


def test_guide_example_and_scaffold_pass_as_written(pytester, capsys):
    """One pytest session for both files (one model load; their identical train() requests train once)."""
    (pytester.path / EXAMPLE_FILE).write_text(first_python_block(GUIDE), encoding="utf-8")  # verbatim
    assert main(["new", "my_claim", "--dir", str(pytester.path)]) == 0
    scaffold = pytester.path / "test_my_claim.py"
    out = capsys.readouterr().out
    assert f"wrote {scaffold}" in out and f"python -m pytest {scaffold}" in out

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*= stance-harness =*",  # files in collection order: test_my_claim.py first
        "PASS*test_my_claim.py::test_my_claim*lora, full*7/7*",
        "PASS*::test_lora_learns_the_stance_and_leaves_the_base_alone*lora*2/2*",  # the file's name shortened
        "PASS*::test_lora_forgets_less_than_full_finetuning*lora, full*1/1*",
        "report: *index.html*",
    ])
    run_dir = pytester.path / "reports" / (pytester.path / "reports" / "latest").read_text().strip()
    assert {"report.json", "report.md", "index.html"} <= {p.name for p in run_dir.iterdir()}
    tests = {t["nodeid"]: t for t in json.loads((run_dir / "report.json").read_text())["tests"]}
    scaffold_test = tests["test_my_claim.py::test_my_claim"]
    assert scaffold_test["tables"] and scaffold_test["metrics"] and scaffold_test["notes"]
    assert tests[f"{EXAMPLE_FILE}::test_lora_forgets_less_than_full_finetuning"]["tables"]


def test_every_python_block_in_the_guide_compiles():
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE, re.S | re.M)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        compile(block, f"{GUIDE_PATH.name}[python block {i}]", "exec")


def test_new_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert main(["new", "my_claim", "--dir", str(tmp_path)]) == 0
    target = tmp_path / "test_my_claim.py"
    target.write_text("# my edits\n")
    capsys.readouterr()
    assert main(["new", "my_claim", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err and str(target) in err
    assert target.read_text() == "# my edits\n"
    assert main(["new", "my_claim", "--dir", str(tmp_path), "--force"]) == 0
    assert "def test_my_claim(train, stance_report):" in target.read_text()


def test_new_creates_the_directory(tmp_path, capsys):
    assert main(["new", "x", "--dir", str(tmp_path / "a" / "b")]) == 0
    assert (tmp_path / "a" / "b" / "test_x.py").is_file()


@pytest.mark.parametrize("raw, name", [
    ("my_claim", "my_claim"),
    ("My Claim!", "my_claim"),
    ("lora-forgets-less.py", "lora_forgets_less"),
    ("test_LoRA_Forgets_Less", "lora_forgets_less"),
    ("  2 layers ", "2_layers"),
    ("Café au lait", "cafe_au_lait"),
])
def test_names_are_normalised_to_identifiers(raw, name, tmp_path, capsys):
    assert normalise_name(raw) == name
    assert main(["new", raw, "--dir", str(tmp_path)]) == 0
    source = (tmp_path / f"test_{name}.py").read_text()
    compile(source, f"test_{name}.py", "exec")
    assert f"def test_{name}(" in source


@pytest.mark.parametrize("raw", ["!!!", "test_", "test"])
def test_a_name_with_nothing_usable_is_a_usage_error(raw, tmp_path, capsys):
    assert main(["new", raw, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stance-harness: error:") and err.count("\n") == 1 and "no usable name" in err
    assert not list(tmp_path.iterdir())


def test_the_template_names_its_own_path():
    assert "python -m pytest suites/test_abc.py" in render("abc", "suites/test_abc.py")


# -- the guide against the code ------------------------------------------------------------
class _FakeGroup:
    def __init__(self, names):
        self.names = names

    def addoption(self, *opts, **attrs):
        self.names.update(opts)


class _FakeParser:
    def __init__(self):
        self.names: set[str] = set()

    def getgroup(self, *args, **kwargs):
        return _FakeGroup(self.names)

    def addoption(self, *opts, **attrs):
        self.names.update(opts)


def plugin_options() -> set[str]:
    from stance_harness import plugin

    fake = _FakeParser()
    plugin.pytest_addoption(fake)
    return fake.names


def cli_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and hasattr(a.choices, "items") and "new" in a.choices)
    return parser, dict(sub.choices)


def cli_options() -> set[str]:
    parser, subparsers = cli_parsers()
    return {opt for p in [parser, *subparsers.values()] for a in p._actions for opt in a.option_strings}


# Options of pytest and other tools that the docs show in commands (pip, accelerate, torchrun, the example script)
OTHER_TOOLS = {"--junitxml", "--head", "--address", "--no-deps", "--upgrade", "--num_processes", "--num_machines",
               "--machine_rank", "--main_process_ip", "--nnodes", "--nproc_per_node", "--standalone", "--strict", "--method", "--options", "--recipe", "--out",
               "--shape", "--layers"}  # the last two: benchmarks/shape_model.py's


def test_every_option_in_the_docs_exists():
    for where, text in DOCS.items():
        mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))
        unknown = mentioned - plugin_options() - cli_options() - OTHER_TOOLS
        assert not unknown, f"{where} names options the plugin and the CLI do not have: {sorted(unknown)}"


def test_the_docs_document_every_plugin_option_and_subcommand():
    written = "\n".join(text for where, text in DOCS.items() if where != "docs/reference/options.md")
    undocumented = plugin_options() - set(re.findall(r"--[a-z][a-z0-9-]*", written))
    assert not undocumented, f"no hand-written page says what these options are for: {sorted(undocumented)}"
    _, subparsers = cli_parsers()
    assert not {f"stance-harness {name}" for name in subparsers} - set(re.findall(r"stance-harness [a-z]+", written))
    for where, text in DOCS.items():
        for name in re.findall(r"^stance-harness ([a-z]+)", text, re.M):
            assert name in subparsers, f"{where} runs `stance-harness {name}`, which does not exist"
    assert re.findall(r"^stance-harness compare ", GATE_PAGE, re.M)


def _signature(fn) -> str:
    params = []
    for p in inspect.signature(fn).parameters.values():
        params.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return f"{fn.__name__}({', '.join(params)})".replace("'", '"')


def test_every_assertion_helper_is_in_the_checks_table_with_its_signature():
    helpers = [name for name in stance_harness.__all__ if name.startswith("assert_")]
    assert len(helpers) >= 9
    for name in helpers:
        signature = _signature(getattr(stance_harness, name))
        assert f"`{signature}`" in CHECKS_PAGE, f"docs/measurements.md's Checks table lacks `{signature}`"
