"""Adapts a user's vector field to the solvers' internal view of a problem.

Solvers integrate a flat state in an increasing internal time tau (host Python floats); the user
sees torchdiffeq's conventions: `func(t, y)` with `t` a 0-dim tensor in y's dtype, `y` shaped like
`y0` (or a tuple), and decreasing output times handled by t = -tau. Nothing here negates f: the
solvers fold the direction sign into the step size they pass to the kernels, saving an op per
evaluation.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor


class Perturb(Enum):
    """Which side of a time point func is evaluated on (torchdiffeq's semantics)."""

    NONE = 0
    PREV = 1  # just before: the last stage of a step, so f never sees a discontinuity at t1
    NEXT = 2  # just after: the first evaluation after a jump


def _flat_to_shape(flat: Tensor, shapes: list[torch.Size]) -> tuple[Tensor, ...]:
    parts, start = [], 0
    for shape in shapes:
        stop = start + shape.numel()
        parts.append(flat[..., start:stop].view(flat.shape[:-1] + shape))
        start = stop
    return tuple(parts)


class VectorField:
    """f(tau, y_flat_or_shaped) for the solvers; counts evaluations."""

    def __init__(
        self,
        func: Callable[..., Any],
        y0: Tensor,
        direction: float,
        tuple_shapes: list[torch.Size] | None,
    ) -> None:
        self.func = func
        self.direction = direction
        self.tuple_shapes = tuple_shapes
        self.dtype = y0.dtype
        self.device = y0.device
        self.state_shape = y0.shape
        self.nfe = 0
        self._float32_time = y0.dtype == torch.float32
        self._last_key: tuple[float, Perturb] = (math.nan, Perturb.NONE)
        self._last_time = torch.zeros(())

    def time_tensor(self, tau: float, perturb: Perturb = Perturb.NONE) -> Tensor:
        """The user-facing time for internal time tau, in y's dtype, nudged one ulp if asked.

        The last tensor made is reused when the same time is asked again (an RK step's stages at
        t1 share one), saving a tensor creation per step.
        """
        key = (tau, perturb)
        if key == self._last_key:
            return self._last_time
        value = tau
        if perturb is not Perturb.NONE:
            if self._float32_time:  # nudge in the dtype func sees, as torchdiffeq does
                toward = np.float32(-np.inf if perturb is Perturb.PREV else np.inf)
                value = float(np.nextafter(np.float32(tau), toward))
            else:
                value = math.nextafter(tau, -math.inf if perturb is Perturb.PREV else math.inf)
        t = torch.scalar_tensor(self.direction * value, dtype=self.dtype, device=self.device)
        self._last_key, self._last_time = key, t
        return t

    def user_time(self, tau: float) -> float:
        return self.direction * tau

    def __call__(self, tau: float, y: Tensor, perturb: Perturb = Perturb.NONE) -> Tensor:
        self.nfe += 1
        if perturb is Perturb.NONE and tau != self._last_key[0]:  # the common case, inlined
            t = torch.scalar_tensor(self.direction * tau, dtype=self.dtype, device=self.device)
            self._last_key, self._last_time = (tau, perturb), t
        else:
            t = self.time_tensor(tau, perturb)
        if self.tuple_shapes is None:
            out = self.func(t, y)
            if not isinstance(out, Tensor) or out.shape != self.state_shape:
                self.checked_parts(out, tau)  # raises, naming the problem
            return out
        parts = self.checked_parts(self.func(t, _flat_to_shape(y, self.tuple_shapes)), tau)
        return torch.cat([o.reshape(-1) for o in parts])

    def shape(self, flat: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The user's view of a flat state: itself, or the tuple of parts."""
        return flat.view(self.state_shape) if self.tuple_shapes is None else _flat_to_shape(flat, self.tuple_shapes)

    def checked_parts(self, out: object, tau: float) -> tuple[Tensor, ...]:
        """func's output as a tuple of parts, each checked against the state's shape."""
        if self.tuple_shapes is None:
            if not isinstance(out, Tensor) or out.shape != self.state_shape:
                raise _shape_error(out, self.state_shape, self.user_time(tau))
            return (out,)
        if not isinstance(out, (tuple, list)) or len(out) != len(self.tuple_shapes):
            raise TypeError(
                f"func must return a tuple of {len(self.tuple_shapes)} tensors matching the tuple y0, "
                f"got {type(out).__name__} at t={self.user_time(tau):.6g}"
            )
        for part, (o, shape) in enumerate(zip(out, self.tuple_shapes)):
            # Parts are flattened, as torchdiffeq does, so only their sizes must agree.
            if not isinstance(o, Tensor) or o.numel() != shape.numel():
                raise _shape_error(o, shape, self.user_time(tau), f"part {part} of ")
        return tuple(out)

    def into(self, out: Tensor, tau: float, y: Tensor, perturb: Perturb = Perturb.NONE) -> None:
        """Writes f(tau, y) into `out` (a stage row). Fields that can produce f in place (the
        adjoint's augmented dynamics) override this to skip the copy."""
        out.copy_(self(tau, y, perturb))


def _shape_error(out: object, shape: torch.Size, t: float, part: str = "") -> Exception:
    if not isinstance(out, Tensor):
        return TypeError(
            f"func must return a Tensor shaped like {part}y0 {tuple(shape)}, got {type(out).__name__} at t={t:.6g}"
        )
    return ValueError(
        f"func returned shape {tuple(out.shape)} for {part}the state, but {part}y0 has shape {tuple(shape)} (at t={t:.6g})"
    )
