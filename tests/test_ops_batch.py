"""Tests of flashode's batch-parallel ops (batch_stage, batch_step; csrc/common/batch_args.h,
csrc/cpu/batch_kernels.cpp).

The compiled kernels are checked against the pure-PyTorch reference (_reference.py) on random
batches: per-sample steps (zero, negative), stopped samples whose stages hold NaN/inf, trailing
shapes that cross the CPU kernel's 256-element tiles and its parallel groups, non-contiguous
inputs, every tolerance layout, both controllers, clipping to the end, max_steps, dt_min
underflow and non-finite states. batch_step mutates ten buffers: every one of them is compared,
with the accept mask. Then hand-built scenarios whose outcome is known without either
implementation, input validation, the autograd formulas (RecordingOps, the registered autograd of
batch_stage) against plain autograd through the reference, gradcheck, and opcheck. CUDA cases
(CUDA kernel against the CPU kernel) run only where a GPU is present.

Tolerances: state-like outputs are compared relative to the magnitude of the terms summed
(|y| + sum_j |w_j| |k_j|), as in test_ops_rk.py. Kernel and reference compute the per-sample
float64 quantities (times, steps, error ratios) from the same float64 expressions, differing only
in the order of the error norm's sum (and the dense weights' polynomial evaluation), so those are
compared to 1e-12 relative in both state dtypes; integer and boolean outputs exactly.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashode import _ops, _reference
from flashode.batch import Status, make_controller
from flashode.tableaus import ADAPTIVE

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
DTYPES = (torch.float32, torch.float64)
F64 = torch.float64

RUNNING, SUCCESS = int(Status.RUNNING), int(Status.SUCCESS)
MAX_STEPS, DT_UNDERFLOW, NON_FINITE = int(Status.MAX_STEPS_REACHED), int(Status.DT_UNDERFLOW), int(Status.NON_FINITE)
STOPPED_CODES = (SUCCESS, MAX_STEPS, DT_UNDERFLOW, NON_FINITE)

# State-like values, relative to the magnitude of the summed terms (see the module docstring).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Per-sample float64 values (t, dt, h, history): same expressions, another summation order.
TIME_RTOL = 1e-12

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAN, INF = float("nan"), float("inf")


def kernel(name: str) -> Callable[..., Any]:
    """The registered op itself, so a comparison can never silently fall back to the reference."""
    return getattr(torch.ops.flashode, name).default


def reference(name: str) -> Callable[..., Any]:
    return getattr(_reference, name)


def test_kernels_are_loaded() -> None:
    assert "cpu" in _ops.kernel_devices, _ops.load_errors.get("cpu")
    assert hasattr(torch.ops.flashode, "batch_stage") and hasattr(torch.ops.flashode, "batch_step")


# ----------------------------------------------------------------------------- helpers


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values stored non-contiguously: `permuted` (all dims reversed in memory) or
    `strided` (every other element of a twice-as-wide last dim)."""
    if layout == "permuted" and values.dim() >= 2:
        dims = list(reversed(range(values.dim())))
        out = values.permute(dims).contiguous().permute(dims)
    elif layout == "strided" and values.dim() >= 1:
        buf = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])
        buf[..., ::2] = values
        out = buf[..., ::2]
    else:
        return values.contiguous()
    assert torch.equal(out, values) or bool(values.isnan().any())
    return out


def assert_close_mag(actual: torch.Tensor, expected: torch.Tensor, mag: torch.Tensor, what: str = "") -> None:
    """Same shape/dtype, NaN where the other is NaN, else |actual - expected| <= TOL * mag."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    actual, expected, mag = actual.cpu(), expected.cpu(), mag.cpu()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN patterns differ"
    diff = (actual.double() - expected.double()).abs()
    bound = TOL[actual.dtype] * mag.double() + torch.finfo(actual.dtype).tiny
    ok = (diff <= bound) | (actual == expected) | actual.isnan()
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: max |diff| {diff[~ok].max().item():.3e} beyond {TOL[actual.dtype]:.0e} x the term magnitude "
            f"(first at {bad}: {actual[tuple(bad)].item()!r} vs {expected[tuple(bad)].item()!r})"
        )


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """float64 per-sample values: same NaN/inf pattern, else relative difference <= rtol."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    a, e = actual.cpu().double(), expected.cpu().double()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN patterns differ: {a} vs {e}"
    diff = (a - e).abs()
    ok = (a == e) | a.isnan() | (diff <= rtol * torch.maximum(a.abs(), e.abs()))
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {a[tuple(bad)].item()!r} vs {e[tuple(bad)].item()!r} at {bad}")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bitwise-equal values (NaN matching NaN), same shape and dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    a, e = actual.cpu(), expected.cpu()
    if a.is_floating_point():
        same = (a == e) | (a.isnan() & e.isnan())
    else:
        same = a == e
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {a[tuple(bad)].item()!r} != {e[tuple(bad)].item()!r} at {bad}")


# ----------------------------------------------------------------------------- batch_stage


@dataclass
class StageCase:
    dtype: torch.dtype
    batch: int
    trail: tuple[int, ...]
    stages: int
    n_coeffs: int
    seed: int
    y_layout: str
    k_layout: str
    c: float

    def inputs(self, device: str) -> tuple[torch.Tensor, torch.Tensor, list[float], torch.Tensor, torch.Tensor, float]:
        gen = torch.Generator().manual_seed(self.seed)
        rng = random.Random(self.seed)
        shape = (self.batch, *self.trail)
        y = torch.randn(shape, generator=gen, dtype=self.dtype)
        k = torch.randn((self.stages, *shape), generator=gen, dtype=self.dtype)
        a = [0.0 if rng.random() < 0.2 else rng.uniform(-2.0, 2.0) for _ in range(self.n_coeffs)]
        # Per-sample steps: zeros (stopped samples), negative (backward) and positive.
        h = torch.randn(self.batch, generator=gen, dtype=F64) * 0.5
        h = torch.where(torch.rand(self.batch, generator=gen) < 0.25, 0.0, h)
        if self.batch >= 3:
            h[0], h[1], h[2] = 0.0, -abs(float(h[1])) - 0.01, abs(float(h[2])) + 0.01
        t = torch.randn(self.batch, generator=gen, dtype=F64) * 10
        # A stopped sample keeps y exactly whatever k holds; rows past len(a) are never read.
        for b in (h == 0).nonzero().flatten().tolist():
            if self.n_coeffs:
                j = rng.randrange(self.n_coeffs)
                k[j, b].view(-1)[rng.randrange(k[j, b].numel())] = rng.choice([NAN, INF, -INF])
        k[self.n_coeffs:] = NAN
        y = with_layout(y.to(device), self.y_layout)
        k = with_layout(k.to(device), self.k_layout)
        return y, k, a, h.to(device), t.to(device), self.c


def stage_magnitude(y: torch.Tensor, k: torch.Tensor, a: list[float], h: torch.Tensor) -> torch.Tensor:
    """|y| + sum_j |(T)(a_j h_b)| |k_j|, zero weights skipped (as both implementations do)."""
    batch = y.shape[0]
    y2, k2 = y.detach().double().reshape(batch, -1).cpu(), k.detach().double().reshape(k.shape[0], batch, -1).cpu()
    mag = y2.abs()
    for j, coeff in enumerate(a):
        w = (coeff * h.cpu()).to(y.dtype).double()[:, None]
        mag = mag + torch.where(w != 0, w.abs() * k2[j].abs(), 0.0)
    return mag.reshape(y.shape)


