"""Event handling: solve until `event_fn(t, y)` crosses zero, and make the event time differentiable.

Semantics follow torchdiffeq: a multivariate event function stops the solve at the first sign change
of any component (its components are combined as min(c * sign(c(t0, y0))), positive until one of
them changes sign); the solver steps until the combined value changes sign at a step's end, then
bisects on that step's interpolant (the dense output of the method) until the bracket is `atol`
wide. The event time a solver returns carries no gradient; `odeint_event` adds one by the implicit
function theorem (`reroute_event_gradient`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ._func import VectorField
from .errors import SolverError

# The state at internal time tau inside the step that brackets the event.
StateAt = Callable[[float], Tensor]


class EventFunction:
    """The user's event_fn as the solvers see it: internal time and flat state in, the combined
    value out (as a host float, one device read per call)."""

    def __init__(
        self, event_fn: Callable[..., Any], field: VectorField, time_dtype: torch.dtype, tau0: float, y0: Tensor
    ) -> None:
        self.event_fn = event_fn
        self.field = field
        self.time_dtype = time_dtype
        with torch.no_grad():
            self.signs = torch.sign(self._user_value(self._time(tau0, y0), y0))

    def _time(self, tau: float, like: Tensor) -> Tensor:
        return torch.scalar_tensor(self.field.user_time(tau), dtype=self.time_dtype, device=like.device)

    def _user_value(self, t: Tensor, y: Tensor) -> Tensor:
        value = self.event_fn(t, self.field.shape(y))
        if not isinstance(value, Tensor):
            raise TypeError(f"event_fn must return a Tensor, got {type(value).__name__}")
        return value

    def combined(self, t: Tensor, y: Tensor) -> Tensor:
        """min(c * initial signs) at user time t (a tensor) and flat state y: differentiable."""
        return torch.min(self._user_value(t, y) * self.signs)

    def __call__(self, tau: float, y: Tensor) -> float:
        with torch.no_grad():
            value = float(self.combined(self._time(tau, y), y))
        if math.isnan(value):
            raise SolverError(
                f"event_fn returned NaN at t={self.field.user_time(tau):.10g} "
                "(is the state non-finite there, or event_fn undefined?)"
            )
        return value


def locate_event(state_at: StateAt, event: EventFunction, sign0: float, t0: float, t1: float, tol: float
                 ) -> tuple[float, Tensor]:
    """Bisects [t0, t1] (internal times, the sign of the event differs at the ends) until the
    bracket is `tol` wide, as torchdiffeq does: ceil(log2((t1 - t0) / tol)) halvings. Returns the
    bracket's midpoint and the state there, evaluated with autograd on (as the caller has it) so
    the event state is differentiable in y0 and func's parameters."""
    with torch.no_grad():
        halvings = max(0, math.ceil(math.log2((t1 - t0) / tol))) if tol > 0 else 64
        for _ in range(halvings):
            mid = (t0 + t1) / 2.0
            if event_sign(event(mid, state_at(mid))) == sign0:
                t0 = mid
            else:
                t1 = mid
    event_tau = (t0 + t1) / 2.0
    return event_tau, state_at(event_tau)


def event_sign(x: float) -> float:
    """The sign the solvers compare from step to step (0 for an exact zero, as torch.sign)."""
    return float((x > 0) - (x < 0))


class _RerouteEventGradient(torch.autograd.Function):
    """Identity on (event_t, state_t) whose backward moves dL/d(event_t) onto the state.

    The event time T solves c(T, y(T)) = 0, so a change dy of the state at T moves it by
    dT = -(dc/dy . dy) / (dc/dt + dc/dy . f). The state returned at T also moves with T itself, by
    f dT: that term is folded into dL/dT first, as if T were an ordinary odeint output time.
    """

    @staticmethod
    def forward(
        ctx: Any, problem: Any, event: EventFunction, event_t: Tensor, state_t: Tensor
    ) -> tuple[Tensor, Tensor]:
        ctx.problem = problem
        ctx.event = event
        ctx.save_for_backward(event_t, state_t)
        return event_t.detach().clone(), state_t.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_t: Tensor, grad_state: Tensor) -> tuple[None, None, None, Tensor]:
        event_t, state_t = ctx.saved_tensors
        problem, event = ctx.problem, ctx.event
        with torch.enable_grad():
            t = event_t.detach().to(event.time_dtype).requires_grad_(True)
            y = state_t.detach().requires_grad_(True)
            value = event.combined(t, y)
            dc_dt, dc_dy = torch.autograd.grad(value, (t, y), allow_unused=True)
        dc_dt = torch.zeros((), dtype=y.dtype, device=y.device) if dc_dt is None else dc_dt.to(y.dtype)
        dc_dy = torch.zeros_like(y) if dc_dy is None else dc_dy
        with torch.no_grad():
            f = problem.field(problem.direction * float(event_t), state_t)
            dc_total = dc_dt + torch.sum(dc_dy * f)
            if float(dc_total) == 0.0:
                raise SolverError(
                    f"odeint_event: event_fn does not cross zero transversally at t={float(event_t):.10g} "
                    "(d/dt event_fn(t, y(t)) = 0 there), so the event time has no derivative"
                )
            grad_t_total = grad_t.to(y.dtype) + torch.sum(grad_state * f)
            grad_state = grad_state + dc_dy * (-grad_t_total / dc_total)
        return None, None, None, grad_state


def reroute_event_gradient(problem: Any, event: EventFunction, event_t: Tensor, state_t: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """(event_t, state_t) with the event time's gradient routed through the state at the event."""
    return _RerouteEventGradient.apply(problem, event, event_t, state_t)
