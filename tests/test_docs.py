"""The README and the docs site against the code: the generated reference pages are what the
generator makes now, the hand-written tables list what the registries hold, the measurement keys
are the keys a real run returns, the site builds in strict mode, and every Python example in the
docs compiles and imports only names that exist (the cheap ones run as written)."""

import ast
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stance_harness
from stance_harness.core.metrics import METRICS
from stance_harness.models import MODELS
from stance_harness.runs.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


# -- the README ---------------------------------------------------------------------------------
def test_readme_is_short():
    size = len(README.encode("utf-8"))
    assert size <= 10 * 1024, f"README.md is {size} bytes; at most 10 KiB: move the detail into docs/"


def test_readme_opens_with_the_two_commands():
    commands = [line for line in README.split("```bash", 1)[1].split("```", 1)[0].splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["./dev.sh suites", "./dev.sh test"]


def test_readme_links_point_at_files_that_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert targets, "the README links nowhere"
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_hypothesis_runs_as_written(pytester, monkeypatch):
    """The README's hypothesis file, verbatim: both tests pass on the embedded default model."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (block,) = [b for b in python_blocks(README) if "def test_" in b]
    pytester.makepyfile(test_my_hypothesis=block)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--no-reports")
    result.assert_outcomes(passed=2)


# -- hand-written tables against the registries ------------------------------------------------
def table_names(text: str, heading: str) -> set[str]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name.strip("` ") for row in rows for name in row.split("|")[1].split(",") if name.strip().startswith("`")}


def test_methods_table_lists_every_registered_method():
    assert table_names(page("methods.md"), "# Methods") == set(METHODS.names())


def test_models_table_lists_every_alias():
    names = {n.split(" ")[0].strip("`") for n in table_names(page("models.md"), "# Models")}  # "`tiny-qwen2` (default)"
    assert names == set(MODELS.names())


# -- the generated reference pages -------------------------------------------------------------
@pytest.fixture(scope="module")
def generated():
    return GEN.generate()


def test_the_reference_pages_are_what_the_code_generates(generated):
    stale = GEN.stale(generated)
    assert not stale, f"docs/reference: {stale} differ from the code; regenerate them: {GEN.COMMAND}"


def test_the_check_mode_names_a_stale_page_and_the_command(generated, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(GEN, "OUT", tmp_path)
    for name, text in generated.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert GEN.main(["--check"]) == 0
    (tmp_path / "metrics.md").write_text(generated["metrics.md"].replace("| `ece` | lower", "| `ece` | higher"))
    assert GEN.main(["--check"]) == 1
    assert capsys.readouterr().err.strip() == f"docs/reference: metrics.md differ from the code; run: {GEN.COMMAND}"


class _Names:
    """pytest's parser as the plugin sees it: records the flags it adds."""

    def __init__(self):
        self.flags: list[str] = []

    def getgroup(self, *args, **kwargs):
        return self

    def addoption(self, *opts, **attrs):
        self.flags.extend(opts)

    def addini(self, *args, **kwargs):
        pass


def plugin_flags() -> list[str]:
    from stance_harness import plugin

    names = _Names()
    plugin.pytest_addoption(names)
    return names.flags


def test_the_options_page_lists_every_plugin_option(generated):
    flags = plugin_flags()
    assert len(flags) >= 20
    documented = set(re.findall(r"`(--[a-z][a-z0-9-]*)", generated["options.md"]))
    assert set(flags) == documented


def test_the_methods_page_lists_every_method_and_option(generated):
    import dataclasses

    text = generated["methods.md"]
    assert set(re.findall(r"^## `([^`]+)`", text, re.M)) == set(METHODS.names())
    section = text.split("## `lora`", 1)[1].split("\n## ", 1)[0]
    assert {f.name for f in dataclasses.fields(METHODS.get("lora").config_cls)} == set(
        re.findall(r"^\| `(\w+)`", section, re.M))
    assert "| `r` | `8` |" in section


def test_the_metrics_page_holds_every_direction(generated):
    GEN.import_package()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (lower|higher) \|", generated["metrics.md"], re.M))
    assert rows == {name: info.direction for name, info in METRICS.items()}
    assert rows["ece"] == "lower" and rows["behavior_shift"] == "higher"


def test_the_checks_page_lists_every_public_check(generated):
    public = {n for n in stance_harness.__all__ if n.startswith(("check_", "assert_"))}
    listed = set(re.findall(r"^\| `(\w+)\(", generated["checks.md"], re.M))
    assert listed == public
    assert f"`{GEN.signature(stance_harness.assert_ece)}`" in generated["checks.md"]


def test_the_measurements_page_lists_every_measurement(generated):
    listed = re.findall(r"^\| `(?:run\.)?(\w+)", generated["measurements.md"].split("|---|", 1)[1], re.M)
    try:
        from stance_harness.measurements import MEASUREMENTS
    except ImportError:  # no measurement registry in this version: the Run's accessors whose result is kept
        assert {"counts", "behavior", "forgetting", "calibration", "rank", "geometry"} <= set(listed)
    else:
        assert sorted(listed) == sorted(MEASUREMENTS.names())


def test_the_layout_page_lists_every_module(generated):
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "stance_harness").rglob("*.py") if p.name != "__init__.py"}
    listed = set(re.findall(r"^\| `(stance_harness/[^`]+\.py)`", generated["layout.md"], re.M))
    assert listed == modules


