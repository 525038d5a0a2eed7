"""odeint_dense: the continuous solution of one solve, for every adaptive method."""

from __future__ import annotations

import math

import flashode
import numpy as np
import pytest
import torch
from problems import ADAPTIVE, PROBLEMS

F64 = torch.float64
# Methods whose interpolant has the method's accuracy. bosh3 and dopri8 interpolate with
# torchdiffeq's quartic fit (kept so odeint's outputs match torchdiffeq's), which is much less
# accurate between steps than at them; fehlberg2's global error is itself ~300x its tolerance.
FULL_ORDER_INTERPOLANT = ("dopri5", "tsit5", "adaptive_heun")


def random_times(count: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).uniform(lo, hi, count), dtype=F64)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_dense_equals_odeint_at_the_same_times(method: str) -> None:
    # Steps do not depend on the output times, so both evaluate the same interpolants.
    p = PROBLEMS["forced_pendulum"]
    y0 = torch.tensor(p.y0)
    times = random_times(200, 0.0, 5.0)
    sol = flashode.odeint_dense(p.func, y0, 0.0, 5.0, rtol=1e-6, atol=1e-8, method=method)
    grid = torch.cat([torch.zeros(1, dtype=F64), times.sort().values])
    expected = flashode.odeint(p.func, y0, grid, rtol=1e-6, atol=1e-8, method=method)[1:]
    order = times.argsort().argsort()
    assert torch.equal(sol(times), expected[order])


@pytest.mark.parametrize("method", FULL_ORDER_INTERPOLANT)
def test_dense_accuracy_at_1000_random_times(method: str) -> None:
    p = PROBLEMS["linear"]  # analytic: y(t) = expm(A t) y0
    a = np.array([[-0.1, 2.0], [-2.0, -0.1]])
    w, v = np.linalg.eig(a)
    times = random_times(1000, 0.0, 3.0)
    reference = np.stack([(v @ np.diag(np.exp(w * ti)) @ np.linalg.solve(v, p.y0)).real for ti in times.numpy()])
    rtol, atol = 1e-7, 1e-9
    sol = flashode.odeint_dense(p.func, torch.tensor(p.y0), 0.0, 3.0, rtol=rtol, atol=atol, method=method)
    error = np.abs(sol(times).numpy() - reference).max()
    # Global error of a solve at this tolerance: a few times rtol at the step ends (adaptive_heun's
    # error estimate is first order), and no worse in between.
    assert error <= 5 * rtol


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


def test_gradients_flow_through_the_dense_solution() -> None:
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    sol = flashode.odeint_dense(lambda t, y: -w * y, y0, 0.0, 2.0, rtol=1e-10, atol=1e-12)
    gw, gy = torch.autograd.grad(sol(torch.tensor(1.5, dtype=F64)).sum(), [w, y0])
    # y(1.5) = y0 exp(-1.5 w)
    assert gw.item() == pytest.approx(-1.5 * 3.0 * math.exp(-1.05), rel=1e-7)
    assert torch.allclose(gy, torch.full((2,), math.exp(-1.05), dtype=F64), rtol=1e-7)


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
