"""The Adams methods (explicit_adams, implicit_adams, fixed_adams) reproduce torchdiffeq 0.2.5:
same coefficients, same start-up, same corrector decisions, same outputs and evaluation counts."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import flashode
from flashode.solvers.adams import MAX_ORDER, adams_bashforth, adams_moulton

torchdiffeq = pytest.importorskip("torchdiffeq")
fixed_adams = pytest.importorskip("torchdiffeq._impl.fixed_adams")

METHODS = ("explicit_adams", "implicit_adams", "fixed_adams")
F64 = torch.float64
# A jump in the forcing at a point of the 0.07 grid: with perturb=True the steps ending there see
# the old value and the steps starting there the new one.
JUMP = 20 * 0.07


class Oscillator(torch.nn.Module):
    """Damped, forced (with a jump), nonlinear, with a parameter; counts its evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.damping = torch.nn.Parameter(torch.tensor(0.1, dtype=F64))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        x, v = y[..., 0], y[..., 1]
        forcing = 0.3 * torch.cos(t) + 0.5 * (t >= JUMP).to(y.dtype)
        return torch.stack([v, -torch.sin(x) - self.damping.to(y.dtype) * v + forcing], dim=-1)


def _both(y0, t, **kwargs):
    """(flashode result, torchdiffeq result, flashode evaluations, torchdiffeq evaluations)."""
    ours, theirs = Oscillator(), Oscillator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = flashode.odeint(ours, y0, t, **kwargs)
        b = torchdiffeq.odeint(theirs, y0, t, **kwargs)
    return a, b, ours.calls, theirs.calls


def _y0(dtype=F64):
    return torch.tensor([[1.0, 0.0], [0.3, -0.5], [2.0, 1.0]], dtype=dtype)


def _close(a, b, tol):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def test_coefficients_are_torchdiffeqs():
    # torchdiffeq tabulates up to 20 values; its order-1 Moulton entry (1/11, a typo for 1) is unused.
    for steps in range(1, 21):
        assert adams_bashforth(steps) == tuple(fixed_adams._BASHFORTH_DIVISOR[steps].tolist())
        if steps > 1:
            assert adams_moulton(steps) == tuple(fixed_adams._MOULTON_DIVISOR[steps].tolist())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("max_order", [2, 4, 7, 12])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
@pytest.mark.parametrize("perturb", [False, True])
def test_same_results_as_torchdiffeq(method, max_order, interp, perturb):
    if method == "explicit_adams" and max_order == 12:
        max_order = 8  # Adams–Bashforth of order 11 is unstable here: both blow up, rounding apart
    t = torch.linspace(0, 4, 9, dtype=F64)  # off the grid: outputs are interpolated
    opts = dict(step_size=0.07, max_order=max_order, interp=interp, perturb=perturb)
    ours, theirs, n_ours, n_theirs = _both(_y0(), t, method=method, rtol=1e-7, atol=1e-9, options=opts)
    _close(ours, theirs, 1e-12)
    assert n_ours == n_theirs


@pytest.mark.parametrize("method", METHODS)
def test_decreasing_time_and_output_grid(method):
    t = torch.tensor([3.0, 2.9, 2.7, 2.2, 1.9, 1.5, 1.4, 1.0, 0.5], dtype=F64)  # the grid is t itself
    ours, theirs, n_ours, n_theirs = _both(_y0(), t, method=method, rtol=1e-6, atol=1e-8)
    _close(ours, theirs, 1e-12)
    assert n_ours == n_theirs
    ours, theirs, _, _ = _both(_y0(), t, method=method, options=dict(step_size=0.1, interp="cubic"))
    _close(ours, theirs, 1e-12)


def test_grid_constructor_with_a_repeated_point():
    # A zero-length step at 0.5: the second f there is not added to the history (same time).
    def grid(func, y0, t):
        return torch.cat([torch.linspace(t[0], 0.5, 11, dtype=t.dtype), torch.linspace(0.5, t[-1], 31, dtype=t.dtype)])

    t = torch.tensor([0.0, 0.75, 2.0], dtype=F64)
    for method in METHODS:
        options = dict(grid_constructor=grid, max_order=8)
        ours, theirs, n_ours, n_theirs = _both(_y0(), t, method=method, options=options)
        _close(ours, theirs, 1e-12)
        assert n_ours == n_theirs


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_tuple_state_with_tuple_tolerances(method):
    def f(t, state):
        x, v = state
        return v, -torch.sin(x) - 0.2 * v

    y0 = (torch.tensor([1.0, 0.2], dtype=F64), torch.tensor([[0.0], [0.5]], dtype=F64).reshape(2))
    t = torch.linspace(0, 2, 5, dtype=F64)
    kwargs = dict(method=method, rtol=(1e-6, 1e-8), atol=(1e-9, 1e-7), options=dict(step_size=0.05, max_order=6))
    ours, theirs = flashode.odeint(f, y0, t, **kwargs), torchdiffeq.odeint(f, y0, t, **kwargs)
    for a, b in zip(ours, theirs):
        _close(a, b, 1e-12)


