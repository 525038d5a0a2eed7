"""flashode.odeint reproduces torchdiffeq.odeint: same steps, same outputs, same errors.

flashode keeps torchdiffeq's stage structure, controller and interpolant, so for every method it
shares with torchdiffeq 0.2.5 the results agree to rounding (the accept/reject sequence is the same).
dopri8 is compared loosely: its error estimate is ~1e-7 of the tolerance on smooth problems, pure
rounding noise, so tiny differences in summation order legitimately change its step sizes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import flashode

torchdiffeq = pytest.importorskip("torchdiffeq")

SHARED = ("dopri5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3", "rk4")
FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4")


class Oscillator(torch.nn.Module):
    """Damped, forced, nonlinear; t enters the field so time handling is exercised."""

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, -torch.sin(x) - 0.1 * v + 0.3 * torch.cos(t)], dim=-1)


def _both(y0, t, **kwargs):
    f = Oscillator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flashode.odeint(f, y0, t, **kwargs), torchdiffeq.odeint(f, y0, t, **kwargs)


@pytest.mark.parametrize("method", SHARED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_results_as_torchdiffeq(method, dtype):
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.5], [2.0, 1.0]], dtype=dtype)
    t = torch.linspace(0, 4, 9, dtype=dtype)
    opts = dict(step_size=0.05) if method in FIXED else None
    # float32 solves use tolerances well above float32 rounding, so that rounding differences in the
    # error estimate cannot flip an accept/reject decision.
    rtol, atol, tol = (1e-6, 1e-8, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6, 1e-5)
    ours, theirs = _both(y0, t, method=method, rtol=rtol, atol=atol, options=opts)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=tol, atol=tol), (ours - theirs).abs().max()


def test_dopri8_close_to_torchdiffeq():
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ours, theirs = _both(y0, torch.linspace(0, 4, 9, dtype=torch.float64), method="dopri8", rtol=1e-6, atol=1e-8)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4"])
def test_same_results_decreasing_time(method):
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([3.0, 2.5, 1.0, -0.5], dtype=torch.float64)
    opts = dict(step_size=0.1) if method == "rk4" else None
    ours, theirs = _both(y0, t, method=method, options=opts)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        dict(first_step=0.01),
        dict(max_step=0.1),
        dict(min_step=0.2),
        dict(safety=0.8, ifactor=4.0, dfactor=0.5),
        dict(step_t=torch.tensor([0.33, 1.7])),
        dict(jump_t=torch.tensor([0.5, 2.2])),
        dict(norm=lambda x: x.abs().max()),
    ],
    ids=lambda o: next(iter(o)),
)
def test_same_results_with_adaptive_options(options):
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ours, theirs = _both(y0, torch.linspace(0, 3, 5, dtype=torch.float64), method="dopri5", options=options)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [dict(step_size=0.07), dict(step_size=0.1, interp="cubic"), dict(step_size=0.1, perturb=True)])
def test_same_results_with_fixed_options(options):
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.123, 0.5, 1.0, 2.95], dtype=torch.float64)
    ours, theirs = _both(y0, t, method="rk4", options=options)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_grid_constructor_is_called_like_torchdiffeq():
    def grid(func, y0, t):
        return torch.linspace(t[0], t[-1], 17, dtype=t.dtype)

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ours, theirs = _both(y0, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), method="midpoint",
                         options=dict(grid_constructor=grid))
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_tuple_state_same_as_torchdiffeq():
    def f(t, ys):
        x, v = ys
        return v, -x

    y0 = (torch.tensor([1.0, 0.2], dtype=torch.float64), torch.tensor([[0.0], [0.5]], dtype=torch.float64))
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    ours = flashode.odeint(f, y0, t, rtol=(1e-6, 1e-7), atol=1e-8)
    theirs = torchdiffeq.odeint(f, y0, t, rtol=(1e-6, 1e-7), atol=1e-8)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_callbacks_called_like_torchdiffeq():
    class Logged(Oscillator):
        def __init__(self):
            super().__init__()
            self.log = []

        def callback_step(self, t0, y0, dt):
            self.log.append(("step", round(float(t0), 9)))

        def callback_accept_step(self, t0, y0, dt):
            self.log.append(("accept", round(float(t0), 9)))

        def callback_reject_step(self, t0, y0, dt):
            self.log.append(("reject", round(float(t0), 9)))

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    ours, theirs = Logged(), Logged()
    flashode.odeint(ours, y0, t, options=dict(first_step=1.0))  # forces rejections first
    torchdiffeq.odeint(theirs, y0, t, options=dict(first_step=1.0))
    assert ours.log == theirs.log and any(kind == "reject" for kind, _ in ours.log)


@pytest.mark.parametrize("method", ["rk4", "explicit_adams", "implicit_adams"])
def test_fixed_grid_callbacks_called_like_torchdiffeq(method):
    """Fixed-grid solvers call callback_step only (before each step), with the step's start."""

    class Logged(Oscillator):
        def __init__(self):
            super().__init__()
            self.log = []

        def callback_step(self, t0, y0, dt):
            self.log.append(("step", round(float(t0), 9), round(float(dt), 9), y0.clone()))

        def callback_accept_step(self, t0, y0, dt):
            self.log.append(("accept",))

        def callback_reject_step(self, t0, y0, dt):
            self.log.append(("reject",))

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 1.0], dtype=torch.float64)
    ours, theirs = Logged(), Logged()
    flashode.odeint(ours, y0, t, method=method, options=dict(step_size=0.25))
    torchdiffeq.odeint(theirs, y0, t, method=method, options=dict(step_size=0.25))
    assert len(ours.log) == len(theirs.log) == 4
    for a, b in zip(ours.log, theirs.log):
        assert a[:3] == b[:3] and torch.allclose(a[3], b[3], rtol=1e-12, atol=1e-12)
