"""Methods from outside the harness: the public base class, lazy entry points (a fake installed
distribution on sys.path), code identity in the run key, `stance-harness list --methods`, and the
guide's conftest.py example run as written through pytester."""

import hashlib
import importlib
import json
import re
import sys
from pathlib import Path

import pytest

import stance_harness
from stance_harness.cli import main
from stance_harness.runs.methods import METHODS, method_code
from stance_harness.runs.methods.base import ENTRY_POINT_GROUP, load_plugin_methods
from stance_harness.core.registry import HarnessError, Registry
from stance_harness.outcome import outside_methods

GUIDE = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text(encoding="utf-8")

PLUGIN = '''
from dataclasses import dataclass, field

from stance_harness import Method, MethodConfig, register_method


@dataclass(frozen=True)
class NormsConfig(MethodConfig):
    final_only: bool = field(default=False, metadata={"help": "only the final norm trains"})


class NormsOnly(Method):
    """Only the norm layers train (a plug-in)."""

    name = "norms-only"
    config_cls = NormsConfig

    def prepare(self, model, ctx):
        for raw, param in model.named_parameters():
            kind = ctx.anatomy.name_of(raw).kind
            param.requires_grad_(kind == "final_norm" if ctx.config.final_only else kind.endswith("norm"))
        return model
'''


