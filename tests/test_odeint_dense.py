"""odeint_dense: the continuous solution of one solve, for every adaptive method."""

from __future__ import annotations

import math

import flashode
import numpy as np
import pytest
import torch
from problems import ADAPTIVE, PROBLEMS
from scipy.integrate import solve_ivp

F64 = torch.float64
# Two tolerances per method, the low-order methods' looser so that their solves stay quick.
TOLERANCES = {
    "dopri5": (1e-6, 1e-9), "dopri8": (1e-6, 1e-9), "tsit5": (1e-6, 1e-9), "bosh3": (1e-6, 1e-9),
    "fehlberg2": (1e-5, 1e-8), "adaptive_heun": (1e-5, 1e-7),
}
_ROTATION = np.array([[-0.1, 2.0], [-2.0, -0.1]])  # PROBLEMS["linear"]'s matrix

# The exact solutions through y(s[m]) = y_s[m], at the times t[m] (one row per m).


def linear_flow(s: np.ndarray, y_s: np.ndarray, t: np.ndarray) -> np.ndarray:
    # expm(A (t - s)) y_s, by A's eigendecomposition
    w, v = np.linalg.eig(_ROTATION)
    return (v @ (np.exp(np.outer(w, t - s)) * np.linalg.solve(v, y_s.T))).real.T


def logistic_flow(s: np.ndarray, y_s: np.ndarray, t: np.ndarray) -> np.ndarray:
    decay = np.exp(-(t - s)).reshape(-1, *([1] * (y_s.ndim - 1)))
    return 1.0 / (1.0 + (1.0 / y_s - 1.0) * decay)


def pendulum_flow(s: np.ndarray, y_s: np.ndarray, t: np.ndarray) -> np.ndarray:
    # All at once, each over its own interval mapped onto tau in [0, 1]: y = z(tau), time s + tau (t - s).
    span = t - s

    def rhs(tau: float, z: np.ndarray) -> np.ndarray:
        x, v = z.reshape(2, -1)
        time = s + tau * span
        return (span * np.stack([v, -np.sin(x) - 0.2 * v + 0.5 * np.cos(1.3 * time)])).reshape(-1)

    end = solve_ivp(rhs, (0.0, 1.0), y_s.T.reshape(-1), method="DOP853", rtol=1e-13, atol=1e-15).y[:, -1]
    return end.reshape(2, -1).T


FLOWS = {"linear": linear_flow, "logistic": logistic_flow, "forced_pendulum": pendulum_flow}


def random_times(count: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).uniform(lo, hi, count), dtype=F64)


