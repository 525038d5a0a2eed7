"""torchdiffeq's fixed-grid Adams methods: `explicit_adams` (Adams–Bashforth) and `implicit_adams` /
`fixed_adams` (Adams–Bashforth predictor, Adams–Moulton corrector by functional iteration).

Semantics follow torchdiffeq 0.2.5's `AdamsBashforthMoulton`: every step evaluates f0 = f(t0, y0)
and adds it to a history of at most `max_order - 1` values (only when t0 differs from the last time
added); with fewer than 3 values the step is `rk4` (torchdiffeq's 3/8 rule) from the newest value;
otherwise the predictor is Adams–Bashforth over the whole history and, for the implicit methods, the
corrector iterates dy = h (m0 f(t1, y0 + dy) + sum_j m_(j+1) f_j) up to `max_iters` times until
successive increments agree within rtol/atol in the max norm. If they never do, the solver warns and
forgets the oldest history value.

The history is one stacked ring buffer, so each history sum (predictor, corrector constant) is one
fused `rk_stage` op with the coefficients permuted to the ring's order.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

from .. import _ops
from .._func import VectorField
from ..tableaus import FIXED
from .common import Callbacks
from .fixed_grid import FixedGridOptions, FixedGridRKSolver, FixedGridSolver, FixedStep

# method name -> whether it corrects with Adams–Moulton (torchdiffeq's `implicit`)
ADAMS_METHODS = {"explicit_adams": False, "implicit_adams": True, "fixed_adams": True}

MAX_ORDER = 12
DEFAULT_MAX_ITERS = 4
# Adams steps need this many history values (predictor order 3); fewer, and the step is rk4.
_MIN_HISTORY = 3


def adams_class_name(implicit: bool) -> str:
    """torchdiffeq's solver class, as named in its warnings."""
    return "AdamsBashforthMoulton" if implicit else "AdamsBashforth"


def _lagrange_integral(nodes: Sequence[Fraction], j: int) -> Fraction:
    """The integral over [0, 1] of the Lagrange basis polynomial that is 1 at nodes[j] and 0 at the
    other nodes (exact)."""
    poly = [Fraction(1)]  # coefficients, constant term first
    denominator = Fraction(1)
    for i, node in enumerate(nodes):
        if i != j:
            # poly *= (u - node)
            poly = [a - node * b for a, b in zip([Fraction(0), *poly], [*poly, Fraction(0)])]
            denominator *= nodes[j] - node
    return sum(c / (p + 1) for p, c in enumerate(poly)) / denominator


def _adams_weights(steps: int, first_node: int) -> tuple[float, ...]:
    # Time in units of h from t0: f is interpolated through the nodes first_node, first_node - 1, ...
    # and integrated over the step [0, 1].
    nodes = [Fraction(first_node - j) for j in range(steps)]
    return tuple(float(_lagrange_integral(nodes, j)) for j in range(steps))


@functools.cache
def adams_bashforth(steps: int) -> tuple[float, ...]:
    """b with y1 = y0 + h sum_j b[j] f(t0 - j h), exact for polynomial solutions of degree `steps`."""
    return _adams_weights(steps, 0)


@functools.cache
def adams_moulton(steps: int) -> tuple[float, ...]:
    """m with y1 = y0 + h sum_j m[j] f(t1 - j h) (m[0] weights f at the new point t1)."""
    return _adams_weights(steps, 1)


