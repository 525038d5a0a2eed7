"""`flashode.odeint_dense`: solve once over [t0, t1], then evaluate the solution anywhere in it.

torchdiffeq's `odeint_dense` supports dopri5 only; here every adaptive method works, the times may
decrease, the state may be a tuple, and the returned callable takes one time or a 1-D tensor of
times. The solve keeps each accepted step's start state and stages; an evaluation groups the
requested times by step and runs one fused `rk_dense` per step touched.

The interpolant is the method's `tableaus.INTERPOLANTS` entry, as accurate between the step ends as
at them, not the quartic fit `odeint` uses for torchdiffeq's output values (for bosh3 and dopri8
that one errs by ~1000x the tolerance between the step ends). The two agree at the step ends only.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import _ops
from .odeint import Problem, prepare_problem
from .solvers import ADAPTIVE_METHODS, make_solver
from .solvers.rk_adaptive import AcceptedStep

__all__ = ["odeint_dense", "DenseSolution"]


# Adaptive steps are decided on the host: under torch.compile the solve runs eagerly (one graph break).
@torch.compiler.disable(reason="flashode: odeint_dense decides its steps on the host and runs eagerly")
def odeint_dense(
    func: Callable[..., Any],
    y0: Tensor | tuple[Tensor, ...],
    t0: Tensor | float,
    t1: Tensor | float,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
) -> DenseSolution:
    """Integrate dy/dt = func(t, y) from t0 to t1 once and return the continuous solution.

    Same arguments as `flashode.odeint`, with the interval's ends in place of `t`, for the adaptive
    methods (dopri5 by default, dopri8, tsit5, bosh3, fehlberg2, adaptive_heun). The result is a
    `DenseSolution`: call it with a time, or a 1-D tensor of times, inside the interval.
    Gradients flow through it to y0 and func's parameters when the solve ran with grad enabled.

    Between the step ends the solution is as accurate as at them. For that, right after the solve,
    each accepted step costs extra evaluations of func: 2 for dopri5 and tsit5, 8 for dopri8, none
    for bosh3, fehlberg2 and adaptive_heun.
    """
    method = "dopri5" if method is None else method
    if method not in ADAPTIVE_METHODS:
        raise ValueError(
            f'odeint_dense needs an adaptive method (one of {", ".join(ADAPTIVE_METHODS)}), got "{method}": '
            "a fixed grid has no error-controlled interpolant to keep"
        )
    t = torch.stack([_as_time(t0), _as_time(t1)])
    if float(t[0]) == float(t[1]):
        raise ValueError(f"odeint_dense needs t0 != t1, got t0 = t1 = {float(t[0])}")
    problem = prepare_problem(func, y0, t, rtol, atol, method, options)
    solver = make_solver(
        method, problem.field, problem.y0, rtol=problem.rtol, atol=problem.atol, options=dict(problem.options),
        func=func, layout=problem.layout(), direction=problem.direction, time_dtype=problem.time_dtype,
    )
    solver.accepted_steps = []
    # A copy, so the kept first step never aliases the caller's y0.
    solver.integrate(problem.tau, y0=problem.y0.clone())
    # Now, in the solve's grad mode and with func's parameters as the solve saw them.
    steps = [solver.with_slopes(step) for step in solver.accepted_steps]
    return DenseSolution(problem, steps, solver.accurate_dense)


def _as_time(x: Tensor | float) -> Tensor:
    if isinstance(x, Tensor):
        return x.reshape(())
    return torch.tensor(float(x), dtype=torch.float64)


class DenseSolution:
    """y(t) for any t in [t0, t1] of one solve: `solution(t)` for a time (0-dim tensor or float)
    returns a state shaped like y0; for a 1-D tensor of M times, shape (M, *y0.shape) (tuples of
    those for a tuple y0). `t0`, `t1` are the interval's ends and `ts` the step boundaries, where the
    values are the solver's states (to rounding at t1, the last step's end)."""

    def __init__(self, problem: Problem, steps: list[AcceptedStep], dense_poly: list[float]) -> None:
        self._problem = problem
        self._steps = steps
        self._starts = [step.t0 for step in steps]
        self._dense = dense_poly
        self._tau_range = (problem.tau[0], problem.tau[1])
        self.t0, self.t1 = (problem.field.user_time(tau) for tau in self._tau_range)

    @property
    def ts(self) -> Tensor:
        """The accepted steps' boundaries in user time, from t0 (the last one may lie past t1)."""
        last = self._steps[-1]
        taus = self._starts + [last.t0 + last.dt]
        return torch.tensor([self._problem.field.user_time(tau) for tau in taus], dtype=torch.float64)

    @property
    def n_steps(self) -> int:
        return len(self._steps)

    @torch.compiler.disable(reason="flashode: a DenseSolution looks up its steps on the host")
    def __call__(self, t: Tensor | float) -> Tensor | tuple[Tensor, ...]:
        times = torch.as_tensor(t, dtype=torch.float64)
        if times.dim() > 1:
            raise ValueError(
                f"evaluate the dense solution at a time or a 1-D tensor of times, got shape {tuple(times.shape)}"
            )
        values = times.reshape(-1).tolist()
        out = self._evaluate(values)
        if times.dim() == 0:
            out = out[0]
        return self._problem.unflatten(out)

    def _evaluate(self, values: list[float]) -> Tensor:
        problem = self._problem
        lo, hi = self._tau_range
        taus = [problem.direction * v for v in values]
        for v, tau in zip(values, taus):
            if not lo <= tau <= hi:  # also rejects NaN
                raise ValueError(
                    f"the dense solution covers t in [{self.t0:.10g}, {self.t1:.10g}]; "
                    f"it cannot be evaluated at t={v!r}"
                )
        # Times grouped by the step that holds them: one fused interpolation per step touched.
        groups: dict[int, list[int]] = {}
        for m, tau in enumerate(taus):
            step = max(bisect.bisect_right(self._starts, tau) - 1, 0)
            groups.setdefault(step, []).append(m)
        ops = _ops.ops_for(problem.y0.device, torch.is_grad_enabled())
        rows: list[Tensor] = []
        order: list[int] = []
        for index, members in groups.items():
            step = self._steps[index]
            thetas = [(taus[m] - step.t0) / step.dt for m in members]
            rows.append(ops.rk_dense(step.y0, step.k, self._dense, thetas, problem.direction * step.dt))
            order.extend(members)
        stacked = torch.cat(rows)
        if order != sorted(order):
            inverse = np.argsort(order)
            stacked = stacked[torch.as_tensor(inverse, device=stacked.device)]
        return stacked
