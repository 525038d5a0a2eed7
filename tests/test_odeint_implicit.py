"""The implicit fixed-grid methods (torchdiffeq master's implicit_euler ... trbdf2): convergence
order, stiff problems where explicit methods fail, Newton failures as SolverError, tuple states,
decreasing time, float32, gradients (odeint and odeint_adjoint) and options.

torchdiffeq 0.2.5 has none of these methods, so results are checked against analytic solutions and
published reference values. (Against torchdiffeq master, whose Broyden iteration stops at 1e-8,
flashode agrees to ~1e-9, except gl4 on time-dependent problems: master's second gl4 node is wrong.)
"""

from __future__ import annotations

import math
import warnings

import flashode
import pytest
import torch
from flashode.errors import SolverError
from flashode.solvers.implicit_rk import Jacobian
from flashode.tableaus import IMPLICIT

F64 = torch.float64
ORDER = {name: tab.order for name, tab in IMPLICIT.items()}
METHODS = tuple(ORDER)
L_STABLE = ("implicit_euler", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2")


class Counted:
    """A vector field that counts its calls."""

    def __init__(self, func):
        self.func = func
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return self.func(t, y)


# --- problems ---------------------------------------------------------------------------------


def riccati_solution(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 + 0.5 * torch.sin(3 * t), torch.cos(t)], -1)


