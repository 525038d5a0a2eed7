"""`flashode.odeint`: torchdiffeq's front door (checks, tuple states, time reversal, method lookup).

Input checks raise torchdiffeq 0.2.5's exception types with its messages, so code written against
torchdiffeq sees the same errors; flashode adds checks torchdiffeq lacks (integer or half-precision
states, non-finite y0, wrongly shaped func outputs).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ._func import VectorField, _flat_to_shape
from .events import EventFunction
from .fused_dispatch import fused_option, try_odeint_fused, without_fused_option
from .solvers import ADAPTIVE_METHODS, SOLVER_NAMES, make_solver, traceable
from .solvers.common import StateLayout, segment_layout

__all__ = ["odeint", "HostTimes"]

# The steps an adaptive event search takes before giving up, unless options['max_num_steps'] says.
MAX_EVENT_SEARCH_STEPS = 1_000_000


@dataclass(frozen=True)
class HostTimes:
    """Output times as host floats, passed as `t` to odeint or odeint_adjoint by callers that keep
    them so (the nn layers): the solve reads nothing from the device for them, and under
    torch.compile they are Python constants that dynamo guards (changing them recompiles), where a
    tensor t's values are read once, when tracing (see `_read_times`). Like a tensor t they must be
    strictly monotonic; they carry no gradient, and `Problem.t` is made from them in float64."""

    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.values)


def odeint(
    func: Callable[..., Any],
    y0: Tensor | tuple[Tensor, ...],
    t: Tensor | HostTimes,
    *,
    rtol: float | Tensor | tuple[Any, ...] = 1e-7,
    atol: float | Tensor | tuple[Any, ...] = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable[..., Any] | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Integrate dy/dt = func(t, y), y(t[0]) = y0, and return y at every time in t.

    A drop-in for `torchdiffeq.odeint` (same signature, defaults, methods, options and output):
    `y0` is a tensor of any shape, or a tuple of tensors; `t` a 1-D strictly increasing or
    decreasing floating tensor; the result has shape `(len(t), *y0.shape)` with `result[0] == y0`
    (a tuple of such tensors for a tuple `y0`). `func(t, y)` receives `t` as a 0-dim tensor in y's
    dtype. Methods: adaptive dopri5 (default), dopri8, tsit5, bosh3, fehlberg2, adaptive_heun
    (options first_step, min_step, max_step, step_t, jump_t, safety, ifactor, dfactor,
    max_num_steps, norm, dtype); fixed-grid explicit euler, midpoint, heun2, heun3, rk4, the Adams
    methods explicit_adams, implicit_adams, fixed_adams (max_order, max_iters), the implicit
    implicit_euler, implicit_midpoint, trapezoid, radauIIA3, radauIIA5, gl4, gl6, sdirk2, trbdf2
    (max_iters), all with step_size / grid_constructor / interp / perturb; and scipy_solver
    (options solver, min_step, max_step; no gradients). Every method takes options['progress']:
    True, or a dict of tqdm keyword arguments, shows a progress bar over the interval on stderr
    (off by default; see `flashode.progress`). Gradients flow through the solve by autograd; see
    `odeint_adjoint` for constant memory.

    With `event_fn(t, y)` (and len(t) == 2, t[1] only giving the direction), the solve runs until
    any component of event_fn changes sign and returns `(event_t, solution)`, solution = [y0,
    y(event_t)]; the event is located on the method's dense output to `atol`. `event_t` carries no
    gradient here: use `flashode.odeint_event` for a differentiable event time.

    Under `torch.compile`, a fixed-grid explicit method (euler, midpoint, heun2, heun3, rk4, with t
    or a numeric step_size giving the grid) is traced whole, so `fullgraph=True` works: t's values
    are read when tracing and the graph raises if t later holds others, and the finiteness check of
    the outputs runs inside the graph (a RuntimeError when it fails). Every other solve (adaptive,
    Adams, implicit, scipy, events, grid_constructor) needs the host between steps and runs
    eagerly as one graph break, gradients flowing through it as without compile. A traced solve
    shows no progress bar.

    An MLP field the fused solve understands (`flashode.nn.MLPField`, or an nn.Sequential of Linear
    layers and one activation wrapped in `flashode.nn.Autonomous`) with an explicit RK method runs
    the whole solve in one op, each row of y0 (leading dimensions) with its own steps; see
    `flashode.fused_dispatch` for what differs, options['fused'] (None: automatic, True: required,
    False: never) to choose, and `flashode.fused_dispatch.fused_reason` to ask why not.
    """
    if torch.compiler.is_compiling() and not (event_fn is None and traceable(method, options)):
        return _odeint_eagerly(
            func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn
        )
    return _odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn)