def check_stage(case: StageCase, device: str) -> None:
    y, k, a, h, t, c = case.inputs(device)
    out, t_out = kernel("batch_stage")(y, k, a, h, t, c)
    assert out.shape == y.shape and out.dtype == y.dtype and out.device == y.device and out.is_contiguous()
    assert t_out.shape == (case.batch,) and t_out.dtype == y.dtype and t_out.device == y.device
    stopped = (h == 0).cpu()
    # Independent of any implementation: a stopped sample's state comes back bit for bit, the
    # others are finite (only stopped samples and rows past len(a) hold NaN/inf).
    assert_equal(out.cpu()[stopped], y.cpu()[stopped], "stopped samples")
    assert bool(torch.isfinite(out.cpu()[~stopped]).all())
    if device == "cpu":
        ref, ref_t = reference("batch_stage")(y, k, a, h, t, c)
        assert_close_mag(out, ref, stage_magnitude(y, k, a, h), "batch_stage out")
        # t + c * h in float64, then rounded once to y's dtype: the same expression in both.
        assert_equal(t_out, ref_t, "stage times")
    else:  # the CUDA kernel against the CPU kernel
        cpu_out, cpu_t = kernel("batch_stage")(y.cpu(), k.cpu(), a, h.cpu(), t.cpu(), c)
        assert_close_mag(out, cpu_out, stage_magnitude(y, k, a, h), "batch_stage out (cuda vs cpu)")
        assert_close_rel(t_out.double(), cpu_t.double(), float(torch.finfo(y.dtype).eps), "stage times (cuda vs cpu)")


TRAILING = [(1,), (3,), (2, 3), (300,)]  # 300: more than one 256-element tile per sample
LAYOUTS = ("contiguous", "permuted", "strided")


@st.composite
def stage_cases(draw: st.DrawFn) -> StageCase:
    stages = draw(st.integers(1, 8))
    return StageCase(
        dtype=draw(st.sampled_from(DTYPES)),
        batch=draw(st.integers(1, 50)),
        trail=draw(st.sampled_from(TRAILING)),
        stages=stages,
        n_coeffs=draw(st.integers(0, stages)),  # often a subset of the stages
        seed=draw(st.integers(0, 2**31 - 1)),
        y_layout=draw(st.sampled_from(LAYOUTS)),
        k_layout=draw(st.sampled_from(LAYOUTS)),
        c=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0, 8.0 / 9.0])),
    )


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=stage_cases())
def test_batch_stage_matches_reference(device: str, case: StageCase) -> None:
    check_stage(case, device)


# Several parallel groups / chunks of 16384 elements: many small samples (tiles spanning
# samples) and few large ones (chunks splitting a sample).
LARGE = [(20_000, (3,)), (40, (2000,)), (7, (1, 9000))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "trail"), LARGE, ids=["many-small", "few-large", "large-2d"])
def test_batch_stage_large_matches_reference(device: str, dtype: torch.dtype, batch: int, trail: tuple) -> None:
    check_stage(StageCase(dtype, batch, trail, 5, 4, batch, "permuted", "strided", 0.3), device)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_stage_zero_step_with_non_finite_stage(device: str) -> None:
    # Every stage of the stopped sample is non-finite: it must still return y exactly.
    y = torch.arange(6, dtype=F64, device=device).reshape(2, 3)
    k = torch.tensor([[[INF, NAN, -INF], [1.0, 2.0, 3.0]]] * 2, dtype=F64, device=device)
    h = torch.tensor([0.0, 0.5], dtype=F64, device=device)
    t = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    for impl in (kernel, reference):
        out, t_out = impl("batch_stage")(y, k, [0.3, 0.7], h, t, 0.5)
        assert_equal(out[0], y[0])
        torch.testing.assert_close(out[1], y[1] + 0.5 * k[0, 1], rtol=1e-15, atol=0)
        assert t_out.tolist() == [1.0, 2.25]


# ----------------------------------------------------------------------------- batch_step inputs

STEP_ARGS = (
    "y", "k", "rtol", "atol", "b", "b_error", "poly", "t_eval", "t_end", "direction", "y_next", "f_next", "ys",
    "t", "dt", "h", "status", "stats", "next_out", "history", "controller", "max_steps",
)
MUTABLE = ("y_next", "f_next", "ys", "t", "dt", "h", "status", "stats", "next_out", "history")
TOL_KINDS = ("scalar", "element", "sample-element")
SPANS = ("far", "lands", "inside", "near")


@dataclass
class StepCase:
    """A drawn batch_step call (built per device from a seed)."""

    dtype: torch.dtype
    batch: int
    trail: tuple[int, ...]
    outputs: int
    method: str
    tol_kind: str
    controller: str
    clip: bool
    seed: int
    nan_prob: float = 0.1
    y_layout: str = "contiguous"
    k_layout: str = "contiguous"


def _rms_ratio(y: torch.Tensor, k: torch.Tensor, b: list[float], be: list[float], h: torch.Tensor,
               rtol: torch.Tensor, atol: torch.Tensor) -> torch.Tensor:
    """Each sample's error ratio in float64 (only to calibrate the drawn stages)."""
    batch = y.shape[0]
    y2, k2 = y.double().reshape(batch, -1), k.double().reshape(k.shape[0], batch, -1)
    n = y2.shape[1]
    y1 = y2 + torch.einsum("sb,sbn->bn", torch.tensor(b, dtype=F64)[:, None] * h, k2)
    err = torch.einsum("sb,sbn->bn", torch.tensor(be, dtype=F64)[:, None] * h, k2)
    rows = lambda tol: tol.double().reshape(-1, n) if tol.numel() > 1 else tol.double().reshape(1, 1)
    scale = rows(atol) + rows(rtol) * torch.maximum(y2.abs(), y1.abs())
    return (err / scale).pow(2).mean(1).sqrt()


