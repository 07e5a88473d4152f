"""Figures of one suites session from its report.json: wall time, runs trained, training
seconds, and the peak memory the runs' traces measured (CUDA max allocated on a GPU, peak RSS
on the CPU). Prints one JSON object.

    python benchmarks/suite_figures.py REPORT_JSON WALL_SECONDS [NVIDIA_SMI_CSV]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def figures(report: dict, wall: float, smi_csv: Path | None = None) -> dict:
    runs = list(report.get("runs", {}).values())
    peaks: dict = {}
    for run in runs:
        instruments = run.get("instruments") or {}
        kind, value = instruments.get("peak_memory_kind"), instruments.get("peak_memory_bytes")
        if kind and value is not None:
            peaks[kind] = max(peaks.get(kind, 0), value)
    tests = report.get("tests", [])
    outcomes: dict = {}
    for test in tests:
        outcomes[test.get("outcome")] = outcomes.get(test.get("outcome"), 0) + 1
    model = (report.get("provenance") or {}).get("model") or {}
    out = {"wall_s": wall, "tests": len(tests), "outcomes": outcomes, "runs": len(runs),
           "trained_here": sum(1 for r in runs if "trained" in (r.get("origins") or [r.get("origin")])),
           "train_s": sum(r.get("train_seconds") or 0 for r in runs), "peak_bytes_by_kind": peaks,
           "device": model.get("device"), "device_name": model.get("device_name"),
           "precisions": sorted({r.get("precision") for r in runs if r.get("precision")}),
           "interrupted": bool(report.get("interrupted"))}
    if smi_csv is not None and smi_csv.is_file():
        used = [float(x) for x in smi_csv.read_text().split() if x.replace(".", "", 1).isdigit()]
        out["nvidia_smi_peak_MiB"] = max(used) if used else None
    return out


def main() -> None:
    report = json.loads(Path(sys.argv[1]).read_text())
    smi = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    print(json.dumps(figures(report, float(sys.argv[2]), smi)))


if __name__ == "__main__":
    main()
