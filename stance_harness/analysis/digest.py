"""Exact fingerprints of tensors, hashed chunk by chunk so no full-size copy is ever made."""

from __future__ import annotations

import hashlib

import torch

from stance_harness.analysis.chunks import chunk_size, iter_chunks, load, workspace


def tensor_digest(tensor, chunk_elements: int | None = None) -> str:
    """sha256 hex digest (its first 32 digits) of a tensor's bytes in row-major order: equal digests mean
    bit-identical weights. Strided and CUDA tensors are made contiguous / copied to the
    host one chunk (at most CHUNK_BYTES, or `chunk_elements` elements) at a time."""
    t = tensor.detach()
    hasher = hashlib.sha256()  # with the CPU's SHA extensions, twice blake2b's speed (measured here)
    n = chunk_size(t.element_size(), chunk_elements)
    # contiguous host tensors are hashed in place; others pass through one host buffer
    direct = t.is_contiguous() and t.device.type == "cpu"
    buf = None if direct else workspace(t.numel(), n, t.dtype, "cpu")
    for (piece,) in iter_chunks(t, chunk_elements=n):
        flat = piece if direct else load(buf, piece)
        hasher.update(memoryview(flat.view(torch.uint8).numpy()))
    return hasher.hexdigest()[:32]