def build_step(case: StepCase, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Valid, random batch_step arguments (by name) and per-sample facts for coverage checks."""
    rng = random.Random(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    tab = ADAPTIVE[case.method]
    stages, batch, outputs = len(tab.c), case.batch, case.outputs
    n = math.prod(case.trail)
    dt_min = rng.choice([0.0, 0.03])
    dt_max = rng.choice([math.inf, math.inf, 0.3])
    pid_coeffs: tuple[float | None, ...] = (None,) * 3
    if case.controller == "pid":
        pid_coeffs = (rng.uniform(0.0, 0.5), rng.uniform(0.2, 0.6), rng.uniform(0.0, 0.2))
    ctrl = make_controller(
        case.controller, tab.order, rng.uniform(0.8, 0.95), rng.uniform(2.0, 10.0), rng.uniform(0.1, 0.5),
        *pid_coeffs, dt_min, dt_max,
    )
    max_steps = 60

    direction, t0, dt, h, t_end, status, next_out, t_eval, spans = [], [], [], [], [], [], [], [], []
    steps_done = []
    for _ in range(batch):
        d = rng.choice([1.0, -1.0])
        start = rng.uniform(-2.0, 2.0)
        size = math.exp(rng.uniform(math.log(0.02), math.log(0.5)))
        span = rng.choice(SPANS)
        running = rng.random() < 0.8
        if span == "lands":  # the (clipped) last step: h is exactly t_end - t0
            end = start + d * size
            step = end - start
            size = abs(step)
        else:
            end = start + d * size * {"far": rng.uniform(3.0, 10.0), "inside": rng.uniform(0.3, 0.9),
                                      "near": rng.uniform(1.05, 2.5)}[span]
            step = d * size
        reach = min(abs(end - start), size) if span == "inside" else size  # where outputs may lie
        j0 = rng.randrange(outputs + 1)
        if span in ("lands", "inside"):
            inside = outputs - j0  # every remaining output within the step: success on accept
        else:
            inside = rng.randrange(min(3, outputs - j0) + 1)
        before = sorted(rng.uniform(-3.0, -0.01) * size for _ in range(j0))
        within = sorted(rng.uniform(0.02, 1.0) * reach for _ in range(inside))
        if within and rng.random() < 0.3:
            within[-1] = reach  # an output exactly at the step's end
        after = sorted(rng.uniform(1.01, 5.0) * size for _ in range(outputs - j0 - inside))
        times = [start + d * u for u in before + within + after]
        if within and within[-1] == reach:
            times[j0 + inside - 1] = end if span in ("lands", "inside") else start + step
        direction.append(d), t0.append(start), dt.append(size), t_end.append(end), t_eval.append(times)
        h.append(step if running else 0.0)
        status.append(RUNNING if running else rng.choice(STOPPED_CODES))
        next_out.append(j0)
        spans.append(span)
        steps_done.append(max_steps - 1 if rng.random() < 0.1 else rng.randrange(max_steps - 1))

    f64 = {"dtype": F64}
    h_t = torch.tensor(h, **f64)
    y = torch.randn((batch, *case.trail), generator=gen, dtype=case.dtype)
    k = torch.randn((stages, batch, *case.trail), generator=gen, dtype=case.dtype)
    if case.tol_kind == "scalar":
        rtol, atol = torch.tensor(rng.uniform(1e-4, 1e-2)), torch.tensor(rng.uniform(1e-7, 1e-4))
    else:
        shape = (n,) if case.tol_kind == "element" else (batch, n)
        rtol = 10 ** (torch.rand(shape, generator=gen, dtype=F64) * 2 - 4)
        atol = 10 ** (torch.rand(shape, generator=gen, dtype=F64) * 3 - 7)
    rtol, atol = rtol.to(case.dtype), atol.to(case.dtype)
    # Scale each running sample's stages so its error ratio lands near a drawn target: mostly
    # log-uniform in [0.2, 5] (accepts and rejects on both sides of 1), some tiny (the ifactor
    # clamp) and some huge (the dfactor clamp of a rejected step).
    log_target = torch.empty(batch, dtype=F64).uniform_(math.log(0.2), math.log(5.0), generator=gen)
    kind = torch.rand(batch, generator=gen)
    log_target = torch.where(kind < 0.12, log_target * 3 - 25, log_target)  # ~[1e-13, 2e-9]
    log_target = torch.where(kind > 0.85, log_target * 3 + 8, log_target)  # ~[2e1, 4e5]
    target = torch.exp(log_target)
    for _ in range(2):
        ratio = _rms_ratio(y, k, list(tab.b), list(tab.b_error), h_t, rtol, atol)
        scale = torch.where(ratio > 0, target / ratio, 1.0).to(case.dtype)
        k = k * scale.reshape(1, batch, *([1] * len(case.trail)))
    # Non-finite stages: a running sample's non-finite stage makes its ratio NaN (rejected, and
    # NON_FINITE once the shrinking step is below dt_min); a stopped one's must change nothing; a
    # stage with only zero weights (dopri5's k[1]) must not poison anything.
    poisoned = []
    used = [j for j in range(stages) if tab.b[j] != 0 or tab.b_error[j] != 0]
    unused = [j for j in range(stages) if tab.b[j] == 0 and tab.b_error[j] == 0 and not any(tab.dense[j])]
    for b in range(batch):
        if rng.random() < case.nan_prob:
            rows = used if status[b] == RUNNING else list(range(stages))
            j = rng.choice(rows)
            k[j, b].view(-1)[rng.randrange(n)] = rng.choice([NAN, INF, -INF])
            poisoned.append(b)
        elif unused and rng.random() < case.nan_prob:
            k[rng.choice(unused), b].view(-1)[rng.randrange(n)] = NAN

    ys = torch.randn((batch, outputs, *case.trail), generator=gen, dtype=case.dtype)
    stats = torch.randint(0, 40, (batch, 4), generator=gen)
    stats[:, 1] = torch.tensor(steps_done)
    args = {
        "y": with_layout(y.to(device), case.y_layout),
        "k": with_layout(k.to(device), case.k_layout),
        "rtol": rtol.to(device),
        "atol": atol.to(device),
        "b": list(tab.b),
        "b_error": list(tab.b_error),
        "poly": [p for row in tab.dense for p in row],
        "t_eval": torch.tensor(t_eval, **f64).reshape(batch, outputs).to(device),
        "t_end": torch.tensor(t_end, **f64).to(device),
        "direction": torch.tensor(direction, **f64).to(device),
        "y_next": torch.full(y.shape, 12345.0, dtype=case.dtype, device=device),
        "f_next": torch.full(y.shape, -12345.0, dtype=case.dtype, device=device),
        "ys": ys.to(device),
        "t": torch.tensor(t0, **f64).to(device),
        "dt": torch.tensor(dt, **f64).to(device),
        "h": h_t.to(device),
        "status": torch.tensor(status, dtype=torch.int64, device=device),
        "stats": stats.to(device),
        "next_out": torch.tensor(next_out, dtype=torch.int64, device=device),
        "history": torch.empty((batch, 2), dtype=F64).uniform_(0.05, 1.0, generator=gen).to(device),
        "controller": ctrl.pack(case.clip, stages - 1),
        "max_steps": max_steps,
    }
    return args, {"spans": spans, "poisoned": poisoned, "dt_min": dt_min, "dt_max": dt_max}


def call_step(fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fn on clones of every tensor argument; the mutated buffers and the returned accept mask."""
    cloned = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in args.items()}
    accept = fn(*(cloned[name] for name in STEP_ARGS))
    # Inputs the op only reads must be untouched (compared as values: NaN counts as equal).
    for name in ("y", "k", "rtol", "atol", "t_eval", "t_end", "direction"):
        assert_equal(cloned[name], args[name], f"input {name} was modified")
    return {"accept": accept, **{name: cloned[name] for name in MUTABLE}}


