"""The checks, by subject: each checks one claim about a Run and shows a table of what it found.

`check_X(run, ...)` returns a CheckResult whether the claim holds or not; `assert_X(run, ...)`
is the same check raising HypothesisFailed (or HypothesisInconclusive) when it does not hold.
common: what every check shares (exceptions, argument checks, recording, assert_all, metrics);
weights, training, behavior, calibration: checks on one run (or each seed of a RunSet);
comparisons: paired claims between runs. The public names are exported by `stance_harness`.
"""

# importing the package declares every helper's metrics and loads every check (what the plugin and CLI rely on)
from stance_harness.checks import behavior, calibration, common, comparisons, training, weights  # noqa: F401
