"""Routing odeint, odeint_adjoint, solve_ivp and the nn layers to the fused MLP solve.

When the vector field is an MLP the fused op understands (`fused_mlp.mlp_spec`) and the call asks
for nothing the op lacks, the whole solve runs in `flashode::mlp_solve` instead of the generic
solver. ``options=dict(fused=False)`` (``fused=False`` for `solve_ivp`) forces the generic path;
``fused=True`` requires the fused one and raises with the reason when it cannot run. Every
decision, with its reason, is logged on the ``flashode`` logger at DEBUG level, and
`fused_reason` answers the same question without solving.

What changes on the fused path (the reasons it is a choice, not a silent replacement):

* Every row of y0 (its last dimension is the field's state; leading dimensions are samples) is its
  own trajectory with its own steps, as in `solve_ivp`, where odeint steps the whole tensor with
  one step size from the RMS error over all its elements (where one row's error can hide behind
  the others'). Each row's local error is held to the tolerance on its own; the steps differ, and
  the outputs agree to within the tolerance (each row alone takes the steps odeint takes on it).
* Gradients are those of the discrete solve (exact for the computed outputs), for `odeint_adjoint`
  too: its continuous adjoint's backward solve, tolerances and norm are not used. The op keeps one
  checkpoint per accepted step, 2 D + 3 values, instead of a graph per network evaluation.
* ``max_num_steps`` bounds odeint's steps per output interval; the op bounds each row's steps in
  all, so it gets ``max_num_steps`` times the number of intervals.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _ops
from ._mlp_cuda import cuda_fit_reason
from .batch import Solution, Status
from .errors import SolverError
from .solvers.common import tolerance
from .fused_mlp import MLPSpec, _solve_mlp, mlp_spec, mlp_spec_reason
from .tableaus import ADAPTIVE, FIXED

__all__ = ["FusedSolve", "fused_reason", "solve_ivp_fused_spec", "try_odeint_fused"]

logger = logging.getLogger("flashode")

# odeint options the fused op honours (anything else sends the call to the generic solver).
_ADAPTIVE_OPTIONS = {"first_step", "safety", "ifactor", "dfactor", "max_num_steps", "fused"}
_FIXED_OPTIONS = {"step_size", "interp", "perturb", "fused"}
_MAX_STEPS = 2**31 - 1


@dataclass
class FusedSolve:
    """A fused odeint solve's result: ``ys`` shaped as odeint returns it, and the per-row
    `Solution` (ys (rows, T, D), status, stats) it came from."""

    ys: Tensor
    solution: Solution

    @property
    def nfe(self) -> int:
        """The most evaluations any row made (rows are evaluated together, a tile at a time)."""
        return int(self.solution.stats["n_f_evals"].max())


def fused_option(options: dict[str, Any] | None) -> bool | None:
    """options['fused']: None (automatic), True (required) or False (never)."""
    value = (options or {}).get("fused")
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"options['fused'] must be True, False or None, got {value!r}")
    return value


def _scalar_tol(tol: Any) -> bool:
    return isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol) and tol >= 0


def _field_reason(spec: MLPSpec | None, func: Any, adjoint_params: Any) -> str | None:
    """Why a field odeint or solve_ivp calls as func(t, y) cannot run fused (None: it can)."""
    if spec is None:
        return mlp_spec_reason(func)
    if type(func) is torch.nn.Sequential:  # the generic path calls it as f(t, y), and fails
        return "an nn.Sequential is called as f(y): wrap it in flashode.nn.Autonomous to use it as f(t, y)"
    if adjoint_params is not None:
        wanted = {id(p) for p in spec.parameters() if p.requires_grad}
        if {id(p) for p in adjoint_params if p.requires_grad} != wanted:
            return "adjoint_params is not the field's own parameters"
    if torch.compiler.is_compiling():
        return "the call is being traced by torch.compile"
    return None


def _device_reason(spec: MLPSpec, y0: Tensor) -> str | None:
    """Why y0's device cannot run this field fused: no compiled kernel there (the op's reference
    implementation is for tests, far slower than the generic solver), or on CUDA a network too
    wide for a block's shared memory."""
    weight = spec.linears[0].weight
    if y0.dtype != weight.dtype or y0.device != weight.device:
        return f"y0 ({y0.dtype}, {y0.device}) and the field ({weight.dtype}, {weight.device}) differ in dtype or device"
    if not _ops.has_kernel("mlp_solve", y0.device.type):
        return f"no compiled fused MLP kernel for {y0.device.type} tensors (flashode.show_config() says why)"
    if y0.device.type == "cuda":  # the parameters must fit in a block's shared memory
        return cuda_fit_reason(spec.widths, y0.dtype, y0.device, spec.bias)
    return None


