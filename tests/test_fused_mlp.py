"""Tests of the fused MLP solve (flashode.fused_mlp; ops mlp_solve and mlp_solve_backward in
csrc/common/mlp_solve_args.h and csrc/cpu/mlp_solve_kernels.cpp).

The CPU kernel is checked against the pure-PyTorch reference (_reference.mlp_solve) on random
networks (every activation, widths, depths, time input, bias), batches that leave ragged tiles,
per-sample spans in both directions, every output-time and tolerance layout, adaptive and
fixed-grid methods; then against the generic paths it replaces (solve_ivp, and odeint for the
fixed grids): outputs, per-sample steps and statuses, and gradients against backpropagation
through them; thread-count independence, non-finite samples, gradcheck, input validation and
opcheck.

Exactness. The kernel evaluates the network with its own summation order, so its values differ
from torch's by rounding, and an adaptive solve amplifies that through the error estimate (a
cancelling sum): step sizes differ relatively by ~1e-9 at rtol 1e-7 in float64. Accept/reject
decisions flip only where they depend on rounding noise: with the integral controller in float64
and smooth activations they do not, and the step counts are compared exactly there (relu's kinks and the PID
controller's use of a previous, possibly noise-level, error ratio can move a step; float32 error
estimates are noise-level at these tolerances). Elsewhere outputs are compared to the solve's
tolerance.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import flashode
import pytest
import torch
from flashode import _ops, _reference
from flashode.batch import Status, make_controller
from flashode.fused_mlp import ACTIVATIONS, MLPField, _tableau_args, mlp_spec, mlp_spec_reason, solve_mlp
from flashode.tableaus import ADAPTIVE, FIXED
from torch import nn

F32, F64 = torch.float32, torch.float64
STAT_NAMES = ("n_f_evals", "n_steps", "n_accepted", "n_rejected")
SMOOTH = ("tanh", "softplus", "silu", "elu", "sigmoid")


def kernel(name: str) -> Any:
    """The registered op itself, so a comparison can never silently fall back to the reference."""
    return getattr(torch.ops.flashode, name).default


def test_kernels_are_loaded() -> None:
    assert _ops.has_kernel("mlp_solve", "cpu") and _ops.has_kernel("mlp_solve_backward", "cpu"), _ops.load_errors
    assert _ops.mlp_path_for("cpu") == "CPU kernel"


# ----------------------------------------------------------------------------- op-level cases


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    batch: int
    dim: int
    hidden: int
    depth: int
    activation: str
    time_concat: bool
    bias: bool
    method: str
    controller: str = "integral"
    times: str = "shared"  # shared (T,), per_sample (B, T), no_start (t_eval[0] != t_start)
    direction: str = "up"  # up, down, mixed
    tol: str = "scalar"  # scalar, element, sample_element
    first_step: bool = False
    seed: int = 0

    @property
    def fixed(self) -> bool:
        return self.method in FIXED

    def widths(self) -> list[int]:
        return [self.dim + self.time_concat] + [self.hidden] * self.depth + [self.dim]

    def args(self, record: bool = True, max_steps: int = 2000) -> tuple:
        gen = torch.Generator().manual_seed(self.seed)
        widths = self.widths()
        parts = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            parts.append(torch.randn(fan_out * fan_in, generator=gen, dtype=F64) / math.sqrt(fan_in))
            if self.bias:
                parts.append(torch.randn(fan_out, generator=gen, dtype=F64) * 0.5)
        params = torch.cat(parts).to(self.dtype)
        b, d = self.batch, self.dim
        y0 = torch.randn(b, d, generator=gen, dtype=F64).to(self.dtype)
        t0 = torch.rand(b, generator=gen, dtype=F64) * 0.5
        span = 0.5 + torch.rand(b, generator=gen, dtype=F64)
        if self.direction == "down":
            span = -span
        elif self.direction == "mixed":
            span = torch.where(torch.arange(b) % 2 == 0, span, -span)
        t1 = t0 + span
        grid = torch.linspace(0, 1, 5, dtype=F64)
        if self.times == "shared":
            t0, t1 = torch.zeros(b, dtype=F64), torch.full((b,), 1.0 if self.direction != "down" else -1.0, dtype=F64)
            t_eval = grid * t1[0]
        else:
            t_eval = t0[:, None] + span[:, None] * grid
            if self.times == "no_start":
                t_eval = t_eval[:, 1:]
        loose = 1e-5 if self.dtype == F32 else 1e-7
        size = {"scalar": (), "element": (d,), "sample_element": (b, d)}[self.tol]
        rtol = torch.full(size, loose, dtype=self.dtype)
        atol = (torch.rand(size, generator=gen, dtype=F64) * 1e-7 + 1e-9).to(self.dtype)
        first = torch.full((b,), 0.01, dtype=F64) if self.first_step else torch.empty(0, dtype=F64)
        tab = FIXED[self.method] if self.fixed else ADAPTIVE[self.method]
        ctrl = make_controller(self.controller, tab.order, 0.9, 10.0, 0.2, None, None, None, 0.0, math.inf)
        return (
            y0, params, widths, ACTIVATIONS.index(self.activation), self.time_concat, self.bias, t_eval, t0, t1,
            rtol.reshape(-1) if self.tol != "scalar" else rtol, atol.reshape(-1) if self.tol != "scalar" else atol,
            first, *_tableau_args(tab, self.fixed), tab.order, ctrl.pack(True, len(tab.c) - 1), max_steps,
            0.05 if self.fixed else 0.0, record,
        )


def random_cases(count: int, seed: int, **fixed: Any) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        values = dict(
            dtype=rng.choice([F32, F64]), batch=rng.choice([1, 3, 8, 9, 16, 17, 33]), dim=rng.choice([1, 2, 3, 5]),
            hidden=rng.randint(1, 24), depth=rng.randint(0, 3), activation=rng.choice(ACTIVATIONS),
            time_concat=rng.random() < 0.5, bias=rng.random() < 0.75,
            method=rng.choice(["dopri5", "tsit5", "bosh3", "adaptive_heun"]),
            controller=rng.choice(["integral", "pid"]), times=rng.choice(["shared", "per_sample", "no_start"]),
            direction=rng.choice(["up", "down", "mixed"]), tol=rng.choice(["scalar", "element", "sample_element"]),
            first_step=rng.random() < 0.3, seed=seed * 1000 + i,
        )
        values.update(fixed)
        cases.append(Case(**values))
    return cases


def case_id(c: Case) -> str:
    return (f"{str(c.dtype)[6:]}-B{c.batch}-D{c.dim}-{c.hidden}x{c.depth}-{c.activation}{'-t' if c.time_concat else ''}"
            f"{'' if c.bias else '-nobias'}-{c.method}-{c.controller}-{c.times}-{c.direction}-{c.tol}"
            f"{'-first' if c.first_step else ''}-s{c.seed}")


def close_to_magnitude(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Same NaN pattern; elsewhere |actual - expected| <= rtol * (1 + |expected|)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN patterns differ"
    diff = (actual.double() - expected.double()).abs().nan_to_num(0.0)
    bound = rtol * (1 + expected.double().abs().nan_to_num(0.0))
    assert bool((diff <= bound).all()), f"{what}: max |diff| {diff.max().item():.3e} (bound {rtol:.0e} x magnitude)"


# Exact steps: float64, integral controller, smooth activations (see the module docstring).
EXACT_CASES = random_cases(24, 1, dtype=F64, controller="integral", activation=None)
EXACT_CASES = [
    Case(**{**c.__dict__, "activation": SMOOTH[i % len(SMOOTH)], "method": ("dopri5", "tsit5", "bosh3")[i % 3]})
    for i, c in enumerate(EXACT_CASES)
]


@pytest.mark.parametrize("case", EXACT_CASES, ids=case_id)
def test_op_matches_reference_steps(case: Case) -> None:
    args = case.args()
    k = kernel("mlp_solve")(*args)
    r = _reference.mlp_solve(*args)
    for i, name in ((1, "status"), (3, "stats"), (6, "ckpt_offsets"), (7, "out_step")):
        assert torch.equal(k[i], r[i]), name
    # The same steps, their sizes equal up to rounding amplified by the error estimate (~1e-9 here):
    # outputs at given times barely move, checkpoints move with their times.
    close_to_magnitude(k[0], r[0], 1e-9, "ys")
    close_to_magnitude(k[2], r[2], 1e-12, "t_final")
    close_to_magnitude(k[4], r[4], 1e-5, "ckpt_y")
    close_to_magnitude(k[5], r[5], 1e-5, "ckpt_t")
    assert k[5].shape[0] == int(k[3][:, 2].sum())  # a checkpoint per accepted step


@pytest.mark.parametrize("case", random_cases(24, 2), ids=case_id)
def test_op_matches_reference_to_tolerance(case: Case) -> None:
    args = case.args()
    k = kernel("mlp_solve")(*args)
    r = _reference.mlp_solve(*args)
    assert torch.equal(k[1], r[1]), "status"
    # Two solves of one problem at rtol 1e-5 (float32) / 1e-7 (float64), steps possibly different:
    # they differ by about their global errors.
    close_to_magnitude(k[0], r[0], 300 * float(args[9].max()), "ys")
    assert k[6][-1] == k[3][:, 2].sum() and r[6][-1] == r[3][:, 2].sum()


FIXED_CASES = [
    Case(dtype, batch, dim, 7, depth, act, tc, True, method, times=times, direction=direction, seed=seed)
    for seed, (dtype, batch, dim, depth, act, tc, method, times, direction) in enumerate([
        (F32, 17, 2, 2, "tanh", True, "rk4", "shared", "up"),
        (F64, 9, 3, 1, "relu", False, "euler", "per_sample", "mixed"),
        (F64, 5, 1, 3, "silu", True, "midpoint", "no_start", "down"),
        (F32, 33, 2, 1, "softplus", False, "heun3", "per_sample", "up"),
    ])
]


@pytest.mark.parametrize("case", FIXED_CASES, ids=case_id)
def test_op_matches_reference_fixed_grid(case: Case) -> None:
    args = case.args()
    k = kernel("mlp_solve")(*args)
    r = _reference.mlp_solve(*args)
    for i, name in ((1, "status"), (3, "stats"), (6, "ckpt_offsets"), (7, "out_step")):
        assert torch.equal(k[i], r[i]), name
    tol = 1e-5 if case.dtype == F32 else 1e-12
    close_to_magnitude(k[0], r[0], tol, "ys")
    close_to_magnitude(k[4], r[4], tol, "ckpt_y")
    assert torch.equal(k[5], r[5]) and torch.equal(k[2], r[2])  # the grid: the same float64 expressions


def test_record_false_keeps_no_checkpoints() -> None:
    case = EXACT_CASES[0]
    with_ckpt = kernel("mlp_solve")(*case.args(record=True))
    without = kernel("mlp_solve")(*case.args(record=False))
    for i in range(4):
        assert torch.equal(with_ckpt[i], without[i])
    assert without[4].shape[0] == 0 and without[5].shape[0] == 0 and not bool(without[6].any())


@pytest.mark.parametrize("dtype", [F32, F64])
def test_results_do_not_depend_on_thread_count(dtype: torch.dtype) -> None:
    # 300 samples: ragged tiles, several backward pieces (each with its own gradient buffer)
    case = Case(dtype, 300, 2, 16, 2, "tanh", True, True, "dopri5", times="per_sample", direction="mixed", seed=3)
    args = case.args()
    grad_ys = torch.randn(case.batch, 5, 2, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = kernel("mlp_solve")(*args)
            back = kernel("mlp_solve_backward")(*backward_args(args, out, grad_ys))
            results.append((*out, *back))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


_LEVEL_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_fused_mlp import Case, backward_args, kernel
outs = []
for dtype in (torch.float32, torch.float64):
    for activation in ("softplus", "tanh"):
        case = Case(dtype, 21, 2, 12, 2, activation, True, True, "tsit5", times="per_sample", seed=5)
        args = case.args()
        out = kernel("mlp_solve")(*args)
        grad_ys = torch.ones_like(out[0])
        outs.append([*out, *kernel("mlp_solve_backward")(*backward_args(args, out, grad_ys))])
torch.save(outs, sys.argv[1])
"""


