"""Accuracy of every method against analytic / DOP853 references, convergence orders, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flashode
from problems import ADAPTIVE, FIXED, FIXED_ORDER, PROBLEMS


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_adaptive_methods_meet_tolerance(method, problem):
    p = PROBLEMS[problem]
    y0 = torch.tensor(p.y0)
    t = torch.tensor(p.t)
    rtol, atol = 1e-8, 1e-10
    out = flashode.odeint(p.func, y0, t, method=method, rtol=rtol, atol=atol)
    assert out.shape == (len(t), *y0.shape)
    assert torch.equal(out[0], y0)
    # Global error grows over the span; allow a generous multiple of the local tolerance.
    low_order = method in ("fehlberg2", "adaptive_heun")
    final_err = np.abs(out[-1].numpy() - p.reference[-1]).max()
    assert final_err < (2e-5 if low_order or method == "dopri8" else 2e-6), final_err
    # Outputs between steps use torchdiffeq's quartic interpolant: for bosh3, fehlberg2 and
    # adaptive_heun its mid-point value is only first-order accurate, and for dopri8 a quartic is
    # far below the method's order, so those interpolate less accurately than they step (exactly as
    # in torchdiffeq, whose results flashode reproduces; see test_torchdiffeq_parity.py).
    err = np.abs(out.numpy() - p.reference).max()
    assert err < (2e-6 if method in ("dopri5", "tsit5") else 2e-5), err


@pytest.mark.parametrize("method", ADAPTIVE)
def test_tighter_tolerance_is_more_accurate(method):
    p = PROBLEMS["forced_pendulum"]
    y0, t = torch.tensor(p.y0), torch.tensor(p.t)
    errors = []
    for tol in (1e-5, 1e-9):
        out = flashode.odeint(p.func, y0, t, method=method, rtol=tol, atol=tol)
        errors.append(np.abs(out.numpy() - p.reference).max())
    assert errors[1] < errors[0] / 20, errors


@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_convergence_order(method):
    p = PROBLEMS["forced_pendulum"]
    y0, t = torch.tensor(p.y0), torch.tensor(p.t)
    errors = []
    steps = (0.05, 0.025, 0.0125)
    for h in steps:
        out = flashode.odeint(p.func, y0, t, method=method, options=dict(step_size=h))
        errors.append(np.abs(out[-1].numpy() - p.reference[-1]).max())
    observed = math.log2(errors[1] / errors[2])
    assert abs(observed - FIXED_ORDER[method]) < 0.35, (errors, observed)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_on_output_grid_and_cubic_interp(method):
    p = PROBLEMS["linear"]
    y0 = torch.tensor(p.y0)
    t = torch.linspace(0, 3, 301, dtype=torch.float64)  # grid = t itself when no step_size
    out = flashode.odeint(p.func, y0, t, method=method)
    ref = torch.tensor(p.reference[-1])
    assert torch.allclose(out[-1], ref, atol={1: 0.05, 2: 2e-3, 3: 1e-5, 4: 1e-7}[FIXED_ORDER[method]])
    t_out = torch.tensor([0.0, 0.013, 0.5, 1.234, 3.0], dtype=torch.float64)
    lin = flashode.odeint(p.func, y0, t_out, method=method, options=dict(step_size=0.1))
    cub = flashode.odeint(p.func, y0, t_out, method=method, options=dict(step_size=0.1, interp="cubic"))
    assert lin.shape == cub.shape == (5, 2)
    # Grid points coincide for both interpolants (t=0.5 and 3.0 are on the grid).
    assert torch.allclose(lin[[0, 2, 4]], cub[[0, 2, 4]], rtol=0, atol=1e-14)


def test_tuple_state_matches_concatenated_state():
    def f_tuple(t, ys):
        x, v = ys
        return v, -x - 0.1 * v

    def f_flat(t, y):
        return torch.cat([y[2:], -y[:2] - 0.1 * y[2:]])

    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    v0 = torch.tensor([0.0, 0.2], dtype=torch.float64)
    t = torch.linspace(0, 2, 4, dtype=torch.float64)
    xs, vs = flashode.odeint(f_tuple, (x0, v0), t, rtol=1e-10, atol=1e-12)
    flat = flashode.odeint(f_flat, torch.cat([x0, v0]), t, rtol=1e-10, atol=1e-12)
    assert xs.shape == (4, 2) and vs.shape == (4, 2)
    assert torch.allclose(xs, flat[:, :2], atol=1e-8) and torch.allclose(vs, flat[:, 2:], atol=1e-8)


def test_tuple_state_with_tuple_tolerances():
    xs, vs = flashode.odeint(
        lambda t, y: (y[1], -y[0]),
        (torch.tensor([1.0]), torch.tensor([0.0])),
        torch.tensor([0.0, math.pi / 2]),
        rtol=(1e-7, 1e-5),
        atol=(1e-9, 1e-7),
    )
    assert abs(xs[-1].item()) < 1e-4 and abs(vs[-1].item() + 1) < 1e-4


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4"])
def test_decreasing_time_matches_backward_solution(method):
    p = PROBLEMS["linear"]
    y_end = torch.tensor(p.reference[-1])
    t_back = torch.tensor(p.t[::-1].copy())
    opts = dict(step_size=0.01) if method == "rk4" else None
    out = flashode.odeint(p.func, y_end, t_back, method=method, rtol=1e-10, atol=1e-12, options=opts)
    assert np.abs(out.numpy() - p.reference[::-1]).max() < 1e-6


def test_float32_state_and_time_tensor_dtype():
    seen = []

    def f(t, y):
        seen.append(t.dtype)
        return -y

    out = flashode.odeint(f, torch.ones(3), torch.tensor([0.0, 1.0]))
    assert out.dtype == torch.float32
    assert set(seen) == {torch.float32}
    assert torch.allclose(out[-1], torch.full((3,), math.exp(-1.0)), rtol=1e-5)


def test_per_element_tensor_tolerances():
    p = PROBLEMS["logistic"]
    y0 = torch.tensor(p.y0)
    rtol = torch.full_like(y0, 1e-9)
    out = flashode.odeint(p.func, y0, torch.tensor(p.t), rtol=rtol, atol=1e-11)
    assert np.abs(out.numpy() - p.reference).max() < 1e-7


def test_many_outputs_in_one_step_use_dense_output():
    # 200 outputs over a span the solver covers in a handful of steps.
    t = torch.linspace(0, 1, 200, dtype=torch.float64)
    out = flashode.odeint(lambda t, y: -y, torch.ones(2, dtype=torch.float64), t, rtol=1e-8, atol=1e-10)
    assert torch.allclose(out[:, 0], torch.exp(-t), atol=1e-7)


def test_single_time_point_returns_y0():
    y0 = torch.randn(3, 2)
    out = flashode.odeint(lambda t, y: y, y0, torch.tensor([0.5]))
    assert out.shape == (1, 3, 2) and torch.equal(out[0], y0)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_step_t_and_jump_t(method):
    # A right-hand side with a jump at t=1: jump_t makes the solver stop there and restart.
    def f(t, y):
        return torch.where(t < 1.0, torch.ones_like(y), -torch.ones_like(y))

    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = flashode.odeint(f, torch.zeros(1, dtype=torch.float64), t, method=method,
                          options=dict(jump_t=torch.tensor([1.0]), step_t=torch.tensor([0.5])))
    assert abs(out[-1].item()) < 1e-9


def test_min_max_first_step_options_are_respected():
    calls = []

    class Field(torch.nn.Module):
        def forward(self, t, y):
            calls.append(float(t))
            return -y

    flashode.odeint(Field(), torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                    options=dict(max_step=0.05, first_step=0.01))
    gaps = np.diff(sorted(set(calls)))
    assert gaps.max() <= 0.05 + 1e-12