def test_the_verdicts_page_holds_every_recorded_verdict(generated):
    import json

    text = generated["verdicts.md"]
    records = {p.stem: json.loads(p.read_text()) for p in (ROOT / "suites" / "verdicts").glob("*.json")}
    assert records, "no recorded verdicts in suites/verdicts/"
    header = text.split("| hypothesis | ", 1)[1].split(" |\n", 1)[0].split(" | ")
    assert header == sorted(records)
    rows = {re.search(r"`([^`]+)`<br>`([^`]+)`", line).groups(): line.split(" | ")[1:]
            for line in text.splitlines() if line.startswith("| `")}
    for model, record in records.items():
        for test, found in record["tests"].items():
            where, name = test.split("::", 1)
            cell = rows[(Path(where).name, name)][header.index(model)]
            assert cell.startswith(found["verdict"]), (model, test, cell)


def test_a_signature_keeps_star_arguments():
    def judged(run, judge="embedding", *more, **options):
        pass

    assert GEN.signature(judged) == 'judged(run, judge="embedding", *more, **options)'


# -- the site ----------------------------------------------------------------------------------
MKDOCS = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the docs extra)")
def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "options" / "index.html").is_file()


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the docs extra)")
def test_a_broken_link_fails_the_strict_build(tmp_path):
    """Without -q: mkdocs 1.6 under -q does not count warnings, so strict mode passes a broken link."""
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("*.png"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "ray.md").write_text(page("ray.md") + "\n[the store](no-such-page.md)\n")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.relative_to(DOCS).as_posix() for p in doc_pages() if p.relative_to(DOCS).as_posix() not in nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


HISTORY = re.compile(r"\b(as before|we used to|no longer|before:|had read|we now|issue \d+)\b", re.I)


def test_the_docs_tell_no_implementation_history():
    found = [(p.relative_to(ROOT).as_posix(), m.group(0)) for p in [ROOT / "README.md", *doc_pages()]
             for m in HISTORY.finditer(p.read_text(encoding="utf-8"))]
    assert not found, f"implementation history belongs in commit messages: {found}"


# -- every Python example in the docs ----------------------------------------------------------
def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def examples() -> list[tuple[str, str]]:
    found = [("README.md", block) for block in python_blocks(README)]
    for path in doc_pages():
        found += [(path.relative_to(ROOT).as_posix(), block) for block in python_blocks(path.read_text("utf-8"))]
    return found


def test_the_docs_have_examples():
    assert len(examples()) >= 15


def imported_names(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) for `from module import name`, (module, None) for `import module`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
    return out


# a conftest.py example registers a method; the test file beside it imports nothing of its own
LOCAL_MODULES = {"conftest", "my_methods"}