def step_magnitudes(args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Term magnitudes of y1 = y + sum_j (b_j h) k_j, and a bound for every dense output of the
    step (|theta| <= 1: |B_j(theta)| <= sum_p |poly_jp|), per (b, n)."""
    y, k, h = args["y"].cpu(), args["k"].cpu(), args["h"].cpu()
    batch, stages = y.shape[0], k.shape[0]
    y2, k2 = y.double().reshape(batch, -1), k.double().reshape(stages, batch, -1)
    degree = len(args["poly"]) // stages
    mag_y1, mag_dense = y2.abs(), y2.abs()
    for j in range(stages):
        w = (args["b"][j] * h).to(y.dtype).double()[:, None]
        kj = torch.where(torch.isfinite(k2[j]), k2[j].abs(), 0.0)
        mag_y1 = mag_y1 + torch.where(w != 0, w.abs() * kj, 0.0)
        bound = sum(abs(p) for p in args["poly"][j * degree:(j + 1) * degree])
        mag_dense = mag_dense + 2 * bound * h.abs()[:, None] * kj
    return mag_y1, mag_dense


def check_step_semantics(args: dict[str, Any], out: dict[str, torch.Tensor]) -> None:
    """What batch_step must do whatever the rounding: checked on one implementation's outputs."""
    y, k = args["y"].cpu(), args["k"].cpu()
    batch, stages = y.shape[0], k.shape[0]
    o = {name: v.cpu() for name, v in out.items()}
    accept, status0 = o["accept"], args["status"].cpu()
    running = status0 == RUNNING
    assert accept.dtype == torch.bool and accept.shape == (batch,)
    assert not bool((accept & ~running).any()), "a stopped sample was accepted"
    y2, yn = y.reshape(batch, -1), o["y_next"].reshape(batch, -1)
    assert_equal(yn[~accept], y2[~accept], "y_next of rejected/stopped samples")
    f = o["f_next"].reshape(batch, -1)
    assert_equal(f[accept], k.reshape(stages, batch, -1)[stages - 1][accept], "f_next of accepted samples")
    assert_equal(f[~accept], k.reshape(stages, batch, -1)[0][~accept], "f_next of rejected/stopped samples")
    for name in ("t", "dt", "h", "status", "stats", "next_out", "history"):
        assert_equal(o[name][~running], args[name].cpu()[~running], f"{name} of stopped samples")
    stats0 = args["stats"].cpu()
    expected_stats = stats0 + running[:, None] * torch.stack(
        [torch.full((batch,), int(args["controller"][10])), torch.ones(batch, dtype=torch.long), accept.long(),
         (running & ~accept).long()], 1)
    assert_equal(o["stats"], expected_stats, "stats")
    assert_equal(o["h"] == 0, o["status"] != RUNNING, "h is 0 exactly for stopped samples")
    still = o["status"] == RUNNING
    # h = direction * dt, or the remainder to t_end when clipping shortens the step (dt keeps the proposal)
    direction = args["direction"].cpu()
    remaining = (args["t_end"].cpu() - o["t"]) * direction
    clipped = (args["controller"][9] != 0.0) & (remaining > 0) & (o["dt"] >= remaining)
    step = torch.where(clipped, remaining, o["dt"])
    assert_equal(o["h"][still], (direction * step)[still], "h = direction * min(dt, remaining)")
    assert_equal(o["t"][running & ~accept], args["t"].cpu()[running & ~accept], "t of rejected samples")
    assert_equal(o["next_out"][~accept], args["next_out"].cpu()[~accept], "next_out of rejected samples")
    # ys: only the positions [next_out_before, next_out_after) of a sample change.
    first, last = args["next_out"].cpu(), o["next_out"]
    pos = torch.arange(args["t_eval"].shape[1])
    written = (pos >= first[:, None]) & (pos < last[:, None])
    ys0, ys1 = args["ys"].cpu().reshape(batch, pos.numel(), -1), o["ys"].reshape(batch, pos.numel(), -1)
    assert_equal(ys1[~written], ys0[~written], "ys positions the step did not reach")


def compare_step(got: dict[str, torch.Tensor], exp: dict[str, torch.Tensor], args: dict[str, Any], what: str) -> None:
    """Every mutated buffer and the accept mask of two implementations (same inputs)."""
    for name in ("accept", "status", "stats", "next_out"):
        assert_equal(got[name], exp[name], f"{what}: {name}")
    for name in ("t", "dt", "h", "history"):
        assert_close_rel(got[name], exp[name], TIME_RTOL, f"{what}: {name}")
    mag_y1, mag_dense = step_magnitudes(args)
    batch = mag_y1.shape[0]
    assert_close_mag(got["y_next"].reshape(batch, -1), exp["y_next"].reshape(batch, -1), mag_y1, f"{what}: y_next")
    assert_equal(got["f_next"], exp["f_next"], f"{what}: f_next")
    outputs = args["t_eval"].shape[1]
    ys_mag = mag_dense[:, None, :].expand(batch, outputs, -1)
    ys_mag = torch.where(got["ys"].cpu().reshape(ys_mag.shape).isfinite(), ys_mag, 0.0)
    assert_close_mag(got["ys"].reshape(ys_mag.shape), exp["ys"].reshape(ys_mag.shape), ys_mag, f"{what}: ys")
    for name in MUTABLE:
        assert got[name].shape == args[name].shape and got[name].dtype == args[name].dtype


def check_step(case: StepCase, device: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    args, _ = build_step(case, device)
    got = call_step(kernel("batch_step"), args)
    check_step_semantics(args, got)
    where = f"({case.dtype}, {case.method}, {case.tol_kind}, {case.controller}, clip={case.clip}, seed={case.seed})"
    if device == "cpu":
        compare_step(got, call_step(reference("batch_step"), args), args, f"kernel vs reference {where}")
    else:
        cpu_args = {name: v.cpu() if isinstance(v, torch.Tensor) else v for name, v in args.items()}
        compare_step(got, call_step(kernel("batch_step"), cpu_args), cpu_args, f"cuda vs cpu kernel {where}")
    return args, got


@st.composite
def step_cases(draw: st.DrawFn) -> StepCase:
    return StepCase(
        dtype=draw(st.sampled_from(DTYPES)),
        batch=draw(st.integers(1, 50)),
        trail=draw(st.sampled_from(TRAILING)),
        outputs=draw(st.integers(1, 5)),
        method=draw(st.sampled_from(sorted(ADAPTIVE))),
        tol_kind=draw(st.sampled_from(TOL_KINDS)),
        controller=draw(st.sampled_from(["integral", "pid"])),
        clip=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        nan_prob=draw(st.sampled_from([0.0, 0.1, 0.3])),
        y_layout=draw(st.sampled_from(LAYOUTS)),
        k_layout=draw(st.sampled_from(LAYOUTS)),
    )


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=step_cases())
def test_batch_step_matches_reference(device: str, case: StepCase) -> None:
    check_step(case, device)


@pytest.mark.parametrize("controller", ["integral", "pid"])
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
def test_batch_step_sweep_covers_every_outcome(controller: str, clip: bool) -> None:
    """Deterministic cases of 48 samples, every dtype and tolerance layout: kernel vs reference,
    and the generator must really produce every outcome the comparison is meant to cover (else
    the fuzzing above could pass vacuously)."""
    seen: dict[str, int] = {}
    for i, (dtype, tol_kind) in enumerate(itertools.product(DTYPES, TOL_KINDS)):
        case = StepCase(dtype, 48, TRAILING[i % 4], 4, "dopri5", tol_kind, controller, clip, 1000 * i + 7)
        args, out = check_step(case, "cpu")
        running = args["status"] == RUNNING
        accept, status, written = out["accept"], out["status"], out["next_out"] - args["next_out"]
        counts = {
            "accept": accept, "reject": running & ~accept,
            "success": running & (status == SUCCESS), "max_steps": running & (status == MAX_STEPS),
            "non_finite": running & (status == NON_FINITE), "still_running": status == RUNNING,
            "no_output": accept & (written == 0), "one_output": written == 1, "several_outputs": written >= 2,
            "ratio_below_1_history": accept & (out["history"][:, 0] < 1),
            # the controller's clamps, dt * ifactor and dt * dfactor, exactly
            "dfactor_clamp": running & ~accept & (out["dt"] == args["dt"] * args["controller"][3]),
        }
        if not clip:  # (with clipping, most such steps are shortened to land on t_end instead)
            counts["ifactor_clamp"] = accept & (out["dt"] == args["dt"] * args["controller"][2])
        counts["underflow"] = running & (status == DT_UNDERFLOW)  # needs dt_min > 0 (drawn per case)
        if clip:  # the next step was shortened to land on t_end (dt keeps the longer proposal)
            remaining = (args["t_end"] - out["t"]) * args["direction"]
            counts["clipped"] = (status == RUNNING) & (out["h"].abs() == remaining) & (out["dt"] > remaining)
        for name, mask in counts.items():
            seen[name] = seen.get(name, 0) + int(mask.sum())
    missing = [name for name, count in seen.items() if count == 0]
    assert not missing, (missing, seen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "trail"), LARGE, ids=["many-small", "few-large", "large-2d"])
def test_batch_step_large_matches_reference(device: str, dtype: torch.dtype, batch: int, trail: tuple) -> None:
    # Several parallel sample groups; each group's error sums must stay per sample.
    case = StepCase(dtype, batch, trail, 3, "tsit5", "sample-element" if batch < 100 else "scalar", "pid", True,
                    batch, nan_prob=0.05, y_layout="permuted")
    check_step(case, device)


@pytest.fixture
def restore_threads() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_threads")
def test_batch_results_do_not_depend_on_thread_count() -> None:
    case = StepCase(F64, 20_000, (3,), 3, "dopri5", "element", "integral", False, 5)
    args, _ = build_step(case)
    stage_args = (args["y"], args["k"], [0.1, 0.2, 0.3], args["h"], args["t"], 0.5)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((call_step(kernel("batch_step"), args), kernel("batch_stage")(*stage_args)))
    (step1, stage1), (step2, stage2) = results
    for name in step1:
        assert_equal(step1[name], step2[name], name)
    assert_equal(stage1[0], stage2[0], "stage out")
    assert_equal(stage1[1], stage2[1], "stage times")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("controller", ["integral", "pid"])