def riccati(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Nonlinear and time-dependent, with solution g(t) = riccati_solution(t): y' = g' + g^2 - y^2."""
    g = riccati_solution(t)
    return torch.stack([1.5 * torch.cos(3 * t), -torch.sin(t)], -1) + g**2 - y**2


def prothero_robinson(eigenvalues: tuple[float, ...]):
    """y' = L (y - g(t)) + g'(t) with L = P diag(eigenvalues) P^-1 (non-normal): from y(0) = g(0)
    the solution is g(t) = (cos t, sin t, cos 2t), while the eigenvalues make the problem stiff."""
    p = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.5], [0.2, 0.0, 1.0]], dtype=F64)
    lin = p @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ torch.linalg.inv(p)

    def solution(t):
        return torch.stack([torch.cos(t), torch.sin(t), torch.cos(2 * t)], -1)

    def func(t, y):
        slope = torch.stack([-torch.sin(t), torch.cos(t), -2 * torch.sin(2 * t)], -1)
        return (y - solution(t).to(y.dtype)) @ lin.to(y.dtype).T + slope.to(y.dtype)

    return func, solution


def robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1)


# Hairer & Wanner's reference solution of Robertson's problem at t = 40.
ROBERTSON_40 = torch.tensor([0.7158270687193941, 9.185534764557338e-06, 0.2841637457458413], dtype=F64)


def blew_up(func, y0, t, method, step_size) -> bool:
    try:
        y = flashode.odeint(func, y0, t, method=method, options=dict(step_size=step_size))
    except SolverError:  # non-finite values
        return True
    return bool(y.abs().max() > 1e6)


# --- tableaus and accuracy --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_tableau_conditions(method):
    tab = IMPLICIT[method]
    for row, c in zip(tab.a, tab.c):
        assert sum(row) == pytest.approx(c, abs=1e-15)
    for q in range(1, tab.order + 1):  # the quadrature conditions up to the order
        assert sum(b * c ** (q - 1) for b, c in zip(tab.b, tab.c)) == pytest.approx(1 / q, abs=1e-14)
    assert method in flashode.solvers.SOLVER_NAMES


@pytest.mark.parametrize("method", METHODS)
def test_convergence_order(method):
    order = ORDER[method]
    counts = (4, 8, 16) if order >= 5 else (8, 16, 32) if order >= 3 else (16, 32, 64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    errors = []
    for n in counts:
        y = flashode.odeint(riccati, riccati_solution(t[0]), t, method=method, options=dict(step_size=1 / n))
        errors.append(float((y[-1] - riccati_solution(t[-1])).abs().max()))
    slope = math.log(errors[0] / errors[-1]) / math.log(counts[-1] / counts[0])
    assert order - 0.15 < slope < order + 0.6, (errors, slope)


def test_outputs_between_grid_points():
    t = torch.tensor([0.0, 0.3, 0.55, 1.0], dtype=F64)
    grid_t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64)
    grid = flashode.odeint(riccati, riccati_solution(t[0]), grid_t, method="radauIIA5", options=dict(step_size=0.25))
    errors = {}
    for interp in ("linear", "cubic"):
        y = flashode.odeint(
            riccati, riccati_solution(t[0]), t, method="radauIIA5", options=dict(step_size=0.25, interp=interp)
        )
        torch.testing.assert_close(y[-1], grid[-1], rtol=0, atol=1e-14)
        errors[interp] = float((y[1:3] - riccati_solution(t[1:3])).abs().max())
        if interp == "linear":
            torch.testing.assert_close(y[1], grid[1] + (0.3 - 0.25) / 0.25 * (grid[2] - grid[1]), rtol=0, atol=1e-14)
    assert errors["cubic"] < errors["linear"] / 10, errors


# --- stiffness --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_stiff_linear_system(method):
    # Eigenvalues down to -1e4: with h = 0.1 explicit methods blow up, implicit ones stay accurate.
    func, solution = prothero_robinson((-1e4, -1e3, -10.0))
    t = torch.tensor([0.0, 2.0], dtype=F64)
    y = flashode.odeint(func, solution(t[0]), t, method=method, options=dict(step_size=0.1))
    assert float((y[-1] - solution(t[-1])).abs().max()) < 2e-2
    for explicit in ("euler", "rk4"):
        assert blew_up(func, solution(t[0]), t, explicit, 0.1)


@pytest.mark.parametrize("method", ["radauIIA5", "trbdf2", "gl4"])
def test_explicit_adaptive_needs_ten_times_more_evaluations(method):
    func, solution = prothero_robinson((-1e3, -1e2, -1.0))
    t = torch.tensor([0.0, 2.0], dtype=F64)
    implicit = Counted(func)
    y = flashode.odeint(implicit, solution(t[0]), t, method=method, options=dict(step_size=0.1))
    implicit_error = float((y[-1] - solution(t[-1])).abs().max())
    # Each step's Jacobian costs one evaluation (counted) and 3 vector-Jacobian products: count
    # those as evaluations too.
    implicit_cost = implicit.calls + 3 * 20
    explicit = Counted(func)
    # dopri5 at a tolerance that makes it (at least) as accurate: its step is bounded by stability.
    tol = implicit_error / 10
    y = flashode.odeint(explicit, solution(t[0]), t, method="dopri5", rtol=tol, atol=tol)
    assert float((y[-1] - solution(t[-1])).abs().max()) < 5 * implicit_error
    assert explicit.calls >= 10 * implicit_cost, (explicit.calls, implicit_cost)


@pytest.mark.parametrize("method", L_STABLE)
def test_robertson(method):
    # Stiff and nonlinear; at y0 the fast reaction's rate is zero, so the Jacobian there hides the
    # stiffness the Newton iteration must find. Steps of 0.5 over [0, 40].
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 40.0], dtype=F64)
    y = flashode.odeint(robertson, y0, t, method=method, options=dict(step_size=0.5))
    relative = float(((y[-1] - ROBERTSON_40) / ROBERTSON_40).abs().max())
    assert relative < (2e-2 if method == "implicit_euler" else 1e-3)
    assert blew_up(robertson, y0, t, "rk4", 0.5)


# --- Newton failures --------------------------------------------------------------------------


def test_newton_not_converging_raises():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(SolverError) as info:
        flashode.odeint(robertson, y0, t, method="radauIIA5", options=dict(step_size=0.5, max_iters=2))
    message = str(info.value)
    for part in ("radauIIA5", "t=0 ", "step size 0.5", "residual", "max_iters=2", "Reduce step_size"):
        assert part in message, message


def test_newton_without_jacobian_diverges_with_a_hint():
    # func hides its dependence on y from autograd, so there is no Jacobian: the fixed-point
    # iteration diverges where h |df/dy| > 1.
    def opaque(t, y):
        return -1000.0 * y.detach()

    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(SolverError, match="without a Jacobian") as info:
        flashode.odeint(opaque, torch.ones(2, dtype=F64), t, method="trbdf2", options=dict(step_size=0.1))
    assert "trbdf2" in str(info.value)
    # Where it is small, the same field converges.
    t = torch.tensor([0.0, 0.01], dtype=F64)
    y = flashode.odeint(opaque, torch.ones(2, dtype=F64), t, method="implicit_euler", options=dict(step_size=1e-4))
    assert float(y[-1, 0]) == pytest.approx((1 + 0.1) ** -100, abs=1e-10)


# --- states, directions, dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_tuple_state_and_decreasing_time(method):
    def oscillator(t, state):
        x, v = state
        return v, -x + 0.1 * torch.cos(t)

    def stacked(t, y):
        return torch.cat([y[1:], -y[:1] + 0.1 * torch.cos(t)])

    x0, v0 = torch.tensor([1.0], dtype=F64), torch.tensor([[0.0]], dtype=F64)
    t = torch.tensor([0.0, -0.5, -1.0], dtype=F64)
    x, v = flashode.odeint(oscillator, (x0, v0), t, method=method, options=dict(step_size=0.05))
    assert x.shape == (3, 1) and v.shape == (3, 1, 1)
    flat = flashode.odeint(stacked, torch.tensor([1.0, 0.0], dtype=F64), t, method=method, options=dict(step_size=0.05))
    torch.testing.assert_close(torch.cat([x, v.reshape(3, 1)], -1), flat, rtol=0, atol=1e-13)
    # Decreasing time is the time-reversed problem s = -t, integrated forwards.
    reversed_ = flashode.odeint(
        lambda s, y: -stacked(-s, y), torch.tensor([1.0, 0.0], dtype=F64), -t, method=method,
        options=dict(step_size=0.05),
    )
    torch.testing.assert_close(flat, reversed_, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_float32_stiff(method):
    func, solution = prothero_robinson((-1e3, -1e2, -1.0))
    t = torch.tensor([0.0, 1.0], dtype=torch.float32)
    y0 = solution(t[0]).to(torch.float32)
    y = flashode.odeint(func, y0, t, method=method, options=dict(step_size=0.05))
    assert y.dtype == torch.float32 and not y.requires_grad
    assert float((y[-1].double() - solution(t[-1].double())).abs().max()) < 2e-2


def test_state_of_any_shape():
    # Three copies of the Riccati problem in a (3, 1, 2) state.
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = riccati_solution(t[0]).expand(3, 1, 2).contiguous()
    y = flashode.odeint(riccati, y0, t, method="gl4", options=dict(step_size=0.1))
    assert y.shape == (2, 3, 1, 2)
    single = flashode.odeint(riccati, riccati_solution(t[0]), t, method="gl4", options=dict(step_size=0.1))
    torch.testing.assert_close(y[-1], single[-1].expand(3, 1, 2), rtol=0, atol=1e-12)


def test_jacobian_batched_and_row_by_row():
    def func(v):
        return torch.sin(v) * v.sum()

    y = torch.randn(2, 3, dtype=F64, requires_grad=True)
    expected = torch.autograd.functional.jacobian(func, y.detach()).reshape(6, 6)
    for batched in (True, False):  # one vmapped backward pass, or the fallback for funcs vmap cannot batch
        jacobian = Jacobian()
        jacobian.batched = batched
        torch.testing.assert_close(jacobian(func(y), y), expected, rtol=0, atol=1e-15)
    assert Jacobian()(2 * y.detach(), y) is None  # autograd cannot trace f back to y


# --- gradients --------------------------------------------------------------------------------


class Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.3, -1.2], [0.9, -0.4]], dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T) - 0.2 * y + 0.1 * torch.cos(t)


def _loss(field, y0, method, interp="linear"):
    t = torch.tensor([0.0, 0.7, 1.5], dtype=F64)
    y = flashode.odeint(field, y0, t, method=method, options=dict(step_size=0.25, interp=interp))
    return (y**2).sum() + y[1, 0]


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_finite_differences(method):
    field, y0 = Field(), torch.tensor([0.5, -0.2], dtype=F64, requires_grad=True)
    grads = torch.autograd.grad(_loss(field, y0, method), (y0, field.w))
    eps = 1e-5
    for tensor, grad in zip((y0, field.w), grads):
        for i in range(tensor.numel()):
            with torch.no_grad():
                tensor.view(-1)[i] += eps
                up = _loss(field, y0, method)
                tensor.view(-1)[i] -= 2 * eps
                down = _loss(field, y0, method)
                tensor.view(-1)[i] += eps
            assert float(grad.reshape(-1)[i]) == pytest.approx(float(up - down) / (2 * eps), abs=1e-8)


def test_gradients_exact_for_linear_implicit_euler():
    # y_n = (I - h A)^-n y0, differentiated in closed form.
    a = torch.tensor([[-1.0, 2.0], [0.5, -3.0]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y = flashode.odeint(lambda t, y: a @ y, y0, t, method="implicit_euler", options=dict(step_size=0.25))
    exact = torch.linalg.matrix_power(torch.linalg.inv(torch.eye(2, dtype=F64) - 0.25 * a), 4) @ y0
    torch.testing.assert_close(y[-1], exact, rtol=0, atol=1e-14)
    got = torch.autograd.grad(y[-1] @ torch.tensor([1.0, -2.0], dtype=F64), (y0, a))
    want = torch.autograd.grad(exact @ torch.tensor([1.0, -2.0], dtype=F64), (y0, a))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-13)


def test_parameter_gradient_without_y0_gradient_and_no_graph_when_none_needed():
    field, y0 = Field(), torch.tensor([0.5, -0.2], dtype=F64)
    (grad_param,) = torch.autograd.grad(_loss(field, y0, "radauIIA3", interp="cubic"), field.w)
    eps = 1e-5
    with torch.no_grad():
        field.w[0, 1] += eps
        up = _loss(field, y0, "radauIIA3", interp="cubic")
        field.w[0, 1] -= 2 * eps
        down = _loss(field, y0, "radauIIA3", interp="cubic")
        field.w[0, 1] += eps
    assert float(grad_param[0, 1]) == pytest.approx(float(up - down) / (2 * eps), abs=1e-8)
    field.w.requires_grad_(False)
    assert not flashode.odeint(field, y0, torch.tensor([0.0, 1.0], dtype=F64), method="gl6",
                               options=dict(step_size=0.25)).requires_grad


def test_odeint_adjoint():
    field = Field()
    y0 = torch.tensor([0.5, -0.2], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    grads = []
    for solve in (flashode.odeint, flashode.odeint_adjoint):
        y = solve(field, y0, t, method="gl4", options=dict(step_size=0.05))
        grads.append(torch.autograd.grad(y.sum(), (y0, field.w)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# --- options and torchdiffeq semantics --------------------------------------------------------


def test_options():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = riccati_solution(t[0])
    with pytest.warns(UserWarning, match="GaussLegendre4: Unexpected arguments"):
        flashode.odeint(riccati, y0, t, method="gl4", options=dict(step_size=0.5, bogus=1))
    with pytest.raises(ValueError, match="max_iters"):
        flashode.odeint(riccati, y0, t, method="gl4", options=dict(step_size=0.5, max_iters=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashode.odeint(riccati, y0, t, method="sdirk2", options=dict(step_size=0.5, max_iters=50, perturb=True))


@pytest.mark.parametrize("perturb", [False, True])
def test_stage_times(perturb):
    # f0 is evaluated just after t0 with perturb=True; a stage at c == 1 always sees t1 just
    # before (torchdiffeq master nudges it whatever `perturb` says).
    seen: list[float] = []

    def func(t, y):
        seen.append(float(t))
        return -y

    flashode.odeint(func, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="implicit_euler",
                    options=dict(step_size=1.0, perturb=perturb))
    assert {s for s in seen if s < 0.5} == {math.nextafter(0.0, 1.0) if perturb else 0.0}
    assert {s for s in seen if s > 0.5} == {math.nextafter(1.0, 0.0)}
