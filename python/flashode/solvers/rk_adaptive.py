"""One adaptive explicit Runge–Kutta solver for every tableau in `tableaus.ADAPTIVE`.

Control flow (step acceptance, step size, output times) runs on the host in Python floats; every
pass over the state is a fused op: one `rk_stage` per stage, one `rk_finalize` per step (new state,
error estimate and error norm together) and one `rk_dense` per accepted step for all output times
it covers. The only device->host read per step is the error ratio, for the accept decision.

Semantics follow torchdiffeq 0.2.5 (`RKAdaptiveStepsizeODESolver`): Hairer's initial step, accept
when ratio <= 1, the integral controller with safety/ifactor/dfactor and exponent 1/order, min/max
step clamps, `step_t` and `jump_t`, and `max_num_steps` counted between consecutive outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .. import _ops
from .._func import Perturb, VectorField
from ..errors import SolverError
from ..events import EventFunction, event_sign, locate_event
from ..progress import NO_PROGRESS, Bar
from ..tableaus import INTERPOLANTS, Tableau
from .common import Callbacks, ErrorNorm, StageBuffers, check_finite_start, initial_step_size


@dataclass
class AdaptiveOptions:
    first_step: float | None = None
    min_step: float = 0.0
    max_step: float = math.inf
    step_t: list[float] = field(default_factory=list)
    jump_t: list[float] = field(default_factory=list)
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    max_num_steps: int = 2**31 - 1
    time_float32: bool = False


@dataclass(frozen=True)
class AcceptedStep:
    """One accepted step in internal time: from t0 over dt, starting at y0, with stages k."""

    t0: float
    dt: float
    y0: Tensor
    k: Tensor


def optimal_step_size(dt: float, ratio: float, opts: AdaptiveOptions, order: int) -> float:
    """torchdiffeq's integral controller; a non-finite ratio shrinks the step by dfactor."""
    if ratio == 0.0:
        return dt * opts.ifactor
    if not math.isfinite(ratio):
        return dt * opts.dfactor
    dfactor = 1.0 if ratio < 1.0 else opts.dfactor
    factor = min(opts.ifactor, max(opts.safety / ratio ** (1.0 / order), dfactor))
    return dt * factor


