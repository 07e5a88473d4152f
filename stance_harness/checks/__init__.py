"""The checks, by subject: each checks one claim about a Run and shows a table of what it found.

`check_X(run, ...)` returns a CheckResult whether the claim holds or not; `assert_X(run, ...)`
is the same check raising HypothesisFailed (or HypothesisInconclusive) when it does not hold.
common: what every check shares (exceptions, argument checks, recording, assert_all, metrics);
weights, training, behavior, calibration: checks on one run (or each seed of a RunSet);
comparisons: paired claims between runs. The public names are exported by `stance_harness`;
a module added here (the check of a new measurement) is imported with the package, and its
check_X / assert_X are exported by `stance_harness` by name (`check_helper`), with no edit elsewhere.
"""

import importlib
import pkgutil

# importing the package declares every helper's metrics and loads every check (what the plugin and CLI rely on)
from stance_harness.checks import behavior, calibration, common, comparisons, training, weights  # noqa: F401

_MODULES = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]


def check_helper(name: str):
    """The check_X or assert_X called `name` in any module of this package, or None."""
    if not name.startswith(("check_", "assert_")):
        return None
    return next((getattr(m, name) for m in _MODULES if callable(getattr(m, name, None))), None)