def _odeint(
    func: Callable[..., Any],
    y0: Tensor | tuple[Tensor, ...],
    t: Tensor | HostTimes,
    *,
    rtol: Any,
    atol: Any,
    method: str | None,
    options: dict[str, Any] | None,
    event_fn: Callable[..., Any] | None,
) -> Tensor | tuple[Tensor, ...]:
    check_event_fn(event_fn, t)
    if event_fn is None:
        fused = try_odeint_fused(func, y0, t, rtol, atol, method, options)
        if fused is not None:
            return fused.ys
    elif fused_option(options):
        raise ValueError("odeint: options['fused'] is True but the fused MLP solve has no event handling (event_fn)")
    options = without_fused_option(options)
    # In event mode y(event) depends on t[0], which the solve supports (see Problem.event_start).
    # Compiling here means tracing the whole solve (odeint sends every other one to eager).
    problem = prepare_problem(
        func, y0, t, rtol, atol, method, options, differentiable_t=event_fn is not None,
        traced=torch.compiler.is_compiling(),
    )
    if event_fn is None:
        return problem.unflatten(problem.solve())
    event_t, solution = problem.solve_until_event(event_fn)
    return event_t, problem.unflatten(solution)


# A solve that steps on host decisions, run eagerly inside a compiled region: traced, every step's
# host read would be a graph break and every new step size a recompilation.
_odeint_eagerly = torch.compiler.disable(
    _odeint,
    reason="flashode: this solve decides its steps on the host (adaptive, Adams, implicit and scipy methods, "
    "events, a grid_constructor or a tensor step_size) and runs eagerly; a whole solve traces as one graph "
    "(fullgraph=True) with euler, midpoint, heun2, heun3 or rk4",
)


def check_event_fn(event_fn: Callable[..., Any] | None, t: Tensor | HostTimes) -> None:
    if event_fn is not None and len(t) != 2:
        raise ValueError(f"We require len(t) == 2 when in event handling mode, but got len(t)={len(t)}.")


