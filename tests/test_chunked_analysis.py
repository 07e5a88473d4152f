"""Chunked reductions (stance_harness.analysis.chunks, deltas, digest) against the whole-tensor
implementations they replaced; LoRA singular values from the factors against svdvals."""

import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stance_harness.analysis.chunks import CHUNK_BYTES, chunked_sq_norm, count_nonfinite, iter_chunks
from stance_harness.analysis.deltas import DeltaMoments, delta_moments
from stance_harness.analysis.digest import tensor_digest
from stance_harness.analysis.rank import (
    energy_rank, energy_rank_from_singular_values, lora_singular_values, rank_measures, singular_values,
    stable_rank, stable_rank_from_singular_values,
)

FAST = settings(max_examples=60, deadline=None)
ROOT = Path(__file__).resolve().parents[1]


# -- the whole-tensor implementations, kept as references --------------------------------------

def whole_delta_moments(before, after):
    """delta_moments as it was before chunking: full-size float64 copies, mask and products."""
    import torch

    b = before.detach().to(torch.float64)
    a = after.detach().to(torch.float64, copy=False).to(b.device)
    delta = a - b
    finite = torch.isfinite(delta) & torch.isfinite(a)
    nonfinite = int((~finite).sum())
    if nonfinite:
        delta, a, b = delta[finite], a[finite], b[finite]
    sums = torch.stack([delta.sum(), (delta * delta).sum(), delta.abs().sum(), (b * b).sum(), (a * a).sum()]).tolist()
    return DeltaMoments(int(delta.numel()), nonfinite, *sums)


def whole_tensor_digest(tensor):
    """The whole-tensor digest (sha256 of the bytes, first 32 hex digits), made in one piece."""
    import hashlib

    t = tensor.detach().contiguous().cpu()
    raw = t.view(-1).view(dtype=__import__("torch").uint8).numpy() if t.numel() else b""
    return hashlib.sha256(memoryview(raw)).hexdigest()[:32]


def assert_moments_match(got: DeltaMoments, want: DeltaMoments):
    assert (got.n, got.nonfinite) == (want.n, want.nonfinite)
    # Σ Δ may cancel to ~0: its rounding is relative to Σ|Δ|
    assert got.total == pytest.approx(want.total, rel=1e-12, abs=1e-12 * (want.total_abs + 1))
    for name in ("total_sq", "total_abs", "before_sq", "after_sq"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-12, abs=1e-300), name


# -- tensors of every layout -------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` (same shape, same elements) as a contiguous, transposed or strided view."""
    if layout == "transposed" and values.ndim >= 2:
        dims = tuple(reversed(range(values.ndim)))
        return values.permute(dims).contiguous().permute(dims)  # same shape, reversed strides
    if layout == "strided" and values.ndim >= 1:
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    return values


@st.composite
def delta_pairs(draw):
    shape = draw(shapes)
    numel = math.prod(shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    step = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 1e-4, 0.1]))
    before, after = base.clone(), base + step
    specials = [math.nan, math.inf, -math.inf]
    for which, index, value in draw(st.lists(
            st.tuples(st.sampled_from(["before", "after"]), st.integers(0, max(numel - 1, 0)), st.sampled_from(specials)),
            max_size=4 if numel else 0)):
        (before if which == "before" else after).view(-1)[index] = value
    before = laid_out(before.to(draw(st.sampled_from(DTYPES))), draw(st.sampled_from(["contiguous", "transposed", "strided"])))
    after = laid_out(after.to(draw(st.sampled_from(DTYPES))), draw(st.sampled_from(["contiguous", "transposed", "strided"])))
    chunk = draw(st.one_of(st.just(1), st.integers(1, numel + 3), st.just(numel + 100), st.none()))
    return before, after, chunk


@FAST
@given(delta_pairs())
def test_chunked_delta_moments_equal_the_whole_tensor_ones(case):
    before, after, chunk = case
    assert_moments_match(delta_moments(before, after, chunk_elements=chunk), whole_delta_moments(before, after))


def test_chunked_delta_moments_on_a_matrix_of_many_chunks():
    g = torch.Generator().manual_seed(3)
    for rows, cols, chunks in ((301, 97, (None, 97, 1000, 301 * 97)), (31, 17, (1, 5, 17))):
        before = torch.randn(rows, cols, generator=g)
        after = before + 1e-3 * torch.randn(rows, cols, generator=g)
        after[5, 7], before[20, 3], after[30, 16] = math.nan, math.inf, -math.inf
        for b, a in ((before, after), (before.T, after.T), (before, after.T.contiguous().T)):
            for chunk in chunks:
                assert_moments_match(delta_moments(b, a, chunk), whole_delta_moments(b, a))


