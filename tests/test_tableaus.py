"""Checks of flashode's Butcher tableaus: structure, order conditions, empirical convergence
order of the solution and of the embedded error estimate, and the dense-output polynomials.

Pure Python/NumPy (SciPy only for reference solutions), so it runs without torch and without
flashode's package (which may not import on its own yet).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import solve_ivp

_PATH = Path(__file__).resolve().parents[1] / "python" / "flashode" / "tableaus.py"
_SPEC = importlib.util.spec_from_file_location("_flashode_tableaus_under_test", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
tableaus = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = tableaus  # dataclasses resolve annotations through sys.modules
_SPEC.loader.exec_module(tableaus)

ADAPTIVE = tableaus.ADAPTIVE
FIXED = tableaus.FIXED
ALL = {**ADAPTIVE, **FIXED}

Rhs = Callable[[float, np.ndarray], np.ndarray]

# Order of each adaptive method's embedded (error-estimating) weights b_hat = b - b_error.
EMBEDDED_ORDER = {
    "dopri5": 4, "dopri8": 7, "bosh3": 2, "fehlberg2": 1, "adaptive_heun": 1, "tsit5": 4,
}

# Test problems (rhs, y0, t_end): linear, scalar nonlinear non-autonomous, and a nonlinear
# system (a forced pendulum), the last because scalar problems cannot tell every order
# condition apart.
PROBLEMS: dict[str, tuple[Rhs, np.ndarray, float]] = {
    "exp": (lambda t, y: y, np.array([1.0]), 2.0),
    "riccati": (lambda t, y: -(y**2) + np.sin(t), np.array([1.0]), 1.0),
    "pendulum": (
        lambda t, y: np.array([y[1], -np.sin(y[0]) + 0.3 * np.cos(t)]),
        np.array([1.0, 0.0]),
        2.0,
    ),
}


def test_method_names() -> None:
    assert set(ADAPTIVE) == {"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5"}
    assert set(FIXED) == {"euler", "midpoint", "heun2", "heun3", "rk4"}
    assert all(name == tab.name for name, tab in ALL.items())


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_shapes(name: str) -> None:
    tab = ALL[name]
    s = len(tab.c)
    assert tab.c[0] == 0.0
    assert len(tab.a) == s and len(tab.b) == s
    assert all(len(row) == i for i, row in enumerate(tab.a))
    if name in ADAPTIVE:
        assert tab.b_error is not None and len(tab.b_error) == s
        assert len(tab.dense) == s and all(len(row) == 4 for row in tab.dense)
    else:
        assert tab.b_error is None and tab.dense == () and not tab.fsal


@pytest.mark.parametrize("name", ALL)
def test_fsal_flag(name: str) -> None:
    tab = ALL[name]
    expected = tab.a[-1] == tab.b[:-1] and tab.b[-1] == 0.0 and tab.c[-1] == 1.0
    assert tab.fsal == expected
    # fehlberg2 and adaptive_heun end on a stage at the embedded solution, not at y1.
    assert tab.fsal == (name in {"dopri5", "dopri8", "bosh3", "tsit5"})


@pytest.mark.parametrize("name", ALL)
def test_row_sums(name: str) -> None:
    tab = ALL[name]
    for row, c in zip(tab.a, tab.c):
        assert math.fsum(row) == pytest.approx(c, abs=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_weight_sums(name: str) -> None:
    tab = ALL[name]
    assert math.fsum(tab.b) == pytest.approx(1.0, abs=1e-14)
    if tab.b_error is not None:
        assert math.fsum(tab.b_error) == pytest.approx(0.0, abs=1e-14)


# --------------------------------------------------------------------------------------------
# Order conditions (algebraic, up to order 4)
# --------------------------------------------------------------------------------------------


def _order_condition_residuals(
    weights: np.ndarray, a: np.ndarray, c: np.ndarray, order: int, theta: float = 1.0
) -> list[float]:
    """Residuals of the order conditions (one per rooted tree up to `order`, max 4), for
    quadrature weights `weights` over a step of length theta*h (theta = 1: the usual ones)."""
    ac = a @ c
    conditions = [(weights.sum(), 1, 1)]  # (sum, tree order rho, tree density gamma)
    if order >= 2:
        conditions += [(weights @ c, 2, 2)]
    if order >= 3:
        conditions += [(weights @ c**2, 3, 3), (weights @ ac, 3, 6)]
    if order >= 4:
        conditions += [
            (weights @ c**3, 4, 4),
            (weights @ (c * ac), 4, 8),
            (weights @ (a @ c**2), 4, 12),
            (weights @ (a @ ac), 4, 24),
        ]
    return [value - theta**rho / gamma for value, rho, gamma in conditions]


def _matrix(tab) -> np.ndarray:
    s = len(tab.c)
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        a[i, : len(row)] = row
    return a


@pytest.mark.parametrize("name", ALL)
def test_order_conditions(name: str) -> None:
    # For fehlberg2 and adaptive_heun this is the tableau as an ordinary RK method (k[0] =
    # f(t0, y0)); torchdiffeq's reuse of their last stage is a property of the solver loop.
    tab = ALL[name]
    order = min(tab.order, 4)
    residuals = _order_condition_residuals(np.array(tab.b), _matrix(tab), np.array(tab.c), order)
    np.testing.assert_allclose(residuals, 0.0, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Empirical orders
# --------------------------------------------------------------------------------------------


def _stages(tab, f: Rhs, t: float, y: np.ndarray, h: float) -> list[np.ndarray]:
    k = [f(t, y)]
    for i in range(1, len(tab.c)):
        k.append(f(t + tab.c[i] * h, y + h * sum(aij * kj for aij, kj in zip(tab.a[i], k))))
    return k


def _step(tab, f: Rhs, t: float, y: np.ndarray, h: float, weights=None) -> np.ndarray:
    k = _stages(tab, f, t, y, h)
    return y + h * sum(w * kj for w, kj in zip(tab.b if weights is None else weights, k))


def _integrate(tab, f: Rhs, y0: np.ndarray, t_end: float, n: int) -> np.ndarray:
    h = t_end / n
    y = y0.copy()
    for i in range(n):
        y = _step(tab, f, i * h, y, h)
    return y


def _reference(f: Rhs, y0: np.ndarray, t0: float, t1: float) -> np.ndarray:
    sol = solve_ivp(f, (t0, t1), y0, method="DOP853", rtol=3e-14, atol=1e-16)
    assert sol.success
    return sol.y[:, -1]


def _observed_orders(errors: list[float]) -> list[float]:
    return [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]


# Step counts per order: fine enough to be close to the asymptotic regime, coarse enough to
# keep the errors far above round-off.
_STEP_COUNTS = {1: (32, 64), 2: (32, 64), 3: (16, 32), 4: (16, 32), 5: (32, 64), 8: (4, 8)}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("name", ALL)
def test_convergence_order(name: str, problem: str) -> None:
    # Global error of a fixed-step integration, halving h. (For fehlberg2 and adaptive_heun
    # this is the tableau as an ordinary RK method, like the algebraic check above.)
    tab = ALL[name]
    f, y0, t_end = PROBLEMS[problem]
    exact = _reference(f, y0, 0.0, t_end)
    errors = [
        float(np.abs(_integrate(tab, f, y0, t_end, n) - exact).max())
        for n in _STEP_COUNTS[tab.order]
    ]
    assert min(errors) > 1e-13
    (observed,) = _observed_orders(errors)
    assert observed > tab.order - 0.4, (errors, observed)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_embedded_order_conditions(name: str) -> None:
    # b_hat = b - b_error has exactly its nominal order (as far as checked algebraically), so
    # the error estimate is O(h**(p_hat + 1)) and no better.
    tab = ADAPTIVE[name]
    b_hat = np.array(tab.b) - np.array(tab.b_error)
    a, c, p_hat = _matrix(tab), np.array(tab.c), EMBEDDED_ORDER[name]
    residuals = _order_condition_residuals(b_hat, a, c, min(p_hat, 4))
    np.testing.assert_allclose(residuals, 0.0, atol=1e-14)
    if p_hat < 4:
        assert np.abs(_order_condition_residuals(b_hat, a, c, p_hat + 1)).max() > 1e-3


@pytest.mark.parametrize(
    ("problem", "y0"), [("riccati", np.array([0.5])), ("pendulum", np.array([0.3, -0.8]))]
)
@pytest.mark.parametrize("name", ["dopri5", "tsit5", "dopri8"])
def test_embedded_local_error_order(name: str, problem: str, y0: np.ndarray) -> None:
    # The local error of b_hat must scale like h**(p_hat + 1): h**5 for tsit5 and dopri5, h**8
    # for dopri8. (Low-order pairs are covered by the algebraic check above; fehlberg2's
    # leading error term is tiny, 1/512, so its asymptotic regime is out of float64's reach.)
    tab = ADAPTIVE[name]
    f = PROBLEMS[problem][0]
    b_hat = np.array(tab.b) - np.array(tab.b_error)
    p_hat = EMBEDDED_ORDER[name]
    t0 = 0.3
    hs = (0.05, 0.025) if p_hat < 7 else (0.4, 0.2)
    errors = [
        float(np.abs(_step(tab, f, t0, y0, h, b_hat) - _reference(f, y0, t0, t0 + h)).max())
        for h in hs
    ]
    assert min(errors) > 1e-12
    (observed,) = _observed_orders(errors)
    assert abs(observed - (p_hat + 1)) < 0.4, (errors, observed)


# --------------------------------------------------------------------------------------------
# Dense output
# --------------------------------------------------------------------------------------------


def _dense_weights(dense, theta: float) -> np.ndarray:
    """B_j(theta) for every stage j."""
    return np.array(dense) @ np.array([theta ** (p + 1) for p in range(len(dense[0]))])


def _dense_derivative_weights(dense, theta: float) -> np.ndarray:
    """B_j'(theta) for every stage j."""
    return np.array(dense) @ np.array([(p + 1) * theta**p for p in range(len(dense[0]))])