def test_simd_levels(tmp_path: Any) -> None:
    # The kernels run the widest vector level the CPU has; FLASHODE_MLP_SIMD lowers it. AVX2 and
    # AVX-512 compute every lane with the same operations (fused multiply-adds included) in the same
    # order: the same bits. The base level (SSE2) has no FMA, so it differs by rounding only.
    import os
    import subprocess
    import sys

    script = tmp_path / "levels.py"
    script.write_text(_LEVEL_SCRIPT.format(tests=os.path.dirname(__file__)))
    results = []
    for level in ("base", "avx2", "avx512"):
        out = tmp_path / f"{level}.pt"
        env = {**os.environ, "FLASHODE_MLP_SIMD": level, "PYTHONPATH": os.pathsep.join(sys.path)}
        run = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results.append(torch.load(out))
    base, avx2, avx512 = results
    for case_avx2, case_avx512 in zip(avx2, avx512):
        for a, b in zip(case_avx2, case_avx512):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    for case_base, case_avx512 in zip(base, avx512):  # the outputs and the gradients
        tol = 1e-4 if case_base[0].dtype == F32 else 1e-10
        for i, what in ((0, "ys"), (8, "grad_y0"), (9, "grad_params")):
            close_to_magnitude(case_base[i], case_avx512[i], tol, what)


