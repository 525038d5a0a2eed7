"""Fixed-grid solvers: one driver (grid, outputs, events) shared by every fixed-grid method, and
the explicit Runge–Kutta method family run by it for every tableau in `tableaus.FIXED`.

Semantics follow torchdiffeq's `FixedGridODESolver`: the grid comes from `step_size` (the last
point moved onto t[-1]) or a `grid_constructor(func, y0, t)`, or is t itself; outputs between grid
points are linearly interpolated (`interp="linear"`) or use the cubic Hermite interpolant
(`interp="cubic"`, one extra evaluation of f at the end of each step that holds outputs); with
`perturb=True` the first stage sees t0 just after and the stages at t1 see t1 just before.
A method only says how to take one step (`FixedGridSolver.step`); for explicit Runge–Kutta each
stage is one `rk_stage` op, and all outputs inside a step are one `rk_dense` op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import _ops
from .._func import Perturb, VectorField
from ..errors import SolverError
from ..events import EventFunction, event_sign, locate_event
from ..progress import NO_PROGRESS, Bar
from ..tableaus import Tableau
from .common import Callbacks, StageBuffers

# Cubic Hermite basis functions as coefficients of theta, theta^2, theta^3.
_H10 = (1.0, -2.0, 1.0)  # multiplies h * f0
_H01 = (0.0, 3.0, -2.0)  # multiplies y1 - y0 = h * sum_j b_j k_j
_H11 = (0.0, -1.0, 1.0)  # multiplies h * f1

# torchdiffeq's cap on the steps a fixed-grid event search takes.
MAX_EVENT_STEPS = 20000

# One step's interpolant: thetas in [0, 1] -> the state at t0 + theta * dt, shape (M, *state).
Interpolant = Callable[[list[float]], Tensor]


def linear_dense(b: tuple[float, ...]) -> list[float]:
    """y0 + theta (y1 - y0) as per-stage polynomials (degree 1)."""
    return list(b)


def cubic_hermite_dense(b: tuple[float, ...]) -> list[float]:
    """Cubic Hermite through (y0, f0) and (y1, f1), over the stages plus f1 appended as a last row."""
    rows = []
    for j, bj in enumerate(b):
        rows.append([(_H10[p] if j == 0 else 0.0) + bj * _H01[p] for p in range(3)])
    rows.append(list(_H11))
    return [p for row in rows for p in row]


@dataclass(frozen=True)
class FixedGridOptions:
    """torchdiffeq's options common to every fixed-grid method (internal time, positive step)."""

    step_size: float | None = None
    # (tau grid of the output times, the state the solve starts from) -> tau grid
    grid_constructor: Callable[[Tensor, Tensor], Tensor] | None = None
    interp: str = "linear"
    perturb: bool = False


@dataclass(frozen=True)
class FixedStep:
    """A step's end state and its interpolant (valid until the next step is taken)."""

    y1: Tensor
    interpolate: Interpolant


