"""method="scipy_solver": torchdiffeq's wrapper around scipy.integrate's solvers."""

from __future__ import annotations

import re
import warnings

import flashode
import numpy as np
import pytest
import scipy.integrate
import torch
from problems import PROBLEMS

torchdiffeq = pytest.importorskip("torchdiffeq")

SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=torch.float64)
Y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)


def linear(t, y):
    return A.to(y) @ y  # y's dtype and device


def linear_exact(t: torch.Tensor, t0: float, y0: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.linalg.matrix_exp(A * (ti - t0)) @ y0 for ti in t.tolist()])


def scipy_odeint(func, y0, t, **kwargs):
    return flashode.odeint(func, y0, t, method="scipy_solver", **kwargs)


@pytest.mark.parametrize("solver", SCIPY_METHODS)
@pytest.mark.parametrize("name", ["linear", "logistic"])
def test_matches_analytic_solution(solver, name):
    problem = PROBLEMS[name]
    rtol, atol = 1e-8, 1e-10
    out = scipy_odeint(
        problem.func, torch.tensor(problem.y0), torch.tensor(problem.t), rtol=rtol, atol=atol,
        options=dict(solver=solver),
    )
    assert out.shape == (len(problem.t), *problem.y0.shape) and out.dtype == torch.float64
    # Global error of a tolerance-controlled solve: a small multiple of the local tolerance.
    np.testing.assert_allclose(out.numpy(), problem.reference, rtol=100 * rtol, atol=100 * atol)


def test_default_solver_is_lsoda():
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    assert torch.equal(scipy_odeint(linear, Y0, t), scipy_odeint(linear, Y0, t, options=dict(solver="LSODA")))


@pytest.mark.parametrize("solver", SCIPY_METHODS)
def test_equals_torchdiffeq_scipy_solver(solver):
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    ours = scipy_odeint(linear, Y0, t, options=dict(solver=solver))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq makes scipy warn that min_step has no effect
        theirs = torchdiffeq.odeint(linear, Y0, t, method="scipy_solver", options=dict(solver=solver))
    # Same scipy steps and dense output; row 0 is y0 itself (solve_ivp interpolates it).
    assert torch.equal(ours[1:], theirs[1:])
    assert torch.equal(ours[0], Y0)


@pytest.mark.parametrize("solver", ["RK45", "Radau", "LSODA"])
def test_decreasing_t_integrates_from_t0(solver):
    t = torch.tensor([2.0, 1.5, 0.25, -1.0], dtype=torch.float64)
    out = scipy_odeint(linear, Y0, t, rtol=1e-9, atol=1e-11, options=dict(solver=solver))
    torch.testing.assert_close(out, linear_exact(t, 2.0, Y0), rtol=1e-6, atol=1e-8)
    assert torch.equal(out[0], Y0)