def backward_args(args: tuple, out: tuple, grad_ys: torch.Tensor) -> tuple:
    a, b, _b_error, c, poly = args[12:17]
    return (grad_ys, args[1], *args[2:7], *out[4:8], a, b, c, poly, args[20])


# adaptive_heun: the carried first stage is not f(y1), so its cotangent must flow to the previous step
@pytest.mark.parametrize("case", EXACT_CASES[:8] + FIXED_CASES[:2] + [
    Case(F64, 11, 2, 6, 2, "sigmoid", True, True, "adaptive_heun", times="per_sample", seed=7),
], ids=case_id)
def test_backward_op_matches_reference(case: Case) -> None:
    args = case.args()
    out = kernel("mlp_solve")(*args)
    grad_ys = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(case.dtype)
    bargs = backward_args(args, out, grad_ys)
    gy, gp = kernel("mlp_solve_backward")(*bargs)
    ry, rp = _reference.mlp_solve_backward(*bargs)
    tol = 1e-4 if case.dtype == F32 else 1e-10
    close_to_magnitude(gy, ry, tol, "grad_y0")
    close_to_magnitude(gp, rp, tol * max(1.0, float(rp.abs().max())), "grad_params")


# ----------------------------------------------------------------------------- against the generic paths


def make_field(dtype: torch.dtype, activation: str = "tanh", time: str = "none", hidden: int = 32, depth: int = 2,
               seed: int = 0, dim: int = 2) -> MLPField:
    torch.manual_seed(seed)
    return MLPField(dim, hidden, depth, activation, time).to(dtype)