class FixedGridSolver:
    """The grid, output and event driver; subclasses implement `step` (and `start`, to reset
    per-solve state such as stage buffers or a multistep history)."""

    def __init__(self, field: VectorField, y0: Tensor, grid: FixedGridOptions, callbacks: Callbacks) -> None:
        if grid.step_size is not None and grid.grid_constructor is not None:
            raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
        if grid.interp not in ("linear", "cubic"):
            raise ValueError(f"Unknown interpolation method {grid.interp}")
        self.field = field
        self.y0 = y0
        self.opts = grid
        self.callbacks = callbacks
        self.progress = NO_PROGRESS
        self.n_steps = 0

    # --- what a method provides ---------------------------------------------------------------

    def start(self, y0: Tensor) -> None:
        """Called before the first step of every solve."""

    def step(self, t0: float, t1: float, y0: Tensor) -> FixedStep:
        raise NotImplementedError

    # --- shared helpers for methods -----------------------------------------------------------

    def first_perturb(self) -> Perturb:
        return Perturb.NEXT if self.opts.perturb else Perturb.NONE

    def last_perturb(self) -> Perturb:
        return Perturb.PREV if self.opts.perturb else Perturb.NONE

    def hermite_interpolant(self, t1: float, y0: Tensor, f0: Tensor, y1: Tensor, dt: float) -> Interpolant:
        """torchdiffeq's output interpolation for a method that knows y0, f0 and y1: linear, or
        cubic Hermite with f1 evaluated once, on first use. One `rk_dense` per call."""
        ops = _ops.ops_for(y0.device, torch.is_grad_enabled())
        h = self.field.direction * dt
        if self.opts.interp == "linear":
            return lambda thetas: ops.rk_dense(y0, (y1 - y0).unsqueeze(0), [1.0], thetas, 1.0)
        rows: dict[bool, Tensor] = {}  # by grad mode: an event search bisects without grad first

        def cubic(thetas: list[float]) -> Tensor:
            grad = torch.is_grad_enabled()
            if grad not in rows:
                f1 = self.field(t1, y1)
                rows[grad] = torch.stack([h * f0, y1 - y0, h * f1])
            return ops.rk_dense(y0, rows[grad], [*_H10, *_H01, *_H11], thetas, 1.0)

        return cubic

    # --- the driver ---------------------------------------------------------------------------

    def grid(self, t: list[float], y0: Tensor) -> list[float]:
        step_size, constructor = self.opts.step_size, self.opts.grid_constructor
        if step_size is not None:
            # torchdiffeq's construction: ceil((end - start) / step + 1) points, last moved onto t[-1].
            count = int(math.ceil((t[-1] - t[0]) / step_size + 1))
            grid = [i * step_size + t[0] for i in range(count)]
            grid[-1] = t[-1]
            return grid
        if constructor is not None:
            grid_t = constructor(torch.tensor(t, dtype=torch.float64, device=y0.device), y0)
            grid = [float(x) for x in grid_t.tolist()]
            if not (grid[0] == t[0] and grid[-1] == t[-1]):
                raise AssertionError("grid_constructor must return a grid starting at t[0] and ending at t[-1]")
            return grid
        return list(t)

    def integrate(self, t: list[float], y0: Tensor | None = None) -> Tensor:
        """Solution at the increasing internal times t, from y0 (default: the solver's y0)."""
        y0 = self.y0 if y0 is None else y0
        bar = self.progress.open(t[0], t[-1], self.field.user_time)
        try:
            return self.step_through(t, y0, bar)
        finally:
            self.progress.release(bar)

    def step_through(self, t: list[float], y0: Tensor, bar: Bar | None) -> Tensor:
        grid = self.grid(t, y0)
        self.start(y0)
        outputs: list[Tensor] = [y0.unsqueeze(0)]
        j = 1
        for t0, t1 in zip(grid[:-1], grid[1:]):
            dt = t1 - t0
            self.callbacks.step(self.field, t0, y0, dt)
            taken = self.step(t0, t1, y0)
            self.n_steps += 1
            if bar is not None:
                bar.update(t1, dt, self.field.nfe)
            first = j
            while j < len(t) and t1 >= t[j]:
                j += 1
            if j > first:
                chunk = taken.interpolate([(t[m] - t0) / dt for m in range(first, j)])
                self.check_finite(chunk, t[j - 1], dt)
                outputs.append(chunk)
            y0 = taken.y1
        return torch.cat(outputs)

    def integrate_until_event(self, t0: float, event: EventFunction, tol: float) -> tuple[float, Tensor]:
        """Steps of `step_size` from t0 until the event's sign changes at a step's end; returns the
        event time (internal) and the state there, located on that step's interpolant."""
        if self.opts.step_size is None:
            raise AssertionError(
                "Event handling for fixed step solvers currently requires `step_size` to be provided in options."
            )
        bar = self.progress.open(t0, math.inf, self.field.user_time)
        try:
            return self.step_until_event(t0, event, tol, bar)
        finally:
            self.progress.release(bar)

    def step_until_event(self, t0: float, event: EventFunction, tol: float, bar: Bar | None) -> tuple[float, Tensor]:
        y0, dt = self.y0, self.opts.step_size
        self.start(y0)
        sign0 = event_sign(event(t0, y0))
        for _ in range(MAX_EVENT_STEPS):
            t1 = t0 + dt
            self.callbacks.step(self.field, t0, y0, dt)
            taken = self.step(t0, t1, y0)
            self.n_steps += 1
            if bar is not None:
                bar.update(t1, dt, self.field.nfe)
            if event_sign(event(t1, taken.y1)) != sign0:
                start = t0

                def state_at(tau: float) -> Tensor:
                    return taken.interpolate([(tau - start) / dt])[0]

                return locate_event(state_at, event, sign0, t0, t1, tol)
            t0, y0 = t1, taken.y1
        raise SolverError(
            f"Reached maximum number of iterations {MAX_EVENT_STEPS}: no event found up to "
            f"t={self.field.user_time(t0):.10g} with step_size={dt:.3g}"
        )

    def check_finite(self, state: Tensor, tau: float, dt: float) -> None:
        if torch.compiler.is_compiling():
            # A traced solve cannot read the device: the check runs inside the compiled graph
            # instead, and raises a RuntimeError with the same message when it fails.
            torch._assert_async(torch.isfinite(state).all(), self.non_finite_message(tau, dt))
        elif not bool(torch.isfinite(state).all()):
            raise SolverError(self.non_finite_message(tau, dt))

    def non_finite_message(self, tau: float, dt: float) -> str:
        return (
            f"non-finite values in the state at t={self.field.user_time(tau):.10g} "
            f"(fixed step dt={dt:.3g}: reduce step_size, or check func)"
        )


