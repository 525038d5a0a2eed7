"""`method="scipy_solver"`: torchdiffeq's wrapper around scipy.integrate's ODE solvers.

Options follow torchdiffeq's `ScipyWrapperODESolver`: `solver` (a `solve_ivp` method name, default
"LSODA"), `min_step` and `max_step` go to scipy; `norm`, `grid_points` and `eps` are accepted and
ignored; `progress` is flashode's (a bar advanced per scipy step); anything else warns. scipy
integrates on the host in float64, so every evaluation of func copies the state to y0's device and
dtype and f back.

No gradients flow through this method (as in torchdiffeq): the outputs are new tensors without
autograd history, whatever requires grad in y0 or func. For gradients use
`odeint_adjoint(..., method="scipy_solver")`, whose backward pass solves the adjoint system through
scipy as well. (With a single output time, odeint returns a copy of y0, as for every method.)

The solve is driven step by step through scipy's `OdeSolver` objects, as `solve_ivp` does with
`t_eval` (same steps, outputs from each step's dense output, so results equal torchdiffeq's), which
lets flashode do what `solve_ivp` cannot: name the time a failed solve reached, and stop at the
first non-finite value of func instead of hanging (RK45 with NaN at t0), failing inside LAPACK
(Radau, BDF) or returning NaN (LSODA).
"""

from __future__ import annotations

import bisect
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from .._func import VectorField
from ..errors import SolverError
from ..progress import NO_PROGRESS, Bar
from .common import as_float, check_finite_start, tolerance

if TYPE_CHECKING:
    import scipy.integrate

SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
_IGNORED_OPTIONS = {"norm", "grid_points", "eps"}  # torchdiffeq drops these silently
_OPTIONS = {"solver", "min_step", "max_step", "progress"} | _IGNORED_OPTIONS
_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


class _NumpyField:
    """The field as scipy calls it: f(tau, y) on float64 host arrays, in internal time tau.

    VectorField gives dy/dt at t = direction * tau without negating it, so dy/dtau is direction * f.
    """

    def __init__(self, field: VectorField, y0: Tensor) -> None:
        self.field = field
        self.shape = y0.shape
        self.dtype = y0.dtype
        self.device = y0.device

    def __call__(self, tau: float, y: np.ndarray) -> np.ndarray:
        # torch.tensor copies: func must not be able to write into scipy's state through a view.
        state = torch.tensor(y, dtype=self.dtype, device=self.device).view(self.shape)
        # No graph is wanted here; the adjoint's AugmentedDynamics turns grad back on for its VJPs.
        with torch.no_grad():
            f = self.field(float(tau), state)
        # The product is a fresh array: scipy keeps f, which must not alias a buffer func reuses.
        out = f.detach().to("cpu", torch.float64).numpy().reshape(-1) * self.field.direction
        if not np.isfinite(out).all():
            raise SolverError(f"func returned non-finite values at t={self.field.user_time(float(tau)):.10g}")
        return out


