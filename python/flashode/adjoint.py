"""`flashode.odeint_adjoint`: gradients of an ODE solve in memory independent of its step count.

The forward solve records no graph. The backward pass integrates the adjoint system (see
`_augmented.py`) from the last output time to the first, one interval at a time: at each output
time t_i the state part is reset to the stored y(t_i) and dL/dy(t_i) is added to the adjoint, as in
Chen et al.'s algorithm. One solver object carries across the intervals (its buffers, and with the
default adjoint norm the step size: each interval after the first starts from the step the
previous one ended with instead of re-running the initial-step heuristic).

Semantics follow torchdiffeq 0.2.5's `odeint_adjoint`: defaults for the adjoint tolerances, method
and options, the adjoint norm in `out.grad_fn.adjoint_options['norm']` (replaceable before
backward), `norm="seminorm"`, `callback_*_adjoint` callbacks and time gradients.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._augmented import AdjointNorm, AugmentedDynamics, adjoint_layout, wrap_user_adjoint_norm
from .errors import SolverError
from .fused_dispatch import try_odeint_fused, without_fused_option
from .odeint import Problem, check_event_fn, prepare_problem
from .solvers import make_solver
from .solvers.rk_adaptive import AdaptiveRKSolver

__all__ = ["odeint_adjoint"]


# Under torch.compile the adjoint runs eagerly, as one graph break: its forward and backward solves
# step on host decisions, and its autograd.Function carries the solver state in Python objects.
@torch.compiler.disable(reason="flashode: odeint_adjoint runs eagerly")
def odeint_adjoint(
    func: Callable[..., Any],
    y0: Tensor | tuple[Tensor, ...],
    t: Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable[..., Any] | None = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_method: str | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Any = None,
) -> Tensor | tuple[Tensor, ...]:
    """Like `flashode.odeint`, but backpropagates by solving the adjoint ODE backwards in time.

    Gradients flow to `y0` (tensor or tuple), to `adjoint_params` (default: `func.parameters()`,
    which needs `func` to be an nn.Module; pass `adjoint_params=()` for none) and to `t` when
    `t.requires_grad`. Memory does not grow with the number of steps: no graph of the solve is
    kept, only the outputs. `adjoint_rtol/atol/method` default to the forward ones,
    `adjoint_options` to the forward options without `norm`; `adjoint_options=dict(norm="seminorm")`
    leaves the parameter-gradient channels out of the backward error control, usually saving
    steps. A custom adjoint norm receives `(t, y, adj_y, *adj_params)` (for a tuple state
    `(t, *y, *adj_y, *adj_params)`).

    A field that runs fused (see `flashode.odeint`) gets the gradients of the discrete solve from
    the fused op instead (exact for the computed outputs; one checkpoint of 2 D + 3 values per
    accepted step, so memory stays small); ``options=dict(fused=False)`` keeps the adjoint solve.
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an instance of nn.Module to specify the adjoint parameters; alternatively they "
            "can be specified explicitly via the `adjoint_params` argument. If there are no parameters "
            "then it is allowable to set `adjoint_params=()`."
        )
    # Defaults come from the arguments as given, before the forward options are normalised.
    adjoint_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    adjoint_atol = atol if adjoint_atol is None else adjoint_atol
    adjoint_method = method if adjoint_method is None else adjoint_method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "If `adjoint_method != method` then we cannot infer `adjoint_options` from `options`. So as "
            "`options` has been passed then `adjoint_options` must be passed as well."
        )
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in options.items() if k != "norm"} if options is not None else {}
    else:
        adjoint_options = dict(adjoint_options)  # never modify the caller's dict

    params = tuple(_find_parameters(func) if adjoint_params is None else adjoint_params)
    used = tuple(p for p in params if p.requires_grad)
    if len(used) != len(params) and callable(adjoint_options.get("norm")):
        warnings.warn(
            "An adjoint parameter was passed without requiring gradient. For efficiency this will be "
            "excluded from the adjoint pass, and will not appear as a tensor in the adjoint norm."
        )
    for p in used:
        if not torch.is_floating_point(p):
            raise TypeError(f"odeint_adjoint: adjoint parameters must be floating point tensors, got {p.dtype}")

    check_event_fn(event_fn, t)
    if event_fn is None:
        fused = try_odeint_fused(func, y0, t, rtol, atol, method, options, caller="odeint_adjoint",
                                 adjoint_params=params)
        if fused is not None:
            return fused.ys
    options = without_fused_option(options)
    adjoint_options = without_fused_option(adjoint_options)
    problem = prepare_problem(func, y0, t, rtol, atol, method, options, differentiable_t=True)
    for name, tol in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if isinstance(tol, (tuple, list)) or (isinstance(tol, Tensor) and tol.numel() != 1):
            raise ValueError(
                f"odeint_adjoint: {name} must be a scalar: per-element or tupled tolerances describe the "
                "forward state, not the augmented backward state (y, dL/dy and the parameter gradients); "
                f"pass a scalar {name} explicitly"
            )
    _set_adjoint_norm(adjoint_options, (options or {}).get("norm"), problem)

    spec = _BackwardSpec(adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, event_fn)
    out = _OdeintAdjoint.apply(problem, spec, problem.y0, problem.t, *used)
    if event_fn is None:
        return problem.unflatten(out)
    event_t, solution = out
    return event_t, problem.unflatten(solution)