def test_delta_moments_leave_float64_inputs_alone():
    before = torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64)
    after = torch.tensor([2.0, 5.0, -1.0], dtype=torch.float64)
    kept = before.clone(), after.clone()
    delta_moments(before, after, chunk_elements=2)
    torch.testing.assert_close((before, after), kept, equal_nan=True, rtol=0, atol=0)


def test_delta_moments_need_one_shape_and_a_positive_chunk():
    with pytest.raises(ValueError, match="one shape"):
        delta_moments(torch.zeros(3, 2), torch.zeros(2, 3))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_elements"):
            delta_moments(torch.zeros(3), torch.zeros(3), chunk_elements=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_delta_moments_across_devices():
    g = torch.Generator().manual_seed(4)
    before = torch.randn(513, 129, generator=g)
    after = (before + 1e-2 * torch.randn(513, 129, generator=g)).to(torch.bfloat16)
    after[0, 0] = math.nan
    want = whole_delta_moments(before, after)
    for b, a in ((before, after.cuda()), (before.cuda(), after), (before.cuda(), after.cuda().T.contiguous().T)):
        assert_moments_match(delta_moments(b, a, chunk_elements=1000), want)
    assert tensor_digest(after.cuda(), chunk_elements=1000) == whole_tensor_digest(after)
    assert tensor_digest(after.cuda().T, chunk_elements=7) == whole_tensor_digest(after.T)


# -- the chunk iterator and the small reductions on it -----------------------------------------

@FAST
@given(shapes, st.sampled_from(["contiguous", "transposed", "strided"]), st.sampled_from(["contiguous", "transposed"]),
       st.integers(1, 40))
def test_chunks_are_aligned_views_covering_every_element_once(shape, layout_a, layout_b, chunk):
    values = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    a, b = laid_out(values, layout_a), laid_out(values * 2, layout_b)
    pieces = list(iter_chunks(a, b, chunk_elements=chunk))
    for pa, pb in pieces:
        assert pa.numel() == pb.numel() <= chunk
        assert pa.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()  # a view, not a copy
        torch.testing.assert_close(pb, pa * 2)
    flat = torch.cat([pa.reshape(-1) for pa, _ in pieces]) if pieces else torch.zeros(0)
    torch.testing.assert_close(flat, values.reshape(-1), rtol=0, atol=0)  # row-major order


@FAST
@given(delta_pairs())
def test_chunked_norm_and_nonfinite_count_equal_the_whole_tensor_ones(case):
    t, _, chunk = case
    x = t.to(torch.float64)
    assert count_nonfinite(t, chunk) == int((~torch.isfinite(x)).sum())
    want = (x * x).sum().item()
    got = chunked_sq_norm(t, chunk)
    assert got == pytest.approx(want, rel=1e-12) or (math.isnan(got) and math.isnan(want))


# -- digests -----------------------------------------------------------------------------------

DIGEST_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8,
                 torch.uint8, torch.bool]


@FAST
@given(shapes, st.sampled_from(DIGEST_DTYPES), st.sampled_from(["contiguous", "transposed", "strided"]),
       st.one_of(st.none(), st.integers(1, 50)), st.integers(0, 2**31 - 1))
