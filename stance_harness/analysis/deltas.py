"""Weight deltas: per-matrix statistics, and exact per-layer aggregation.

Each matrix reduces to additive moments (float64 sums), so a layer's statistics are exactly
those of its matrices' elements pooled, not an average of averages. Non-finite elements are
counted and left out of the sums, so a run with NaN weights still yields a table that says so.
Variances are unbiased (n - 1), like torch.var. A matrix is reduced in bounded chunks
(`chunks`), so its float64 working copies never exceed CHUNK_BYTES, whatever its size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from stance_harness.analysis.chunks import chunk_size, exact_sum, iter_chunks, load, workspace


@dataclass(frozen=True)
class DeltaMoments:
    n: int = 0  # finite elements
    nonfinite: int = 0
    total: float = 0.0  # Σ Δ
    total_sq: float = 0.0  # Σ Δ²  (= ‖Δ‖²)
    total_abs: float = 0.0  # Σ |Δ|
    before_sq: float = 0.0  # ‖W‖²
    after_sq: float = 0.0  # ‖W'‖²

    def __add__(self, other: "DeltaMoments") -> "DeltaMoments":
        return DeltaMoments(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    # -- derived statistics -------------------------------------------------------------
    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def var(self) -> float:
        return _unbiased(self.n, self.total_sq, self.mean)

    @property
    def mean_abs(self) -> float:
        return self.total_abs / self.n if self.n else math.nan

    @property
    def var_abs(self) -> float:
        return _unbiased(self.n, self.total_sq, self.mean_abs)  # |Δ|² = Δ²

    @property
    def delta_norm(self) -> float:
        return math.sqrt(self.total_sq)

    @property
    def rel_change(self) -> float:
        """‖Δ‖ / ‖W‖."""
        return self.delta_norm / math.sqrt(self.before_sq) if self.before_sq > 0 else math.nan

    @property
    def norm_change(self) -> float:
        """(‖W'‖ - ‖W‖) / ‖W‖: the signed relative change of the norm."""
        base = math.sqrt(self.before_sq)
        return (math.sqrt(self.after_sq) - base) / base if base > 0 else math.nan

    def stats(self) -> dict:
        return {
            "mean": self.mean, "var": self.var, "mean_abs": self.mean_abs, "var_abs": self.var_abs,
            "delta_norm": self.delta_norm, "rel_change": self.rel_change,
            "norm_change": self.norm_change, "numel": self.n + self.nonfinite,
            "nonfinite": self.nonfinite,
        }


def _unbiased(n: int, total_sq: float, mean: float) -> float:
    if n < 2:
        return math.nan
    return max(0.0, (total_sq - n * mean * mean) / (n - 1))


# Workspace per element of one chunk: float64 before, after, Δ and a scratch column (32), a
# mask (1), and up to 8 for the staging copy torch makes when after lives on another device.
_DELTA_BYTES = 41


def delta_moments(before, after, chunk_elements: int | None = None) -> DeltaMoments:
    """Moments of Δ = after - before, in float64, over the finite elements.

    An element is non-finite when Δ or after is. Both tensors are walked in aligned chunks
    (at most `chunk_elements` elements; default: what fits CHUNK_BYTES), on before's device,
    in one workspace allocated per call. A chunk whose sums come out finite has no non-finite
    element (one would make Σ Δ² or Σ W'² NaN or inf), so it takes plain reductions; only a
    chunk whose sums do not (a non-finite element, or an overflow) is masked element by element.
    """
    before, after = before.detach(), after.detach()
    n = chunk_size(_DELTA_BYTES, chunk_elements)
    device, numel = before.device, before.numel()
    b_buf, a_buf, d_buf, w_buf = (workspace(numel, n, torch.float64, device) for _ in range(4))
    bad_buf = workspace(numel, n, torch.bool, device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    parts = []
    for b_piece, a_piece in iter_chunks(before, after, chunk_elements=n):
        b, a = load(b_buf, b_piece), load(a_buf, a_piece)
        m = b.numel()
        d = torch.sub(a, b, out=d_buf[:m])
        # abs into the scratch column, then sum: twice as fast as vector_norm(d, 1) here (measured)
        part = torch.stack([zero, d.sum(), torch.dot(d, d), torch.abs(d, out=w_buf[:m]).sum(),
                            torch.dot(b, b), torch.dot(a, a)])
        if not bool(torch.isfinite(part).all()):  # a non-finite element, or an overflow: mask exactly
            part = _masked_part(b, a, d, w_buf[:m], bad_buf[:m])
        parts.append(part)
    if not parts:
        return DeltaMoments()
    # one host transfer per matrix; per-chunk partials added exactly
    columns = [exact_sum(col) for col in zip(*torch.stack(parts).tolist())]
    nonfinite = int(columns[0])
    return DeltaMoments(numel - nonfinite, nonfinite, *columns[1:])


def _masked_part(b, a, d, w, bad):
    """A chunk's partial sums over its finite elements only (nonfinite count first)."""
    # (a - a) + d - d is 0 where Δ and after are finite and NaN elsewhere, and never overflows
    torch.sub(a, a, out=w).add_(d).sub_(d)
    torch.ne(w, w, out=bad)
    # zeroed rather than dropped: a zero adds nothing to any sum, and no gather copy is made
    for x in (d, a, b):
        x.masked_fill_(bad, 0.0)
    total = d.sum()
    total_abs = d.abs_().sum()
    total_sq = d.mul_(d).sum()
    return torch.stack([w.copy_(bad).sum(), total, total_sq, total_abs, b.mul_(b).sum(), a.mul_(a).sum()])


@dataclass(frozen=True)
class MatrixDelta:
    """One parameter tensor's change, under its canonical name (e.g. L15.v_proj.weight)."""

    name: str  # canonical
    raw_name: str
    layer: int | None
    kind: str
    leaf: str
    moments: DeltaMoments

    def row(self) -> dict:
        return {"name": self.name, "layer": self.layer, "kind": self.kind, "leaf": self.leaf, **self.moments.stats()}

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MatrixDelta":
        return cls(**{**data, "moments": DeltaMoments(**data["moments"])})


def raw_delta_pairs(model, before: dict) -> list[tuple[str, object, object]]:
    """(raw name, before, after) for the snapshotted parameters of `model`."""
    params = dict(model.named_parameters())
    return [(name, tensor, params[name].detach()) for name, tensor in before.items()]


def delta_table(pairs, anatomy) -> list[MatrixDelta]:
    """One MatrixDelta per (raw name, before, after), in the order given."""
    out = []
    for raw_name, before, after in pairs:
        where = anatomy.name_of(raw_name)
        out.append(MatrixDelta(str(where), raw_name, where.layer, where.kind, where.leaf, delta_moments(before, after)))
    return out


def layer_label(name) -> str:
    """Layer label of a ParamName or MatrixDelta: L{i} inside the blocks, the role (embed, head, ...) outside."""
    return f"L{name.layer}" if name.layer is not None else name.kind.split(".")[0]



def aggregate(rows, key=layer_label) -> dict[str, DeltaMoments]:
    """Pooled moments per group, blocks first in layer order, then other roles."""
    groups: dict[str, DeltaMoments] = {}
    for row in rows:
        label = key(row)
        groups[label] = groups.get(label, DeltaMoments()) + row.moments
    return dict(sorted(groups.items(), key=lambda kv: _label_order(kv[0])))


def _label_order(label: str):
    if label.startswith("L") and label[1:].isdigit():
        return (1, int(label[1:]), "")
    return (0 if label.startswith("embed") else 2, 0, label)


def layer_rows(rows) -> list[dict]:
    return [{"layer": label, **moments.stats()} for label, moments in aggregate(rows).items()]