def test_batch_step_trajectory_reaches_non_finite(dtype: torch.dtype, controller: str) -> None:
    """Twelve steps in a row, each from the kernel's state, fed to both implementations; sample 0
    keeps a NaN stage: rejected every step with the step shrinking by dfactor until it is below
    dt_min, then NON_FINITE, and frozen."""
    case = StepCase(dtype, 16, (5,), 3, "bosh3", "scalar", controller, True, 11, nan_prob=0.0)
    args, _ = build_step(case)
    ctrl = make_controller(controller, 3, 0.9, 5.0, 0.5, None, None, None, 1e-3, math.inf).pack(True, 3)
    args["controller"] = ctrl
    args["status"][0], args["h"][0], args["dt"][0] = RUNNING, args["direction"][0] * 0.1, 0.1
    args["stats"][0] = 0  # far from max_steps
    args["t_end"][0] = args["t"][0] + args["direction"][0] * 100.0
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        args["k"][1:] = torch.randn(args["k"][1:].shape, generator=gen, dtype=dtype) * 0.05
        args["k"][1, 0, 2] = NAN
        got = call_step(kernel("batch_step"), args)
        check_step_semantics(args, got)
        compare_step(got, call_step(reference("batch_step"), args), args, f"step {step}")
        assert not bool(got["accept"][0])
        expected_dt = 0.1 * 0.5 ** min(step + 1, 7)  # 0.1 * 0.5^7 < 1e-3: NON_FINITE after 7 steps
        assert got["dt"][0].item() == pytest.approx(expected_dt, rel=1e-15)
        assert got["status"][0].item() == (RUNNING if step < 6 else NON_FINITE), step
        # Next step: the kernel's state.
        args.update({name: got[name] for name in ("t", "dt", "h", "status", "stats", "next_out", "history", "ys")})
        args["y"], args["k"] = got["y_next"], args["k"].clone()
        args["k"][0] = got["f_next"]
    assert int(args["stats"][0, 3]) >= 7


# ----------------------------------------------------------------------------- known outcomes


def _propose(ctrl: list[float], dt: float, ratio: float, prev: float, prev2: float) -> float:
    """batch_args.h: propose_dt, written out once more in plain Python."""
    pid, safety, ifactor, dfactor, b1, b2, b3 = ctrl[:7]
    if ratio == 0:
        return dt * ifactor
    if not math.isfinite(ratio):
        return dt * dfactor
    if pid:
        f = lambda r: 1.0 / max(r, 1e-12)
        factor = safety * f(ratio) ** b1 * f(prev) ** b2 * f(prev2) ** b3
    else:
        factor = safety / ratio**b1
    return dt * min(ifactor, max(factor, 1.0 if ratio < 1 else dfactor))


# One sample per row: a two-stage pair with b = [1/2, 1/2], b_error = [1, -1], y = 0, N = 1,
# rtol = 0, atol = 1, so the ratio is exactly |h (k0 - k1)|; linear dense output.
# (t0, h, t_end, t_eval (4), next_out, status, steps done, (k0, k1)) -> expected status.
SCENARIOS = {
    "accept-two-outputs": ((0.0, 0.1, 10.0, [0.05, 0.1, 5.0, 10.0], 0, RUNNING, 0, (0.5, 0.0)), RUNNING),
    "reject": ((0.0, 0.1, 10.0, [0.05, 0.1, 5.0, 10.0], 0, RUNNING, 0, (2.0, 0.0)), RUNNING),
    "success": ((0.0, 1.0, 1.0, [-2.0, -1.0, 0.5, 1.0], 2, RUNNING, 0, (0.5, 0.0)), SUCCESS),
    "max-steps": ((0.0, 0.1, 10.0, [0.05, 0.1, 5.0, 10.0], 0, RUNNING, 99, (0.5, 0.0)), MAX_STEPS),
    "underflow": ((0.0, 0.011, 10.0, [1.0, 2.0, 5.0, 10.0], 0, RUNNING, 0, (10_000.0, 0.0)), DT_UNDERFLOW),
    "nan-below-dt-min": ((0.0, 0.011, 10.0, [1.0, 2.0, 5.0, 10.0], 0, RUNNING, 0, (NAN, 0.0)), NON_FINITE),
    "inf-above-dt-min": ((0.0, 1.0, 10.0, [1.5, 2.0, 5.0, 10.0], 0, RUNNING, 0, (INF, 0.0)), RUNNING),
    "stopped-with-nan": ((0.0, 0.0, 10.0, [1.0, 2.0, 5.0, 10.0], 0, DT_UNDERFLOW, 3, (NAN, INF)), DT_UNDERFLOW),
    "backward": ((0.0, -0.1, -10.0, [-0.05, -0.1, -5.0, -10.0], 0, RUNNING, 0, (-0.5, 0.0)), RUNNING),
    "stall": ((1e18, 1.0, 2e18, [1.5e18, 1.6e18, 1.7e18, 2e18], 0, RUNNING, 0, (0.5, 0.0)), DT_UNDERFLOW),
    "zero-error": ((0.0, 1.0, 100.0, [50.0, 60.0, 70.0, 100.0], 0, RUNNING, 0, (3.0, 3.0)), RUNNING),
    "clip": ((0.0, 0.5, 0.6, [0.1, 0.2, 0.55, 0.6], 1, RUNNING, 0, (0.02, 0.0)), RUNNING),
    "lands": ((0.1, 0.5, 0.6, [0.1, 0.2, 0.55, 0.6], 1, RUNNING, 0, (0.02, 0.0)), SUCCESS),
}


def scenario_args(controller: str, clip: bool) -> dict[str, Any]:
    rows = [row for row, _ in SCENARIOS.values()]
    batch = len(rows)
    f64 = {"dtype": F64}
    t0 = torch.tensor([r[0] for r in rows], **f64)
    h = torch.tensor([r[1] for r in rows], **f64)
    t_end = torch.tensor([r[2] for r in rows], **f64)
    lands = list(SCENARIOS).index("lands")
    h[lands] = t_end[lands] - t0[lands]  # exactly the clipped last step
    # k_j = given_j / |h|: the ratio |h (k0 - k1)| is |given_0 - given_1| (up to rounding).
    k = torch.tensor([[r[7][j] / (abs(r[1]) or 1.0) for r in rows] for j in range(2)], **f64).reshape(2, batch, 1)
    ctrl = make_controller(controller, 5, 0.9, 10.0, 0.2, None, None, None, 0.01, 5.0).pack(clip, 1)
    stats = torch.zeros((batch, 4), dtype=torch.int64)
    stats[:, 1] = torch.tensor([r[6] for r in rows])
    return {
        "y": torch.zeros((batch, 1), **f64), "k": k, "rtol": torch.zeros((), **f64), "atol": torch.ones((), **f64),
        "b": [0.5, 0.5], "b_error": [1.0, -1.0], "poly": [0.5, 0.5],
        "t_eval": torch.tensor([r[3] for r in rows], **f64), "t_end": t_end,
        "direction": torch.where(t_end >= t0, 1.0, -1.0).to(F64),
        "y_next": torch.empty((batch, 1), **f64), "f_next": torch.empty((batch, 1), **f64),
        "ys": torch.full((batch, 4, 1), -7.0, **f64), "t": t0, "dt": h.abs(), "h": h,
        "status": torch.tensor([r[5] for r in rows]), "stats": stats,
        "next_out": torch.tensor([r[4] for r in rows]),
        "history": torch.tensor([[0.3, 0.7]] * batch, **f64), "controller": ctrl, "max_steps": 100,
    }