def stats_of(sol: flashode.Solution) -> torch.Tensor:
    return torch.stack([sol.stats[name] for name in STAT_NAMES], 1)


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
@pytest.mark.parametrize("time", ["none", "concat"])
def test_matches_solve_ivp_float64(method: str, time: str) -> None:
    field = make_field(F64, time=time)
    gen = torch.Generator().manual_seed(1)
    y0 = torch.randn(21, 2, generator=gen, dtype=F64)
    t_eval = torch.linspace(0, 1.5, 7, dtype=F64)
    kw = dict(method=method, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        fused = solve_mlp(field, y0, t_eval, **kw)
        generic = flashode.solve_ivp(field, y0, t_eval, **kw)
    assert torch.equal(fused.status, generic.status)
    assert torch.equal(stats_of(fused), stats_of(generic))
    torch.testing.assert_close(fused.t_final, generic.t_final, rtol=0, atol=0)
    torch.testing.assert_close(fused.ys, generic.ys, rtol=1e-10, atol=1e-11)
    assert fused.loop_reads == 0 and torch.equal(fused.ts, generic.ts)


def test_matches_solve_ivp_float32() -> None:
    field = make_field(F32, hidden=64)
    y0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(2))
    t_eval = torch.linspace(0, 1, 10)
    with torch.no_grad():
        fused = solve_mlp(field, y0, t_eval, rtol=1e-6, atol=1e-8)
        generic = flashode.solve_ivp(field, y0, t_eval, rtol=1e-6, atol=1e-8)
    assert bool(fused.success.all()) and bool(generic.success.all())
    torch.testing.assert_close(fused.ys, generic.ys, rtol=1e-5, atol=1e-6)
    # float32 error estimates are near rounding noise here: steps may differ by a rare rejection
    assert (stats_of(fused) - stats_of(generic)).abs().max() <= 2 * 6


def test_matches_solve_ivp_options() -> None:
    """Per-sample spans and output times in both directions, an output time not at the start,
    first_step, PID control, clip_to_end=False, dt_max, and the statuses max_steps and dt_min give."""
    field = make_field(F64, activation="softplus", time="concat", hidden=16)
    gen = torch.Generator().manual_seed(3)
    b = 12
    y0 = torch.randn(b, 2, generator=gen, dtype=F64)
    t0 = torch.rand(b, generator=gen, dtype=F64)
    span = torch.where(torch.arange(b) % 3 == 0, -1.0, 1.0) * (0.5 + torch.rand(b, generator=gen, dtype=F64))
    t_eval = t0[:, None] + span[:, None] * torch.linspace(0.1, 1, 4, dtype=F64)
    variants = [
        dict(t_start=t0, t_end=t0 + span),
        dict(t_start=t0, t_end=t0 + span, first_step=0.02, dt_max=0.3, clip_to_end=False),
        dict(t_start=t0, t_end=t0 + span, controller="pid", pcoeff=0.2, icoeff=0.5),
        dict(t_start=t0, t_end=t0 + span, max_steps=4),
        dict(t_start=t0, t_end=t0 + span, dt_min=0.05, first_step=0.01),
    ]
    for kw in variants:
        with torch.no_grad():
            fused = solve_mlp(field, y0, t_eval, rtol=1e-7, atol=1e-9, **kw)
            generic = flashode.solve_ivp(field, y0, t_eval, rtol=1e-7, atol=1e-9, **kw)
        assert torch.equal(fused.status, generic.status), kw
        assert torch.equal(stats_of(fused), stats_of(generic)), kw
        torch.testing.assert_close(fused.t_final, generic.t_final, rtol=1e-15, atol=0)
        torch.testing.assert_close(fused.ys, generic.ys, rtol=1e-9, atol=1e-10, equal_nan=True)
    assert {int(s) for s in fused.status} <= {int(Status.SUCCESS), int(Status.DT_UNDERFLOW)}