def test_float32_matches_torchdiffeq():
    t = torch.linspace(0, 4, 9, dtype=torch.float32)
    for method in METHODS:
        ours, theirs, _, _ = _both(
            _y0(torch.float32), t, method=method, rtol=1e-4, atol=1e-6, options=dict(step_size=0.05, max_order=6)
        )
        _close(ours, theirs, 1e-5)


def test_non_convergence_warns_and_drops_history():
    t = torch.linspace(0, 2, 5, dtype=F64)
    # One iteration can never meet these tolerances: every Adams step warns and drops a value.
    kwargs = dict(method="implicit_adams", rtol=1e-14, atol=1e-16, options=dict(step_size=0.05, max_iters=1))
    with pytest.warns(UserWarning, match="Functional iteration did not converge. Solution may be incorrect."):
        flashode.odeint(Oscillator(), _y0(), t, **kwargs)
    ours, theirs, n_ours, n_theirs = _both(_y0(), t, **kwargs)
    _close(ours, theirs, 1e-12)
    assert n_ours == n_theirs


def test_option_checks():
    y0, t = _y0(), torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(AssertionError, match=f"max_order must be at most {MAX_ORDER}"):
        flashode.odeint(Oscillator(), y0, t, method="implicit_adams", options=dict(max_order=13))
    for max_order in (1, 3):  # torchdiffeq cannot run max_order=1; here it is rk4 like the others below 4
        with pytest.warns(UserWarning, match="max_order is below 4, so the solver reduces to `rk4`."):
            ours = flashode.odeint(Oscillator(), y0, t, method="fixed_adams", options=dict(max_order=max_order))
        assert torch.equal(ours, flashode.odeint(Oscillator(), y0, t, method="rk4"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="max_order must be a positive integer, got 0"):
        flashode.odeint(Oscillator(), y0, t, method="fixed_adams", options=dict(max_order=0))
    with pytest.warns(UserWarning, match="AdamsBashforth: Unexpected arguments {'bogus': 1}"):
        flashode.odeint(Oscillator(), y0, t, method="explicit_adams", options=dict(bogus=1))
    with pytest.warns(UserWarning, match="AdamsBashforthMoulton: Unexpected arguments {'bogus': 1}"):
        flashode.odeint(Oscillator(), y0, t, method="implicit_adams", options=dict(bogus=1))


@pytest.mark.parametrize("method, max_order, order", [("explicit_adams", 4, 3), ("implicit_adams", 4, 4)])
def test_convergence_order(method, max_order, order):
    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    y0, t = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
    exact = torch.linalg.matrix_exp(2.0 * a) @ y0
    errors = [
        (flashode.odeint(lambda t, y: a @ y, y0, t, method=method, rtol=1e-6, atol=1e-8,
                         options=dict(step_size=h, max_order=max_order))[-1] - exact).norm().item()
        for h in (0.04, 0.02, 0.01)
    ]
    observed = [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]
    assert all(abs(p - order) < 0.2 for p in observed), observed


def test_gradients_match_finite_differences():
    t = torch.linspace(0, 1, 3, dtype=F64)

    def solve(y0, damping):
        def f(t, y):
            x, v = y[..., 0], y[..., 1]
            return torch.stack([v, -torch.sin(x) - damping * v + 0.3 * torch.cos(t)], dim=-1)

        return flashode.odeint(
            f, y0, t, method="implicit_adams", rtol=1e-6, atol=1e-8, options=dict(step_size=0.05, max_order=5)
        )

    y0 = _y0()[:2].clone().requires_grad_()
    damping = torch.tensor(0.1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (y0, damping), eps=1e-6, atol=1e-7)


def test_gradients_match_torchdiffeq_and_adjoint():
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)
    grads = {}
    for name, odeint in [("ours", flashode.odeint), ("theirs", torchdiffeq.odeint),
                         ("ours_adjoint", flashode.odeint_adjoint), ("theirs_adjoint", torchdiffeq.odeint_adjoint)]:
        func = Oscillator()
        y = odeint(func, y0, t, method="implicit_adams", rtol=1e-8, atol=1e-10, options=dict(step_size=0.05))
        grads[name] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(y.pow(2).sum(), (y0, func.damping))])
    _close(grads["ours"], grads["theirs"], 1e-12)
    _close(grads["ours_adjoint"], grads["theirs_adjoint"], 1e-10)


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")  # the jump: dropping included
def test_recording_a_graph_gives_the_same_values():
    # Under autograd the history is copied on every push instead of written in place.
    t = torch.linspace(0, 3, 7, dtype=F64)
    kwargs = dict(method="implicit_adams", rtol=1e-6, atol=1e-8, options=dict(step_size=0.03, max_order=5))
    with torch.no_grad():
        plain = flashode.odeint(Oscillator(), _y0(), t, **kwargs)
    recorded = flashode.odeint(Oscillator(), _y0().requires_grad_(), t, **kwargs)
    assert torch.equal(plain, recorded.detach())