class History:
    """The last f values, newest first, as rows of one ring buffer (capacity, *state).

    A combination sum_a c[a] f_(newest - a) is one `rk_stage` over all rows, with the coefficients
    placed at the rows' ring positions and zero elsewhere (the kernels skip zero weights).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: Tensor | None = None
        self.head = 0  # ring position of the newest value
        self.count = 0
        self.fresh = False

    def reset(self, y0: Tensor, fresh: bool) -> None:
        """Empties the history for a solve. Without `fresh` the rows are written in place and kept
        across solves (the adjoint integrates interval after interval on one solver)."""
        self.head, self.count, self.fresh = 0, 0, fresh
        shape = (self.capacity, *y0.shape)
        rows = self.rows
        if fresh or rows is None or rows.shape != shape or rows.dtype != y0.dtype or rows.device != y0.device:
            self.rows = y0.new_zeros(shape)

    def __len__(self) -> int:
        return self.count

    def push(self, f: Tensor) -> None:
        """Adds f as the newest value, overwriting the oldest when full."""
        self.head = (self.head - 1) % self.capacity
        if self.fresh:
            # Under autograd each push makes a new buffer (as StageBuffers does), so no tensor an
            # op has already recorded is ever overwritten.
            rows = self.rows
            self.rows = torch.cat((rows[: self.head], f.unsqueeze(0), rows[self.head + 1 :]))
        else:
            self.rows[self.head].copy_(f)
        self.count = min(self.count + 1, self.capacity)

    def drop_oldest(self) -> None:
        self.count -= 1

    def newest(self) -> Tensor:
        return self.rows[self.head]

    def weights(self, coeffs: Sequence[float]) -> list[float]:
        """Coefficients for the newest, second newest, ... value, placed at their ring rows."""
        placed = [0.0] * self.capacity
        for age, c in enumerate(coeffs):
            placed[(self.head + age) % self.capacity] = c
        return placed


class AdamsSolver(FixedGridSolver):
    """torchdiffeq's AdamsBashforth (`implicit=False`) and AdamsBashforthMoulton on the shared
    fixed-grid driver; start-up steps are the `rk4` tableau's."""

    def __init__(
        self,
        field: VectorField,
        y0: Tensor,
        grid: FixedGridOptions,
        callbacks: Callbacks,
        *,
        implicit: bool,
        max_order: int,
        max_iters: int,
        rtol: Tensor,
        atol: Tensor,
    ) -> None:
        super().__init__(field, y0, grid, callbacks)
        assert max_order <= MAX_ORDER, "max_order must be at most {}".format(MAX_ORDER)
        if max_order < _MIN_HISTORY + 1:
            warnings.warn("max_order is below {}, so the solver reduces to `rk4`.".format(_MIN_HISTORY + 1))
        max_order = int(max_order)
        if max_order < 1:
            raise ValueError(f"max_order must be a positive integer, got {max_order}")
        self.implicit = implicit
        self.max_iters = int(max_iters)
        # Flat, like the state the convergence test sees: one value or one per element.
        self.rtol = rtol.reshape(-1)
        self.atol = atol.reshape(-1)
        # torchdiffeq keeps max_order - 1 values; one at least, so that max_order = 1 (which
        # torchdiffeq cannot run) is rk4 like the other orders below 4.
        self.history = History(max(max_order - 1, 1))
        self.startup = FixedGridRKSolver(field, y0, FIXED["rk4"], grid, callbacks)
        self._last_t: float | None = None

    def start(self, y0: Tensor) -> None:
        record_graph = torch.is_grad_enabled()
        self._ops = _ops.ops_for(y0.device, record_graph)
        self.startup.start(y0)
        self.history.reset(y0, fresh=record_graph)
        self._last_t = None
        self._zero = torch.zeros_like(y0)  # the base of increments: dy = 0 + h sum_j c_j f_j

    def step(self, t0: float, t1: float, y0: Tensor) -> FixedStep:
        f0 = self.field(t0, y0, self.first_perturb())
        if t0 != self._last_t:
            self.history.push(f0)
            self._last_t = t0
        order = len(self.history)
        if order < _MIN_HISTORY:
            return self.startup.step_from(t0, t1, y0, self.history.newest())
        h = self.field.direction * (t1 - t0)
        predictor = self.history.weights(adams_bashforth(order))
        if self.implicit:
            y1 = y0 + self.correct(t1, y0, h, self._ops.rk_stage(self._zero, self.history.rows, predictor, h))
        else:
            y1 = self._ops.rk_stage(y0, self.history.rows, predictor, h)
        return FixedStep(y1, self.hermite_interpolant(t1, y0, f0, y1, t1 - t0))

    def correct(self, t1: float, y0: Tensor, h: float, dy: Tensor) -> Tensor:
        """The Adams–Moulton increment by functional iteration from the predicted increment dy."""
        moulton = adams_moulton(len(self.history) + 1)
        # The history's part of the corrector is the same in every iteration.
        delta = self._ops.rk_stage(self._zero, self.history.rows, self.history.weights(moulton[1:]), h)
        for _ in range(self.max_iters):
            f1 = self.field(t1, y0 + dy, self.last_perturb())
            dy_old, dy = dy, self._ops.rk_stage(delta, f1.unsqueeze(0), [moulton[0]], h)
            if self.converged(dy_old, dy):
                return dy
        warnings.warn("Functional iteration did not converge. Solution may be incorrect.")
        self.history.drop_oldest()
        return dy

    def converged(self, dy_old: Tensor, dy: Tensor) -> bool:
        """torchdiffeq's test: max |dy_old - dy| / (atol + rtol max(|dy_old|, |dy|)) < 1 (NaN fails).
        One device-to-host read."""
        if dy.numel() == 0:
            return True
        with torch.no_grad():  # a control decision, not differentiated
            old, new = dy_old.reshape(-1), dy.reshape(-1)
            scale = self.atol + self.rtol * torch.maximum(old.abs(), new.abs())
            return bool(((old - new).abs() / scale).amax() < 1)