def test_empty_span_and_outputs_at_the_start() -> None:
    field = make_field(F64, hidden=8)
    y0 = torch.randn(3, 2, dtype=F64)
    with torch.no_grad():
        fused = solve_mlp(field, y0, torch.zeros(1, dtype=F64))
        generic = flashode.solve_ivp(field, y0, torch.zeros(1, dtype=F64))
    assert bool(fused.success.all())
    assert torch.equal(stats_of(fused), stats_of(generic)) and torch.equal(fused.ys[:, 0], y0)


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_fixed_grid_matches_odeint(method: str) -> None:
    field = make_field(F64, time="concat", hidden=16)
    y0 = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.0], dtype=F64)
    with torch.no_grad():
        fused = solve_mlp(field, y0, t, method=method, step_size=0.06)
        generic = flashode.odeint(field, y0, t, method=method, options=dict(step_size=0.06))
    torch.testing.assert_close(fused.ys, generic.transpose(0, 1), rtol=1e-13, atol=1e-14)
    steps = math.ceil(1.0 / 0.06 + 1) - 1
    assert bool((fused.stats["n_steps"] == steps).all()) and bool(fused.success.all())
    assert bool((fused.stats["n_f_evals"] == steps * len(FIXED[method].c)).all())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def grads(sol_ys: torch.Tensor, w: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(torch.where(sol_ys.isfinite(), sol_ys * w, 0.0).sum(), inputs)


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_solve_ivp_backprop(method: str, activation: str) -> None:
    time = "concat" if ACTIVATIONS.index(activation) % 2 else "none"
    field = make_field(F64, activation, time, hidden=16, seed=ACTIVATIONS.index(activation))
    gen = torch.Generator().manual_seed(5)
    y0 = torch.randn(13, 2, generator=gen, dtype=F64).requires_grad_()
    t_eval = torch.linspace(0, 1, 5, dtype=F64)
    w = torch.randn(13, 5, 2, generator=gen, dtype=F64)
    inputs = [y0, *field.parameters()]
    kw = dict(method=method, rtol=1e-6, atol=1e-8)
    fused = solve_mlp(field, y0, t_eval, **kw)
    generic = flashode.solve_ivp(field, y0, t_eval, **kw)
    assert torch.equal(stats_of(fused), stats_of(generic)), "the same steps (the premise of the comparison)"
    for got, want in zip(grads(fused.ys, w, inputs), grads(generic.ys, w, inputs)):
        assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_fixed_grid_gradients_match_odeint_backprop(method: str) -> None:
    field = make_field(F64, "silu", "concat", hidden=8)
    y0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    t = torch.linspace(0, 0.9, 4, dtype=F64)
    w = torch.randn(5, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    inputs = [y0, *field.parameters()]
    fused = solve_mlp(field, y0, t, method=method, step_size=0.1)
    generic = flashode.odeint(field, y0, t, method=method, options=dict(step_size=0.1)).transpose(0, 1)
    for got, want in zip(grads(fused.ys, w, inputs), grads(generic, w, inputs)):
        assert relative_error(got, want) < 1e-10


def test_gradcheck_fixed_grid() -> None:
    field = make_field(F64, "tanh", "concat", hidden=3, depth=1)
    spec = mlp_spec(field)
    y0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    params = spec.params().detach().requires_grad_()
    args = _op_args_for(spec, y0, torch.tensor([0.0, 0.3, 0.7], dtype=F64), "rk4", step_size=0.25)
    assert torch.autograd.gradcheck(lambda y, p: kernel("mlp_solve")(y, p, *args)[0], (y0, params))


def test_gradcheck_adaptive_with_input_independent_steps() -> None:
    # With a first step and a tolerance so loose that every proposal hits ifactor, the steps do not
    # depend on y0 or the parameters, so finite differences see only the differentiated part.
    field = make_field(F64, "elu", "none", hidden=3, depth=1)
    spec = mlp_spec(field)
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    params = spec.params().detach().requires_grad_()
    args = _op_args_for(spec, y0, torch.tensor([0.0, 0.05, 0.4], dtype=F64), "dopri5", rtol=1e3, atol=1e3,
                        first_step=0.01)
    out = kernel("mlp_solve")(y0.detach(), params.detach(), *args)
    assert int(out[3][:, 1].min()) >= 2  # several steps, clipped at the end
    assert torch.autograd.gradcheck(lambda y, p: kernel("mlp_solve")(y, p, *args)[0], (y0, params))


def _op_args_for(spec: Any, y0: torch.Tensor, t_eval: torch.Tensor, method: str, rtol: float = 1e-6,
                 atol: float = 1e-8, first_step: float | None = None, step_size: float | None = None) -> tuple:
    """mlp_solve's arguments after (y0, params), with record=True."""
    fixed = method in FIXED
    tab = FIXED[method] if fixed else ADAPTIVE[method]
    b = y0.shape[0]
    first = torch.full((b,), first_step, dtype=F64) if first_step else torch.empty(0, dtype=F64)
    ctrl = make_controller("integral", tab.order, 0.9, 10.0, 0.2, None, None, None, 0.0, math.inf)
    return (
        spec.widths, ACTIVATIONS.index(spec.activation), spec.time_concat, spec.bias, t_eval,
        torch.full((b,), float(t_eval[0]), dtype=F64), torch.full((b,), float(t_eval[-1]), dtype=F64),
        torch.tensor(rtol, dtype=y0.dtype), torch.tensor(atol, dtype=y0.dtype), first, *_tableau_args(tab, fixed),
        tab.order, ctrl.pack(True, len(tab.c) - 1), 1000, float(step_size or 0.0), True,
    )


def test_registered_autograd_matches_eager_path() -> None:
    field = make_field(F64, "sigmoid", "concat", hidden=8)
    spec = mlp_spec(field)
    y0 = torch.randn(6, 2, dtype=F64, requires_grad=True)
    t_eval = torch.linspace(0, 1, 4, dtype=F64)
    args = _op_args_for(spec, y0, t_eval, "tsit5")
    params = spec.params()
    ys = kernel("mlp_solve")(y0, params, *args)[0]
    w = torch.randn_like(ys)
    inputs = [y0, *field.parameters()]
    registered = grads(ys, w, inputs)
    eager = grads(solve_mlp(field, y0, t_eval, method="tsit5", rtol=1e-6, atol=1e-8).ys, w, inputs)
    for a, b in zip(registered, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    record_off = kernel("mlp_solve")(y0, spec.params(), *args[:-1], False)[0]
    with pytest.raises(RuntimeError, match="record=False"):
        record_off.sum().backward()


def test_reference_path_matches_kernel_path() -> None:
    field = make_field(F64, "tanh", "concat", hidden=8)
    y0 = torch.randn(9, 2, dtype=F64, requires_grad=True)
    t_eval = torch.linspace(0, 1, 4, dtype=F64)
    w = torch.randn(9, 4, 2, dtype=F64)
    inputs = [y0, *field.parameters()]
    sol = solve_mlp(field, y0, t_eval, rtol=1e-6, atol=1e-8)
    with _ops.reference_path():
        ref = solve_mlp(field, y0, t_eval, rtol=1e-6, atol=1e-8)
        ref_grads = grads(ref.ys, w, inputs)
    assert torch.equal(stats_of(sol), stats_of(ref))
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-13)
    for a, b in zip(grads(sol.ys, w, inputs), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- non-finite samples


def test_non_finite_start_is_isolated() -> None:
    field = make_field(F64, hidden=8)
    y0 = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    y0[2, 1] = math.nan
    keep = torch.tensor([0, 1, 3, 4, 5])
    t_eval = torch.linspace(0, 1, 4, dtype=F64)
    y = y0.clone().requires_grad_()
    sol = solve_mlp(field, y, t_eval)
    alone = solve_mlp(field, y0[keep], t_eval)
    assert sol.status.tolist() == [0, 0, int(Status.NON_FINITE), 0, 0, 0]
    assert bool(sol.ys[2, 1:].isnan().all()) and torch.equal(sol.ys[keep], alone.ys)
    (g,) = torch.autograd.grad(sol.ys[keep].sum(), [y])
    assert bool(g.isfinite().all()) and not bool(g[2].any())


def test_sample_blowing_up_mid_solve_is_isolated() -> None:
    # y' = 10 y in float32: the third sample approaches overflow, its steps shrink, and it stops
    # where solve_ivp stops it (max_steps); the others are unaffected, values and parameter
    # gradients alike.
    field = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        field[0].weight.fill_(10.0)
    y0 = torch.tensor([[1.0], [2.0], [3e37], [-1.5]])
    t_eval = torch.linspace(0, 1, 3)
    kw = dict(rtol=1e-5, atol=1e-7, max_steps=500)
    sol = solve_mlp(field, y0, t_eval, **kw)
    keep = torch.tensor([0, 1, 3])
    alone = solve_mlp(field, y0[keep], t_eval, **kw)
    with torch.no_grad():
        generic = flashode.solve_ivp(lambda t, y: field(y), y0, t_eval, **kw)
    assert torch.equal(sol.status, generic.status) and torch.equal(stats_of(sol), stats_of(generic))
    assert int(sol.status[2]) == int(Status.MAX_STEPS_REACHED) and bool(sol.success[keep].all())
    assert torch.equal(sol.ys[keep], alone.ys) and bool(sol.ys[2, 1:].isnan().all())
    (g_all,) = torch.autograd.grad(sol.ys[keep].sum(), [field[0].weight])
    (g_alone,) = torch.autograd.grad(alone.ys.sum(), [field[0].weight])
    assert bool(g_all.isfinite().all())
    torch.testing.assert_close(g_all, g_alone, rtol=1e-6, atol=0)


def test_sample_meeting_nan_stops_non_finite() -> None:
    # A float32 field that is NaN from t ~ 0.53 on (an overflow to inf - inf in its last layer) and
    # 0.5 y before: the sample whose span crosses it stops NON_FINITE there (its steps shrink to
    # nothing against the NaN), as in solve_ivp; the others are exact exponentials.
    field = MLPField(1, 3, 2, "relu", "concat")
    with torch.no_grad():
        field.layers[0].weight.copy_(torch.tensor([[0.0, 1e20], [0.0, 1e20], [1.0, 0.0]]))
        field.layers[0].bias.copy_(torch.tensor([-0.5e20, -0.5e20, 0.0]))
        field.layers[1].weight.copy_(torch.tensor([[1e20, 0, 0], [0, 1e20, 0], [0, 0, 1.0]]))
        field.layers[1].bias.zero_()
        field.layers[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.5]]))
        field.layers[2].bias.zero_()
    y0 = torch.tensor([[1.0], [2.0], [0.5]], requires_grad=True)
    t_end = torch.tensor([0.4, 0.45, 1.0], dtype=F64)
    t_eval = t_end[:, None] * torch.linspace(0, 1, 3, dtype=F64)
    kw = dict(t_end=t_end, rtol=1e-5, atol=1e-7)
    sol = solve_mlp(field, y0, t_eval, **kw)
    with torch.no_grad():
        generic = flashode.solve_ivp(field, y0, t_eval, **kw)
    assert sol.status.tolist() == generic.status.tolist() == [0, 0, int(Status.NON_FINITE)]
    torch.testing.assert_close(sol.t_final, generic.t_final, rtol=1e-3, atol=0)
    assert 0.5 < float(sol.t_final[2]) < 0.6 and bool(sol.ys[2, 2].isnan().all())
    exact = torch.exp(0.5 * t_eval[:2])[..., None] * y0[:2, None].detach().double()
    torch.testing.assert_close(sol.ys[:2].double(), exact, rtol=1e-4, atol=0)
    (g,) = torch.autograd.grad(sol.ys[:2].sum(), [field.layers[2].weight])
    assert bool(g.isfinite().all()) and bool(g.any())


