"""`flashode.odeint_event`: solve until an event, with a differentiable event time."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .events import reroute_event_gradient
from .odeint import odeint, prepare_problem

__all__ = ["odeint_event"]


def odeint_event(
    func: Callable[..., Any],
    y0: Tensor | tuple[Tensor, ...],
    t0: Tensor,
    *,
    event_fn: Callable[..., Any],
    reverse_time: bool = False,
    odeint_interface: Callable[..., Any] = odeint,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | tuple[Tensor, ...]]:
    """Solve dy/dt = func(t, y) from t0, forward (or backward with `reverse_time`), until
    `event_fn(t, y)` crosses zero (any component of a multivariate event function).

    As torchdiffeq's `odeint_event`: returns `(event_t, solution)` with `solution = [y0, y(event_t)]`
    stacked (a tuple of such for a tuple y0); `odeint_interface` is `flashode.odeint` (gradients by
    backpropagation) or `flashode.odeint_adjoint`, `kwargs` go to it (rtol, atol, method, options,
    adjoint_params, ...). The event is located on the method's dense output to `atol`. `event_t` is
    differentiable with respect to y0, t0 and func's parameters (implicit function theorem), and so
    is the final state, which moves with the event time.
    """
    t0_flat = t0.reshape(-1)
    offset = -1.0 if reverse_time else 1.0  # any second time: it only sets the direction
    t = torch.cat([t0_flat, t0_flat.detach() + offset])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)

    # The flat view of the problem, for the gradient rerouting (tolerances and method do not matter).
    problem = prepare_problem(func, y0, t, 0.0, 0.0, None, None, differentiable_t=True)
    if problem.tuple_shapes is None:
        state_t = solution[-1]
    else:
        state_t = torch.cat([part[-1].reshape(-1) for part in solution])
    event_t, state_t = reroute_event_gradient(problem, problem.event_function(event_fn), event_t, state_t)
    if problem.tuple_shapes is None:
        return event_t, torch.cat([solution[:-1], state_t.unsqueeze(0)])
    parts = problem.unflatten(state_t.unsqueeze(0))
    return event_t, tuple(torch.cat([s[:-1], p]) for s, p in zip(solution, parts))
