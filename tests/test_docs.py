"""The README's tables list what the registries hold, so the docs cannot drift from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stance_harness.runs.methods import METHODS
from stance_harness.models import MODELS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_names(heading: str) -> set[str]:
    section = README.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name.strip("` ") for row in rows for name in row.split("|")[1].split(",") if name.strip().startswith("`")}


def test_methods_table_lists_every_registered_method():
    assert table_names("## Methods") == set(METHODS.names())


def test_models_table_lists_every_alias():
    names = {n.split(" ")[0].strip("`") for n in table_names("## Models")}  # "`tiny-qwen2` (default)"
    assert names == set(MODELS.names())


def test_readme_opens_with_the_two_commands():
    commands = [line for line in README.split("```bash", 1)[1].split("```", 1)[0].splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["./dev.sh suites", "./dev.sh test"]


# -- docs/measurements.md: the keys each measurement returns, checked on real runs -----------
MEASUREMENTS = (Path(__file__).resolve().parents[1] / "docs" / "measurements.md").read_text()


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


# -- README "Inside your own training": its two examples run as written ---------------------------
def python_blocks(heading: str) -> list[str]:
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


@pytest.mark.parametrize("index, printed", [(0, r"checks passed: True report: reports/\S+/index.html"),
                                             (1, r"^[-+]?\d\.\d+(e-\d+)? [-+]?\d\.\d+(e-\d+)?$")])
def test_the_inside_your_own_training_examples_run(index, printed, tmp_path):
    code = python_blocks("## Inside your own training")[index]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(printed, done.stdout, re.MULTILINE), done.stdout
    if index == 0:
        assert (tmp_path / "reports" / "latest").is_file()