@pytest.mark.parametrize("impl", [kernel, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("controller", ["integral", "pid"])
def test_batch_step_known_outcomes(impl: Callable[[str], Any], controller: str) -> None:
    """Outcomes worked out by hand from the contract (ops.cpp, batch_args.h), for each
    implementation on its own: status, times, steps, outputs, stats and history."""
    names = list(SCENARIOS)
    for clip in (False, True):
        args = scenario_args(controller, clip)
        out = call_step(impl("batch_step"), args)
        check_step_semantics(args, out)
        ctrl = args["controller"]
        for b, name in enumerate(names):
            row, expected_status = SCENARIOS[name]
            if name == "clip" and not clip:
                expected_status = RUNNING
            if name == "lands" and not clip:
                expected_status = SUCCESS  # 0.1 + 0.5 rounds to exactly 0.6 anyway
            t0, h0, t_end = float(args["t"][b]), float(args["h"][b]), float(args["t_end"][b])
            ratio = abs(row[7][0] - row[7][1]) if all(map(math.isfinite, row[7])) else NAN
            running = row[5] == RUNNING
            accept = running and ratio <= 1.0
            status = int(out["status"][b])
            assert status == expected_status, (name, clip, status)
            assert bool(out["accept"][b]) == accept, name
            if not running:
                continue
            t1 = t0 + h0 if accept else t0
            if accept and clip and h0 == t_end - t0:
                t1 = t_end
            assert float(out["t"][b]) == t1, name
            # dt: the controller's proposal from the step taken (|h|), unclipped, on success too
            dt_new = min(_propose(ctrl, abs(h0), ratio, 0.3, 0.7), 5.0)
            assert float(out["dt"][b]) == pytest.approx(dt_new, rel=1e-14), name
            if status == SUCCESS:
                assert float(out["h"][b]) == 0.0, name
            else:
                remaining = (t_end - t1) * float(args["direction"][b])
                step = remaining if clip and 0 < remaining <= dt_new else dt_new
                expected_h = math.copysign(step, h0) if status == RUNNING else 0.0
                assert float(out["h"][b]) == pytest.approx(expected_h, rel=1e-14), name
            if accept:
                assert out["history"][b].tolist() == pytest.approx([ratio, 0.3], rel=1e-14), name
            else:
                assert out["history"][b].tolist() == [0.3, 0.7], name
        # Outputs: "accept-two-outputs" writes t = 0.05 (theta 1/2) and t = 0.1 (its end, theta 1).
        k0, k1 = float(args["k"][0, 0, 0]), float(args["k"][1, 0, 0])
        first = names.index("accept-two-outputs")
        assert int(out["next_out"][first]) == 2
        assert out["ys"][first, :, 0].tolist() == pytest.approx(
            [0.1 * 0.25 * (k0 + k1), 0.1 * 0.5 * (k0 + k1), -7.0, -7.0], rel=1e-14)
        assert int(out["next_out"][names.index("backward")]) == 2
        assert int(out["next_out"][names.index("success")]) == 4
        assert int(out["next_out"][names.index("reject")]) == 0
        clipped = names.index("clip")
        if clip:  # 0.5 + proposal > 0.6: the step is shortened to land on t_end
            assert float(out["h"][clipped]) == 0.6 - 0.5 and int(out["status"][clipped]) == RUNNING
            assert float(out["dt"][clipped]) > 0.6 - 0.5  # dt keeps the proposal it was shortened from


# ----------------------------------------------------------------------------- mixed tolerances


@pytest.mark.parametrize("dtype", [F64])
@pytest.mark.parametrize(
    ("rtol_kind", "atol_kind"),
    [("scalar", "element"), ("element", "scalar"), ("scalar", "sample-element"), ("element", "sample-element")],
)
def test_batch_step_mixed_tolerance_sizes_match_reference(dtype: torch.dtype, rtol_kind: str, atol_kind: str) -> None:
    # solve_ivp passes a scalar tolerance as a 0-d tensor and any other as (B, N), so
    # solve_ivp(..., rtol=1e-6, atol=per_element) reaches batch_step with rtol of 1 value and atol
    # of B*N; rk_finalize (whose norm batch_step applies per sample) takes each tolerance's size
    # independently, and so does the reference.
    case = StepCase(dtype, 6, (3,), 3, "bosh3", "sample-element", "integral", False, 21, nan_prob=0.0)
    args, _ = build_step(case)
    sizes = {"scalar": (), "element": (3,), "sample-element": (6, 3)}
    args["rtol"] = torch.full(sizes[rtol_kind], 1e-3, dtype=dtype)
    args["atol"] = torch.full(sizes[atol_kind], 1e-6, dtype=dtype)
    got = call_step(kernel("batch_step"), args)
    compare_step(got, call_step(reference("batch_step"), args), args, "mixed tolerances")


# ----------------------------------------------------------------------------- bad inputs


def step_args(**over: Any) -> dict[str, Any]:
    args, _ = build_step(StepCase(F64, 4, (3,), 2, "bosh3", "scalar", "integral", False, 1, nan_prob=0.0))
    args.update(over)
    return args


def stage_args(**over: Any) -> dict[str, Any]:
    args = {"y": torch.randn(4, 3, dtype=F64), "k": torch.randn(3, 4, 3, dtype=F64), "a": [0.5, 0.25],
            "h": torch.full((4,), 0.1, dtype=F64), "t": torch.zeros(4, dtype=F64), "c": 0.5}
    args.update(over)
    return args


def _ctrl(**fields: float) -> list[float]:
    ctrl = make_controller("integral", 3, 0.9, 10.0, 0.2, None, None, None, 0.0, math.inf).pack(False, 3)
    order = ["pid", "safety", "ifactor", "dfactor", "b1", "b2", "b3", "dt_min", "dt_max", "clip", "evals"]
    for name, value in fields.items():
        ctrl[order.index(name)] = value
    return ctrl


@dataclass
class Bad:
    """One invalid call: `over` (a function, so tensors are fresh) replaces some of the valid
    arguments; `reference`: whether the reference must raise too (it only checks y and k)."""

    id: str
    op: str
    over: Callable[[], dict[str, Any]]
    match: str
    reference: bool = False


STAGE, STEP = "batch_stage", "batch_step"
FLOAT16 = "float32 or float64, got float16"
PER_SAMPLE = "must be a contiguous tensor with one entry per sample"
OUTS_LIKE_Y = "y_next and f_next must be contiguous like y"
T_EVAL = re.escape("t_eval must be a contiguous float64 (B, T)")
YS = re.escape("ys must be a contiguous (B, T, N)")
TOL_SIZE = re.escape("must have 1, 3 (per element) or 12 (per sample and element) values, got")
LONG = torch.long

BAD = [
    Bad("stage-float16", STAGE, lambda: {"y": torch.randn(4, 3).half(), "k": torch.randn(3, 4, 3).half()},
        FLOAT16, True),
    Bad("stage-int", STAGE, lambda: {"y": torch.ones(4, 3, dtype=LONG)}, "float32 or float64", True),
    Bad("stage-k-shape", STAGE, lambda: {"k": torch.randn(3, 4, 2, dtype=F64)},
        re.escape("k must have shape (S, *y"), True),
    Bad("stage-k-dtype", STAGE, lambda: {"k": torch.randn(3, 4, 3)}, "same dtype", True),
    Bad("stage-too-many-coeffs", STAGE, lambda: {"a": [0.1] * 4}, "need at least as many stages", True),
    Bad("stage-h-size", STAGE, lambda: {"h": torch.zeros(5, dtype=F64)}, f"h {PER_SAMPLE} \\(4\\), got 5"),
    Bad("stage-h-2d", STAGE, lambda: {"h": torch.zeros(4, 2, dtype=F64)}, f"h {PER_SAMPLE}"),
    Bad("stage-h-noncontig", STAGE, lambda: {"h": torch.zeros(8, dtype=F64)[::2]}, f"h {PER_SAMPLE}"),
    Bad("stage-h-float32", STAGE, lambda: {"h": torch.zeros(4)}, "h has the wrong dtype"),
    Bad("stage-t-size", STAGE, lambda: {"t": torch.zeros(3, dtype=F64)}, f"t {PER_SAMPLE}"),
    Bad("stage-t-float32", STAGE, lambda: {"t": torch.zeros(4)}, "t has the wrong dtype"),
    Bad("step-float16", STEP, lambda: {"y": torch.randn(4, 3).half(), "k": torch.randn(4, 4, 3).half()}, FLOAT16, True),
    Bad("step-k-dtype", STEP, lambda: {"k": torch.randn(4, 4, 3)}, "same dtype", True),
    Bad("step-k-shape", STEP, lambda: {"k": torch.randn(4, 4, 2, dtype=F64)},
        re.escape("k must have shape (S, *y"), True),
    Bad("step-b-length", STEP, lambda: {"b": [0.5, 0.5], "b_error": [0.1, -0.1]},
        "b and b_error need one weight per stage \\(4\\)"),
    Bad("step-poly-size", STEP, lambda: {"poly": [0.1] * 7}, re.escape("poly must hold S * D")),
    Bad("step-poly-degree-9", STEP, lambda: {"poly": [0.1] * 36},
        re.escape("poly must hold S * D dense-output coefficients, D <= 8")),
    Bad("step-poly-empty", STEP, lambda: {"poly": []}, re.escape("poly must hold S * D")),
    Bad("step-controller-short", STEP, lambda: {"controller": _ctrl()[:10]}, "controller must hold 11 values, got 10"),
    Bad("step-controller-long", STEP, lambda: {"controller": [*_ctrl(), 0.0]},
        "controller must hold 11 values, got 12"),
    Bad("step-safety", STEP, lambda: {"controller": _ctrl(safety=0.0)}, "need safety > 0"),
    Bad("step-dfactor", STEP, lambda: {"controller": _ctrl(dfactor=1.5)}, "0 < dfactor <= 1"),
    Bad("step-ifactor", STEP, lambda: {"controller": _ctrl(ifactor=0.5)}, "ifactor >= 1"),
    Bad("step-dt-min-max", STEP, lambda: {"controller": _ctrl(dt_min=2.0, dt_max=1.0)}, "0 <= dt_min <= dt_max"),
    Bad("step-max-steps", STEP, lambda: {"max_steps": 0}, "max_steps must be positive"),
    Bad("step-rtol-size", STEP, lambda: {"rtol": torch.full((5,), 1e-3, dtype=F64)}, f"rtol {TOL_SIZE} 5"),
    Bad("step-atol-size", STEP, lambda: {"atol": torch.full((4, 2), 1e-3, dtype=F64)}, f"atol {TOL_SIZE} 8"),
    Bad("step-rtol-dtype", STEP, lambda: {"rtol": torch.full((), 1e-3)}, "rtol must have the state's dtype"),
    Bad("step-y-next-dtype", STEP, lambda: {"y_next": torch.empty(4, 3)}, OUTS_LIKE_Y),
    Bad("step-f-next-size", STEP, lambda: {"f_next": torch.empty(4, 2, dtype=F64)}, OUTS_LIKE_Y),
    Bad("step-f-next-noncontig", STEP, lambda: {"f_next": torch.empty(3, 4, dtype=F64).t()}, OUTS_LIKE_Y),
    Bad("step-t-eval-float32", STEP, lambda: {"t_eval": torch.zeros(4, 2)}, T_EVAL),
    Bad("step-t-eval-1d", STEP, lambda: {"t_eval": torch.zeros(8, dtype=F64)}, T_EVAL),
    Bad("step-t-eval-batch", STEP, lambda: {"t_eval": torch.zeros(5, 2, dtype=F64)}, T_EVAL),
    Bad("step-ys-size", STEP, lambda: {"ys": torch.zeros(4, 3, 3, dtype=F64)}, YS),
    Bad("step-ys-dtype", STEP, lambda: {"ys": torch.zeros(4, 2, 3)}, YS),
    Bad("step-t-end-size", STEP, lambda: {"t_end": torch.zeros(3, dtype=F64)}, f"t_end {PER_SAMPLE}"),
    Bad("step-direction-dtype", STEP, lambda: {"direction": torch.ones(4)}, "direction has the wrong dtype"),
    Bad("step-t-size", STEP, lambda: {"t": torch.zeros(5, dtype=F64)}, f"t {PER_SAMPLE}"),
    Bad("step-dt-dtype", STEP, lambda: {"dt": torch.ones(4)}, "dt has the wrong dtype"),
    Bad("step-h-noncontig", STEP, lambda: {"h": torch.ones(8, dtype=F64)[::2]}, f"h {PER_SAMPLE}"),
    Bad("step-status-int32", STEP, lambda: {"status": torch.full((4,), -1, dtype=torch.int32)},
        "status has the wrong dtype"),
    Bad("step-stats-shape", STEP, lambda: {"stats": torch.zeros(4, 3, dtype=LONG)}, f"stats {PER_SAMPLE}"),
    Bad("step-stats-float", STEP, lambda: {"stats": torch.zeros(4, 4, dtype=F64)}, "stats has the wrong dtype"),
    Bad("step-next-out-size", STEP, lambda: {"next_out": torch.zeros(3, dtype=LONG)}, f"next_out {PER_SAMPLE}"),
    Bad("step-history-shape", STEP, lambda: {"history": torch.ones(4, dtype=F64)}, f"history {PER_SAMPLE}"),
]


def bad_params() -> list:
    params = []
    for bad in BAD:
        for impl in ("kernel", "reference") if bad.reference else ("kernel",):
            params.append(pytest.param(bad.op, bad.over, bad.match, impl, id=f"{bad.id}-{impl}"))
    return params


@pytest.mark.parametrize(("op", "over", "match", "impl"), bad_params())
def test_bad_inputs_raise(op: str, over: Callable[[], dict[str, Any]], match: str, impl: str) -> None:
    args = (stage_args if op == "batch_stage" else step_args)(**over())
    fn = kernel(op) if impl == "kernel" else reference(op)
    with pytest.raises(RuntimeError, match=match):
        fn(*args.values())


@requires_cuda
@pytest.mark.cuda
def test_cuda_mixed_devices_raise() -> None:
    args = stage_args()
    args = {name: v.cuda() if name in ("y", "k") else v for name, v in args.items()}
    with pytest.raises(RuntimeError, match="h must be on the state's device"):
        kernel("batch_stage")(*args.values())
    sargs = {name: v.cuda() if isinstance(v, torch.Tensor) and name != "status" else v
             for name, v in step_args().items()}
    with pytest.raises(RuntimeError, match="status must be on the state's device"):
        kernel("batch_step")(*sargs.values())


# ----------------------------------------------------------------------------- autograd

RECORDING = _ops.RecordingOps(_ops.NoGradOps(torch.device("cpu")))


def linear_functional(outs: tuple[torch.Tensor, ...], seed: int) -> torch.Tensor:
    """A random linear functional of the outputs (NaN-free weights; non-finite outputs masked)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=F64)
    for o in outs:
        w = torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)
        total = total + torch.where(o.detach().isfinite(), o * w, 0.0).sum().double()
    return total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ops", ["recording", "autograd"])
def test_batch_stage_grads_match_reference(dtype: torch.dtype, ops: str) -> None:
    impl = RECORDING.batch_stage if ops == "recording" else _ops.AutogradOps.batch_stage
    grads = []
    for fn in (impl, _ops.ReferenceOps.batch_stage):
        case = StageCase(dtype, 9, (2, 3), 5, 3, 17, "permuted", "strided", 0.5)
        y, k, a, h, t, c = case.inputs("cpu")
        k = torch.where(k.isfinite(), k, 0.0)  # finite stages: the gradients are compared as values
        y, k = y.detach().requires_grad_(), k.detach().requires_grad_()
        out, t_out = fn(y, k, a, h, t, c)
        assert out.requires_grad and not t_out.requires_grad
        grads.append(torch.autograd.grad(linear_functional((out,), 5), (y, k)))
    (gy, gk), (ry, rk) = grads
    # d/dy passes the functional's weights through; d/dk_j is (T)(a_j h_b) times them.
    torch.testing.assert_close(gy, ry, rtol=0, atol=0)
    torch.testing.assert_close(gk, rk, rtol=TOL[dtype], atol=TOL[dtype])
    assert not bool(gk[3:].any()), "stages past len(a) get no gradient"
    assert bool(gk[:3].any())


def _step_grads(fn: Callable[..., Any], args: dict[str, Any], seed: int) -> tuple[dict, tuple[torch.Tensor, ...]]:
    cloned = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in args.items()}
    y, k = cloned["y"].requires_grad_(), cloned["k"].requires_grad_()
    accept = fn(*(cloned[name] for name in STEP_ARGS))
    outs = (cloned["y_next"], cloned["f_next"], cloned["ys"])
    assert all(o.requires_grad for o in outs)
    grads = torch.autograd.grad(linear_functional(outs, seed), (y, k))
    return {"accept": accept, **{name: cloned[name].detach() for name in MUTABLE}}, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [3, 4])
def test_batch_step_recording_grads_match_reference(dtype: torch.dtype, seed: int) -> None:
    case = StepCase(dtype, 24, (4,), 4, "dopri5", "sample-element", "integral", True, seed, nan_prob=0.1)
    args, _ = build_step(case)
    got, (gy, gk) = _step_grads(RECORDING.batch_step, args, seed)
    exp, (ry, rk) = _step_grads(_ops.ReferenceOps.batch_step, args, seed)
    # The differentiated outputs and the decisions behind them (every buffer is compared above).
    for name in ("accept", "next_out", "f_next"):
        assert_equal(got[name], exp[name], name)
    mag_y1, mag_dense = step_magnitudes(args)
    assert_close_mag(got["y_next"].reshape(mag_y1.shape), exp["y_next"].reshape(mag_y1.shape), mag_y1, "y_next")
    ys_mag = mag_dense[:, None, :].expand(24, 4, -1)
    assert_close_mag(got["ys"].reshape(ys_mag.shape), exp["ys"].reshape(ys_mag.shape), ys_mag, "ys")
    written = got["next_out"] - args["next_out"]
    assert bool(got["accept"].any()) and bool((written > 0).any()) and bool((~got["accept"]).any())
    # Gradient terms are weights (b_j h, B_j(theta) h, 0 or 1) times the functional's O(1) weights.
    scale = 10.0 * (1 + 4 * float(args["h"].abs().max()) * sum(abs(p) for p in args["poly"]))
    assert_close_mag(gy, ry, torch.full_like(ry, scale, dtype=F64), "grad y")
    assert_close_mag(gk, rk, torch.full_like(rk, scale, dtype=F64), "grad k")


@pytest.mark.parametrize("ops", ["recording", "reference"])
def test_batch_step_steps_and_times_are_not_differentiated(ops: str) -> None:
    # "Steps, times and the accept decision are data, not differentiated (as in odeint)"
    # (_BatchStepFunction). They are buffers the solver mutates in place every step: were they in
    # the graph, the next step's in-place update would break backward, and the stage times fed
    # to func would carry gradients through the step-size controller.
    fn = RECORDING.batch_step if ops == "recording" else _ops.ReferenceOps.batch_step
    args, _ = build_step(StepCase(F64, 6, (3,), 3, "bosh3", "scalar", "pid", False, 3, nan_prob=0.0))
    cloned = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in args.items()}
    cloned["y"].requires_grad_(), cloned["k"].requires_grad_()
    fn(*(cloned[name] for name in STEP_ARGS))
    assert cloned["y_next"].requires_grad and cloned["f_next"].requires_grad
    differentiated = [name for name in ("t", "dt", "h", "status", "stats", "next_out", "history")
                      if cloned[name].requires_grad]
    assert not differentiated, f"{ops}: {differentiated} joined the autograd graph"


def tiny_step_args() -> dict[str, Any]:
    """Three samples, ratios far from 1 (gradcheck's perturbations keep every decision): 0 accepted
    with two outputs in its step, 1 rejected, 2 stopped."""
    case = StepCase(F64, 3, (2,), 3, "bosh3", "scalar", "integral", False, 2, nan_prob=0.0)
    args, _ = build_step(case)
    args["status"] = torch.tensor([RUNNING, RUNNING, SUCCESS])
    args["h"] = torch.tensor([0.2, -0.3, 0.0], dtype=F64)
    args["dt"] = torch.tensor([0.2, 0.3, 0.1], dtype=F64)
    args["direction"] = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    args["t"] = torch.zeros(3, dtype=F64)
    args["t_end"] = torch.tensor([5.0, -5.0, 5.0], dtype=F64)
    args["t_eval"] = torch.tensor([[0.05, 0.15, 1.0], [-0.1, -0.2, -1.0], [0.5, 0.6, 1.0]], dtype=F64)
    args["next_out"] = torch.zeros(3, dtype=torch.long)
    args["stats"] = torch.zeros(3, 4, dtype=torch.long)
    gen = torch.Generator().manual_seed(9)
    args["y"] = torch.randn(3, 2, generator=gen, dtype=F64)
    k = torch.randn(4, 3, 2, generator=gen, dtype=F64)
    k[:, 0] *= 1e-3  # ratio << 1: accepted
    k[:, 1] *= 1e3  # ratio >> 1: rejected
    args["k"] = k
    return args


def _gradcheck_step(fn: Callable[..., Any], args: dict[str, Any]) -> Callable[..., tuple[torch.Tensor, ...]]:
    def wrapper(y: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cloned = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in args.items()}
        cloned["y"], cloned["k"] = y, k
        fn(*(cloned[name] for name in STEP_ARGS))
        return cloned["y_next"], cloned["f_next"], cloned["ys"]

    return wrapper


@pytest.mark.parametrize("ops", ["recording", "reference"])
def test_batch_step_gradcheck(ops: str) -> None:
    args = tiny_step_args()
    fn = RECORDING.batch_step if ops == "recording" else _ops.ReferenceOps.batch_step
    out = call_step(kernel("batch_step"), args)
    assert out["accept"].tolist() == [True, False, False] and out["next_out"].tolist() == [2, 0, 0]
    y, k = args["y"].clone().requires_grad_(), args["k"].clone().requires_grad_()
    assert torch.autograd.gradcheck(_gradcheck_step(fn, args), (y, k))


@pytest.mark.parametrize("ops", ["recording", "autograd", "reference"])
@pytest.mark.parametrize(("trail", "layout"), [((1,), "contiguous"), ((3,), "strided"), ((2, 2), "permuted")])
def test_batch_stage_gradcheck(ops: str, trail: tuple[int, ...], layout: str) -> None:
    fn = {"recording": RECORDING.batch_stage, "autograd": _ops.AutogradOps.batch_stage,
          "reference": _ops.ReferenceOps.batch_stage}[ops]
    h = torch.tensor([0.3, 0.0, -0.4], dtype=F64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    y = with_layout(torch.randn(3, *trail, dtype=F64), layout).requires_grad_()
    k = with_layout(torch.randn(4, 3, *trail, dtype=F64), layout).requires_grad_()  # 4 stages, 3 coefficients
    assert torch.autograd.gradcheck(lambda y, k: fn(y, k, [0.5, 0.0, -0.75], h, t, 0.5)[0], (y, k))


# ----------------------------------------------------------------------------- registrations


def opcheck_stage_cases() -> list:
    g = lambda x: x.requires_grad_()
    h = torch.tensor([0.1, 0.0, -0.2], dtype=F64)
    t = torch.tensor([0.0, 1.0, -1.0], dtype=F64)
    cases = {
        "f64-grad": (
            g(torch.randn(3, 4, dtype=F64)), g(torch.randn(4, 3, 4, dtype=F64)), [0.5, 0.0, 0.25], h, t, 0.5,
        ),
        "f32-noncontig": (
            with_layout(torch.randn(3, 2, 3), "permuted"), with_layout(torch.randn(3, 3, 2, 3), "strided"),
            [0.5, 0.25, -1.0], h, t, 1.0,
        ),
        "f64-no-coeffs": (g(torch.randn(3, 1, dtype=F64)), g(torch.randn(2, 3, 1, dtype=F64)), [], h, t, 0.0),
    }
    return [pytest.param(args, id=name) for name, args in cases.items()]


@pytest.mark.parametrize("args", opcheck_stage_cases())
def test_opcheck_batch_stage(args: tuple) -> None:
    # Schema, fake impl vs kernel (shapes, strides, dtypes), the registered autograd and aot_dispatch.
    results = torch.library.opcheck(kernel("batch_stage"), args)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_batch_step(dtype: torch.dtype) -> None:
    # batch_step has no registered autograd formula (RecordingOps carries it), so its inputs do
    # not require grad here; every opcheck sub-test applies to a mutable op with these inputs
    # (test_schema checks that only the Tensor(a!) arguments are mutated). Each sub-test runs on
    # the same buffers, so later runs see stopped samples: still valid inputs.
    args, _ = build_step(StepCase(dtype, 5, (3,), 3, "bosh3", "element", "pid", True, 13, nan_prob=0.0))
    results = torch.library.opcheck(kernel("batch_step"), tuple(args[name] for name in STEP_ARGS))
    assert set(results.values()) == {"SUCCESS"}, results
