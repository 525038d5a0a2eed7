"""Tests of flashode's fused Runge–Kutta ops (rk_stage, rk_finalize, rk_dense).

The compiled kernels (csrc/) are checked against the pure-PyTorch reference (_reference.py) on
random shapes, layouts and coefficients; then rk_finalize's norm segments (a tail in no segment
for the adjoint's seminorm, per-segment norms), non-finite handling, input validation, the
torch.library registrations (opcheck), the autograd formulas (gradcheck), thread-count
determinism and the autograd-free `ops_for` path. CUDA cases run only where a GPU is present.

Kernel and reference sum the same terms in possibly different orders (and CUDA may contract to
FMAs), so values are compared relative to the *magnitude of the terms summed*
(|y| + sum_j |w_j| |k_j|), not to the result, which may be a cancellation of those terms: that is
the tightest tolerance that is still an honest rounding-error bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashode import _ops, _reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
DTYPES = (torch.float32, torch.float64)
OPS = ("rk_stage", "rk_finalize", "rk_dense")

# Relative to the magnitude of the summed terms (see module docstring): 10x (float32) to 500x
# (float64) the rounding error of a 15-term sum, far below any real discrepancy (a wrong or
# dropped term is O(1) relative).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def kernel(name: str) -> Callable[..., Any]:
    """The registered op itself, so a comparison can never silently fall back to the reference."""
    return getattr(torch.ops.flashode, name).default


def reference(name: str) -> Callable[..., Any]:
    return getattr(_reference, name)


Impl = Callable[[str], Callable[..., Any]]  # kernel or reference


def test_kernels_are_loaded() -> None:
    # Everything below compares against torch.ops.flashode: make a missing library an explicit failure.
    assert "cpu" in _ops.kernel_devices, _ops.load_errors.get("cpu")
    assert _ops.path_for("cpu") == "CPU kernel"


@requires_cuda
@pytest.mark.cuda
def test_cuda_kernels_are_loaded() -> None:
    assert "cuda" in _ops.kernel_devices, _ops.load_errors.get("cuda")


# ----------------------------------------------------------------------------- tensor helpers

LAYOUTS = ("contiguous", "permuted", "strided", "offset")


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` stored with `layout` (contiguous where the layout needs more dims).

    permuted: all dims reversed in memory (for k this also makes the stage dim the fastest);
    strided: every other element of a twice-as-wide buffer; offset: contiguous but one element
    into its storage, so the data pointer is misaligned for 16-byte vector loads;
    broadcast (for k): row 0 repeated with stride 0 on the stage dim -- the one layout that
    changes the values, which is fine since kernel and reference then see the same tensor.
    """
    if layout == "permuted" and values.dim() >= 2:
        dims = list(reversed(range(values.dim())))
        return values.permute(dims).contiguous().permute(dims)
    if layout == "strided" and values.dim() >= 1:
        buf = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])
        buf[..., ::2] = values
        return buf[..., ::2]
    if layout == "offset":
        flat = values.new_zeros(values.numel() + 1)
        flat[1:] = values.reshape(-1)
        return flat[1:].view(values.shape)
    if layout == "broadcast" and values.dim() >= 1 and values.shape[0] >= 1:
        return values[:1].expand(values.shape)
    return values.contiguous()