@pytest.mark.parametrize("name", ADAPTIVE)
def test_dense_endpoints(name: str) -> None:
    tab = ADAPTIVE[name]
    s = len(tab.c)
    np.testing.assert_allclose(_dense_weights(tab.dense, 0.0), 0.0, atol=0)
    np.testing.assert_allclose(_dense_weights(tab.dense, 1.0), tab.b, rtol=0, atol=1e-14)  # y1
    # Slopes: p'(0) = h k[0] and p'(1) = h k[S-1] (torchdiffeq's fit; also true of tsit5's).
    slope_at_0 = _dense_derivative_weights(tab.dense, 0.0)
    slope_at_1 = _dense_derivative_weights(tab.dense, 1.0)
    np.testing.assert_allclose(slope_at_0, np.eye(s)[0], rtol=0, atol=0)
    np.testing.assert_allclose(slope_at_1, np.eye(s)[-1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("theta", [0.1, 0.3, 0.5, 0.8])
def test_dense_order_conditions(name: str, theta: float) -> None:
    tab = ADAPTIVE[name]
    weights = _dense_weights(tab.dense, theta)
    residuals = _order_condition_residuals(weights, _matrix(tab), np.array(tab.c), 4, theta)
    if name in {"dopri5", "dopri8", "tsit5"}:
        np.testing.assert_allclose(residuals, 0.0, atol=1e-14)  # a 4th-order interpolant
    else:
        # torchdiffeq's mid-point values for bosh3, fehlberg2 and adaptive_heun are only
        # first-order accurate (e.g. bosh3's y0 + h/2 k[1]), so their quartic is too: reproduced
        # on purpose, for agreement with torchdiffeq.
        assert abs(residuals[0]) < 1e-14
        assert np.abs(residuals[1:]).max() > 1e-3


def test_quartic_fit_dense_conditions() -> None:
    rng = np.random.default_rng(0)
    s = 5
    b = [Fraction(int(x), 97) for x in rng.integers(-50, 50, s)]
    c_mid = [Fraction(int(x), 89) for x in rng.integers(-50, 50, s)]
    dense = tableaus._quartic_fit_dense(b, c_mid)
    assert len(dense) == s and all(len(row) == 4 for row in dense)
    np.testing.assert_allclose(_dense_weights(dense, 1.0), [float(x) for x in b], atol=1e-13)
    np.testing.assert_allclose(_dense_weights(dense, 0.5), [float(x) for x in c_mid], atol=1e-13)
    np.testing.assert_allclose(_dense_derivative_weights(dense, 0.0), np.eye(s)[0], atol=1e-13)
    np.testing.assert_allclose(_dense_derivative_weights(dense, 1.0), np.eye(s)[-1], atol=1e-13)


@pytest.mark.parametrize("theta", [0.25, 0.5, 0.75])
def test_tsit5_dense_output_on_exponential(theta: float) -> None:
    tab = ADAPTIVE["tsit5"]
    h, y0 = 0.1, np.array([1.0])
    k = _stages(tab, lambda t, y: y, 0.0, y0, h)
    y_theta = y0 + h * sum(w * kj for w, kj in zip(_dense_weights(tab.dense, theta), k))
    assert abs(y_theta[0] / math.exp(theta * h) - 1.0) < 1e-7