def solve_ivp_fused_spec(func: Any, y0: Any, cuda_graph: bool, adjoint_params: Any) -> MLPSpec | str:
    """The field's spec when a solve_ivp call can run fused (solve_mlp checks the rest), else why not."""
    spec = mlp_spec(func)
    reason = _field_reason(spec, func, adjoint_params)
    if reason is not None or spec is None:
        return reason or ""
    if cuda_graph:
        return "cuda_graph=True asks for the generic solver's captured steps"
    if not isinstance(y0, Tensor) or y0.dim() != 2 or y0.shape[1] != spec.dim:
        return f"y0 must have shape (B, {spec.dim}) for this field"
    return _device_reason(spec, y0) or spec


def _odeint_reason(
    spec: MLPSpec | None, func: Any, y0: Any, t: Any, rtol: Any, atol: Any, method: str | None,
    options: dict[str, Any], adjoint_params: Any,
) -> str | None:
    """Why an odeint(_adjoint) call cannot run fused (None: it can). Only calls the generic path
    would accept pass: anything unusual goes there, and gets its checks and errors."""
    reason = _field_reason(spec, func, adjoint_params)
    if reason is not None or spec is None:
        return reason
    method = "dopri5" if method is None else method
    if method in ADAPTIVE:
        extra = set(options) - _ADAPTIVE_OPTIONS
        first = options.get("first_step")
        if first is not None and not (isinstance(first, (int, float)) and math.isfinite(first) and first > 0):
            return "options['first_step'] is not a positive number"
        if not isinstance(options.get("max_num_steps", 1), int):
            return "options['max_num_steps'] is not an int"
    elif method in FIXED:
        extra = set(options) - _FIXED_OPTIONS
        step = options.get("step_size")
        if not (isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) and step != 0):
            return f"{method} runs fused with a numeric options['step_size'] only (here the grid is t's times)"
        if options.get("interp", "linear") != "linear" or options.get("perturb", False):
            return "the fused fixed grid interpolates linearly and does not perturb"
    else:
        return f"method {method!r} has no fused implementation (adaptive explicit RK and fixed-grid explicit only)"
    if extra:
        return f"options {sorted(extra)} are not supported by the fused solve"
    if not isinstance(y0, Tensor) or y0.dim() == 0 or y0.shape[-1] != spec.dim or y0.numel() == 0:
        return f"y0 must be a tensor whose last dimension is the field's {spec.dim} states"
    device_reason = _device_reason(spec, y0)
    if device_reason is not None:
        return device_reason
    if not (isinstance(t, Tensor) and t.dim() == 1 and len(t) >= 2 and torch.is_floating_point(t)):
        return "t is not a 1-D floating tensor of two or more times"
    if t.device != y0.device or t.requires_grad:
        return "t is on another device than y0, or requires grad"
    times = t.tolist()
    steps = [b - a for a, b in zip(times, times[1:])]
    if not (all(map(math.isfinite, times)) and (all(d > 0 for d in steps) or all(d < 0 for d in steps))):
        return "t is not finite and strictly monotone"
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (_scalar_tol(tol) or (isinstance(tol, Tensor) and not tol.requires_grad)):
            return f"{name} is neither a non-negative number nor a tensor"
    return None


def fused_reason(
    func: Any, y0: Any, t: Any, *, rtol: Any = 1e-7, atol: Any = 1e-9, method: str | None = None,
    options: dict[str, Any] | None = None, adjoint_params: Any = None,
) -> str | None:
    """Why `odeint(func, y0, t, ...)` would take the generic path; None when it runs fused."""
    options = dict(options or {})
    if fused_option(options) is False:
        return "options['fused'] is False"
    return _odeint_reason(mlp_spec(func), func, y0, t, rtol, atol, method, options, adjoint_params)