class AdaptiveRKSolver:
    def __init__(
        self,
        field: VectorField,
        y0: Tensor,
        tableau: Tableau,
        norm: ErrorNorm,
        options: AdaptiveOptions,
        callbacks: Callbacks,
    ) -> None:
        self.field = field
        self.y0 = y0
        self.tab = tableau
        self.norm = norm
        self.opts = options
        self.callbacks = callbacks
        self.progress = NO_PROGRESS
        self.sign = field.direction
        self.stages = len(tableau.c)
        self.rows = [list(r) for r in tableau.a]
        self.b = list(tableau.b)
        self.b_error = list(tableau.b_error or ())
        self.dense = _flat(tableau.dense)  # torchdiffeq's interpolant, for odeint's outputs
        # The interpolant as accurate between step ends as at them (dense output, events).
        self.interpolant = INTERPOLANTS[tableau.name]
        self.accurate_dense = _flat(self.interpolant.dense)
        self._buffers: StageBuffers | None = None
        self.n_steps = self.n_accepted = 0
        self.next_dt: float | None = None  # the step proposed after the last solve (to resume from)
        # Set to a list to keep every accepted step (for dense output over the whole solve).
        self.accepted_steps: list[AcceptedStep] | None = None
        self._round = (lambda x: float(np.float32(x))) if options.time_float32 else (lambda x: x)

    def integrate(
        self,
        t: list[float],
        y0: Tensor | None = None,
        first_step: float | None = None,
        stop_after: Callable[[AcceptedStep, Tensor], bool] | None = None,
    ) -> Tensor:
        """Solution at the increasing internal times t (t[0] is the initial time), from y0 (default:
        the state the solver was made for) with a first step of `first_step` (default: the option,
        else Hairer's heuristic). `stop_after(step, y1)`, if given, is asked after every accepted
        step whether to stop there (while the step's stages are still intact)."""
        y0 = self.y0 if y0 is None else y0
        bar = self.progress.open(t[0], t[-1], self.field.user_time)
        try:
            return self.step_through(t, y0, first_step, stop_after, bar)
        finally:
            self.progress.release(bar)

    def step_through(
        self,
        t: list[float],
        y0: Tensor,
        first_step: float | None,
        stop_after: Callable[[AcceptedStep, Tensor], bool] | None,
        bar: Bar | None,
    ) -> Tensor:
        field, tab, opts = self.field, self.tab, self.opts
        first_step = opts.first_step if first_step is None else first_step
        record_graph = torch.is_grad_enabled()
        ops = _ops.ops_for(y0.device, record_graph)
        keep_steps = self.accepted_steps is not None
        buffers = self._buffers = StageBuffers.reuse(self._buffers, y0, self.stages, record_graph or keep_steps)

        t0 = t[0]
        if first_step is None:
            f0 = field(t0, y0)
            # The starting-step heuristic reads norms of y0 and f0 to the host anyway and checks
            # them for non-finite values on the way, with no extra device read.
            dt = initial_step_size(field, t0, y0, f0, tab.order - 1, self.norm, self.sign)
        else:
            check_finite_start(field, t0, y0, None)  # before func ever sees y0
            f0 = field(t0, y0)
            check_finite_start(field, t0, None, f0)
            dt = float(first_step)
        step_t = _future_times(opts.step_t, t0)
        jump_t = _future_times(opts.jump_t, t0)
        if len(set(step_t + jump_t)) != len(step_t) + len(jump_t):
            raise ValueError("`step_t` and `jump_t` must not have any repeated elements between them.")
        step_i = jump_i = 0
        stage_plan = [(i, self.rows[i], tab.c[i]) for i in range(1, self.stages)]
        rk_stage = ops.rk_stage

        outputs: list[Tensor] = [y0.unsqueeze(0)]
        next_out = 1
        steps_since_output = 0
        while next_out < len(t):
            if steps_since_output >= opts.max_num_steps:
                raise SolverError(
                    f"max_num_steps exceeded ({steps_since_output}>={opts.max_num_steps}) at "
                    f"t={field.user_time(t0):.10g} with dt={dt:.3g} (the solve is stiff or the tolerance too tight?)"
                )
            if not math.isfinite(dt):
                dt = opts.min_step
            dt = min(max(dt, opts.min_step), opts.max_step)
            self.callbacks.step(field, t0, y0, dt)
            t1 = self._round(t0 + dt)
            if not t1 > t0:
                raise SolverError(self._underflow_message(t0, dt))
            on_step = on_jump = False
            if step_i < len(step_t) and t0 < step_t[step_i] < t1:
                t1, dt, on_step = step_t[step_i], step_t[step_i] - t0, True
            if jump_i < len(jump_t) and t0 < jump_t[jump_i] < t1:
                t1, dt, on_step, on_jump = jump_t[jump_i], jump_t[jump_i] - t0, False, True

            k, k_rows = buffers.next(f0)
            h = self.sign * dt
            for i, row, c in stage_plan:
                yi = rk_stage(y0, k, row, h)
                if c == 1.0:  # stages at the step's end see t1 from just before (torchdiffeq)
                    field.into(k_rows[i], t1, yi, Perturb.PREV)
                else:
                    field.into(k_rows[i], self._round(t0 + c * dt), yi)
            y1, err, ratio_t = ops.rk_finalize(
                y0, k, self.b, self.b_error, h, self.norm.rtol, self.norm.atol,
                self.norm.segment_ends, self.norm.custom is not None, self.norm.per_segment,
            )
            ratio = self.norm.ratio(ratio_t, err, y0, y1)  # the one host read of the step
            self.n_steps += 1
            steps_since_output += 1

            accept = ratio <= 1.0
            if dt > opts.max_step:
                accept = False
            if dt <= opts.min_step:
                if math.isnan(ratio):  # min_step forces acceptance, never of a non-finite state
                    raise SolverError(
                        f"non-finite values in the state at t={field.user_time(t1):.10g} "
                        f"(step from t={field.user_time(t0):.10g} with dt={dt:.3g} = min_step)"
                    )
                accept = True
            if accept:
                self.callbacks.accept(field, t0, y0, dt)
                self.n_accepted += 1
                if bar is not None:
                    bar.update(t1, dt, field.nfe)
                if keep_steps:  # fresh stage buffers: k is never overwritten
                    self.accepted_steps.append(AcceptedStep(t0, dt, y0, k))
                first = next_out
                while next_out < len(t) and t[next_out] <= t1:
                    next_out += 1
                if next_out > first:
                    thetas = [(t[j] - t0) / dt for j in range(first, next_out)]
                    outputs.append(ops.rk_dense(y0, k, self.dense, thetas, h))
                    steps_since_output = 0
                if stop_after is not None and stop_after(AcceptedStep(t0, dt, y0, k), y1):
                    break
                f_next = k_rows[self.stages - 1]
                if on_step and step_i < len(step_t) - 1:
                    step_i += 1
                if on_jump:
                    if jump_i < len(jump_t) - 1:
                        jump_i += 1
                    f_next = field(t1, y1, Perturb.NEXT)
                y0, f0, t0 = y1, f_next, t1
            else:
                self.callbacks.reject(field, t0, y0, dt)
                # The buffer holding f0 is reused two attempts later; keep the copy in this one.
                f0 = k_rows[0]
            dt = min(max(optimal_step_size(dt, ratio, opts, tab.order), opts.min_step), opts.max_step)
        self.next_dt = dt
        return torch.cat(outputs)

    def integrate_until_event(self, t0: float, event: EventFunction, tol: float) -> tuple[float, Tensor]:
        """Steps from t0 until the event's sign changes at a step's end; returns the event time
        (internal) and the state there, located on that step's interpolant."""
        y0 = self.y0
        value0 = event(t0, y0)
        if value0 == 0.0:  # torchdiffeq: an event exactly at the start ends the solve there
            return t0, y0
        sign0 = event_sign(value0)
        found: list[tuple[float, Tensor]] = []

        def stop_after(step: AcceptedStep, y1: Tensor) -> bool:
            t1 = step.t0 + step.dt
            if event_sign(event(t1, y1)) == sign0:
                return False
            found.append(locate_event(self.state_in(step), event, sign0, step.t0, t1, tol))
            return True

        try:
            self.integrate([t0, math.inf], y0, stop_after=stop_after)
        except SolverError as exc:
            raise SolverError(f"no event found (event_fn kept its sign): {exc}") from exc
        return found[0]

    def state_in(self, step: AcceptedStep) -> Callable[[float], Tensor]:
        """The state at internal time tau inside an accepted step, on the accurate interpolant
        (events are located on it: torchdiffeq's quartic can be ~1000x the tolerance off)."""
        step = self.with_slopes(step)

        def state_at(tau: float) -> Tensor:
            ops = _ops.ops_for(step.y0.device, torch.is_grad_enabled())
            thetas = [(tau - step.t0) / step.dt]
            return ops.rk_dense(step.y0, step.k, self.accurate_dense, thetas, self.sign * step.dt)[0]

        return state_at

    def with_slopes(self, step: AcceptedStep) -> AcceptedStep:
        """The step with its accurate interpolant's slope rows after the stages (f at each node,
        on the previous round's interpolant, see `tableaus.Interpolant`), for `accurate_dense`.
        Differentiable when grad is enabled; costs `rounds * len(nodes)` evaluations of f."""
        interpolant = self.interpolant
        if interpolant.rounds == 0:
            return step
        ops = _ops.ops_for(step.y0.device, torch.is_grad_enabled())
        h = self.sign * step.dt
        nodes = list(interpolant.nodes)
        rows, poly = step.k, _flat(interpolant.start)
        for _ in range(interpolant.rounds):
            states = ops.rk_dense(step.y0, rows, poly, nodes, h)
            slopes = [self.field(step.t0 + theta * step.dt, state) for theta, state in zip(nodes, states)]
            rows, poly = torch.cat([step.k, torch.stack(slopes)]), self.accurate_dense
        return replace(step, k=rows)

    def _underflow_message(self, t0: float, dt: float) -> str:
        cause = (
            "the state or func produced non-finite values (NaN/inf) for every step size tried"
            if self.norm.saw_non_finite
            else "the solution may blow up here, or the problem is too stiff for an explicit method at this tolerance"
        )
        return f"underflow in dt {dt:.3g} at t={self.field.user_time(t0):.10g}: {cause}"


def _flat(rows: tuple[tuple[float, ...], ...]) -> list[float]:
    return [p for row in rows for p in row]


def _future_times(times: list[float], t0: float) -> list[float]:
    # Grid points at or before t0 can never be stepped to (torchdiffeq starts after t0 too).
    return sorted(x for x in times if x > t0)