def local_errors(sol: flashode.DenseSolution, flow, times: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """For each time: the dense solution's distance to the exact solution through the start of
    the step that holds it, in units of the tolerance scale atol + rtol * max(|y(step start)|,
    |y(t)|), the solver's own per-step scale (at a zero crossing, atol alone would measure
    against a scale no step was ever held to)."""
    sign = 1.0 if sol.t1 > sol.t0 else -1.0
    starts = sol.ts.numpy()[:-1]
    # The step holding t: the last one starting at or before it, in the direction of the solve.
    index = np.maximum(np.searchsorted(sign * starts, sign * times, side="right") - 1, 0)
    dense = sol(torch.tensor(times, dtype=F64)).numpy()
    states = sol(torch.tensor(starts[index], dtype=F64)).numpy()  # a step start's value is the step's state
    exact = flow(starts[index], states, times)
    scale = atol + rtol * np.maximum(np.abs(states), np.abs(exact))
    return (np.abs(dense - exact) / scale).reshape(len(times), -1).max(axis=1)


@pytest.mark.parametrize(
    "problem, t0, t1",
    [("linear", 0.0, 3.0), ("logistic", 0.0, 4.0), ("forced_pendulum", 0.0, 5.0), ("linear", 3.0, 0.0)],
)
@pytest.mark.parametrize("method", ADAPTIVE)
def test_dense_accuracy_at_1000_random_times(method: str, problem: str, t0: float, t1: float) -> None:
    # Against the exact solution through each step's start, i.e. the local error, which is what the
    # step-size control holds to the tolerance: the global error at the step ends is the solver's,
    # not the interpolant's (for fehlberg2 up to ~1e4 times the tolerance). Between the step ends
    # the interpolant must be as accurate as at them: within a few tolerance scales, or within a
    # few times the step's own local error where the method misses its tolerance (fehlberg2: its
    # error estimate, that of its 1st-order embedded solution, is smaller than its actual error).
    p = PROBLEMS[problem]
    flow = FLOWS[problem]
    for rtol in TOLERANCES[method]:
        atol = rtol * 1e-2
        sol = flashode.odeint_dense(p.func, torch.tensor(p.y0), t0, t1, rtol=rtol, atol=atol, method=method)
        between = local_errors(sol, flow, random_times(1000, min(t0, t1), max(t0, t1)).numpy(), rtol, atol)
        ends = sol.ts.numpy()[1:-1]  # each the next step's start, reached from the previous step's
        at_ends = local_errors(sol, flow, np.nextafter(ends, sol.t0), rtol, atol)
        assert between.max() <= 5 * max(1.0, at_ends.max()), (rtol, between.max(), at_ends.max())


@pytest.mark.parametrize("method", ADAPTIVE)
def test_step_ends_are_the_solver_states_and_agree_with_odeint(method: str) -> None:
    # odeint's steps do not depend on its output times, so at the step ends it returns the same
    # states; there it evaluates its quartic at theta = 1, which is y1 to rounding. In between,
    # the two interpolants differ (odeint's keeps torchdiffeq's values).
    p = PROBLEMS["forced_pendulum"]
    y0 = torch.tensor(p.y0)
    rtol, atol = TOLERANCES[method][0], TOLERANCES[method][0] * 1e-2
    sol = flashode.odeint_dense(p.func, y0, 0.0, 5.0, rtol=rtol, atol=atol, method=method)
    ends = sol.ts[:-1]  # the last step ends past t1
    expected = flashode.odeint(p.func, y0, ends, rtol=rtol, atol=atol, method=method)
    assert torch.allclose(sol(ends), expected, rtol=1e-13, atol=1e-15)
    # Continuous across each step end: the previous step's interpolant ends at the state there, to
    # the rounding of its weights (float64 polynomials with coefficients up to ~6e3 for dopri8).
    inner = sol.ts[1:-1]
    just_before = torch.tensor(np.nextafter(inner.numpy(), -np.inf), dtype=F64)
    assert torch.allclose(sol(just_before), sol(inner), rtol=1e-12, atol=1e-12)


def test_scalar_and_vector_times_tuple_state_and_reversed_interval() -> None:
    def rotation(t, state):
        x, v = state
        return v, -x

    x0, v0 = torch.tensor(1.0, dtype=F64), torch.tensor([0.0], dtype=F64)
    sol = flashode.odeint_dense(rotation, (x0, v0), torch.tensor(2.0, dtype=F64), 0.0, rtol=1e-10, atol=1e-12)
    assert (sol.t0, sol.t1) == (2.0, 0.0)
    x, v = sol(torch.tensor(0.5, dtype=F64))
    assert x.shape == () and v.shape == (1,)
    # y(t) with y(2) = (1, 0): x = cos(t - 2), v = -sin(t - 2)
    assert x.item() == pytest.approx(math.cos(-1.5), abs=1e-8)
    xs, vs = sol(torch.tensor([2.0, 1.0, 0.0], dtype=F64))
    assert xs.shape == (3,) and vs.shape == (3, 1)
    assert torch.allclose(xs, torch.cos(torch.tensor([0.0, -1.0, -2.0], dtype=F64)), atol=1e-8)
    assert float(sol.ts[0]) == 2.0 and sol.n_steps == len(sol.ts) - 1


GRADIENT_RTOL = {
    "dopri5": 1e-10, "dopri8": 1e-10, "tsit5": 1e-10, "bosh3": 1e-9, "fehlberg2": 1e-8, "adaptive_heun": 1e-7,
}


@pytest.mark.parametrize("method", ADAPTIVE)
def test_gradients_flow_through_the_dense_solution(method: str) -> None:
    rtol = GRADIENT_RTOL[method]
    # Between step ends, so that the interpolant's slope rows (f at its nodes) carry gradient too.
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    sol = flashode.odeint_dense(lambda t, y: -w * y, y0, 0.0, 2.0, rtol=rtol, atol=rtol * 1e-2, method=method)
    assert 1.5 not in sol.ts.tolist()
    gw, gy = torch.autograd.grad(sol(torch.tensor(1.5, dtype=F64)).sum(), [w, y0])
    # y(1.5) = y0 exp(-1.5 w). The gradients are as accurate as the solution: fehlberg2's error is
    # ~200x its tolerance.
    assert gw.item() == pytest.approx(-1.5 * 3.0 * math.exp(-1.05), rel=1e3 * rtol)
    assert torch.allclose(gy, torch.full((2,), math.exp(-1.05), dtype=F64), rtol=1e3 * rtol, atol=0)


def test_the_dense_solution_does_not_alias_y0() -> None:
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    sol = flashode.odeint_dense(lambda t, y: -y, y0, 0.0, 1.0)
    before = sol(0.0).clone()
    y0.add_(5.0)
    assert torch.equal(sol(0.0), before)


def test_errors() -> None:
    sol = flashode.odeint_dense(lambda t, y: -y, torch.ones(2, dtype=F64), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"covers t in \[0, 1\]"):
        sol(1.5)
    with pytest.raises(ValueError, match="covers t"):
        sol(float("nan"))
    with pytest.raises(ValueError, match="1-D tensor of times"):
        sol(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="adaptive method"):
        flashode.odeint_dense(lambda t, y: -y, torch.ones(2), 0.0, 1.0, method="rk4")
    with pytest.raises(ValueError, match="t0 != t1"):
        flashode.odeint_dense(lambda t, y: -y, torch.ones(2), 1.0, 1.0)