class FixedGridRKSolver(FixedGridSolver):
    """Explicit Runge–Kutta from a tableau; outputs use the stages themselves (`rk_dense`)."""

    def __init__(
        self, field: VectorField, y0: Tensor, tableau: Tableau, grid: FixedGridOptions, callbacks: Callbacks
    ) -> None:
        super().__init__(field, y0, grid, callbacks)
        self.tab = tableau
        self.stages = len(tableau.c)
        self.rows = [list(r) for r in tableau.a]
        self.b = list(tableau.b)
        self.dense = linear_dense(tableau.b) if grid.interp == "linear" else cubic_hermite_dense(tableau.b)
        self._buffers: StageBuffers | None = None

    def start(self, y0: Tensor) -> None:
        record_graph = torch.is_grad_enabled()
        self._ops = _ops.ops_for(y0.device, record_graph)
        extra = 1 if self.opts.interp == "cubic" else 0  # a row for f1
        self._buffers = StageBuffers.reuse(self._buffers, y0, self.stages + extra, record_graph)

    def step(self, t0: float, t1: float, y0: Tensor) -> FixedStep:
        return self.step_from(t0, t1, y0, self.field(t0, y0, self.first_perturb()))

    def step_from(self, t0: float, t1: float, y0: Tensor, f0: Tensor) -> FixedStep:
        """A step whose first stage f(t0, y0) is already known (a multistep method's start-up)."""
        field, ops, dt = self.field, self._ops, t1 - t0
        h = field.direction * dt
        k, k_rows = self._buffers.next(f0)
        for i in range(1, self.stages):
            yi = ops.rk_stage(y0, k, self.rows[i], h)
            if self.tab.c[i] == 1.0:
                field.into(k_rows[i], t1, yi, self.last_perturb())
            else:
                field.into(k_rows[i], t0 + self.tab.c[i] * dt, yi)
        y1 = ops.rk_stage(y0, k, self.b, h)
        f1_grad_modes: list[bool] = []  # the grad modes f1 was written in

        def interpolate(thetas: list[float]) -> Tensor:
            # An event search bisects without grad, then evaluates the event state with it: f1
            # is then written again so that autograd sees where it came from.
            grad = torch.is_grad_enabled()
            if self.opts.interp == "cubic" and grad not in f1_grad_modes:
                field.into(k_rows[self.stages], t1, y1)
                f1_grad_modes.append(grad)
            return ops.rk_dense(y0, k, self.dense, thetas, h)

        return FixedStep(y1, interpolate)