@pytest.mark.parametrize("where, block", examples(), ids=[f"{w}[{i}]" for i, (w, _) in enumerate(examples())])
def test_every_example_compiles_and_imports_what_exists(where, block):
    tree = compile(block, where, "exec", flags=ast.PyCF_ONLY_AST)
    compile(tree, where, "exec")
    for module, name in imported_names(tree):
        if module.split(".")[0] in LOCAL_MODULES:
            continue
        imported = importlib.import_module(module)
        assert name is None or hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"{where}: `from {module} import {name}`: {module} has no {name}")


def test_a_missing_name_in_an_example_is_found():
    tree = ast.parse("from stance_harness import assert_no_such_check\nimport os.path\n")
    assert imported_names(tree) == [("stance_harness", "assert_no_such_check"), ("os.path", None)]
    with pytest.raises(AssertionError, match="stance_harness has no assert_no_such_check"):
        test_every_example_compiles_and_imports_what_exists("x.md", "from stance_harness import assert_no_such_check\n")


# -- the example test files in the docs pass as written ------------------------------------------
NOT_RUN = "<!-- example not run by test_docs: "


def page_examples() -> list[tuple[str, int, str, str | None]]:
    """(page, index, block, why it is not run here or None) for every Python block of the docs pages."""
    found = []
    for path in doc_pages():
        text = path.read_text("utf-8")
        for index, match in enumerate(re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)):
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            why = before.removeprefix(NOT_RUN).removesuffix(" -->") if before.startswith(NOT_RUN) else None
            found.append((path.relative_to(ROOT).as_posix(), index, match.group(1), why))
    return found


def runnable_examples() -> dict[str, list[tuple[str, str]]]:
    """The example test files to run, grouped by the `--model` their `run:` comment names (default: none)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for where, index, block, why in page_examples():
        if why is None and "def test_" in block:
            model = re.search(r"^# .*\brun: .*--model (\S+)", block, re.M)
            name = f"test_{Path(where).stem.replace('-', '_')}_{index}.py"
            groups.setdefault(model.group(1) if model else "", []).append((name, block))
    return groups


def fragments() -> list[tuple[str, int, str]]:
    """The unmarked blocks that are no test file: fragments that read a `run`."""
    return [(where, index, block) for where, index, block, why in page_examples()
            if why is None and "def test_" not in block]


def test_every_example_runs_or_says_why_not():
    for where, index, _block, why in page_examples():
        assert why is None or why.strip(), f"{where}[python block {index}] is marked not run without a reason"
    assert sum(len(files) for files in runnable_examples().values()) >= 6
    assert len(fragments()) >= 5
    for where, index, block in fragments():
        assert re.search(r"\brun\.", block), (
            f"{where}[python block {index}] is neither a test file nor a fragment on `run`: "
            f"make it one, or mark it {NOT_RUN}why -->")


def test_the_fragments_run_on_a_run(quick_run, capsys):
    run = quick_run("lora")
    for where, index, block in fragments():
        try:
            exec(compile(block, f"{where}[python block {index}]", "exec"), {"run": run})
        except Exception as err:
            raise AssertionError(f"{where}[python block {index}] failed on a lora run: {err!r}\n{block}") from err


@pytest.mark.parametrize("model", sorted(runnable_examples()))
def test_the_example_test_files_pass(model, pytester, monkeypatch):
    """Each unmarked example test file of the docs, verbatim, in one session per model."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shutil.copytree(DOCS / "examples", pytester.path / "docs" / "examples")  # stances named by path
    files = runnable_examples()[model]
    for name, block in files:
        (pytester.path / name).write_text(block, encoding="utf-8")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--no-reports", *(["--model", model] if model else []))
    outcomes = {k: v for k, v in result.parseoutcomes().items() if k not in ("warnings", "warning")}
    assert set(outcomes) == {"passed"}, result.stdout.str()[-6000:]
    assert outcomes["passed"] >= sum(block.count("def test_") for _, block in files)


# -- docs/reference/run-measurements.md: the keys each measurement returns, checked on real runs --
MEASUREMENTS = page("reference/run-measurements.md")