# ----------------------------------------------------------------------------- the module and its spec


def test_mlp_field_forward_and_spec() -> None:
    field = MLPField(3, 5, 2, "elu", "concat", bias=False)
    assert len(field.layers) == 3 and [m.in_features for m in field.layers] == [4, 5, 5]
    assert all(m.bias is None for m in field.layers)
    y = torch.randn(4, 3)
    t = torch.rand(4)
    manual = torch.cat([y, t[:, None]], 1)
    for i, layer in enumerate(field.layers):
        manual = layer(manual)
        manual = nn.functional.elu(manual) if i < 2 else manual
    torch.testing.assert_close(field(t, y), manual)
    torch.testing.assert_close(field(0.5, y), field(torch.full((4,), 0.5), y))  # scalar t broadcast
    spec = mlp_spec(field)
    assert spec is not None and spec.widths == [4, 5, 5, 3] and spec.time_concat and not spec.bias
    torch.testing.assert_close(spec(t, y), manual)
    # the field works with every solver
    out = flashode.odeint(field, y, torch.linspace(0, 1, 3), method="rk4", options=dict(step_size=0.1))
    assert out.shape == (3, 4, 3)


def test_sequential_is_recognised_and_solved() -> None:
    torch.manual_seed(9)
    seq = nn.Sequential(nn.Linear(2, 12), nn.Softplus(), nn.Linear(12, 12), nn.Softplus(), nn.Linear(12, 2)).double()
    spec = mlp_spec(seq)
    assert spec is not None and spec.activation == "softplus" and not spec.time_concat and spec.widths == [2, 12, 12, 2]
    y0 = torch.randn(5, 2, dtype=F64)
    t_eval = torch.linspace(0, 1, 3, dtype=F64)
    with torch.no_grad():
        fused = solve_mlp(seq, y0, t_eval)
        generic = flashode.solve_ivp(lambda t, y: seq(y), y0, t_eval)
    torch.testing.assert_close(fused.ys, generic.ys, rtol=1e-12, atol=1e-13)
    assert mlp_spec(nn.Sequential(nn.Linear(3, 3))) is not None  # a linear field