def test_chunked_digest_equals_the_whole_tensor_digest(shape, dtype, layout, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    t = laid_out((torch.randn(shape, generator=g) * 50).to(dtype), layout)
    got = tensor_digest(t, chunk)
    assert got == whole_tensor_digest(t.clone(memory_format=torch.contiguous_format))
    try:
        old = whole_tensor_digest(t)
    except RuntimeError:  # the old one could not view a "contiguous" size-1 dim of stride != 1 as bytes
        assert t.is_contiguous() and any(size == 1 and stride != 1 for size, stride in zip(t.shape, t.stride()))
    else:
        assert got == old


def test_digest_of_empty_and_scalar_tensors_and_parameters():
    for t in (torch.zeros(0), torch.zeros(3, 0, 2), torch.zeros(0, 4).T, torch.tensor(2.5), torch.tensor(7)):
        assert tensor_digest(t) == whole_tensor_digest(t)
    assert tensor_digest(torch.zeros(0)) == hashlib.sha256(b"").hexdigest()[:32]
    p = torch.nn.Parameter(torch.randn(17, 5))
    assert tensor_digest(p, 3) == whole_tensor_digest(p)
    q = p.detach().clone()
    q.view(-1)[40] = torch.nextafter(q.view(-1)[40], torch.tensor(math.inf))
    assert tensor_digest(q) != tensor_digest(p)  # one ulp is a different weight


# -- no full-size temporary: a memory cap the old implementations cannot live under ------------

CHILD = """
import json, resource, sys
import torch
torch.set_num_threads(1)  # threads (and their malloc arenas) start in the warm-up, before the cap
from stance_harness.analysis.deltas import DeltaMoments, delta_moments
from stance_harness.analysis.digest import tensor_digest
{references}
mode, n, margin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
moments, digest = (delta_moments, tensor_digest) if mode == "chunked" else (whole_delta_moments, whole_tensor_digest)

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

before = torch.randn(n)
after = before + 1e-3
small = torch.randn(4096, 8)
moments(small, small + 1), digest(small.T), digest(small)  # warm-up: lazy initialisation happens here
baseline = vm_size()
resource.setrlimit(resource.RLIMIT_AS, (baseline + margin, resource.getrlimit(resource.RLIMIT_AS)[1]))
result = {{"baseline": baseline}}
for name, op in (("moments", lambda: moments(before, after).n),
                 ("digest", lambda: digest(before.view(1024, -1).T))):  # strided: a whole copy for the old one
    try:
        result[name] = op()
    except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator raises RuntimeError
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        result[name] = "out of memory"
print(json.dumps(result))
"""


def _run_capped(mode: str, n: int, margin: int) -> dict:
    references = textwrap.dedent(inspect.getsource(whole_delta_moments) + "\n" + inspect.getsource(whole_tensor_digest))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(references=references), mode, str(n), str(margin)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux", reason="needs Linux RLIMIT_AS")
def test_a_matrix_larger_than_the_budget_needs_no_full_size_temporary():
    n = 64 * 2**20  # two float32 tensors of 256 MiB; one float64 copy would be 512 MiB
    margin = 3 * CHUNK_BYTES  # room for the chunked temporaries, well below one full-size copy
    assert margin < n * 4 < n * 8
    chunked = _run_capped("chunked", n, margin)
    assert chunked["moments"] == n and isinstance(chunked["digest"], str), chunked
    whole = _run_capped("whole", n, margin)
    assert whole["moments"] == "out of memory" and whole["digest"] == "out of memory", whole


# -- rank: LoRA factors and singular-value rules -----------------------------------------------

@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 7),
       st.one_of(st.just(0.0), st.floats(0.01, 8), st.floats(-8, -0.01)), st.integers(0, 2**31 - 1))
def test_lora_singular_values_equal_svdvals_of_the_product(out, inner, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g)
    A = torch.randn(r, inner, generator=g)
    want = torch.linalg.svdvals(scale * B.double() @ A.double())
    got = lora_singular_values(B, A, scale)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * (1 + want.max().item()))
    for energy in (0.5, 0.9, 1.0):
        assert energy_rank_from_singular_values(got, energy) == energy_rank(scale * B.double() @ A.double(), energy)
    assert stable_rank_from_singular_values(got) == pytest.approx(stable_rank(scale * B.double() @ A.double()),
                                                                 rel=1e-9, abs=1e-12)


def test_lora_singular_values_input_errors():
    with pytest.raises(ValueError, match="out x r"):
        lora_singular_values(torch.ones(4, 2), torch.ones(3, 5), 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        lora_singular_values(torch.ones(0, 2), torch.ones(2, 5), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        lora_singular_values(torch.tensor([[math.nan]]), torch.ones(1, 3), 1.0)


def test_matrix_and_singular_value_rules_agree():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 30, generator=g, dtype=torch.float64)
    s = singular_values(delta)
    for energy in (0.3, 0.9, 1.0):
        assert energy_rank(delta, energy) == energy_rank_from_singular_values(s, energy)
    assert energy_rank(delta, 1.0) == 6
    assert stable_rank(delta) == stable_rank_from_singular_values(s)
    assert energy_rank_from_singular_values(torch.zeros(3)) == 0 and stable_rank_from_singular_values(torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="energy must be"):
        energy_rank_from_singular_values(s, 0.0)


def test_float32_rank_measures_match_float64_on_low_rank_plus_noise():
    """The module docstring's measurement, on small matrices: float32 buys the same ranks."""
    for seed, (m, n), r, noise in [(0, (64, 48), 4, 1e-2), (1, (96, 200), 8, 1e-3), (2, (120, 120), 1, 0.0),
                                   (3, (150, 60), 16, 1e-1)]:
        g = torch.Generator().manual_seed(seed)
        delta = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
        delta += noise * torch.randn(m, n, generator=g, dtype=torch.float64)
        f32, f64 = rank_measures(delta, 0.9), rank_measures(delta, 0.9, dtype=torch.float64)
        assert f32["rank"] == f64["rank"]
        assert f32["stable_rank"] == pytest.approx(f64["stable_rank"], rel=1e-5)
        if noise == 0:  # REL_TOL_F32 reads float32's null-space floor as zero
            assert energy_rank(delta.float(), 1.0, dtype=torch.float32) == r
