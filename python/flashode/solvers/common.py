"""Pieces shared by the Runge–Kutta solvers: error norm, stage buffers, callbacks, initial step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .._func import VectorField
from ..errors import SolverError

# A norm adapted to the flat state: (scaled error, each segment's RMS or None) -> float.
NormFn = Callable[[Tensor, "list[float] | None"], float]


@dataclass(frozen=True)
class StateLayout:
    """How a solver's flat state looks from outside.

    `shape` gives the user's view of a flat state (for callbacks, grid constructors and norms).
    The default error norm is the largest RMS over `segment_ends` (cumulative; [] = the whole
    state): one segment is torchdiffeq's `_rms_norm`, one per tuple part its `_mixed_norm`.
    Elements past the last end are not error-controlled (the adjoint's seminorm). `norm`, when
    set, replaces both the default and `options['norm']`; with `per_segment` it also receives each
    segment's RMS, computed by the kernel in the same pass.
    """

    shape: Callable[[Tensor], Any]
    segment_ends: list[int] = field(default_factory=list)
    norm: NormFn | None = None
    per_segment: bool = False


# csrc/common/rk_args.h kMaxSegments: beyond this many norm segments the norm is taken in Python.
MAX_KERNEL_SEGMENTS = 256


def segment_layout(shape: Callable[[Tensor], Any], segment_ends: list[int]) -> StateLayout:
    """The default norm over `segment_ends`: in the finalisation kernel, or in Python past the
    kernel's segment limit."""
    if len(segment_ends) <= MAX_KERNEL_SEGMENTS:
        return StateLayout(shape, segment_ends)
    return StateLayout(shape, norm=lambda flat, _segments: nan_max(segment_rms(flat, segment_ends)))


def nan_max(values: Sequence[float]) -> float:
    """max() that returns NaN if any value is NaN (Python's max depends on the order)."""
    result = 0.0
    for v in values:
        if math.isnan(v):
            return math.nan
        result = max(result, v)
    return result


def segment_rms(flat: Tensor, segment_ends: list[int]) -> list[float]:
    """Each segment's RMS of a flat tensor (see StateLayout), in one device read."""
    bounds = list(zip([0] + segment_ends[:-1], segment_ends or [flat.numel()]))
    norms = torch.stack([torch.linalg.vector_norm(flat[a:b]) for a, b in bounds])
    return [v / math.sqrt(max(b - a, 1)) for v, (a, b) in zip(norms.tolist(), bounds)]


def as_float(x: Any) -> float:
    """An option given as a number or a one-element tensor, as a host float."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def tolerance(tol: Any, y0: Tensor, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """A scalar or per-element tolerance on y0's device, in `dtype` (default: the state's): shape
    () or one value per state element (flat for a 1-D tolerance, else y0's shape)."""
    dtype = y0.dtype if dtype is None else dtype
    if isinstance(tol, (int, float)):  # a fill on the device: no host-to-device copy to wait for
        return torch.full((), float(tol), dtype=dtype, device=y0.device)
    tol_t = torch.as_tensor(tol, dtype=dtype, device=y0.device).detach()
    if tol_t.numel() == 1:
        return tol_t.reshape(())
    if tol_t.numel() == y0.numel() and tol_t.dim() <= 1:
        return tol_t.contiguous()
    try:
        return tol_t.expand(y0.shape).contiguous()
    except RuntimeError:
        message = f"{name} of shape {tuple(tol_t.shape)} does not broadcast to y0's shape {tuple(y0.shape)}"
        raise ValueError(message) from None


class ErrorNorm:
    """How a step's scaled error becomes one number (see StateLayout).

    Without a custom norm the number comes from `rk_finalize` with no extra pass; a custom norm is
    applied in Python to the error the kernel returns, divided by the tolerance scale.
    """

    def __init__(
        self, rtol: Tensor, atol: Tensor, segment_ends: list[int], custom: NormFn | None, per_segment: bool
    ) -> None:
        self.rtol = rtol
        self.atol = atol
        self.segment_ends = segment_ends
        self.custom = custom
        self.per_segment = per_segment and custom is not None
        self.saw_non_finite = False

    def apply(self, x: Tensor) -> float:
        """The norm of a flat state-like tensor, read to the host."""
        flat = x.reshape(-1)
        if self.custom is not None:
            return float(self.custom(flat, segment_rms(flat, self.segment_ends) if self.per_segment else None))
        return nan_max(segment_rms(flat, self.segment_ends))

    def ratio(self, ratio_t: Tensor, err: Tensor, y0: Tensor, y1: Tensor) -> float:
        """The step's error ratio as a host float (the step's one device->host read)."""
        if self.custom is None:
            value = ratio_t.item()
        else:
            with torch.no_grad():  # step-size control is not differentiated
                tol = self.atol + self.rtol * torch.maximum(y0.abs(), y1.abs())
                segments = ratio_t.tolist() if self.per_segment else None
                value = abs(float(self.custom((err / tol).reshape(-1), segments)))
        if not math.isfinite(value):
            self.saw_non_finite = True
        return value


class StageBuffers:
    """The stacked stage buffer k[S, *state] for each step attempt.

    Usually two buffers are reused alternately (the carried-over f0 may live in the other one).
    `fresh` gives each attempt a new buffer instead: under autograd, so no recorded op ever sees its
    input overwritten, and when a solve keeps every step's stages (dense output).
    """

    def __init__(self, y0: Tensor, stages: int, fresh: bool) -> None:
        self.shape = (stages, *y0.shape)
        self.like = y0
        self.fresh = fresh
        self.stages = stages
        if not fresh:
            self.pool = [torch.empty(self.shape, dtype=y0.dtype, device=y0.device) for _ in range(2)]
            self.pool_rows = [buf.unbind(0) for buf in self.pool]
            self.turn = 0

    @classmethod
    def reuse(cls, previous: StageBuffers | None, y0: Tensor, stages: int, fresh: bool) -> StageBuffers:
        """The buffers for a solve: a solver run again (the adjoint, interval after interval) keeps
        its pool, so nothing is reallocated and views of its rows stay valid."""
        if (
            previous is not None and not fresh and not previous.fresh
            and previous.shape == (stages, *y0.shape) and previous.like.dtype == y0.dtype
            and previous.like.device == y0.device
        ):
            return previous
        return cls(y0, stages, fresh)

    def next(self, f0: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        if self.fresh:
            k = torch.empty(self.shape, dtype=self.like.dtype, device=self.like.device)
            rows: Sequence[Tensor] = _FreshRows(k)
        else:
            self.turn ^= 1
            k, rows = self.pool[self.turn], self.pool_rows[self.turn]
        rows[0].copy_(f0)
        return k, rows


class _FreshRows:
    """k[i] taken at use time: a view made before k joined the graph would go stale once an
    in-place copy gives k a grad_fn, so autograd needs the rows indexed afresh."""

    def __init__(self, k: Tensor) -> None:
        self.k = k

    def __getitem__(self, i: int) -> Tensor:
        return self.k[i]

    def __len__(self) -> int:
        return self.k.shape[0]


class Callbacks:
    """torchdiffeq's optional `callback_step/accept_step/reject_step` methods on func (with
    `suffix="_adjoint"`, the `callback_step_adjoint`... methods the adjoint solve calls)."""

    def __init__(
        self, func: Any, shape: Callable[[Tensor], Any], time_dtype: torch.dtype, suffix: str = ""
    ) -> None:
        self.shape = shape
        self.time_dtype = time_dtype
        self._step = getattr(func, "callback_step" + suffix, None)
        self._accept = getattr(func, "callback_accept_step" + suffix, None)
        self._reject = getattr(func, "callback_reject_step" + suffix, None)

    def _call(self, cb: Callable[..., Any] | None, field: VectorField, t0: float, y0: Tensor, dt: float) -> None:
        if cb is None:
            return
        # torchdiffeq hands callbacks its time-dtype tensors (float64 by default), not y's dtype.
        t = torch.scalar_tensor(field.user_time(t0), dtype=self.time_dtype, device=y0.device)
        cb(t, self.shape(y0), torch.scalar_tensor(dt, dtype=self.time_dtype, device=y0.device))

    def step(self, field: VectorField, t0: float, y0: Tensor, dt: float) -> None:
        self._call(self._step, field, t0, y0, dt)

    def accept(self, field: VectorField, t0: float, y0: Tensor, dt: float) -> None:
        self._call(self._accept, field, t0, y0, dt)

    def reject(self, field: VectorField, t0: float, y0: Tensor, dt: float) -> None:
        self._call(self._reject, field, t0, y0, dt)


def check_finite_start(field: VectorField, t0: float, y0: Tensor | None, f0: Tensor | None) -> None:
    """Raises if y0, or func at the initial time, holds NaN or inf (one device read each given)."""
    if y0 is not None and not bool(torch.isfinite(y0).all()):
        raise ValueError(f"non-finite values in the initial state y0 at t={field.user_time(t0):.10g}")
    if f0 is not None and not bool(torch.isfinite(f0).all()):
        raise SolverError(f"func returned non-finite values at the initial time t={field.user_time(t0):.10g}")


def initial_step_size(
    field: VectorField, t0: float, y0: Tensor, f0: Tensor, order: int, norm: ErrorNorm, sign: float
) -> float:
    """Hairer, Nørsett & Wanner's starting step (Solving ODEs I, II.4), as torchdiffeq computes it:
    in the state's precision (torchdiffeq does this arithmetic on tensors in y's dtype, so float32
    states must round alike to take the same steps)."""
    rnd = (lambda x: float(np.float32(x))) if y0.dtype == torch.float32 else (lambda x: x)
    with torch.no_grad():
        scale = torch.addcmul(norm.atol, y0.abs(), norm.rtol)
        d0 = abs(norm.apply(y0 / scale))
        d1 = abs(norm.apply(f0 / scale))
        if not (math.isfinite(d0) and math.isfinite(d1)):  # the norms double as the finiteness check
            check_finite_start(field, t0, y0, f0)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else rnd(rnd(0.01 * d0) / d1)
        h0 = abs(h0)
        f1 = field(t0 + h0, torch.add(y0, f0, alpha=sign * h0))
        d2 = abs(rnd(norm.apply((f1 - f0) / scale) / h0))
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, rnd(h0 * 1e-3))
    else:
        h1 = rnd(rnd(0.01 / max(d1, d2)) ** (1.0 / float(order + 1)))
    return min(rnd(100 * h0), abs(h1))