def _find_parameters(module: nn.Module) -> list[Tensor]:
    # Inside DataParallel replicas parameters are plain tensor attributes, not module parameters.
    if getattr(module, "_is_replica", False):
        members = module._named_members(
            get_members_fn=lambda m: [(k, v) for k, v in m.__dict__.items() if torch.is_tensor(v) and v.requires_grad]
        )
        return [p for _, p in members]
    return list(module.parameters())


def _set_adjoint_norm(adjoint_options: dict[str, Any], forward_norm: Any, problem: Problem) -> None:
    """torchdiffeq's `handle_adjoint_norm_`: the default, seminorm, or the user's adjoint norm."""
    norm = adjoint_options.get("norm")
    if norm is None or (isinstance(norm, str) and norm == "seminorm"):
        adjoint_options["norm"] = AdjointNorm(forward_norm, problem.field.shape, seminorm=norm is not None)
    elif isinstance(norm, str):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm!r}")
    elif problem.tuple_shapes is not None:
        adjoint_options["norm"] = wrap_user_adjoint_norm(norm, problem.tuple_shapes)


class _BackwardSpec:
    """The adjoint solve's settings, fixed when odeint_adjoint is called."""

    def __init__(
        self, rtol: Any, atol: Any, method: str | None, options: dict[str, Any], event_fn: Callable[..., Any] | None
    ) -> None:
        self.rtol = rtol
        self.atol = atol
        self.method = "dopri5" if method is None else method
        self.options = options
        self.event_fn = event_fn