class _MyLinear(nn.Linear):
    pass


def _replaced_layer() -> nn.Module:
    field = MLPField(2, 4, 1)
    field.layers[1] = _MyLinear(4, 2)
    return field


def _hooked() -> nn.Module:
    seq = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    seq[1].register_forward_hook(lambda *a: None)
    return seq


@pytest.mark.parametrize(("module", "match"), [
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Dropout(), nn.Linear(4, 2)), "unsupported activation"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Softplus(beta=2.0), nn.Linear(4, 2)), "unsupported activation"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.ELU(alpha=0.5), nn.Linear(4, 2)), "unsupported activation"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "differ"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Tanh()), "start and end with nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(2, 3)), "input and output must match"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(5, 2)), "do not chain"),
    (lambda: nn.Sequential(nn.Linear(2, 4, bias=False), nn.Tanh(), nn.Linear(4, 2)), "all or none"),
    (lambda: nn.Sequential(_MyLinear(2, 2)), "must be an nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(2, 1100), nn.Tanh(), nn.Linear(1100, 2)), "width at most 1024"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).half(), "float32 and float64"),
    (_hooked, "hooks"),
    (lambda: nn.Linear(2, 2), "neither"),
    (lambda: _replaced_layer(), "were replaced"),
    (lambda: (lambda t, y: y), "neither"),
])
def test_unsupported_fields_have_reasons(module: Any, match: str) -> None:
    m = module()
    assert mlp_spec(m) is None
    assert match in mlp_spec_reason(m)
    with pytest.raises(ValueError, match="not a supported MLP"):
        solve_mlp(m, torch.zeros(1, 2), torch.linspace(0, 1, 2))


def test_solve_mlp_input_errors() -> None:
    field = make_field(F32, hidden=4)
    t = torch.linspace(0, 1, 3)
    y0 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        solve_mlp(field, torch.zeros(3, 3), t)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        solve_mlp(field, torch.zeros(2), t)
    with pytest.raises(ValueError, match="share dtype and device"):
        solve_mlp(field, y0.double(), t)
    with pytest.raises(ValueError, match="Invalid method"):
        solve_mlp(field, y0, t, method="dopri6")
    with pytest.raises(ValueError, match="needs a positive step_size"):
        solve_mlp(field, y0, t, method="rk4")
    with pytest.raises(ValueError, match="step_size applies"):
        solve_mlp(field, y0, t, step_size=0.1)
    with pytest.raises(ValueError, match="first_step applies"):
        solve_mlp(field, y0, t, method="euler", step_size=0.1, first_step=0.1)
    with pytest.raises(ValueError, match="first_step must be positive"):
        solve_mlp(field, y0, t, first_step=0.0)
    with pytest.raises(ValueError, match="strictly monotone"):
        solve_mlp(field, y0, torch.tensor([0.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="max_steps"):
        solve_mlp(field, y0, t, max_steps=0)


def test_inference_sees_parameter_updates() -> None:
    # Solves without a graph reuse a field's packed parameters until a parameter changes.
    field = make_field(F64, hidden=6)
    y0 = torch.randn(4, 2, dtype=F64)
    t_eval = torch.linspace(0, 1, 3, dtype=F64)
    with torch.no_grad():
        before = solve_mlp(field, y0, t_eval).ys
        assert torch.equal(solve_mlp(field, y0, t_eval).ys, before)
        field.layers[1].weight.mul_(1.5)
        after = solve_mlp(field, y0, t_eval).ys
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, flashode.solve_ivp(field, y0, t_eval).ys, rtol=1e-10, atol=1e-11)
        field.layers[0].weight = nn.Parameter(field.layers[0].weight * 0.5)  # a new tensor
        torch.testing.assert_close(solve_mlp(field, y0, t_eval).ys, flashode.solve_ivp(field, y0, t_eval).ys,
                                   rtol=1e-10, atol=1e-11)


def test_non_contiguous_parameters_and_inputs() -> None:
    field = make_field(F64, "tanh", "concat", hidden=6)
    y0 = torch.randn(5, 2, dtype=F64)
    t_eval = torch.linspace(0, 1, 3, dtype=F64)
    with torch.no_grad():
        want = solve_mlp(field, y0, t_eval).ys
        for layer in field.layers:  # the same values, stored transposed
            layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())
        assert not field.layers[1].weight.is_contiguous()
        got = solve_mlp(field, y0.t().contiguous().t(), t_eval).ys
    assert torch.equal(got, want)
    spec = mlp_spec(field)
    args = _op_args_for(spec, y0, t_eval, "dopri5")
    wide = torch.zeros(2 * spec.params().numel(), dtype=F64)
    wide[::2] = spec.params().detach()
    out = kernel("mlp_solve")(y0, wide[::2], *args)[0]
    assert torch.equal(out, kernel("mlp_solve")(y0, spec.params().detach(), *args)[0])