class ScipyWrapperSolver:
    """Integrates with one of scipy.integrate's `OdeSolver` classes (RK45, LSODA, ...)."""

    def __init__(
        self,
        field: VectorField,
        y0: Tensor,
        method: type[scipy.integrate.OdeSolver],  # noqa: F821 (imported when first used)
        rtol: float | np.ndarray,
        atol: float | np.ndarray,
        step_options: dict[str, float],
    ) -> None:
        self.field = field
        self.y0 = y0
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.step_options = step_options
        self.progress = NO_PROGRESS

    def integrate(self, t: list[float], y0: Tensor | None = None) -> Tensor:
        """Solution at the increasing internal times t (t[0] is the initial time), from y0 (default:
        the state the solver was made for), shape (len(t), *y0.shape), as a new tensor without grad."""
        y0 = self.y0 if y0 is None else y0
        bar = self.progress.open(t[0], t[-1], self.field.user_time)
        try:
            return self.step_through(t, y0, bar)
        finally:
            self.progress.release(bar)

    def step_through(self, t: list[float], y0: Tensor, bar: Bar | None) -> Tensor:
        check_finite_start(self.field, t[0], y0, None)  # before func ever sees y0
        # A copy (astype copies): y0 must not share memory with a state scipy may update in place.
        start = y0.detach().reshape(-1).cpu().numpy().astype(np.float64)
        solver = self.method(
            _NumpyField(self.field, y0), t[0], start, t[-1], rtol=self.rtol, atol=self.atol, **self.step_options
        )
        out = np.empty((len(t), start.size))
        out[0] = start  # exactly y0, where solve_ivp would interpolate (LSODA's differs by roundoff)
        next_out = 1
        while next_out < len(t):
            try:
                message = solver.step()
            except SolverError as exc:
                raise SolverError(f"{exc} (scipy's {self.name} had reached t={self._user_time(solver.t)})") from None
            if solver.status == "failed":
                raise SolverError(f"scipy's {self.name} failed at t={self._user_time(solver.t)}: {message}")
            if not np.isfinite(solver.y).all():
                raise SolverError(f"non-finite values in the state at t={self._user_time(solver.t)}")
            if bar is not None:
                bar.update(float(solver.t), float(solver.step_size), self.field.nfe)
            stop = bisect.bisect_right(t, solver.t, lo=next_out)
            if stop > next_out:
                out[next_out:stop] = solver.dense_output()(np.asarray(t[next_out:stop])).T
                next_out = stop
        return torch.from_numpy(out).to(y0.device, y0.dtype).view(len(t), *y0.shape)

    @property
    def name(self) -> str:
        return self.method.__name__

    def _user_time(self, tau: float) -> str:
        return f"{self.field.user_time(float(tau)):.10g}"


def make_scipy_solver(
    field: VectorField,
    y0: Tensor,
    rtol: Any,
    atol: Any,
    options: dict[str, Any],
    func: Callable[..., Any],
    callback_suffix: str,
) -> ScipyWrapperSolver:
    """The solver for `method="scipy_solver"` and its options, checked; unknown options warn as
    torchdiffeq's `_handle_unused_kwargs` does, and so do callbacks on func (scipy steps without
    calling back, and torchdiffeq warns that they will not be called)."""
    callbacks = {name for name in _CALLBACKS if callable(getattr(func, name + callback_suffix, None))}
    if callbacks:
        warnings.warn("Solver '{}' does not support callbacks {}".format("scipy_solver", callbacks))
    unknown = set(options) - _OPTIONS
    if unknown:
        warnings.warn("{}: Unexpected arguments {}".format("ScipyWrapperODESolver", {k: options[k] for k in unknown}))
    try:
        import scipy.integrate  # optional: only this method needs scipy
    except ImportError as exc:
        raise ImportError("method='scipy_solver' needs scipy: pip install scipy") from exc
    method = _scipy_method(options.get("solver", "LSODA"))
    min_step = as_float(options.get("min_step", 0.0))
    step_options = {"max_step": as_float(options.get("max_step", math.inf))}
    # Only LSODA has a minimum step; solve_ivp passes it to every method, and the others warn that
    # it has no effect. flashode passes it elsewhere only when it was set, so that warning is true.
    if method is scipy.integrate.LSODA or min_step != 0.0:
        step_options["min_step"] = min_step
    rtol, atol = _tolerance(rtol, y0, "rtol"), _tolerance(atol, y0, "atol")
    return ScipyWrapperSolver(field, y0, method, rtol, atol, step_options)


def _scipy_method(solver: Any) -> type[scipy.integrate.OdeSolver]:
    import scipy.integrate

    # solve_ivp also takes an OdeSolver subclass in place of a name.
    if isinstance(solver, type) and issubclass(solver, scipy.integrate.OdeSolver):
        return solver
    if solver not in SCIPY_METHODS:
        raise ValueError(
            f"Unknown scipy solver {solver!r}: options['solver'] must be one of "
            + ", ".join(f'"{name}"' for name in SCIPY_METHODS)
            + " (scipy.integrate.solve_ivp's methods) or a scipy.integrate.OdeSolver subclass"
        )
    return getattr(scipy.integrate, solver)


def _tolerance(tol: Any, y0: Tensor, name: str) -> float | np.ndarray:
    """A scalar, or one float64 value per element of the flat state, as scipy takes tolerances."""
    if isinstance(tol, (int, float)):
        return float(tol)
    values = tolerance(tol, y0, name, torch.float64).cpu()
    return float(values) if values.numel() == 1 else values.reshape(-1).numpy()
