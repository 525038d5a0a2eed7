"""Method registry: maps a method name and torchdiffeq-style options onto a configured solver."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .._func import VectorField
from ..progress import Progress
from ..tableaus import ADAPTIVE, FIXED, IMPLICIT
from .adams import ADAMS_METHODS, DEFAULT_MAX_ITERS, MAX_ORDER, AdamsSolver, adams_class_name
from .common import Callbacks, ErrorNorm, NormFn, StateLayout, as_float, tolerance
from .fixed_grid import FixedGridOptions, FixedGridRKSolver, FixedGridSolver
from .implicit_rk import DEFAULT_MAX_ITERS as IMPLICIT_MAX_ITERS
from .implicit_rk import TORCHDIFFEQ_CLASSES, ImplicitRKSolver
from .rk_adaptive import AdaptiveOptions, AdaptiveRKSolver
from .scipy_wrapper import ScipyWrapperSolver, make_scipy_solver

Solver = AdaptiveRKSolver | FixedGridSolver | ScipyWrapperSolver

ADAPTIVE_METHODS = tuple(ADAPTIVE)
FIXED_METHODS = tuple(FIXED)
# Every method, in torchdiffeq master's order (its "Invalid method" message lists them so).
SOLVER_NAMES = (
    "dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3",
    "rk4", "explicit_adams", "implicit_adams", "implicit_euler", "implicit_midpoint", "trapezoid", "radauIIA3",
    "gl4", "radauIIA5", "gl6", "sdirk2", "trbdf2", "fixed_adams", "scipy_solver",
)
assert set(SOLVER_NAMES) == {*ADAPTIVE_METHODS, *FIXED_METHODS, *IMPLICIT, *ADAMS_METHODS, "scipy_solver"}

_ADAPTIVE_OPTIONS = {
    "first_step", "min_step", "max_step", "step_t", "jump_t", "safety", "ifactor", "dfactor",
    "max_num_steps", "norm", "progress",
}
_FIXED_OPTIONS = {"step_size", "grid_constructor", "interp", "perturb", "progress"}


def traceable(method: str | None, options: dict[str, Any] | None) -> bool:
    """Whether torch.compile can trace a whole solve as one graph: a fixed-grid explicit method
    whose grid follows from host floats (t's values, a numeric step_size). Every other solve
    reads the device to decide its steps (adaptive step control, Newton or corrector iterations,
    scipy) or its grid (a grid_constructor, a tensor step_size)."""
    options = options or {}
    return (
        method in FIXED and options.get("grid_constructor") is None
        and not isinstance(options.get("step_size"), Tensor)
    )


def _as_times(x: Any, direction: float) -> list[float]:
    if x is None:
        return []
    values = x.reshape(-1).tolist() if isinstance(x, Tensor) else list(x)
    return [direction * float(v) for v in values]


def _check_tolerances(rtol: Any, atol: Any, n: int) -> None:
    """Negative or all-zero tolerances can never accept a step. Checked on the values the user
    gave (host floats in the common case, so no device read)."""
    if isinstance(rtol, (int, float)) and isinstance(atol, (int, float)):
        if rtol < 0 or atol < 0:
            raise ValueError("rtol and atol must be non-negative")
        if n > 0 and rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be zero: no step could ever be accepted")
        return
    r = torch.as_tensor(rtol, dtype=torch.float64).detach().cpu()
    a = torch.as_tensor(atol, dtype=torch.float64).detach().cpu()
    if bool((r < 0).any()) or bool((a < 0).any()):
        raise ValueError("rtol and atol must be non-negative")
    if n > 0 and bool(((r == 0) & (a == 0)).any()):
        raise ValueError("rtol and atol cannot both be zero (for any state element): no step could ever be accepted")


def _with_progress(build: Callable[..., Solver]) -> Callable[..., Solver]:
    """Gives every solver `build` makes its options['progress'] bar (see `flashode.progress`)."""

    @functools.wraps(build)
    def make(method: str, *args: Any, options: dict[str, Any], **kwargs: Any) -> Solver:
        solver = build(method, *args, options=options, **kwargs)
        solver.progress = Progress(options.get("progress"), method)
        return solver

    return make


@_with_progress
def make_solver(
    method: str,
    field: VectorField,
    y0: Tensor,
    *,
    rtol: Any,
    atol: Any,
    options: dict[str, Any],
    func: Callable[..., Any],
    layout: StateLayout,
    direction: float,
    time_dtype: torch.dtype,
    callback_suffix: str = "",
    grid_inputs: tuple[Callable[..., Any], Callable[[Tensor], Any]] | None = None,
) -> Solver:
    """A solver for `method` over the flat state y0. Callbacks are looked up on `func` (with
    `callback_suffix`). A grid constructor receives `grid_inputs`: a func and a view of the state
    (default: `func` and the layout's user view). options['progress'] is every method's (see
    `flashode.progress`)."""
    if method == "scipy_solver":  # no layout or grid; callbacks only warn, as in torchdiffeq
        return make_scipy_solver(field, y0, rtol, atol, options, func, callback_suffix)
    callbacks = Callbacks(func, layout.shape, time_dtype, callback_suffix)
    if method in FIXED:
        grid = fixed_grid_options(options, set(), "FixedGridRKSolver", func, layout, direction, grid_inputs)
        return FixedGridRKSolver(field, y0, FIXED[method], grid, callbacks)
    if method in IMPLICIT:
        grid = fixed_grid_options(
            options, {"max_iters"}, TORCHDIFFEQ_CLASSES[method], func, layout, direction, grid_inputs
        )
        return ImplicitRKSolver(
            field, y0, IMPLICIT[method], grid, callbacks, max_iters=options.get("max_iters", IMPLICIT_MAX_ITERS)
        )
    if method in ADAMS_METHODS:
        implicit = ADAMS_METHODS[method]
        grid = fixed_grid_options(
            options, {"max_order", "max_iters"}, adams_class_name(implicit), func, layout, direction, grid_inputs
        )
        return AdamsSolver(
            field, y0, grid, callbacks, implicit=implicit, max_order=options.get("max_order", MAX_ORDER),
            max_iters=options.get("max_iters", DEFAULT_MAX_ITERS),
            rtol=tolerance(rtol, y0, "rtol"), atol=tolerance(atol, y0, "atol"),
        )

    unknown = set(options) - _ADAPTIVE_OPTIONS
    if unknown:
        warnings.warn("{}: Unexpected arguments {}".format("AdaptiveRKSolver", {k: options[k] for k in unknown}))
    n = y0.numel()
    norm = ErrorNorm(
        tolerance(rtol, y0, "rtol"), tolerance(atol, y0, "atol"), layout.segment_ends,
        layout.norm if layout.norm is not None else _user_norm(options.get("norm"), layout.shape),
        layout.per_segment,
    )
    if norm.rtol.numel() not in (1, n) or norm.atol.numel() not in (1, n):
        raise ValueError(f"rtol/atol must be scalars or have one value per state element ({n})")
    _check_tolerances(rtol, atol, n)
    first_step = options.get("first_step")
    opts = AdaptiveOptions(
        first_step=None if first_step is None else abs(as_float(first_step)),
        min_step=as_float(options.get("min_step", 0.0)),
        max_step=as_float(options.get("max_step", math.inf)),
        step_t=_as_times(options.get("step_t"), direction),
        jump_t=_as_times(options.get("jump_t"), direction),
        safety=as_float(options.get("safety", 0.9)),
        ifactor=as_float(options.get("ifactor", 10.0)),
        dfactor=as_float(options.get("dfactor", 0.2)),
        max_num_steps=int(as_float(options.get("max_num_steps", 2**31 - 1))),
        time_float32=time_dtype == torch.float32,
    )
    if not opts.max_step > 0:
        raise ValueError(f"max_step must be positive, got {opts.max_step}")
    if opts.first_step is not None and not (math.isfinite(opts.first_step) and opts.first_step > 0):
        raise ValueError(f"first_step must be a finite positive number, got {opts.first_step}")
    return AdaptiveRKSolver(field, y0, ADAPTIVE[method], norm, opts, callbacks)


def fixed_grid_options(
    options: dict[str, Any],
    method_options: set[str],
    class_name: str,
    func: Callable[..., Any],
    layout: StateLayout,
    direction: float,
    grid_inputs: tuple[Callable[..., Any], Callable[[Tensor], Any]] | None,
) -> FixedGridOptions:
    """torchdiffeq's fixed-grid options (step_size, grid_constructor, interp, perturb), checked;
    unknown options warn as torchdiffeq's `_handle_unused_kwargs` does (`method_options` are the
    method's own, read by the caller)."""
    unknown = set(options) - _FIXED_OPTIONS - method_options - {"norm"}  # torchdiffeq drops `norm` silently
    if unknown:
        warnings.warn("{}: Unexpected arguments {}".format(class_name, {k: options[k] for k in unknown}))
    step_size = options.get("step_size")
    if step_size is not None and not (math.isfinite(as_float(step_size)) and as_float(step_size) != 0):
        raise ValueError(f"step_size must be a finite, non-zero number, got {as_float(step_size)}")
    grid_constructor = options.get("grid_constructor")
    user_grid = None
    if grid_constructor is not None:
        grid_func, view = (func, layout.shape) if grid_inputs is None else grid_inputs

        # The constructor sees user time and the state the solve starts from; the solver works
        # in internal time tau = direction * t.
        def user_grid(tau: Tensor, start: Tensor) -> Tensor:
            return direction * grid_constructor(grid_func, view(start), direction * tau)

    return FixedGridOptions(
        step_size=None if step_size is None else abs(as_float(step_size)),
        grid_constructor=user_grid,
        interp=options.get("interp", "linear"),
        perturb=bool(options.get("perturb", False)),
    )


def _user_norm(norm: Callable[[Any], Any] | None, shape: Callable[[Tensor], Any]) -> NormFn | None:
    """`options['norm']` (called on the user's view of the state) adapted to the flat state."""
    if norm is None:
        return None
    return lambda flat, _segments: float(norm(shape(flat)))