@dataclass
class Problem:
    """A checked odeint call, as the solvers see it: a flat state (y0 itself for a tensor state,
    the parts concatenated for a tuple), increasing internal times tau = direction * t, and what
    a solver needs besides."""

    func: Callable[..., Any]
    y0: Tensor
    tuple_shapes: list[torch.Size] | None
    t: Tensor
    tau: list[float]
    direction: float
    time_dtype: torch.dtype
    method: str
    rtol: Any
    atol: Any
    options: dict[str, Any]
    field: VectorField

    def layout(self) -> StateLayout:
        if self.tuple_shapes is None or len(self.tuple_shapes) == 1 or "norm" in self.options:
            return StateLayout(self.field.shape)  # options['norm'], if any, is applied by make_solver
        return segment_layout(self.field.shape, list(itertools.accumulate(s.numel() for s in self.tuple_shapes)))

    def solve(self) -> Tensor:
        """The flat solution at every time: shape (len(t), *y0.shape)."""
        if len(self.tau) == 1:
            return self.y0.unsqueeze(0).clone()  # a fresh tensor, never a view of the caller's y0
        solver = make_solver(
            self.method, self.field, self.y0, rtol=self.rtol, atol=self.atol, options=dict(self.options),
            func=self.func, layout=self.layout(), direction=self.direction, time_dtype=self.time_dtype,
        )
        return solver.integrate(self.tau)

    def event_function(self, event_fn: Callable[..., Any]) -> EventFunction:
        # torchdiffeq hands event_fn times in the time dtype (adaptive) or the state's (fixed grid).
        time_dtype = self.time_dtype if self.method in ADAPTIVE_METHODS else self.y0.dtype
        return EventFunction(event_fn, self.field, time_dtype, self.tau[0], self.y0)

    def solve_until_event(self, event_fn: Callable[..., Any]) -> tuple[Tensor, Tensor]:
        """Solves from t[0] until event_fn crosses zero: the event time (user time, t's dtype and
        device, no gradient) and the flat solution [y0, y(event)] (differentiable in y0, func's
        parameters and t[0])."""
        if self.method == "scipy_solver":
            raise ValueError("scipy_solver does not support event handling (event_fn); use an adaptive method")
        options = dict(self.options)
        if self.method in ADAPTIVE_METHODS:
            # An event that never comes must not run forever (torchdiffeq would).
            options.setdefault("max_num_steps", MAX_EVENT_SEARCH_STEPS)
        solver = make_solver(
            self.method, self.field, self.event_start(), rtol=self.rtol, atol=self.atol, options=options,
            func=self.func, layout=self.layout(), direction=self.direction, time_dtype=self.time_dtype,
        )
        tol = float(torch.as_tensor(self.atol, dtype=torch.float64).min())
        event_tau, event_y = solver.integrate_until_event(self.tau[0], self.event_function(event_fn), tol)
        event_t = torch.tensor(self.field.user_time(event_tau), dtype=self.t.dtype, device=self.t.device)
        return event_t, torch.stack([self.y0, event_y])

    def event_start(self) -> Tensor:
        """y0, made to depend on t[0] when t requires grad: starting at t0 + d instead moves y at
        any later time by -Phi f(t0, y0) d (Phi the flow's Jacobian), which is what y0 - d f(t0, y0)
        does to first order, and the value is y0 itself."""
        if not (self.t.requires_grad and torch.is_grad_enabled()):
            return self.y0
        with torch.no_grad():
            f0 = self.field(self.tau[0], self.y0)
        shift = (self.t[0] - self.t[0].detach()).to(self.y0.dtype)
        return self.y0 - shift * f0

    def unflatten(self, out: Tensor) -> Tensor | tuple[Tensor, ...]:
        return out if self.tuple_shapes is None else _flat_to_shape(out, self.tuple_shapes)


def prepare_problem(
    func: Callable[..., Any],
    y0: Tensor | tuple[Tensor, ...],
    t: Tensor | HostTimes,
    rtol: Any,
    atol: Any,
    method: str | None,
    options: dict[str, Any] | None,
    *,
    differentiable_t: bool = False,
    traced: bool = False,
) -> Problem:
    """torchdiffeq's input checks and normalisation (`_check_inputs`). Gradients with respect to
    t exist only through the adjoint (`differentiable_t`): the solvers keep times on the host.
    `traced`: torch.compile traces the solve, which compiles t's values in (see `_read_times`)."""
    tuple_shapes: list[torch.Size] | None = None
    if not isinstance(y0, Tensor):
        assert isinstance(y0, tuple), "y0 must be either a torch.Tensor or a tuple"
        tuple_shapes = [y.shape for y in y0]
        rtol = _tuple_tol("rtol", rtol, tuple_shapes)
        atol = _tuple_tol("atol", atol, tuple_shapes)
        _check_state_dtypes(y0)
        y0_flat = torch.cat([y.reshape(-1) for y in y0])
    else:
        _check_state_dtypes((y0,))
        y0_flat = y0

    options = {} if options is None else dict(options)
    if method is None:
        method = "dopri5"
    if method not in SOLVER_NAMES:
        raise ValueError(
            'Invalid method "{}". Must be one of {}'.format(method, '{"' + '", "'.join(SOLVER_NAMES) + '"}.')
        )

    t_host = _check_timelike("t", t, traced)
    if isinstance(t, HostTimes):
        t = torch.tensor(t_host, dtype=torch.float64, device=y0_flat.device)
    reversed_time = len(t_host) > 1 and t_host[0] > t_host[1]

    if torch.is_tensor(rtol):
        assert not rtol.requires_grad, "rtol cannot require gradient"
    if torch.is_tensor(atol):
        assert not atol.requires_grad, "atol cannot require gradient"
    if t.requires_grad and torch.is_grad_enabled() and not differentiable_t:
        # The solver keeps times on the host (one device read per solve instead of per step), so
        # gradients cannot flow to t: refuse rather than return a silently missing gradient.
        raise NotImplementedError(
            "flashode.odeint does not differentiate with respect to t (t.requires_grad is True); "
            "use flashode.odeint_adjoint for time gradients, or pass t.detach() if they are not needed"
        )
    if t.device != y0_flat.device:
        warnings.warn("t is not on the same device as y0. Coercing to y0.device.")
        t = t.to(y0_flat.device)

    direction = -1.0 if reversed_time else 1.0
    time_dtype = torch.promote_types(options.pop("dtype", torch.float64), y0_flat.dtype)
    # Internal time tau = direction * t, increasing, as host floats in the time dtype.
    tau = [direction * x for x in t_host]
    if time_dtype == torch.float32:
        tau = [float(np.float32(x)) for x in tau]
    return Problem(
        func, y0_flat, tuple_shapes, t, tau, direction, time_dtype, method, rtol, atol, options,
        VectorField(func, y0_flat, direction, tuple_shapes),
    )