class _OdeintAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, problem: Problem, spec: _BackwardSpec, y0: Tensor, t: Tensor, *params: Tensor
    ) -> Tensor | tuple[Tensor, Tensor]:
        # Grad mode is off inside forward: no graph is recorded.
        if spec.event_fn is None:
            ys, ctx.tau = problem.solve(), problem.tau
        else:
            event_t, ys = problem.solve_until_event(spec.event_fn)
            # Backward integrates from the event back to t0. Like torchdiffeq, it does not
            # differentiate through the event time (odeint_event reroutes that gradient).
            ctx.mark_non_differentiable(event_t)
            ctx.tau = [problem.tau[0], problem.direction * float(event_t)]
        ctx.problem = problem
        ctx.spec = spec
        # torchdiffeq exposes the adjoint options on the graph node; user code reads (and may
        # replace) adjoint_options['norm'] there before calling backward.
        ctx.adjoint_options = spec.options
        ctx.t_requires_grad = t.requires_grad
        ctx.save_for_backward(ys, *params)
        return ys if spec.event_fn is None else (event_t, ys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        ys, *params = ctx.saved_tensors
        grad_ys = grads[-1]  # in event mode grads[0] is the (non-differentiable) event time's
        grad_y0, grad_t, grad_params = _integrate_adjoint(
            ctx.problem, ctx.spec, ctx.tau, ys, grad_ys, tuple(params), ctx.t_requires_grad
        )
        if grad_t is not None and ctx.spec.event_fn is not None:
            grad_t[1:] = 0  # t[1] only gave the direction of the event search
        return (None, None, grad_y0, grad_t, *grad_params)


def _integrate_adjoint(
    problem: Problem,
    spec: _BackwardSpec,
    tau: list[float],
    ys: Tensor,
    grad_ys: Tensor,
    params: tuple[Tensor, ...],
    t_requires_grad: bool,
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """dL/dy0, dL/dt and dL/dtheta by integrating the adjoint system over each output interval
    (between the internal times `tau` of the outputs ys)."""
    n = problem.y0.numel()
    field = AugmentedDynamics(
        problem.func, problem.y0, problem.tuple_shapes, params, t_requires_grad, -problem.direction
    )
    x = ys.new_zeros(field.size)
    x[:n] = ys[-1].reshape(-1)
    x[n : 2 * n] = grad_ys[-1].reshape(-1)
    time_vjps = None
    if t_requires_grad:
        time_vjps = torch.zeros(len(tau), dtype=problem.t.dtype, device=problem.t.device)

    if len(tau) > 1:
        options = dict(spec.options)
        norm = options.pop("norm")
        time_dtype = torch.promote_types(options.pop("dtype", problem.time_dtype), x.dtype)
        solver = make_solver(
            spec.method, field, x, rtol=spec.rtol, atol=spec.atol, options=options, func=problem.func,
            layout=adjoint_layout(norm, field), direction=field.direction, time_dtype=time_dtype,
            callback_suffix="_adjoint",
            # torchdiffeq hands a grid constructor the augmented dynamics over its flat state.
            grid_inputs=(field.torchdiffeq_dynamics, field.torchdiffeq_flat),
        )
        # Each interval starts from the step size the previous one ended with, instead of the
        # initial-step heuristic, when every channel is error-controlled (the default norm). Under
        # the seminorm the parameter channels are not, and carried large steps cost them accuracy
        # (float64 MLP: 1.2e-5 relative error against 6.3e-7 restarting), so it restarts like
        # torchdiffeq; so does a custom norm, which may leave channels out too.
        carry_step = (
            isinstance(solver, AdaptiveRKSolver) and "first_step" not in options
            and isinstance(norm, AdjointNorm) and not norm.seminorm
        )
        # The backward solve runs in internal time -tau, increasing from the last output time; one
        # progress bar (adjoint_options['progress']) spans all its intervals.
        with solver.progress.spanning(-tau[-1], -tau[0], field.user_time, f"{spec.method} (adjoint)"):
            for i in range(len(tau) - 1, 0, -1):
                if t_requires_grad:
                    # Moving output time t_i moves y(t_i) by f(t_i, y_i): dL/dt_i = f . dL/dy_i.
                    f_i = problem.field(tau[i], ys[i])
                    dl_dt = torch.dot(f_i.reshape(-1), grad_ys[i].reshape(-1))
                    x[2 * n] -= dl_dt
                    time_vjps[i] = dl_dt
                span = [-tau[i], -tau[i - 1]]
                try:
                    if carry_step:
                        x = solver.integrate(span, y0=x, first_step=solver.next_dt)[-1]
                    else:
                        x = solver.integrate(span, y0=x)[-1]
                except SolverError as exc:
                    raise SolverError(f"odeint_adjoint: the backward (adjoint) solve failed: {exc}") from exc
                x[:n] = ys[i - 1].reshape(-1)  # continue from the forward solution, not the re-integrated y
                x[n : 2 * n] += grad_ys[i - 1].reshape(-1)

    if time_vjps is not None:
        time_vjps[0] = x[2 * n]
    grad_y0 = x[n : 2 * n].view(problem.y0.shape)
    grad_params = [g.to(p.dtype) for p, g in zip(params, field.param_views(x))]
    return grad_y0, time_vjps, grad_params
