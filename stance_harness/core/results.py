"""The result of one check: what an assertion helper found, as data the report can show, and the
verdicts a claim can reach."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tabulate import tabulate

VERDICTS = ("supported", "refuted", "inconclusive")


@dataclass
class CheckResult:
    """The structured outcome of one assertion helper."""

    check: str
    passed: bool
    summary: str
    headers: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    verdict: str | None = None  # supported, refuted or inconclusive; None: what `passed` says

    def __post_init__(self):
        if self.verdict is None:
            self.verdict = "supported" if self.passed else "refuted"
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")

    def render(self) -> str:
        text = f"{self.check}: {self.summary}"
        if self.rows:
            text += "\n" + tabulate(self.rows, headers=self.headers, floatfmt=".4g", tablefmt="simple")
        return text

    def as_dict(self) -> dict:
        return json_safe(asdict(self))



def json_safe(value):
    """Floats that JSON can hold (NaN/inf become strings), containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return json_safe(value.item())  # a 0-d tensor or a numpy scalar
    if hasattr(value, "tolist") and callable(value.tolist):
        return json_safe(value.tolist())
    return value