def magnitude(y: torch.Tensor, k: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """|y| + sum_j |w_j| |k_j| in float64: the size of the terms each output element sums."""
    mag = y.detach().double().abs()
    k_abs = k.detach().double().abs()
    for j, w in enumerate(weights):
        mag = mag + abs(w) * k_abs[j]
    return mag


def assert_close(actual: torch.Tensor, expected: torch.Tensor, mag: torch.Tensor) -> None:
    """Same shape/dtype/device, NaN where the other is NaN, else |actual - expected| <= TOL * mag."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype and actual.device == expected.device
    assert torch.equal(actual.isnan(), expected.isnan())
    diff = (actual.double() - expected.double()).abs()
    bound = TOL[actual.dtype] * mag.double() + torch.finfo(actual.dtype).tiny
    ok = (diff <= bound) | (actual == expected) | actual.isnan()  # equal infinities have a NaN diff
    worst = diff[~ok].max().item() if not ok.all() else 0.0
    assert bool(ok.all()), f"max |diff| {worst:.3e} beyond {TOL[actual.dtype]:.0e} x the term magnitude"


def tol_tensor(value: float, y: torch.Tensor, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """A tolerance tensor in y's dtype and device (the kernels require both)."""
    return torch.full(shape, value, dtype=y.dtype, device=y.device)


def tols(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Typical scalar (rtol, atol) for y."""
    return tol_tensor(1e-3, y), tol_tensor(1e-6, y)


# ----------------------------------------------------------------------------- comparisons


def check_stage(y: torch.Tensor, k: torch.Tensor, a: list[float], h: float) -> None:
    out = kernel("rk_stage")(y, k, a, h)
    assert out.is_contiguous()  # the fake impl promises a contiguous result
    assert_close(out, reference("rk_stage")(y, k, a, h), magnitude(y, k, [h * c for c in a]))


def check_dense(y: torch.Tensor, k: torch.Tensor, poly: list[float], theta: list[float], h: float) -> None:
    out = kernel("rk_dense")(y, k, poly, theta, h)
    expected = reference("rk_dense")(y, k, poly, theta, h)
    weights = _reference.dense_weights(poly, theta, k.shape[0], h)
    mag = torch.stack([magnitude(y, k, row) for row in weights]) if weights else expected.double()
    assert_close(out, expected, mag)


def ratio_slack(args: tuple, y1: torch.Tensor, err: torch.Tensor) -> list[float]:
    """Per segment, the RMS of the first-order sensitivity of err_i / scale_i to rounding of the
    summed terms: |ΔRMS_s| <= TOL * this (RMS is 1-Lipschitz), however much err or y1 cancel.
    `args` are rk_finalize's; y1 and err the reference's."""
    y, k, b, b_error, h, rtol, atol, ends, *_ = args
    n = y.numel()
    if n == 0:
        return [0.0] * max(len(ends), 1)
    flat = lambda t: t.detach().double().reshape(-1)  # noqa: E731
    rt, at = flat(rtol).expand(n), flat(atol).expand(n)
    mag_y1 = flat(magnitude(y, k, [h * c for c in b]))
    mag_err = flat(magnitude(torch.zeros_like(y), k, [h * c for c in b_error]))
    scale = at + rt * torch.maximum(flat(y).abs(), flat(y1).abs())
    bound = (mag_err + flat(err).abs() * rt * mag_y1 / scale) / scale
    slacks, begin = [], 0
    for end in ends or [n]:
        slacks.append(bound[begin:end].pow(2).mean().sqrt().item() if end > begin else 0.0)
        begin = end
    return slacks


def assert_ratio_close(r: float, rr: float, slack: float, dtype: torch.dtype) -> None:
    """A kernel's ratio value r against the reference's rr, given the rounding slack."""
    if math.isnan(rr) or math.isinf(rr):
        assert (math.isnan(r) and math.isnan(rr)) or r == rr, (r, rr)
    else:
        # The scaled errors are computed in the state's dtype and squared in float64, so a
        # float32 square below float32's smallest normal may be lost: a mean of squares off by
        # < tiny, i.e. a ratio off by < sqrt(tiny) (~1e-19), whatever the relative error.
        floor = math.sqrt(torch.finfo(dtype).tiny)
        assert abs(r - rr) <= TOL[dtype] * (slack + rr) + floor, (r, rr, slack)


def nan_max(values: torch.Tensor) -> float:
    """The max of a float64 vector, NaN if any value is NaN (the 0-dim ratio from the per-segment one)."""
    return math.nan if bool(values.isnan().any()) else values.max().item()


def check_finalize(*args: object) -> None:
    """Kernel vs reference for rk_finalize(*args); then the kernel's other ratio mode (0-dim or
    per-segment) must agree with it exactly: the max of the per-segment values."""
    y, k, b, b_error, h, _rtol, _atol, ends, return_error, per_segment = args
    y1, err, ratio = kernel("rk_finalize")(*args)
    ry1, rerr, rratio = reference("rk_finalize")(*args[:8], True, per_segment)  # err for the checks below
    assert y1.is_contiguous()
    assert_close(y1, ry1, magnitude(y, k, [h * c for c in b]))
    if return_error:
        assert_close(err, rerr, magnitude(torch.zeros_like(y), k, [h * c for c in b_error]))
    else:
        assert err.shape == (0,) and err.dtype == y.dtype and err.device == y.device
    shape = (max(len(ends), 1),) if per_segment else ()
    assert ratio.shape == shape and ratio.dtype == torch.float64 and ratio.device == y.device
    assert rratio.shape == shape and rratio.dtype == torch.float64
    slacks = ratio_slack(args, ry1, rerr)
    if per_segment:
        for r, rr, slack in zip(ratio.tolist(), rratio.tolist(), slacks):
            assert_ratio_close(r, rr, slack, y.dtype)
    else:
        assert_ratio_close(ratio.item(), rratio.item(), max(slacks), y.dtype)
    _, _, other = kernel("rk_finalize")(*args[:9], not per_segment)
    per, single = (ratio, other) if per_segment else (other, ratio)
    assert per.shape == (max(len(ends), 1),) and single.shape == ()
    r, expected = single.item(), nan_max(per)
    assert (math.isnan(r) and math.isnan(expected)) or r == expected, (r, expected)


# ----------------------------------------------------------------------------- random cases

# Zero coefficients (the kernels drop them) must occur, but hypothesis already favours 0.0 and
# all-equal lists, so plain floats are filtered to keep most sums non-trivial.
_NONZERO = st.floats(-3.0, 3.0, allow_nan=False).filter(bool)
COEFF = st.one_of(_NONZERO, _NONZERO, _NONZERO, st.just(0.0), st.just(-0.0))
SHAPES = st.one_of(
    st.lists(st.integers(0, 5), max_size=3).map(tuple),  # 0-d, empty and small n-d states
    st.integers(0, 1100).map(lambda n: (n,)),  # crosses the CPU kernel's 256-element tiles
)


@dataclass
class Case:
    """A drawn (y, k) pair: tensors are built per device in the test, from a seed."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stages: int
    seed: int
    y_layout: str
    k_layout: str
    h: float

    def tensors(self, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        y = torch.randn(self.shape, generator=gen, dtype=self.dtype)
        k = torch.randn((self.stages, *self.shape), generator=gen, dtype=self.dtype)
        return with_layout(y.to(device), self.y_layout), with_layout(k.to(device), self.k_layout)

    def uniform(self, device: str, lo: float, hi: float) -> torch.Tensor:
        """Per-element values in [lo, hi] (for tolerances), deterministic in the seed."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        u = torch.rand(self.shape, generator=gen, dtype=self.dtype)
        return (lo + (hi - lo) * u).to(device)


cases = st.builds(
    Case,
    dtype=st.sampled_from(DTYPES),
    shape=SHAPES,
    stages=st.integers(1, 14),
    seed=st.integers(0, 2**31 - 1),
    y_layout=st.sampled_from(LAYOUTS),
    k_layout=st.sampled_from((*LAYOUTS, "broadcast")),
    h=st.floats(-1.0, 1.0, allow_nan=False),
)


def draw_coeffs(data: st.DataObject, max_len: int, min_len: int = 0) -> list[float]:
    size = data.draw(st.integers(min_len, max_len))
    return data.draw(st.lists(COEFF, min_size=size, max_size=size))


def draw_tolerance(data: st.DataObject, case: Case, device: str, lo: float, hi: float) -> torch.Tensor:
    """A scalar (0-d or 1 element) or per-element (y's shape or flat) tolerance in y's dtype."""
    kind = data.draw(st.sampled_from(("0-d", "one", "per-element", "flat")))
    y_like = torch.empty((), dtype=case.dtype, device=device)
    if kind in ("0-d", "one"):
        return tol_tensor(data.draw(st.floats(lo, hi)), y_like, () if kind == "0-d" else (1,))
    values = case.uniform(device, lo, hi)
    return values if kind == "per-element" else values.reshape(-1)


def draw_segment_ends(data: st.DataObject, n: int) -> list[int]:
    """[] (one segment) or cumulative ends; repeated cuts give empty segments. The last end is n
    or, half the time, anywhere from the last cut to n: the elements after it are in no segment
    (the adjoint's seminorm)."""
    if data.draw(st.booleans()):
        return []
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    last = n if data.draw(st.booleans()) else data.draw(st.integers(cuts[-1] if cuts else 0, n))
    return [*cuts, last]


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=cases, data=st.data())
def test_stage_matches_reference(device: str, case: Case, data: st.DataObject) -> None:
    y, k = case.tensors(device)
    check_stage(y, k, draw_coeffs(data, case.stages), case.h)


@pytest.mark.parametrize("device", DEVICES)
@settings(FUZZ, max_examples=150)  # the most inputs to vary: tolerances, segments, err, per_segment
@given(case=cases, data=st.data())
def test_finalize_matches_reference(device: str, case: Case, data: st.DataObject) -> None:
    y, k = case.tensors(device)
    b = draw_coeffs(data, case.stages)
    # At least one error weight: an all-zero error (ratio 0) is tested on its own below, and would
    # otherwise be a large share of the draws (hypothesis favours short and all-equal lists).
    b_error = draw_coeffs(data, case.stages, min_len=1)
    # atol > 0 keeps every scale positive; rtol up to 1 makes max(|y|, |y1|) matter.
    rtol = draw_tolerance(data, case, device, 0.0, 1.0)
    atol = draw_tolerance(data, case, device, 1e-6, 1.0)
    ends = draw_segment_ends(data, y.numel())
    return_error, per_segment = data.draw(st.booleans()), data.draw(st.booleans())
    check_finalize(y, k, b, b_error, case.h, rtol, atol, ends, return_error, per_segment)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=cases, data=st.data())
def test_dense_matches_reference(device: str, case: Case, data: st.DataObject) -> None:
    y, k = case.tensors(device)
    degree = data.draw(st.integers(0, 5))
    poly = draw_coeffs(data, case.stages * degree, min_len=case.stages * degree)
    theta = data.draw(st.lists(st.floats(0.0, 1.0), max_size=4))
    check_dense(y, k, poly, theta, case.h)


# Several 16384-element CPU chunks (and many CUDA blocks), with segments and tiles cut across
# chunk boundaries; n and the storage offset decide whether the CUDA vectorised path is taken
# (n % 4 == 0 and 16-byte aligned) or the scalar fallback.
LARGE_N = (3 * 16384, 3 * 16384 + 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LARGE_N)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_large_and_misaligned_states_match_reference(
    device: str, dtype: torch.dtype, n: int, layout: str
) -> None:
    gen = torch.Generator().manual_seed(n)
    y = with_layout(torch.randn(n, generator=gen, dtype=dtype).to(device), layout)
    k = with_layout(torch.randn(7, n, generator=gen, dtype=dtype).to(device), layout)
    if layout == "offset":  # the vector path must really be unavailable
        assert y.data_ptr() % 16 != 0 and k.data_ptr() % 16 != 0
    a = [0.1, -0.2, 0.0, 0.7, 0.3, 0.0]
    b, b_error = [0.2, 0.0, 0.3, 0.1, 0.0, 0.4, 0.0], [0.01, 0.0, -0.02, 0.0, 0.03, -0.01, 0.02]
    check_stage(y, k, a, 0.05)
    rtol = with_layout(torch.full((n,), 1e-3, dtype=dtype, device=device), layout)
    atol = tol_tensor(1e-6, y)  # scalar atol with per-element rtol: the kernel expands it
    # All of the state in segments, or a tail of 16k+ elements after the last end in none.
    for ends in ([100, 16384 + 7, 16384 + 7, 2 * 16384 - 1, n], [100, 16384 + 7, 16384 + 7, 2 * 16384 - 1]):
        for return_error in (True, False):
            for per_segment in (False, True):
                check_finalize(y, k, b, b_error, 0.05, rtol, atol, ends, return_error, per_segment)
    check_dense(y, k, [0.1 * (j + p) for j in range(7) for p in range(3)], [0.0, 0.4, 1.0], 0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", [kernel, reference], ids=["kernel", "reference"])
def test_stages_beyond_coefficients_are_never_read(device: str, dtype: torch.dtype, impl: Impl) -> None:
    # Solvers allocate k with torch.empty and stage i only passes i coefficients: rows past
    # len(a) may hold garbage (here NaN) and must not leak into the result.
    y = torch.randn(37, dtype=dtype, device=device)
    k = torch.randn(5, 37, dtype=dtype, device=device)
    a = [0.5, -0.25]
    clean = impl("rk_stage")(y, k, a, 0.1)
    k[2:] = float("nan")
    torch.testing.assert_close(impl("rk_stage")(y, k, a, 0.1), clean, rtol=0, atol=0)
    y1, err, ratio = impl("rk_finalize")(y, k, a, a[::-1], 0.1, *tols(y), [], True, False)
    assert torch.isfinite(y1).all() and torch.isfinite(err).all() and math.isfinite(ratio.item())


# ----------------------------------------------------------------------------- norm segments


def scaled_error(y: torch.Tensor, y1: torch.Tensor, err: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """err / (atol + rtol * max(|y|, |y1|)) in float64, flat."""
    y, y1, err = (t.detach().double().reshape(-1) for t in (y, y1, err))
    return err / (atol + rtol * torch.maximum(y.abs(), y1.abs()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", [kernel, reference], ids=["kernel", "reference"])
def test_finalize_per_segment_values(device: str, dtype: torch.dtype, impl: Impl) -> None:
    # Empty first and third segments (RMS 0), and [42, 50) in no segment.
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(50, generator=gen, dtype=dtype).to(device)
    k = torch.randn(3, 50, generator=gen, dtype=dtype).to(device)
    ends = [0, 10, 10, 30, 42]
    args = (y, k, [0.2, 0.3, 0.5], [0.1, 0.0, -0.1], 0.1, *tols(y), ends, True)
    y1, err, per = impl("rk_finalize")(*args, True)
    scaled = scaled_error(y, y1, err, 1e-3, 1e-6)
    rms = lambda lo, hi: scaled[lo:hi].pow(2).mean().sqrt().item()  # noqa: E731
    expected = torch.tensor([0.0, rms(0, 10), 0.0, rms(10, 30), rms(30, 42)], dtype=torch.float64)
    assert per.shape == (5,) and per.dtype == torch.float64 and per.device == y.device
    torch.testing.assert_close(per.cpu(), expected, rtol=TOL[dtype], atol=0)
    assert per[0].item() == 0.0 and per[2].item() == 0.0 and per[1].item() > 0.0
    # The 0-dim ratio is the max of the same values; [] is one segment over the whole state.
    assert impl("rk_finalize")(*args, False)[2].item() == per.max().item()
    _, _, whole = impl("rk_finalize")(*args[:7], [], True, True)
    assert whole.shape == (1,)
    assert whole.item() == pytest.approx(scaled.pow(2).mean().sqrt().item(), rel=TOL[dtype])
    # Only the elements after the last end in none: an error there, however large, changes nothing.
    k_tail = k.clone()
    k_tail[:, 42:] *= 1e6
    y1_tail, err_tail, per_tail = impl("rk_finalize")(y, k_tail, *args[2:], True)
    assert torch.equal(per_tail, per) and bool((err_tail[42:] != err[42:]).all())
    assert torch.equal(y1_tail[:42], y1[:42])
    # All elements after the last end: no segment has any, so the ratio is 0.
    _, _, none = impl("rk_finalize")(*args[:7], [0], True, False)
    assert none.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_finalize_per_segment_defaults_to_false(device: str) -> None:
    # The schema default: the public op and the solvers' boxed redispatch (NoGradOps) fill it in,
    # though every flashode call site passes it.
    y, k = f64(12, device=device), f64(2, 12, device=device)
    args = (y, k, [0.5, 0.5], [0.1, -0.1], 0.1, *tols(y), [4, 8], False)
    expected = kernel("rk_finalize")(*args, False)[2]
    assert expected.shape == ()
    assert torch.equal(kernel("rk_finalize")(*args)[2], expected)
    assert torch.equal(_ops.NoGradOps(torch.device(device)).rk_finalize(*args)[2], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tail", [0, 37], ids=["no-tail", "tail"])
def test_finalize_accepts_256_segments(device: str, dtype: torch.dtype, tail: int) -> None:
    # kMaxSegments: on CUDA the ends travel by value in the kernel's parameters, and the last
    # block folds 256 segments' partials over its threads.
    gen = torch.Generator().manual_seed(4)
    n = 3000
    y = torch.randn(n, generator=gen, dtype=dtype).to(device)
    k = torch.randn(4, n, generator=gen, dtype=dtype).to(device)
    cuts = sorted(torch.randint(0, n - tail + 1, (255,), generator=gen).tolist())
    ends = [*cuts, n - tail]
    b, b_error = [0.1, 0.2, 0.3, 0.4], [0.01, -0.02, 0.0, 0.01]
    for return_error in (False, True):
        for per_segment in (False, True):
            check_finalize(y, k, b, b_error, 0.2, *tols(y), ends, return_error, per_segment)


# ----------------------------------------------------------------------------- non-finite values

# Four stages whose coefficients reach y1 only (0), both outputs (1), err only (2), neither (3).
B, B_ERROR = [0.5, 0.5, 0.0, 0.0], [0.0, 0.1, -0.1, 0.0]
NAN, INF = float("nan"), float("inf")
N_POISON = 40_000  # three CPU chunks


def poison_inputs(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded y and 4-stage k of N_POISON elements, for the non-finite tests to poison."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(N_POISON, generator=gen, dtype=dtype).to(device)
    k = torch.randn(4, N_POISON, generator=gen, dtype=dtype).to(device)
    return y, k


SEGMENTS = [1_000, 20_000, N_POISON]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", [kernel, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("where", [0, 19_999, N_POISON - 1], ids=["first", "segment-end", "last-chunk"])
@pytest.mark.parametrize(
    ("target", "value", "expected"),
    [
        ("k2", NAN, "nan"),  # err is NaN, y1 finite
        ("k1", NAN, "nan"),
        ("k0", INF, "nan"),  # y1 is inf, err finite: the (y1 - y1) term must poison the ratio
        ("y", INF, "nan"),
        ("y", NAN, "nan"),
        ("k2", INF, "inf"),  # err inf with a finite y1 is a (huge) ratio, not NaN
        ("k3", NAN, "clean"),  # a stage with only zero coefficients is skipped
    ],
)
def test_finalize_non_finite(
    device: str, dtype: torch.dtype, impl: Impl, where: int, target: str, value: float, expected: str
) -> None:
    y, k = poison_inputs(device, dtype)
    finalize = impl("rk_finalize")
    _, _, clean = finalize(y, k, B, B_ERROR, 0.1, *tols(y), SEGMENTS, False, False)
    (y if target == "y" else k[int(target[1])])[where] = value
    y1, err, ratio = finalize(y, k, B, B_ERROR, 0.1, *tols(y), SEGMENTS, True, False)
    assert math.isfinite(clean.item()) and clean.item() > 0
    if expected == "nan":
        assert math.isnan(ratio.item())
    elif expected == "inf":
        assert ratio.item() == math.inf and torch.isfinite(y1).all()
    else:
        assert ratio.item() == clean.item() and torch.isfinite(y1).all() and torch.isfinite(err).all()


# [1_000, 1_000) is empty; [20_000, N_POISON) is in no segment: the tail spans chunks 2 and 3.
TAIL_SEGMENTS = [1_000, 1_000, 20_000]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", [kernel, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("per_segment", [False, True], ids=["max", "per-segment"])
@pytest.mark.parametrize("where", [500, 20_000, N_POISON - 1], ids=["segment", "tail-first", "tail-last"])
@pytest.mark.parametrize(
    ("target", "value", "y1_finite"),
    [
        ("k0", INF, False),  # y1 is inf (err finite)
        ("k1", NAN, False),  # y1 and err are NaN
        ("y", INF, False),
        ("y", NAN, False),
        ("k2", NAN, True),  # only err is NaN
        ("k2", INF, True),  # only err is inf
        ("k3", NAN, True),  # a stage with only zero coefficients is skipped
    ],
)
def test_finalize_non_finite_with_tail(
    device: str, dtype: torch.dtype, impl: Impl, per_segment: bool, where: int, target: str, value: float,
    y1_finite: bool,
) -> None:
    # A non-finite y1 anywhere, the tail in no segment included, makes every ratio value NaN: a
    # blow-up in the seminorm's excluded channels is never accepted. A non-finite err there is
    # not measured; in a segment it makes that segment's RMS NaN or inf (and so the max).
    y, k = poison_inputs(device, dtype)
    finalize = impl("rk_finalize")
    _, _, clean = finalize(y, k, B, B_ERROR, 0.1, *tols(y), TAIL_SEGMENTS, False, True)
    assert clean.shape == (3,) and bool((clean[[0, 2]].isfinite() & (clean[[0, 2]] > 0)).all())
    (y if target == "y" else k[int(target[1])])[where] = value
    for return_error in (False, True):
        _, _, ratio = finalize(y, k, B, B_ERROR, 0.1, *tols(y), TAIL_SEGMENTS, return_error, per_segment)
        per = ratio if per_segment else None
        if not y1_finite:
            assert bool(ratio.isnan().all()), ratio
        elif where >= TAIL_SEGMENTS[-1] or target == "k3":
            expected = clean if per_segment else clean.max()
            assert torch.equal(ratio, expected), (ratio, expected)
        else:  # err non-finite in segment 0
            bad = math.nan if math.isnan(value) else math.inf
            if per is None:
                got = ratio.item()
                assert (math.isnan(got) and math.isnan(bad)) or got == bad, got
            else:
                first = per[0].item()
                assert (math.isnan(first) and math.isnan(bad)) or first == bad, first
                assert torch.equal(per[1:], clean[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [kernel, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("n", [0, 1, 1000, N_POISON])
@pytest.mark.parametrize("b_error", [[], [0.0, 0.0, 0.0]])
def test_finalize_zero_error_gives_zero_ratio(device: str, impl: Impl, n: int, b_error: list[float]) -> None:
    y = torch.randn(n, dtype=torch.float64, device=device)
    k = torch.randn(3, n, dtype=torch.float64, device=device)
    ends = [n // 2, n // 2, n]  # with an empty segment, which must not divide 0 by 0
    _, err, ratio = impl("rk_finalize")(y, k, [0.2, 0.3, 0.5], b_error, 0.1, *tols(y), ends, True, False)
    assert ratio.item() == 0.0 and not bool(err.any())
    _, _, per = impl("rk_finalize")(y, k, [0.2, 0.3, 0.5], b_error, 0.1, *tols(y), ends, False, True)
    assert per.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rk_stage", "rk_finalize"])
def test_zero_step_with_non_finite_stage_agrees(device: str, op: str) -> None:
    y = torch.ones(3, dtype=torch.float64, device=device)
    k = torch.tensor([[math.inf, 1.0, 1.0]], dtype=torch.float64, device=device)
    args = (y, k, [1.0], 0.0) if op == "rk_stage" else (y, k, [1.0], [0.5], 0.0, *tols(y), [], False, False)
    got, expected = kernel(op)(*args), reference(op)(*args)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    torch.testing.assert_close(first(got), first(expected), equal_nan=True)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda]),
    ],
)
def test_float32_ratio_does_not_overflow(device: str) -> None:
    # Scaled errors of 1e20 are finite in float32 and the ratio is float64: it must be 1e20, not
    # inf, as the reference gives (a large but finite ratio still steers the step-size control).
    y = torch.zeros(4, device=device)
    k = torch.full((1, 4), 1e20, device=device)
    one = tol_tensor(1.0, y)
    _, _, ratio = kernel("rk_finalize")(y, k, [0.0], [1.0], 1.0, one, one, [], False, False)
    assert ratio.item() == pytest.approx(1e20, rel=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def default_args(op: str, device: str, y: Any = None, k: Any = None, stages: int = 3, **over: Any) -> tuple:
    """Valid arguments for `op` with some replaced: each bad-input case breaks exactly one thing."""
    y = torch.randn(3, 4, dtype=torch.float64, device=device) if y is None else y
    k = torch.randn(stages, *y.shape, device=device).to(y.dtype) if k is None else k
    tol_dtype = y.dtype if y.is_floating_point() else torch.float64
    params = {
        "rk_stage": {"a": [0.5, 0.25], "h": 0.1},
        "rk_finalize": {
            "b": [0.5, 0.0, 0.5],
            "b_error": [0.1, 0.0, -0.1],
            "h": 0.1,
            "rtol": torch.full((), 1e-3, dtype=tol_dtype, device=device),
            "atol": torch.full((), 1e-6, dtype=tol_dtype, device=device),
            "segment_ends": [],
            "return_error": True,
            "per_segment": False,
        },
        "rk_dense": {"poly": [0.1 * i for i in range(2 * k.shape[0])], "theta": [0.5], "h": 0.1},
    }[op]
    params.update(over)
    return (y, k, *params.values())


def f64(*shape: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, device=device)


@dataclass
class Bad:
    """One invalid call: `over` are default_args overrides (a callable of the device where they are
    tensors). `reference` is "raises" or "kernel-only" (a kernel capacity limit the reference need
    not share)."""

    id: str
    ops: tuple[str, ...]
    over: Callable[[str], dict[str, Any]]
    match: str
    reference: str = "raises"


BAD_INPUTS = [
    Bad("float16", OPS, lambda d: {"y": f64(3, 4, device=d).half()}, "float32 or float64"),
    Bad("int64", OPS, lambda d: {"y": torch.ones(3, 4, dtype=torch.long, device=d)}, "float32 or float64"),
    Bad("k-numel", OPS, lambda d: {"k": f64(3, 3, 5, device=d)}, re.escape("k must have shape (S, *y")),
    Bad("k-dtype", OPS, lambda d: {"k": f64(3, 3, 4, device=d).float()}, "same dtype"),
    Bad("too-few-stages", ("rk_stage",), lambda d: {"a": [0.1] * 4}, "need at least as many stages"),
    Bad("too-few-stages", ("rk_finalize",), lambda d: {"b_error": [0.1] * 4}, "need at least as many stages"),
    Bad("no-stages", ("rk_dense",), lambda d: {"stages": 0, "poly": []}, "need at least as many stages"),
    Bad("33-stages", ("rk_stage", "rk_finalize"), lambda d: {"stages": 33}, "at most 32 stages"),
    Bad("33-stages", ("rk_dense",), lambda d: {"stages": 33, "poly": [0.1] * 33}, "at most 32 stages"),
    Bad("segments-long", ("rk_finalize",), lambda d: {"segment_ends": [5, 13]},
        re.escape("the last segment end (13) must not exceed the state size (12)")),
    Bad("segments-long-per-segment", ("rk_finalize",), lambda d: {"segment_ends": [13], "per_segment": True},
        re.escape("the last segment end (13) must not exceed the state size (12)")),
    Bad("segments-decreasing", ("rk_finalize",), lambda d: {"segment_ends": [7, 5, 12]}, "non-decreasing"),
    Bad("segments-negative", ("rk_finalize",), lambda d: {"segment_ends": [-1, 12]}, "non-negative and non-decreasing"),
    Bad("rtol-size", ("rk_finalize",), lambda d: {"rtol": f64(5, device=d).abs()}, "rtol must have 1 or 12"),
    Bad("atol-size", ("rk_finalize",), lambda d: {"atol": f64(2, device=d).abs()}, "atol must have 1 or 12"),
    Bad("poly-size", ("rk_dense",), lambda d: {"poly": [0.1] * 5}, re.escape("poly must hold S * D")),
    Bad("tol-dtype", ("rk_finalize",), lambda d: {"rtol": torch.full((), 1e-3, device=d)},
        "rtol must have the state's dtype"),
    Bad("theta-nan", ("rk_dense",), lambda d: {"theta": [0.5, math.nan]}, "theta must be finite"),
    Bad("degree-9", ("rk_dense",), lambda d: {"poly": [0.1] * 27}, "degree 9 exceeds",
        reference="kernel-only"),
    Bad("257-segments", ("rk_finalize",), lambda d: {"segment_ends": [0] * 256 + [12]},
        "at most 256 norm segments are supported, got 257", reference="kernel-only"),
]


def bad_input_params() -> list:
    params = []
    for bad in BAD_INPUTS:
        for op in bad.ops:
            for impl in ("kernel", "reference"):
                if impl == "reference" and bad.reference == "kernel-only":
                    continue
                params.append(pytest.param(op, impl, bad, id=f"{op}-{bad.id}-{impl}"))
    return params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("op", "impl", "bad"), bad_input_params())
def test_bad_inputs_raise(device: str, op: str, impl: str, bad: Bad) -> None:
    fn = kernel(op) if impl == "kernel" else reference(op)
    args = default_args(op, device, **bad.over(device))
    with pytest.raises(RuntimeError, match=bad.match):
        fn(*args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_mixed_devices_raise(op: str) -> None:
    y = f64(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        kernel(op)(*default_args(op, "cuda", y=y, k=f64(3, 3, 4)))
    if op == "rk_finalize":
        with pytest.raises(RuntimeError, match="rtol must be on the state's device"):
            kernel(op)(*default_args(op, "cuda", y=y, rtol=torch.full((), 1e-3, dtype=torch.float64)))


# ----------------------------------------------------------------------------- registrations


def opcheck_cases() -> list:
    """Representative inputs per op: float64 with requires_grad (autograd registration and the
    backward under aot_dispatch), float32 non-contiguous, and empty / 0-d states."""
    g = lambda t: t.requires_grad_()  # noqa: E731
    y64, k64 = g(f64(3, 4)), g(f64(4, 3, 4))
    y32 = with_layout(torch.randn(5, 6), "permuted")
    k32 = with_layout(torch.randn(3, 5, 6), "strided")
    y0, k0 = g(f64(0)), g(f64(2, 0))
    per_element_atol = tol_tensor(1e-6, y64, (12,))
    cases = {
        "stage-f64-grad": ("rk_stage", (y64, k64, [0.5, 0.0, 0.25], 0.1)),
        "stage-f32-noncontig": ("rk_stage", (y32, k32, [0.5, 0.25, -1.0], -0.2)),
        "stage-0d-grad": ("rk_stage", (g(f64()), g(f64(2)), [0.5], 0.1)),
        "finalize-f64-grad": ("rk_finalize", (
            y64, k64, [0.2, 0.3, 0.0, 0.5], [0.1, 0.0, -0.1], 0.1, tol_tensor(1e-3, y64), per_element_atol,
            [5, 5, 12], True, False,
        )),
        "finalize-f64-grad-per-segment-tail": ("rk_finalize", (
            y64, k64, [0.2, 0.3, 0.0, 0.5], [0.1, 0.0, -0.1], 0.1, tol_tensor(1e-3, y64), per_element_atol,
            [0, 5, 5, 9], True, True,
        )),
        "finalize-f32-noerr": ("rk_finalize", (y32, k32, [0.2, 0.3, 0.5], [0.1], 0.1, *tols(y32), [], False, False)),
        "finalize-f32-per-segment-tail": ("rk_finalize", (
            y32, k32, [0.2, 0.3, 0.5], [0.1], 0.1, *tols(y32), [10, 20], False, True,
        )),
        "finalize-empty-grad": ("rk_finalize", (y0, k0, [0.5, 0.5], [0.1, -0.1], 0.1, *tols(y0), [], True, False)),
        "finalize-empty-per-segment": ("rk_finalize", (y0, k0, [0.5, 0.5], [0.1, -0.1], 0.1, *tols(y0), [], True, True)),
        "dense-f64-grad": ("rk_dense", (y64, k64, [0.1 * i for i in range(8)], [0.0, 0.3, 1.0], 0.1)),
        "dense-f32-noncontig": ("rk_dense", (y32, k32, [0.1 * i for i in range(9)], [0.5], 0.2)),
    }
    return [pytest.param(op, args, id=name) for name, (op, args) in cases.items()]


@pytest.mark.parametrize(("op", "args"), opcheck_cases())
def test_opcheck(op: str, args: tuple) -> None:
    # Checks the schema, the fake impl against the kernel (shapes, strides, dtypes), that
    # requires_grad inputs reach the registered autograd formula, and tracing via aot_dispatch.
    results = torch.library.opcheck(kernel(op), args)
    assert set(results.values()) == {"SUCCESS"}, results


B3 = [0.2, 0.0, 0.8]
GRADCHECK_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "stage": lambda y, k: _ops.rk_stage(y, k, [0.5, 0.0, -0.75], 0.3),
    # err is differentiable too; ratio is not (asserted separately).
    "finalize-err": lambda y, k: _ops.rk_finalize(y, k, B3, [0.1, -0.3], 0.3, *tols(y), [], True, False)[:2],
    "finalize-noerr": lambda y, k: _ops.rk_finalize(y, k, B3, [0.1], 0.3, *tols(y), [], False, False)[0],
    "finalize-tail-per-segment": lambda y, k: _ops.rk_finalize(
        y, k, B3, [0.1, -0.3], 0.3, *tols(y), [y.numel() // 2], True, True
    )[:2],
    "dense": lambda y, k: _ops.rk_dense(y, k, [0.1 * i - 0.5 for i in range(12)], [0.0, 0.3, 1.0], 0.3),
}


@pytest.mark.parametrize("fn_name", list(GRADCHECK_FNS))
@pytest.mark.parametrize(("shape", "layout"), [((), "contiguous"), ((5,), "strided"), ((2, 3), "permuted")])
def test_gradcheck(fn_name: str, shape: tuple[int, ...], layout: str) -> None:
    # k has 4 stages, more than any coefficient list: the extra stage must get a zero gradient.
    y = with_layout(f64(*shape), layout).requires_grad_()
    k = with_layout(f64(4, *shape), layout).requires_grad_()
    assert torch.autograd.gradcheck(GRADCHECK_FNS[fn_name], (y, k))


def test_finalize_ratio_is_not_differentiable() -> None:
    y, k = f64(6).requires_grad_(), f64(2, 6).requires_grad_()
    for per_segment in (False, True):
        y1, err, ratio = _ops.rk_finalize(y, k, [0.5, 0.5], [0.1, -0.1], 0.1, *tols(y), [2, 4], True, per_segment)
        assert y1.requires_grad and err.requires_grad and not ratio.requires_grad


def test_dense_backward_with_no_output_times() -> None:
    y, k = f64(3).requires_grad_(), f64(2, 3).requires_grad_()
    _ops.rk_dense(y, k, [1.0, 0.5], [], 0.1).sum().backward()
    assert not bool(y.grad.any()) and not bool(k.grad.any())


def test_finalize_backward_empty_multidim_state_without_error() -> None:
    y, k = f64(2, 0).requires_grad_(), f64(2, 2, 0).requires_grad_()
    y1, _, _ = _ops.rk_finalize(y, k, [1.0, 0.0], [0.1, 0.0], 0.1, *tols(y), [], False, False)
    y1.sum().backward()
    assert y.grad.shape == y.shape and k.grad.shape == k.shape


# ----------------------------------------------------------------------------- determinism, ops_for


def run_all_ops(call: Callable[[str, tuple], Any], y: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """Every op (finalize with and without err, several segments, a tail in none, per-segment
    norms, the most segments) on (y, k); `call(op, args)` runs one."""
    n, s = y.numel(), k.shape[0]
    b = [0.1 * (j + 1) for j in range(s)]
    b_error = [0.01 * (-1) ** j for j in range(s)]
    rtol, atol = tol_tensor(1e-3, y), tol_tensor(1e-6, y, tuple(y.shape))
    outs: list[torch.Tensor] = [call("rk_stage", (y, k, b[:-1], 0.07))]
    many = [(i * (n - n // 7)) // 256 for i in range(1, 257)]  # 256 segments, then a tail
    for ends, return_error, per_segment in (
        ([], True, False),
        ([n // 3, n // 3, n - 5, n], False, False),
        ([n // 3, n // 3, n - 5], True, True),
        (many, False, True),
        (many, False, False),
    ):
        outs += call("rk_finalize", (y, k, b, b_error, 0.07, rtol, atol, ends, return_error, per_segment))
    outs.append(call("rk_dense", (y, k, [0.05 * i for i in range(2 * s)], [0.0, 0.25, 1.0], 0.07)))
    return outs


def call_kernel(op: str, args: tuple) -> Any:
    return kernel(op)(*args)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_thread_count(dtype: torch.dtype) -> None:
    # ~19 chunks of 16384: the error norm's partial sums must be combined in a fixed order.
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(300_001, generator=gen, dtype=dtype)
    k = torch.randn(5, 300_001, generator=gen, dtype=dtype)
    by_threads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        by_threads.append(run_all_ops(call_kernel, y, k))
    for one, two in zip(*by_threads):
        assert torch.equal(one, two)


@requires_cuda
@pytest.mark.cuda
def test_cuda_results_are_repeatable() -> None:
    # The last-block fold of the norm's partials is fixed-order: same launch, same bits.
    y, k = f64(300_001, device="cuda"), f64(5, 300_001, device="cuda")
    first, second = (run_all_ops(call_kernel, y, k) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_for_without_graph_matches_autograd_path(device: str, dtype: torch.dtype) -> None:
    y = with_layout(torch.randn(70, 9, dtype=dtype, device=device), "permuted")
    k = torch.randn(4, 70, 9, dtype=dtype, device=device)
    fast = _ops.ops_for(torch.device(device), record_graph=False)
    assert isinstance(fast, _ops.NoGradOps)
    assert isinstance(_ops.ops_for(torch.device(device), record_graph=True), _ops.RecordingOps)
    with torch.no_grad():
        got = run_all_ops(lambda op, args: getattr(fast, op)(*args), y, k)
        expected = run_all_ops(lambda op, args: getattr(_ops, op)(*args), y, k)
    # Same kernel either way, so the results must be bitwise equal (NaN-free inputs).
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_recording_ops_match_the_registered_autograd(device: str, dtype: torch.dtype) -> None:
    """The eager recording path (autograd.Functions around the kernels) gives the registered ops'
    values and gradients, for every op and finalize variant."""
    recording = _ops.ops_for(torch.device(device), record_graph=True)
    results = []
    for call in (lambda op, args: getattr(recording, op)(*args), lambda op, args: getattr(_ops, op)(*args)):
        gen = torch.Generator().manual_seed(3)
        y = torch.randn(70, 9, generator=gen, dtype=dtype).to(device).requires_grad_(True)
        k = torch.randn(4, 70, 9, generator=gen, dtype=dtype).to(device).requires_grad_(True)
        outs = [o for o in run_all_ops(call, with_layout(y, "permuted"), k) if o.requires_grad]
        weights = [torch.randn(o.shape, generator=gen, dtype=dtype).to(device) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        results.append((outs, torch.autograd.grad(loss, (y, k))))
    (outs_a, grads_a), (outs_b, grads_b) = results
    assert len(outs_a) == len(outs_b)
    for a, b in zip(outs_a + list(grads_a), outs_b + list(grads_b)):
        assert torch.equal(a.detach(), b.detach())


def test_recording_ops_support_double_backward() -> None:
    y = torch.randn(5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    recording = _ops.ops_for(torch.device("cpu"), record_graph=True)

    def stage(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return recording.rk_stage(y, k, [0.2, -0.5, 0.7], 0.3)

    def dense(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return recording.rk_dense(y, k, [0.1, 0.2, -0.3, 0.4, 0.5, -0.6], [0.3, 0.9], 0.3)

    assert torch.autograd.gradcheck(stage, (y, k)) and torch.autograd.gradgradcheck(stage, (y, k))
    assert torch.autograd.gradcheck(dense, (y, k)) and torch.autograd.gradgradcheck(dense, (y, k))