def _row_tolerance(tol: Any, y0: Tensor, rows: int, name: str) -> Any:
    """A tolerance of odeint's per row of y0: a host float when it is one value (the fused solve's
    fast path), else odeint's own broadcasting (solvers.common.tolerance) viewed as (rows, D)."""
    if not isinstance(tol, Tensor) or tol.numel() == 1:
        return float(tol)
    return tolerance(tol, y0, name).reshape(rows, -1)


def _raise_for_failure(solution: Solution, y0_rows: Tensor, caller: str) -> None:
    """The generic path's errors for the first row that failed, with the time it reached."""
    failed = (~solution.success).nonzero().flatten().tolist()
    if not failed:
        return
    row = failed[0]
    status, t_reached = Status(int(solution.status[row])), float(solution.t_final[row])
    where = f"row {row} of y0 (as ({y0_rows.shape[0]}, {y0_rows.shape[1]})), {len(failed)} row(s) failed"
    if status == Status.NON_FINITE and not bool(torch.isfinite(y0_rows[row]).all()):
        raise ValueError(f"non-finite values in the initial state y0 at t={t_reached:.10g} ({where})")
    if status == Status.MAX_STEPS_REACHED:
        n_steps = int(solution.stats["n_steps"][row])
        raise SolverError(f"{caller}: max_num_steps exceeded ({n_steps} steps) at t={t_reached:.10g} ({where})")
    cause = ("the state or func produced non-finite values (NaN/inf) for every step size tried"
             if status == Status.NON_FINITE else "the solution may blow up here, or the problem is too stiff")
    raise SolverError(f"{caller}: underflow in dt at t={t_reached:.10g}: {cause} ({where})")


def _solve(spec: MLPSpec, y0: Tensor, t: Tensor, rtol: Any, atol: Any, method: str | None,
           options: dict[str, Any], caller: str) -> FusedSolve:
    method = "dopri5" if method is None else method
    rows = y0.reshape(-1, spec.dim)
    kwargs: dict[str, Any] = dict(method=method, rtol=_row_tolerance(rtol, y0, rows.shape[0], "rtol"),
                                  atol=_row_tolerance(atol, y0, rows.shape[0], "atol"))
    if method in ADAPTIVE:
        # clip_to_end=False: steps pass the last time and interpolate back, as odeint's do.
        intervals = len(t) - 1
        kwargs.update(
            first_step=options.get("first_step"), safety=float(options.get("safety", 0.9)),
            ifactor=float(options.get("ifactor", 10.0)), dfactor=float(options.get("dfactor", 0.2)),
            max_steps=min(int(options.get("max_num_steps", _MAX_STEPS)) * intervals, _MAX_STEPS), clip_to_end=False,
        )
    else:
        kwargs.update(step_size=abs(float(options["step_size"])), max_steps=_MAX_STEPS)
    solution = _solve_mlp(spec, rows, t.detach(), **kwargs)
    _raise_for_failure(solution, rows, caller)
    ys = solution.ys.transpose(0, 1).reshape(len(t), *y0.shape).to(y0.dtype)
    return FusedSolve(ys, solution)


def try_odeint_fused(
    func: Any, y0: Any, t: Any, rtol: Any, atol: Any, method: str | None, options: dict[str, Any] | None,
    *, caller: str = "odeint", adjoint_params: Any = None,
) -> FusedSolve | None:
    """The fused solve of an odeint(_adjoint) call, or None when it takes the generic path (which
    then runs it; options['fused'] is dropped from what it sees). Raises if options['fused'] is
    True and the call cannot run fused."""
    options = dict(options or {})
    wanted = fused_option(options)
    if wanted is False:
        return None
    spec = mlp_spec(func)
    reason = _odeint_reason(spec, func, y0, t, rtol, atol, method, options, adjoint_params)
    if reason is not None:
        if wanted:
            raise ValueError(f"{caller}: options['fused'] is True but the fused MLP solve cannot run: {reason}")
        if spec is not None:  # an MLP field that misses the fused path for a reason worth knowing
            logger.debug("%s: generic path: %s", caller, reason)
        return None
    assert spec is not None
    logger.debug("%s: fused MLP solve", caller)
    return _solve(spec, y0, t, rtol, atol, method, options, caller)


def without_fused_option(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """options as the generic solvers take them (they warn about keys they do not know)."""
    if options is None or "fused" not in options:
        return options
    return {k: v for k, v in options.items() if k != "fused"}