def _tuple_tol(name: str, tol: Any, shapes: list[torch.Size]) -> Any:
    try:
        iter(tol)
    except TypeError:
        return tol
    tol = tuple(tol)
    assert len(tol) == len(shapes), "If using tupled {} it must have the same length as the tuple y0".format(name)
    return torch.cat([torch.as_tensor(tol_).expand(shape.numel()) for tol_, shape in zip(tol, shapes)])


def _check_state_dtypes(ys: tuple[Tensor, ...]) -> None:
    for y in ys:
        if not isinstance(y, Tensor):
            raise TypeError(f"y0 must be a Tensor or a tuple of Tensors, got {type(y).__name__}")
        if y.is_complex():
            raise TypeError(
                f"y0 has complex dtype {y.dtype}: flashode integrates real float32/float64 states; "
                "solve for torch.view_as_real(y0) with a func that views its input back as complex"
            )
        if not torch.is_floating_point(y):
            raise TypeError(
                f"y0 must be a floating point Tensor (float32 or float64) but is {y.dtype}; "
                "an ODE state cannot be integer-valued (use y0.double() or y0.float())"
            )
        if y.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"y0 has dtype {y.dtype}: flashode integrates float32 or float64 states "
                "(half precision cannot hold the tolerances of an ODE solve); cast y0 to float32 and "
                "run func under torch.autocast if you want half-precision arithmetic inside it"
            )


def _check_timelike(name: str, t: Any, traced: bool = False) -> list[float]:
    """torchdiffeq's checks on t, done on the host copy of t (the solve's one read of t)."""
    if isinstance(t, HostTimes):
        values = [float(x) for x in t.values]
    else:
        assert isinstance(t, torch.Tensor), "{} must be a torch.Tensor".format(name)
        if not torch.is_floating_point(t):
            raise TypeError("`{}` must be a floating point Tensor but is a {}".format(name, t.type()))
        assert t.ndimension() == 1, "{} must be one dimensional".format(name)
        values = _read_times(t) if traced else t.detach().tolist()
    increasing = all(b > a for a, b in zip(values, values[1:]))
    decreasing = all(b < a for a, b in zip(values, values[1:]))
    assert increasing or decreasing, "{} must be strictly increasing or decreasing".format(name)
    return values


def _read_times(t: Tensor) -> list[float]:
    """t's values for a solve that torch.compile traces: read once, when tracing, they become
    constants of the graph (the solve's steps depend on them). Dynamo guards tensors by shape, not
    value, so the graph checks on every call that t still holds them."""
    values = list(_times_when_traced(t))
    traced = torch.tensor(values, dtype=t.dtype, device=t.device)
    torch._assert_async(
        torch.eq(t.detach(), traced).all(),
        "flashode.odeint under torch.compile: t no longer holds the times it held when the graph was traced "
        "(a fixed-grid solve compiles its time grid in); keep t constant (a module buffer), give the times "
        "as host floats (from flashode.odeint import HostTimes), or call torch.compiler.reset() after "
        "changing t",
    )
    return values


@torch.compiler.assume_constant_result
def _times_when_traced(t: Tensor) -> tuple[float, ...]:
    # Dynamo calls this with t's real value while tracing and keeps the result as a constant.
    return tuple(t.detach().tolist())
