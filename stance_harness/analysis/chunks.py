"""Bounded-memory reductions over tensors: one chunk iterator, and the small sums built on it.

Every reduction here walks a tensor in pieces of at most `chunk_elements` elements, so the
transient memory it needs (float64 copies, masks) stays under CHUNK_BYTES whatever the
tensor's size. Pieces are views; a reduction copies each into a workspace it allocates once
(`load`) and works there in place. Allocating per chunk instead fragments glibc's heap: a
64M-element pair grew RSS by ~440 MiB that way, which is what a workspace rules out.
"""

from __future__ import annotations

import math

import torch

# Transient memory a chunked reduction may use per tensor (or pair), in bytes.
CHUNK_BYTES = 32 * 2**20


def chunk_size(bytes_per_element: int, chunk_elements: int | None = None) -> int:
    """Elements per chunk: `chunk_elements` if given, else what fits CHUNK_BYTES at
    `bytes_per_element` bytes of temporaries per element."""
    if chunk_elements is None:
        return max(1, CHUNK_BYTES // bytes_per_element)
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    return chunk_elements


def iter_chunks(*tensors, chunk_elements: int):
    """Aligned pieces of same-shaped tensors (ValueError otherwise), in row-major order: tuples
    of views of at most `chunk_elements` elements each, together covering every element once.

    All contiguous: flat stride-1 slices. Otherwise one index plan, along dim 0 (and further
    dims for rows larger than a chunk), is applied to every tensor, so a strided tensor is
    never copied whole and the pieces of differently laid-out tensors still line up.
    """
    if not tensors:
        return
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"tensors to walk together need one shape, got {tuple(shape)} and {tuple(t.shape)}")
    tensors = tuple(t.detach() for t in tensors)
    numel = math.prod(shape)
    if numel == 0:
        return
    if all(t.is_contiguous() for t in tensors):
        # as_strided, not reshape: a size-1 dim may carry any stride, and flat views need stride 1
        flats = tuple(t.as_strided((numel,), (1,), t.storage_offset()) for t in tensors)
        for start in range(0, numel, chunk_elements):
            yield tuple(f[start:start + chunk_elements] for f in flats)
        return
    for index in _index_plan(tuple(shape), chunk_elements):
        yield tuple(t[index] for t in tensors)


def _index_plan(shape: tuple, n: int, prefix: tuple = ()):
    """Indices (tuples of ints and one slice) splitting `shape` into row-major blocks of at most n elements."""
    if len(shape) == 0:
        yield prefix
        return
    row = math.prod(shape[1:])
    if row <= n:
        rows = n // row
        for start in range(0, shape[0], rows):
            yield prefix + (slice(start, start + rows),)
        return
    for i in range(shape[0]):  # one row is bigger than a chunk: split it in turn
        yield from _index_plan(shape[1:], n, prefix + (i,))


def workspace(numel: int, chunk_elements: int, dtype, device):
    """A flat buffer for one chunk: min(numel, chunk_elements) elements, so a small tensor gets a small one."""
    return torch.empty(max(0, min(numel, chunk_elements)), dtype=dtype, device=device)


def load(buffer, piece):
    """buffer's first piece.numel() elements, flat, holding piece's elements (in buffer's dtype and device)."""
    out = buffer[:piece.numel()]
    out.view(piece.shape).copy_(piece)
    return out


# -- small reductions on the iterator ---------------------------------------------------------

def chunked_sq_norm(t, chunk_elements: int | None = None) -> float:
    """Σ x² over every element, in float64 (NaN or inf propagate)."""
    n = chunk_size(8, chunk_elements)  # one float64 workspace
    buf = workspace(t.numel(), n, torch.float64, t.device)
    parts = []
    for (piece,) in iter_chunks(t, chunk_elements=n):
        x = load(buf, piece)
        parts.append(x.mul_(x).sum())
    return _fsum_on_host(parts)


def count_nonfinite(t, chunk_elements: int | None = None) -> int:
    """How many elements of a real tensor are NaN or ±inf (none, for an integer or bool tensor)."""
    if t.is_complex():
        raise TypeError("count_nonfinite counts real elements; pass torch.view_as_real(t) for a complex tensor")
    if not t.is_floating_point():
        return 0
    n = chunk_size(8, chunk_elements)
    buf = workspace(t.numel(), n, torch.float64, t.device)
    parts = []
    for (piece,) in iter_chunks(t, chunk_elements=n):
        x = load(buf, piece)
        # x - x is 0 where x is finite, NaN where it is not; x != x then marks those with 1.0
        x.sub_(x)
        parts.append(x.ne_(x).sum())
    return int(_fsum_on_host(parts))


def _fsum_on_host(parts) -> float:
    """Σ of per-chunk 0-d sums, read back in one transfer."""
    return exact_sum(torch.stack(parts).tolist()) if parts else 0.0


def exact_sum(values) -> float:
    """Σ of per-chunk partials, correctly rounded; inf or NaN where a partial (or the sum)
    is, as one whole-tensor sum would give (math.fsum raises on those instead)."""
    values = list(values)
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        return float(sum(values))
