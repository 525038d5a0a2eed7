"""One fixed-grid explicit Runge–Kutta solver for every tableau in `tableaus.FIXED`.

Semantics follow torchdiffeq's `FixedGridODESolver`: the grid comes from `step_size` (the last
point moved onto t[-1]) or a `grid_constructor(func, y0, t)`, or is t itself; outputs between grid
points are linearly interpolated (`interp="linear"`) or use the cubic Hermite interpolant
(`interp="cubic"`, one extra evaluation of f at the end of each step that holds outputs); with
`perturb=True` the first stage sees t0 just after and the stages at t1 see t1 just before.
Each stage is one `rk_stage` op, and all outputs inside a step are one `rk_dense` op.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import _ops
from .._func import Perturb, VectorField
from ..errors import SolverError
from ..tableaus import Tableau
from .common import Callbacks, StageBuffers

# Cubic Hermite basis functions as coefficients of theta, theta^2, theta^3.
_H10 = (1.0, -2.0, 1.0)  # multiplies h * f0
_H01 = (0.0, 3.0, -2.0)  # multiplies y1 - y0 = h * sum_j b_j k_j
_H11 = (0.0, -1.0, 1.0)  # multiplies h * f1


def linear_dense(b: tuple[float, ...]) -> list[float]:
    """y0 + theta (y1 - y0) as per-stage polynomials (degree 1)."""
    return list(b)


def cubic_hermite_dense(b: tuple[float, ...]) -> list[float]:
    """Cubic Hermite through (y0, f0) and (y1, f1), over the stages plus f1 appended as a last row."""
    rows = []
    for j, bj in enumerate(b):
        rows.append([(_H10[p] if j == 0 else 0.0) + bj * _H01[p] for p in range(3)])
    rows.append(list(_H11))
    return [p for row in rows for p in row]


class FixedGridRKSolver:
    def __init__(
        self,
        field: VectorField,
        y0: Tensor,
        tableau: Tableau,
        *,
        step_size: float | None,
        grid_constructor: Callable[..., Tensor] | None,
        interp: str,
        perturb: bool,
        callbacks: Callbacks,
    ) -> None:
        if step_size is not None and grid_constructor is not None:
            raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
        if interp not in ("linear", "cubic"):
            raise ValueError(f"Unknown interpolation method {interp}")
        self.field = field
        self.y0 = y0
        self.tab = tableau
        self.step_size = step_size
        self.grid_constructor = grid_constructor
        self.interp = interp
        self.perturb = perturb
        self.callbacks = callbacks
        self.stages = len(tableau.c)
        self.rows = [list(r) for r in tableau.a]
        self.b = list(tableau.b)
        self.dense = linear_dense(tableau.b) if interp == "linear" else cubic_hermite_dense(tableau.b)
        self._buffers: StageBuffers | None = None
        self.n_steps = 0

    def grid(self, t: list[float], y0: Tensor) -> list[float]:
        if self.step_size is not None:
            # torchdiffeq's construction: ceil((end - start) / step + 1) points, last moved onto t[-1].
            count = int(math.ceil((t[-1] - t[0]) / self.step_size + 1))
            grid = [i * self.step_size + t[0] for i in range(count)]
            grid[-1] = t[-1]
            return grid
        if self.grid_constructor is not None:
            grid_t = self.grid_constructor(torch.tensor(t, dtype=torch.float64, device=y0.device), y0)
            grid = [float(x) for x in grid_t.tolist()]
            if not (grid[0] == t[0] and grid[-1] == t[-1]):
                raise AssertionError("grid_constructor must return a grid starting at t[0] and ending at t[-1]")
            return grid
        return list(t)

    def integrate(self, t: list[float], y0: Tensor | None = None) -> Tensor:
        """Solution at the increasing internal times t, from y0 (default: the solver's y0)."""
        y0 = self.y0 if y0 is None else y0
        field = self.field
        grid = self.grid(t, y0)
        record_graph = torch.is_grad_enabled()
        ops = _ops.ops_for(y0.device, record_graph)
        extra = 1 if self.interp == "cubic" else 0
        buffers = self._buffers = StageBuffers.reuse(self._buffers, y0, self.stages + extra, record_graph)
        outputs: list[Tensor] = [y0.unsqueeze(0)]
        j = 1
        for t0, t1 in zip(grid[:-1], grid[1:]):
            dt = t1 - t0
            self.callbacks.step(field, t0, y0, dt)
            h = field.direction * dt
            k, k_rows = buffers.next(field(t0, y0, Perturb.NEXT if self.perturb else Perturb.NONE))
            for i in range(1, self.stages):
                yi = ops.rk_stage(y0, k, self.rows[i], h)
                if self.tab.c[i] == 1.0:
                    field.into(k_rows[i], t1, yi, Perturb.PREV if self.perturb else Perturb.NONE)
                else:
                    field.into(k_rows[i], t0 + self.tab.c[i] * dt, yi)
            y1 = ops.rk_stage(y0, k, self.b, h)
            self.n_steps += 1
            first = j
            while j < len(t) and t1 >= t[j]:
                j += 1
            if j > first:
                if extra:
                    field.into(k_rows[self.stages], t1, y1)
                chunk = ops.rk_dense(y0, k, self.dense, [(t[m] - t0) / dt for m in range(first, j)], h)
                if not bool(torch.isfinite(chunk).all()):
                    raise SolverError(
                        f"non-finite values in the state at t={field.user_time(t[j - 1]):.10g} "
                        f"(fixed step dt={dt:.3g}: reduce step_size, or check func)"
                    )
                outputs.append(chunk)
            y0 = y1
        return torch.cat(outputs)