def op_error_cases() -> list:
    def over(**changes: Any) -> Any:
        def build() -> tuple:
            case = Case(F64, 3, 2, 4, 1, "tanh", False, True, "dopri5")
            args = list(case.args())
            names = ["y0", "params", "widths", "activation", "time_concat", "bias", "t_eval", "t_start", "t_end",
                     "rtol", "atol", "first_step", "a", "b", "b_error", "c", "poly", "order", "controller",
                     "max_steps", "step_size", "record"]
            values = dict(zip(names, args))
            for name, fn in changes.items():
                values[name] = fn(values)
            return tuple(values.values())
        return build

    return [
        pytest.param(over(y0=lambda v: v["y0"].half()), "float32 or float64", id="half"),
        pytest.param(over(y0=lambda v: v["y0"][0]), "y0 must be a \\(B, D\\) tensor", id="1d-state"),
        pytest.param(over(params=lambda v: v["params"][:-1]), "params must be a 1-d tensor", id="params-size"),
        pytest.param(over(params=lambda v: v["params"].float()), "params must have the state's", id="params-dtype"),
        pytest.param(over(widths=lambda v: [3, 4, 2]), "the first layer takes 3 inputs", id="widths-in"),
        pytest.param(over(widths=lambda v: [2, 4, 3]), "the last layer gives 3 outputs", id="widths-out"),
        pytest.param(over(widths=lambda v: [2, 2000, 2]), "layer widths must be in", id="too-wide"),
        pytest.param(over(widths=lambda v: [2]), "widths must list", id="no-layer"),
        pytest.param(over(activation=lambda v: 9), "unknown activation code", id="activation"),
        pytest.param(over(t_eval=lambda v: torch.zeros(5, 3, dtype=F64)), "t_eval has 5 rows", id="t_eval-rows"),
        pytest.param(over(t_eval=lambda v: v["t_eval"].float()), "t_eval must be a float64", id="t_eval-dtype"),
        pytest.param(over(t_start=lambda v: torch.zeros(2, dtype=F64)), "t_start must be a contiguous", id="t_start"),
        pytest.param(over(rtol=lambda v: torch.zeros(5, dtype=F64)), "rtol and atol must have 1, D or B", id="rtol"),
        pytest.param(over(first_step=lambda v: torch.ones(2, dtype=F64)), "first_step must be", id="first-step"),
        pytest.param(over(a=lambda v: v["a"][:-1]), "a must hold the", id="tableau-a"),
        pytest.param(over(b_error=lambda v: []), "needs one error weight per stage", id="b_error"),
        pytest.param(over(poly=lambda v: v["poly"][:-1]), "poly must hold", id="poly"),
        pytest.param(over(controller=lambda v: v["controller"][:-1]), "controller must hold", id="controller"),
        pytest.param(over(step_size=lambda v: -1.0), "step_size must be 0", id="step-size"),
    ]


@pytest.mark.parametrize(("build", "match"), op_error_cases())
def test_op_rejects_bad_inputs(build: Any, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        kernel("mlp_solve")(*build())


def test_backward_op_rejects_bad_checkpoints() -> None:
    case = EXACT_CASES[0]
    args = case.args()
    out = kernel("mlp_solve")(*args)
    bargs = list(backward_args(args, out, torch.zeros_like(out[0])))
    bad = list(bargs)
    bad[7] = out[4][:, :1]
    with pytest.raises(RuntimeError, match="ckpt_y must be a \\(K, 2, D\\)"):
        kernel("mlp_solve_backward")(*bad)
    bad = list(bargs)
    bad[9] = out[6][:-1]
    with pytest.raises(RuntimeError, match="ckpt_offsets must be"):
        kernel("mlp_solve_backward")(*bad)


# ----------------------------------------------------------------------------- registrations


@pytest.mark.parametrize("dtype", [F32, F64])
def test_opcheck_mlp_solve(dtype: torch.dtype) -> None:
    # Schema, fake impl vs kernel (including the data-dependent number of checkpoints), the
    # registered autograd formula and aot_dispatch.
    args = list(Case(dtype, 5, 2, 4, 1, "tanh", True, True, "dopri5", times="per_sample", seed=11).args())
    args[0] = args[0].requires_grad_()
    args[1] = args[1].requires_grad_()
    results = torch.library.opcheck(kernel("mlp_solve"), tuple(args))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("dtype", [F32, F64])
def test_opcheck_mlp_solve_backward(dtype: torch.dtype) -> None:
    args = Case(dtype, 5, 2, 4, 1, "silu", True, True, "tsit5", seed=12).args()
    out = kernel("mlp_solve")(*args)
    bargs = backward_args(args, out, torch.randn_like(out[0]))
    results = torch.library.opcheck(kernel("mlp_solve_backward"), bargs)
    assert set(results.values()) == {"SUCCESS"}, results