def fake_distribution(root: Path, name: str, version: str, module: str, source: str, entry: str) -> Path:
    """An installed distribution as importlib.metadata finds it: a module and its dist-info."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(module + "\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry}\n")
    return root / f"{module}.py"


@pytest.fixture
def on_path(monkeypatch):
    """Put directories on sys.path for one test; forget what they registered afterwards."""
    before = set(METHODS.names())

    def add(path: Path):
        monkeypatch.syspath_prepend(str(path))
        importlib.invalidate_caches()

    yield add
    for name in set(METHODS.names()) - before:
        METHODS.unregister(name)
    for module in ("my_methods", "broken_methods"):
        sys.modules.pop(module, None)


def test_the_public_names_are_the_harness_own():
    from stance_harness.runs.methods import base

    assert stance_harness.Method is base.Method and stance_harness.register_method is base.register_method
    assert stance_harness.MethodConfig is base.MethodConfig and "Method" in stance_harness.__all__


def test_a_registry_loads_its_plugins_once_at_the_first_lookup_not_at_registration():
    calls = []
    registry = Registry("thing", load_plugins=lambda: (calls.append(1), registry.register("plugged", 2),
                                                      calls.append("plugged" in registry)))
    registry.register("own", 1)
    assert calls == []
    assert registry.get("own") == 1 and calls == [1, True]  # a lookup while loading does not recurse
    assert registry.names() == ["own", "plugged"] and "plugged" in registry and calls == [1, True]


def test_a_conftest_imported_again_replaces_its_method_and_another_class_of_that_name_is_refused(on_path):
    import types

    def define(module_name: str, source: str = PLUGIN):
        module = types.ModuleType(module_name)
        exec(compile(source, f"{module_name}.py", "exec"), module.__dict__)
        return stance_harness.register_method(module.NormsOnly)

    first, again = define("conftest_x"), define("conftest_x")
    assert first is not again and type(METHODS.get("norms-only")) is again
    with pytest.raises(ValueError, match="method 'norms-only' is already registered"):
        define("other_module")
    with pytest.raises(TypeError, match="register_method takes a Method subclass"):
        stance_harness.register_method(object)


def test_an_entry_point_method_is_registered_listed_keyed_and_in_provenance(tmp_path, on_path, harness, capsys):
    source = fake_distribution(tmp_path, "my-methods", "1.2.3", "my_methods", PLUGIN,
                               "norms-only = my_methods:NormsOnly")
    on_path(tmp_path)
    assert "norms-only" not in METHODS
    load_plugin_methods()  # what METHODS ran at its first lookup
    method = METHODS.get("norms-only")
    expected = {"module": "my_methods", "package": "my-methods", "version": "1.2.3",
                "source": hashlib.sha256(source.read_bytes()).hexdigest()[:12]}
    assert method_code(method) == expected and method_code(METHODS.get("lora")) is None

    request = harness.request("norms-only", examples=4, final_only=True)
    assert request.describe()["method_code"] == expected and request.describe()["config"] == {"final_only": True}
    assert "method_code" not in harness.request("full", examples=4).describe()  # the harness's keys are as before
    assert outside_methods(["full", "norms-only", "norms-only"]) == [{"name": "norms-only", **expected}]

    assert main(["list", "--methods"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("norms-only"))
    assert re.match(r"norms-only\s+my-methods 1\.2\.3\s+Only the norm layers train \(a plug-in\)\.", row)


def test_changing_an_outside_method_changes_its_run_key(tmp_path, on_path, harness):
    fake_distribution(tmp_path, "my-methods", "1.2.3", "my_methods", PLUGIN, "norms-only = my_methods:NormsOnly")
    on_path(tmp_path)
    load_plugin_methods()
    first = harness.request("norms-only", examples=4).key
    METHODS.unregister("norms-only")
    sys.modules.pop("my_methods")
    (tmp_path / "my_methods.py").write_text(PLUGIN.replace("(a plug-in)", "(a plug-in, edited)"))
    load_plugin_methods()
    assert harness.request("norms-only", examples=4).key != first


@pytest.mark.parametrize("source,entry,message", [
    ("raise ImportError('no such thing')\n", "bad = broken_methods",
     "method plug-in 'bad' (broken_methods, from broken-methods): importing it failed: ImportError: no such thing"),
    ("VALUE = 3\n", "bad = broken_methods:VALUE",
     "method plug-in 'bad' (broken_methods:VALUE, from broken-methods): names a int; it must name a module or a Method"),
    (PLUGIN.replace('"norms-only"', '"lora"'), "bad = broken_methods:NormsOnly",
     "method plug-in 'bad' (broken_methods:NormsOnly, from broken-methods): method 'lora' is already registered"),
])
def test_a_broken_entry_point_is_a_clear_error(tmp_path, on_path, source, entry, message):
    fake_distribution(tmp_path, "broken-methods", "0.1", "broken_methods", source, entry)
    on_path(tmp_path)
    with pytest.raises(HarnessError) as err:
        load_plugin_methods()
    assert message in str(err.value)


def guide_blocks(heading: str, text: str = GUIDE) -> list[str]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)


def test_the_guide_method_examples_run_as_written(pytester, monkeypatch):
    """One pytest session for docs/methods.md's peft example and its conftest.py method, verbatim."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (peft_example,) = guide_blocks("## Your own peft config")
    conftest, test_file = guide_blocks("## Your own method")
    assert conftest.startswith("# conftest.py") and test_file.startswith("# test_bitfit.py")
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_bitfit=test_file, test_peft_example=peft_example)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    report_id = (pytester.path / "reports" / "latest").read_text().strip()
    payload = json.loads((pytester.path / "reports" / report_id / "report.json").read_text())
    (method,) = payload["provenance"]["methods"]  # the conftest's; peft is the harness's own
    source = hashlib.sha256((pytester.path / "conftest.py").read_bytes()).hexdigest()[:12]
    assert method == {"name": "bitfit", "module": "conftest", "package": None, "version": None, "source": source}
    runs = {run["method"] + ("-" + run["config"]["config"]["peft_type"] if run["method"] == "peft" else ""): run
            for run in payload["runs"].values()}
    assert sorted(runs) == ["bitfit", "peft-IA3", "peft-LORA", "peft-VERA"]
    assert runs["bitfit"]["config"] == {"kinds": ["q_proj", "v_proj"]}
    assert runs["peft-LORA"]["config"]["config"]["use_dora"] is True
    markdown = (pytester.path / "reports" / report_id / "report.md").read_text()
    assert f"- methods from outside the harness: `bitfit` (no package, module conftest, source {source})" in markdown