def test_tuple_state_with_tuple_tolerances():
    def f(t, state):
        y, z = state
        return A @ y, -2.0 * z

    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    z0 = torch.ones(2, 2, dtype=torch.float64)
    y, z = scipy_odeint(f, (Y0, z0), t, rtol=(1e-9, 1e-8), atol=(1e-11, 1e-10), options=dict(solver="DOP853"))
    assert y.shape == (5, 2) and z.shape == (5, 2, 2)
    torch.testing.assert_close(y, linear_exact(t, 0.0, Y0), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(z, torch.exp(-2.0 * t).view(5, 1, 1).expand(5, 2, 2), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", SCIPY_METHODS)
def test_float32_state_gives_float32_output(solver):
    seen = []

    def f(t, y):
        seen.append((t.dtype, t.shape, y.dtype, y.shape))
        return linear(t, y)

    t = torch.linspace(0, 2, 5)
    out = scipy_odeint(f, Y0.float(), t, rtol=1e-6, atol=1e-8, options=dict(solver=solver))
    assert out.dtype == torch.float32
    assert set(seen) == {(torch.float32, torch.Size([]), torch.float32, torch.Size([2]))}
    torch.testing.assert_close(out, linear_exact(t.double(), 0.0, Y0).float(), rtol=1e-4, atol=1e-6)


def test_per_element_tolerance_tensors_reach_scipy():
    y0 = torch.tensor([[1.0, 0.5, 0.2], [0.3, 2.0, 1.0]], dtype=torch.float64)
    rtol = torch.tensor([1e-3, 1e-6, 1e-9])  # broadcast over the rows of the state
    atol = torch.full((2, 3), 1e-8, dtype=torch.float64)
    t = torch.linspace(0, 4, 5, dtype=torch.float64)
    out = scipy_odeint(PROBLEMS["logistic"].func, y0, t, rtol=rtol, atol=atol, options=dict(solver="RK45"))
    sol = scipy.integrate.solve_ivp(
        lambda _t, y: y * (1 - y), (0.0, 4.0), y0.reshape(-1).numpy(), method="RK45", t_eval=t.numpy(),
        rtol=rtol.double().expand(2, 3).reshape(-1).numpy(), atol=atol.reshape(-1).numpy(),
    )
    assert sol.success
    torch.testing.assert_close(out[1:], torch.from_numpy(sol.y.T).view(5, 2, 3)[1:], rtol=0, atol=0)


def test_max_step_is_passed_to_scipy():
    calls = []

    def f(t, y):
        calls.append(float(t))
        return linear(t, y)

    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    scipy_odeint(f, Y0, t, rtol=1e-3, atol=1e-3, options=dict(solver="RK45", max_step=0.01))
    assert len(calls) >= 6 * 100  # six evaluations per RK45 step, at least 100 steps


def test_options_torchdiffeq_accepts_do_not_warn():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    options = dict(solver="RK45", min_step=0.0, max_step=0.5, norm=lambda x: x.abs().max(), grid_points=None, eps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does scipy warn that min_step has no effect for RK45
        scipy_odeint(linear, Y0, t, options=options)


def test_unknown_option_warns_like_torchdiffeq():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    options = dict(solver="LSODA", bogus=1)
    with pytest.warns(UserWarning) as theirs:
        torchdiffeq.odeint(linear, Y0, t, method="scipy_solver", options=options)
    with pytest.warns(UserWarning, match=re.escape("ScipyWrapperODESolver: Unexpected arguments {'bogus': 1}")) as ours:
        scipy_odeint(linear, Y0, t, options=options)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


def test_callbacks_warn_like_torchdiffeq():
    class WithCallback(torch.nn.Module):
        def forward(self, t, y):
            return linear(t, y)

        def callback_step(self, t0, y0, dt):
            raise AssertionError("scipy_solver never calls back")

    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.warns(UserWarning) as theirs:
        torchdiffeq.odeint(WithCallback(), Y0, t, method="scipy_solver")
    with pytest.warns(UserWarning, match=re.escape("Solver 'scipy_solver' does not support callbacks")) as ours:
        scipy_odeint(WithCallback(), Y0, t)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


def test_unknown_solver_names_the_valid_ones():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Unknown scipy solver 'rk45'.*\"RK45\", \"RK23\", \"DOP853\", \"Radau\""):
        scipy_odeint(linear, Y0, t, options=dict(solver="rk45"))


def test_an_odesolver_subclass_is_accepted_as_solve_ivp_does():
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    by_class = scipy_odeint(linear, Y0, t, options=dict(solver=scipy.integrate.DOP853))
    assert torch.equal(by_class, scipy_odeint(linear, Y0, t, options=dict(solver="DOP853")))


@pytest.mark.parametrize("solver", SCIPY_METHODS)
def test_nan_from_func_raises_solver_error(solver):
    # With NaN at t0 scipy's RK methods loop forever and Radau/BDF fail inside LAPACK.
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(flashode.SolverError, match=r"func returned non-finite values at t=0\b"):
        scipy_odeint(lambda t, y: y * float("nan"), Y0, t, options=dict(solver=solver))


def test_nan_later_names_both_times():
    def f(t, y):
        return -y if t < 0.5 else y * float("nan")

    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(flashode.SolverError, match=r"non-finite values at t=0\.5\d*.*LSODA had reached t=0\.\d+"):
        scipy_odeint(f, Y0, t)


@pytest.mark.parametrize("solver", SCIPY_METHODS)
def test_blow_up_raises_solver_error_with_the_time_reached(solver):
    # y' = y^2, y(0) = 1 has y = 1 / (1 - t): no solution past t = 1.
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    with pytest.raises(flashode.SolverError, match=r"at t=(0\.99|1\b|1\.0)"):
        scipy_odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), t, options=dict(solver=solver))


def test_step_failure_carries_scipys_message():
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    with pytest.raises(flashode.SolverError, match=r"scipy's RK45 failed at t=1\.0\d*: Required step size"):
        scipy_odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), t, options=dict(solver="RK45"))


def test_non_finite_y0_is_a_value_error():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="non-finite values in the initial state y0 at t=0"):
        scipy_odeint(linear, torch.tensor([1.0, float("inf")], dtype=torch.float64), t)


def test_single_time_returns_y0():
    out = scipy_odeint(linear, Y0, torch.tensor([0.5], dtype=torch.float64))
    assert out.shape == (1, 2) and torch.equal(out[0], Y0)


def test_outputs_carry_no_grad():
    weight = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    y0 = Y0.clone().requires_grad_()
    out = scipy_odeint(lambda t, y: weight * y, y0, torch.linspace(0, 1, 3, dtype=torch.float64))
    assert not out.requires_grad and out.grad_fn is None


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, y):
        return self.A @ y


@pytest.mark.parametrize("solver", ["RK45", "Radau", "LSODA"])
@pytest.mark.parametrize("times", [[0.0, 0.7, 1.5], [1.5, 0.7, 0.0]])
def test_odeint_adjoint_gradients_match_analytic(solver, times):
    func = Linear()
    y0 = Y0.clone().requires_grad_()
    t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([[0.0, 0.0], [0.3, -1.2], [0.7, 0.4]], dtype=torch.float64)
    out = flashode.odeint_adjoint(
        func, y0, t, method="scipy_solver", options=dict(solver=solver), rtol=1e-10, atol=1e-12
    )
    grads = torch.autograd.grad((out * weights).sum(), (y0, func.A, t))
    exact = torch.stack([torch.linalg.matrix_exp(func.A * (ti - t[0])) @ y0 for ti in t])
    expected = torch.autograd.grad((exact * weights).sum(), (y0, func.A, t))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_stays_on_its_device():
    devices = set()

    def f(t, y):
        devices.add((t.device.type, y.device.type))
        return linear(t, y)

    out = scipy_odeint(f, Y0.cuda(), torch.linspace(0, 1, 3, dtype=torch.float64, device="cuda"))
    assert out.device.type == "cuda" and devices == {("cuda", "cuda")}
    torch.testing.assert_close(out.cpu(), scipy_odeint(linear, Y0, torch.linspace(0, 1, 3, dtype=torch.float64)))
