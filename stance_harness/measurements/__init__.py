"""Measurements of a run, one module each; importing this package registers them all.

`run.measure(name, **params)` computes one (once per run and key) over a MeasureContext;
`paired_metrics()` lists what paired claims compare, `producer_of(metric)` finds its measurement.
A new module in this folder registers itself without an edit here: those not named below are
imported after them, by name.
"""

import importlib
import pkgutil

# Registration happens on import; the order here is the order `paired_metrics()` lists them in.
# Paired metrics are listed in this order too.
from stance_harness.measurements import counts, deltas, behavior, forgetting, calibration, step_time  # noqa: F401
from stance_harness.measurements import geometry, ability, judged, replies, localization, dose_response, rank  # noqa: F401
from stance_harness.measurements.base import (MEASUREMENTS, MeasureContext, MeasurementSpec, Metric, measure,
                                              measurement_checks, paired_metrics, producer_of, register_measurement,
                                              without_units)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")  # already imported: a lookup

__all__ = ["MEASUREMENTS", "MeasureContext", "MeasurementSpec", "Metric", "measure", "measurement_checks",
           "paired_metrics", "producer_of", "register_measurement", "without_units"]
