"""Where the package imports what (issue 23, item 6).

Start-up: `import stance_harness`, the pytest plugin and the CLI load none of torch, transformers
and peft, checked in a fresh interpreter rather than by banning import patterns. And an import
stays inside a function only with a reason written beside it; there are at most
MAX_LOCAL_IMPORTS of them in the whole package.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stance_harness

ROOT = Path(stance_harness.__file__).resolve().parent
HEAVY = ("torch", "transformers", "peft")
START_UP = ("stance_harness", "stance_harness.plugin", "stance_harness.cli")

# The target is 30. This is what the package reaches now; lower it as imports move up.
MAX_LOCAL_IMPORTS = 27


# -- start-up ------------------------------------------------------------------------------------
LOADED = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.argv[2:] if m in sys.modules)))
"""


def heavy_modules_after_import(module: str, heavy=HEAVY) -> list[str]:
    """Which of `heavy` are in sys.modules after importing `module` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", LOADED, module, *heavy], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", START_UP)
def test_start_up_modules_import_no_torch_transformers_or_peft(module):
    assert heavy_modules_after_import(module) == [], f"importing {module} loads {heavy_modules_after_import(module)}"


def test_the_start_up_check_sees_a_heavy_import():
    # the check above can fail: the training loop imports torch and transformers at its top
    assert heavy_modules_after_import("stance_harness.runs.training") == ["torch", "transformers"]


# -- function-local imports ----------------------------------------------------------------------
def local_imports(source: str) -> list[tuple[int, str]]:
    """(line, statement) of each import inside a function (nested ones counted once)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found.update((n.lineno, ast.unparse(n)) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return sorted(found)


def _comment(line: str) -> str:
    """The text of a line's comment, less any noqa code (a noqa is not a reason)."""
    if "#" not in line:
        return ""
    text = line.split("#", 1)[1].strip()
    return re.sub(r"^noqa(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?", "", text, flags=re.IGNORECASE).strip(" -:")


def has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line above it or above the block of imports it
    belongs to (one comment may give the reason for several imports in a row)."""
    if _comment(lines[lineno - 1]):
        return True
    above = lineno - 2
    while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
        if _comment(lines[above]):
            return True
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#") and bool(_comment(lines[above]))


def unexplained(source: str) -> list[tuple[int, str]]:
    lines = source.splitlines()
    return [(line, statement) for line, statement in local_imports(source) if not has_reason(lines, line)]


def _package_sources() -> dict[str, str]:
    return {str(path.relative_to(ROOT.parent)): path.read_text() for path in sorted(ROOT.rglob("*.py"))}


def test_function_local_imports_stay_within_the_limit():
    counts = {name: len(local_imports(source)) for name, source in _package_sources().items()}
    total = sum(counts.values())
    worst = sorted(((n, name) for name, n in counts.items() if n), reverse=True)[:10]
    assert total <= MAX_LOCAL_IMPORTS, f"{total} function-local imports (limit {MAX_LOCAL_IMPORTS}); most in: {worst}"


def test_every_function_local_import_says_why():
    missing = [f"{name}:{line}: {statement}" for name, source in _package_sources().items()
               for line, statement in unexplained(source)]
    assert missing == [], "function-local imports without a reason comment:\n" + "\n".join(missing)


SAMPLE = '''\
import os


def a():
    import torch  # why: start-up stays free of torch
    return torch


def b():
    # why: an optional dependency
    import ray
    from ray import util
    return ray, util


def c():
    import yaml
    return yaml


def d():
    import json  # noqa: F401
    return lambda: __import__("x")


class E:
    def f(self):
        def g():
            from pathlib import Path
            return Path
        return g
'''


def test_local_imports_are_found_in_functions_methods_and_nested_functions_only():
    assert local_imports(SAMPLE) == [(5, "import torch"), (11, "import ray"), (12, "from ray import util"),
                                     (17, "import yaml"), (22, "import json"), (29, "from pathlib import Path")]


def test_an_import_without_a_reason_is_named():
    assert unexplained(SAMPLE) == [(17, "import yaml"), (22, "import json"), (29, "from pathlib import Path")]


def test_a_reason_above_covers_its_block_of_imports_only():
    source = "def f():\n    # why: heavy\n    import torch\n    import numpy\n\n    import scipy\n"
    assert unexplained(source) == [(6, "import scipy")]
    assert unexplained("def f():\n    import torch  # noqa: F401 - why: heavy\n") == []


def relative_imports(source: str) -> list[int]:
    return [n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.level]


def test_imports_inside_the_package_are_absolute():
    assert relative_imports("from . import x\nimport os\n\n\ndef f():\n    from ..y import z\n") == [1, 6]
    found = {name: relative_imports(source) for name, source in _package_sources().items()}
    assert {name: lines for name, lines in found.items() if lines} == {}


# -- the old name ---------------------------------------------------------------------------------
OLD_NAME = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import harness
    import harness.core.metrics as old
import stance_harness, stance_harness.core.metrics as new
print(harness is stance_harness, old is new, [str(w.message) for w in caught if w.category is DeprecationWarning])
"""


def test_the_old_import_name_warns_and_is_the_same_package():
    done = subprocess.run([sys.executable, "-c", OLD_NAME], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    same_package, same_module, warned = done.stdout.strip().split(" ", 2)
    assert (same_package, same_module) == ("True", "True")  # one module object: no duplicated registries
    assert "the package `harness` is now `stance_harness`" in warned