def documented_keys() -> dict[str, tuple[set[str], set[str]]]:
    """Per measurement (`run.behavior`): (every documented key path, those marked "Only ...")."""
    found = {}
    for section in MEASUREMENTS.split("\n## `")[1:]:
        name = section.split("`", 1)[0].split("(", 1)[0]
        rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
        keys = {row[1].strip().strip("`") for row in rows}
        optional = {row[1].strip().strip("`") for row in rows if row[2].strip().startswith("Only")}
        found[name] = (keys, optional)
    return found


def key_paths(value, path: str = "") -> set[str]:
    """`a.b`, `rows[].c`: the paths of a returned value down to its leaves (a list of numbers is a
    leaf; the keys of a list of dicts are the union over its items; `correlation` is keyed by kind,
    `families` by family)."""
    if isinstance(value, dict) and value:
        placeholder = "<kind>" if path.endswith("correlation") else "<family>" if path.endswith("families") else None
        return {p for key, item in value.items() for p in key_paths(item, f"{path}.{placeholder or key}")}
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return {p for item in value for p in key_paths(item, f"{path}[]")}
    return {path}


def rows_of(found: list[dict]) -> set[str]:
    return {p.removeprefix("[].") for p in key_paths(found)}


def without_base(found: dict) -> dict:
    """calibration's `base` has `adapted`'s keys (checked here), or is None: documented as one key."""
    if found["base"] is not None:
        assert key_paths(found["base"]) == key_paths(found["adapted"])
    return {**found, "base": None}


def test_every_run_measurement_is_documented():
    from stance_harness.runs.run import Run

    public = {f"run.{name}" for name in ("counts", "behavior", "forgetting", "calibration", "rank", "layer_table",
                                          "localization", "localized", "localization_ends", "dose_response",
                                          "geometry", "unit_values", "replies", "general_ability", "judged")}
    assert set(documented_keys()) == public
    assert all(hasattr(Run, name.removeprefix("run.")) for name in public)


def test_the_documented_keys_are_the_returned_keys(quick_run):
    lora, head = quick_run("lora"), quick_run("lora", task="stance-classification")
    returned = {
        "run.counts": [key_paths(lora.counts)],
        "run.behavior": [key_paths(lora.behavior("loglik_margin")), key_paths(lora.behavior("kl"))],
        "run.forgetting": [key_paths(lora.forgetting()), key_paths(head.forgetting())],
        "run.calibration": [key_paths(without_base(lora.calibration())), key_paths(without_base(head.calibration()))],
        "run.rank": [key_paths(lora.rank())],
        "run.layer_table": [rows_of(lora.layer_table()), rows_of(lora.layer_table("adapter"))],
        "run.localization": [key_paths(lora.localization())],
        "run.localized": [key_paths(lora.localized([1, 2])), key_paths(lora.localized(kinds=["attention"]))],
        "run.localization_ends": [key_paths(lora.localization_ends())],
        "run.dose_response": [key_paths(lora.dose_response())],
        "run.geometry": [key_paths(lora.geometry())],
        "run.replies": [key_paths(lora.replies())],
        # regressions and gains hold rows (documented once, as rows[]); they may be empty on a tiny model
        "run.general_ability": [key_paths({**lora.general_ability(), "regressions": [], "gains": []})],
        "run.judged": [key_paths(lora.judged("embedding"))],
    }
    documented = documented_keys()
    for name, variants in returned.items():
        keys, optional = documented[name]
        seen = set().union(*variants)
        assert {k.lstrip(".") for k in seen} <= keys, f"{name}: undocumented {sorted({k.lstrip('.') for k in seen} - keys)}"
        for paths in variants:
            missing = keys - optional - {k.lstrip(".") for k in paths}
            assert not missing, f"{name}: documented, not returned: {sorted(missing)}"


# -- "Inside your own training": its two examples run as written -------------------------------
@pytest.mark.parametrize("index, printed", [(0, r"checks passed: True report: reports/\S+/index.html"),
                                             (1, r"^[-+]?\d\.\d+(e-\d+)? [-+]?\d\.\d+(e-\d+)?$")])
def test_the_inside_your_own_training_examples_run(index, printed, tmp_path):
    code = python_blocks(page("own-training.md"))[index]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(printed, done.stdout, re.MULTILINE), done.stdout
    if index == 0:
        assert (tmp_path / "reports" / "latest").is_file()
