"""Implicit Runge–Kutta methods on the fixed grid: torchdiffeq master's implicit_euler,
implicit_midpoint, trapezoid, radauIIA3, gl4, radauIIA5, gl6, sdirk2 and trbdf2 (`tableaus.IMPLICIT`).

Each step solves k_i = f(t0 + c_i h, y0 + h sum_j a_ij k_j) for the implicit stages by Newton's
method, simplified as in Hairer & Wanner (Solving ODEs II, IV.8):

* J = df/dy at (t0, y0), once per step, by reverse-mode autograd from the evaluation that gives
  f0 = f(t0, y0). The stages solved together (all implicit stages; one at a time for the
  diagonally implicit methods) have the Newton matrix I - h (A ⊗ J), LU-factored once per step and
  distinct block. Iterates start from stage states at y0 (k = 0): torchdiffeq's guess k = f0 puts
  them at explicit Euler's y0 + c h f0, far off in stiff components, from where Newton can run to
  a spurious root (Robertson's problem does).
* Where J is stale (the increments shrink by less than SLOW_CONTRACTION, or grow) the stages'
  own Jacobians are taken (see `_Newton`), so stiffness that J at y0 does not show is still found.
* The iteration stops when the increments h Δk, in the RMS norm relative to 1 + |y0|, fall below
  tol = eps**(3/4) of the state's dtype (1.8e-12 in float64, 6.4e-6 in float32), or when the
  contraction rate theta says the error left, theta / (1 - theta) |h Δk|, is: far above
  round-off, far below a step's discretisation error. torchdiffeq master iterates Broyden's method
  to 1e-8 (1e-6 in float32) on the residual's 2-norm and warns if that fails; here failure (after
  `max_iters` iterations, or a non-finite iterate) raises SolverError.
* A field whose output autograd cannot trace back to y (the adjoint's augmented dynamics, which
  differentiates func internally) has no Jacobian: the iteration is then a fixed-point iteration,
  which converges only while h |df/dy| is small.

Stages at c == 1 see t1 nudged down (Perturb.PREV) whether or not `perturb` is set, as in
torchdiffeq master. Gradients: the iteration records no graph; with grad enabled the implicit stages
are evaluated once more on the graph and passed through `_ImplicitStages`, whose backward applies
the implicit-function derivative exactly, so odeint differentiates the discrete solution.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _ops
from .._func import Perturb, VectorField
from ..errors import SolverError
from ..tableaus import ImplicitTableau
from .common import Callbacks
from .fixed_grid import FixedGridOptions, FixedGridSolver, FixedStep

DEFAULT_MAX_ITERS = 100
# A Newton iteration whose increments shrink by less than this factor takes fresh Jacobians.
SLOW_CONTRACTION = 0.3

# torchdiffeq master's solver classes, as named in its warnings.
TORCHDIFFEQ_CLASSES = {
    "implicit_euler": "ImplicitEuler",
    "implicit_midpoint": "ImplicitMidpoint",
    "trapezoid": "Trapezoid",
    "radauIIA3": "RadauIIA3",
    "gl4": "GaussLegendre4",
    "radauIIA5": "RadauIIA5",
    "gl6": "GaussLegendre6",
    "sdirk2": "SDIRK2",
    "trbdf2": "TRBDF2",
}


class Jacobian:
    """df/dy (N x N) of an evaluation f = func(y) by reverse-mode autograd: the N vector-Jacobian
    products in one vmapped backward pass, or one by one for a func with an op vmap cannot batch
    (found once, then remembered). None when autograd cannot trace f back to y: one probe product
    finds out, until f has once been traced, so that an untraceable state (the adjoint's, large)
    never builds the N x N basis."""

    def __init__(self) -> None:
        self.batched = True
        self.traced = False

    def __call__(self, f: Tensor, y: Tensor) -> Tensor | None:
        if not f.requires_grad:
            return None
        if not self.traced:
            if torch.autograd.grad(f, y, torch.ones_like(f), retain_graph=True, allow_unused=True)[0] is None:
                return None
            self.traced = True
        n = y.numel()
        basis = torch.eye(n, dtype=f.dtype, device=f.device).view(n, *f.shape)
        if self.batched:
            try:
                (rows,) = torch.autograd.grad(
                    f, y, basis, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
                return None if rows is None else rows.reshape(n, n)
            except RuntimeError:
                self.batched = False
        rows_each = [torch.autograd.grad(f, y, e, retain_graph=True, allow_unused=True)[0] for e in basis]
        return None if rows_each[0] is None else torch.stack(rows_each).reshape(n, n)


def newton_matrix(a: Tensor, jacobians: list[Tensor | None], h: float, n: int) -> Tensor:
    """I - h [a_ij J_i]_ij for g stages with a (g, g) and one Jacobian per stage (None: zero)."""
    g = a.shape[0]
    jac = torch.stack([a.new_zeros(n, n) if j is None else j for j in jacobians])
    blocks = (a[:, :, None, None] * jac[:, None]).permute(0, 2, 1, 3).reshape(g * n, g * n)
    return torch.eye(g * n, dtype=a.dtype, device=a.device) - h * blocks


class _ImplicitStages(torch.autograd.Function):
    """Returns the converged stage derivatives k; backward treats them as the solution of
    k = f(y0 + h A k) with f the stage evaluations on the graph (the input): dk = M^-1 df with the
    exact Newton matrix M = I - h [a_ij J_i] at the converged stages, so the gradient reaching df
    (and through it y0, earlier stages and func's parameters) is M^-T times the incoming one."""

    @staticmethod
    def forward(ctx, f: Tensor, k: Tensor, exact_matrix: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.exact_matrix = exact_matrix
        return k.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        m = ctx.exact_matrix()
        return torch.linalg.solve(m.mT, grad.reshape(-1, 1)).view_as(grad), None, None


class ImplicitRKSolver(FixedGridSolver):
    """An implicit Runge–Kutta method from an `ImplicitTableau`, on the fixed-grid driver."""

    def __init__(
        self,
        field: VectorField,
        y0: Tensor,
        tableau: ImplicitTableau,
        grid: FixedGridOptions,
        callbacks: Callbacks,
        max_iters: int = DEFAULT_MAX_ITERS,
    ) -> None:
        super().__init__(field, y0, grid, callbacks)
        if int(max_iters) < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters}")
        self.tab = tableau
        self.max_iters = int(max_iters)
        s = len(tableau.c)
        self.rows = [list(r) for r in tableau.a]
        self.b = list(tableau.b)
        # Leading stages with c == 0 and a zero row are k = f0; the rest are solved for.
        self.first_implicit = next((i for i in range(s) if tableau.c[i] != 0 or any(tableau.a[i])), s)
        implicit = range(self.first_implicit, s)
        self.groups = [slice(i, i + 1) for i in implicit] if tableau.diagonally_implicit else [slice(implicit.start, s)]
        self.a = torch.tensor(tableau.a, dtype=y0.dtype, device=y0.device)
        self.tol = torch.finfo(y0.dtype).eps ** 0.75
        self.jacobian = Jacobian()
        self.untracked = False  # whether func's output was seen to need no graph (see f_and_jacobian)

    def stage_time(self, i: int, t0: float, t1: float) -> tuple[float, Perturb]:
        if self.tab.c[i] == 1.0:
            return t1, Perturb.PREV
        return t0 + self.tab.c[i] * (t1 - t0), Perturb.NONE

    def start(self, y0: Tensor) -> None:
        self.untracked = False

    def f_and_jacobian(self, tau: float, y: Tensor, perturb: Perturb, record: bool) -> tuple[Tensor, Tensor | None]:
        """f(tau, y), on the caller's graph if `record`, and df/dy, from one evaluation."""
        with torch.enable_grad():
            leaf = y if record and y.requires_grad else y.detach().requires_grad_()
            f = self.field(tau, leaf, perturb)
            jac = self.jacobian(f, leaf)
        if not record:
            return f.detach(), jac
        if leaf is not y:
            # f hangs off a private leaf, which would make the solution require grad even where
            # nothing does: evaluate again for the graph of func's parameters, if any.
            f = self.field(tau, y, perturb)
            self.untracked = not f.requires_grad
        return f, jac

    def step(self, t0: float, t1: float, y0: Tensor) -> FixedStep:
        dt = t1 - t0
        h = self.field.direction * dt
        record = torch.is_grad_enabled() and (y0.requires_grad or not self.untracked)
        f0, jac = self.f_and_jacobian(t0, y0, self.first_perturb(), record)
        with torch.no_grad():
            k = y0.new_zeros((len(self.b), *y0.shape))
            k[: self.first_implicit] = f0.detach()
            newton = _Newton(self, t0, t1, h, y0.detach(), jac)
            for group in self.groups:
                newton.solve(group, k)
        if record and f0.requires_grad:  # else no stage depends on y0 or on func's parameters
            k = self.on_graph(k, f0, y0, t0, t1, h)
        y1 = _ops.ops_for(y0.device, torch.is_grad_enabled()).rk_stage(y0, k, self.b, h)
        return FixedStep(y1, self.hermite_interpolant(t1, y0, f0, y1, dt))

    def on_graph(self, k: Tensor, f0: Tensor, y0: Tensor, t0: float, t1: float, h: float) -> Tensor:
        """The converged stages as differentiable functions of y0, f0 and func's parameters."""
        ops = _ops.ops_for(y0.device, True)
        first, s = self.first_implicit, len(self.b)
        explicit = f0.unsqueeze(0).expand(first, *f0.shape)
        known = torch.cat([explicit, k[first:]])  # implicit rows detached: their dependence is M^-1
        states = [ops.rk_stage(y0, known, self.rows[i], h) for i in range(first, s)]
        times = [self.stage_time(i, t0, t1) for i in range(first, s)]
        f = torch.stack([self.field(tau, y, perturb) for (tau, perturb), y in zip(times, states)])
        detached = [y.detach() for y in states]

        def exact_matrix() -> Tensor:
            jacobians = [self.f_and_jacobian(t, y, p, False)[1] for (t, p), y in zip(times, detached)]
            return newton_matrix(self.a[first:, first:], jacobians, h, y0.numel())

        return torch.cat([explicit, _ImplicitStages.apply(f, k[first:], exact_matrix)])


class _Newton:
    """One step's Newton iterations, group by group, sharing J and the factorisations.

    Simplified Newton with J at (t0, y0) until J turns out stale: the increments shrink by less
    than SLOW_CONTRACTION or grow (J may miss the stiffness altogether, as at Robertson's y0,
    where the fast reaction's rate vanishes). The iteration then takes each stage's Jacobian at the
    current iterate (an exact Newton step), and keeps the last one as J for the rest of the step.
    If the increments grew after a step from a stale J, that step overshot and is undone first."""

    def __init__(self, solver: ImplicitRKSolver, t0: float, t1: float, h: float, y0: Tensor, jac: Tensor | None):
        self.solver = solver
        self.t0, self.t1, self.h = t0, t1, h
        self.y0 = y0
        self.jac = jac
        self.ops = _ops.ops_for(y0.device, False)
        self.scale = (1 + y0.abs()).reshape(-1)
        self.factors: dict[tuple[float, ...], tuple[Tensor, Tensor]] = {}

    def factor(self, a: Tensor) -> tuple[Tensor, Tensor] | None:
        """LU of I - h (a ⊗ J), shared by the groups with the same block a; None without J."""
        if self.jac is None:
            return None
        key = tuple(a.reshape(-1).tolist())
        if key not in self.factors:
            self.factors[key] = self.lu(newton_matrix(a, [self.jac] * a.shape[0], self.h, self.y0.numel()))
        return self.factors[key]

    def refactor(
        self, a: Tensor, states: list[Tensor], times: list[tuple[float, Perturb]]
    ) -> tuple[Tensor, Tensor] | None:
        """LU of the exact Newton matrix at the stage states; their last Jacobian becomes the step's J."""
        jacobians = [self.solver.f_and_jacobian(t, y, p, False)[1] for (t, p), y in zip(times, states)]
        self.jac = jacobians[-1]
        self.factors.clear()
        if all(j is None for j in jacobians):
            return None
        return self.lu(newton_matrix(a, jacobians, self.h, self.y0.numel()))

    def lu(self, m: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return torch.linalg.lu_factor(m)
        except torch.linalg.LinAlgError:
            raise SolverError(
                f"{self.solver.tab.name}: the Newton matrix I - h A⊗J is singular on the step from t="
                f"{self.solver.field.user_time(self.t0):.10g} (step size {abs(self.h):.3g}); change step_size"
            ) from None

    def solve(self, group: slice, k: Tensor) -> None:
        """Solves the stage equations of `group` for k[group] in place, the other stages fixed."""
        solver = self.solver
        a = solver.a[group, group]
        lu = self.factor(a)
        stages = range(group.start, group.stop)
        times = [solver.stage_time(i, self.t0, self.t1) for i in stages]
        previous = math.inf  # the size of the last increment
        last: tuple[Tensor, Tensor] | None = None  # the last residual and increment
        refactored = False  # whether the last increment came from Jacobians at its starting point
        for iteration in range(1, solver.max_iters + 1):
            states = [self.ops.rk_stage(self.y0, k, solver.rows[i], self.h) for i in stages]
            residual = k[group] - torch.stack([solver.field(t, y, p) for (t, p), y in zip(times, states)])
            delta = self.increment(lu, residual)
            size = self.size(delta)
            # Contracts slowly or diverges (not for a fixed-point iteration: there is no J to renew).
            stale = not size <= SLOW_CONTRACTION * previous and self.jac is not None
            if stale:
                if not size < previous and last is not None and not refactored:
                    # Diverging after an increment from a stale J: it overshot, so go back before it.
                    residual, undo = last
                    k[group] += undo
                    states = [self.ops.rk_stage(self.y0, k, solver.rows[i], self.h) for i in stages]
                    previous = math.inf
                lu = self.refactor(a, states, times)
                delta = self.increment(lu, residual)
                size = self.size(delta)
            refactored = stale
            if not math.isfinite(size):
                break
            k[group] -= delta
            # size^2 / (previous - size) = theta / (1 - theta) * size, theta = size / previous.
            if size <= solver.tol or (size < previous < math.inf and size * size / (previous - size) <= solver.tol):
                return
            previous, last = size, (residual, delta)
        raise self.not_converged(iteration, float(torch.linalg.vector_norm(residual)), size)

    def increment(self, lu: tuple[Tensor, Tensor] | None, residual: Tensor) -> Tensor:
        """M^-1 residual for the stacked (g, *state) residual."""
        if lu is None:
            return residual
        return torch.linalg.lu_solve(*lu, residual.reshape(-1, 1)).view_as(residual)

    def size(self, delta: Tensor) -> float:
        """The RMS of h delta relative to 1 + |y0|."""
        scaled = (self.h * delta).reshape(-1, self.scale.numel()) / self.scale
        return float(torch.linalg.vector_norm(scaled)) / math.sqrt(scaled.numel())

    def not_converged(self, iterations: int, residual: float, size: float) -> SolverError:
        solver = self.solver
        hint = (
            "; autograd cannot trace the field's output back to y (func's, or in odeint_adjoint's backward "
            "solve the adjoint dynamics'), so it ran without a Jacobian, as a fixed-point iteration, which needs "
            "h |df/dy| < 1" if self.jac is None else ""
        )
        return SolverError(
            f"{solver.tab.name}: the Newton iteration for the implicit stages did not converge on the step "
            f"from t={solver.field.user_time(self.t0):.10g} (step size {abs(self.h):.3g}; after {iterations} of "
            f"max_iters={solver.max_iters} iterations the residual |k - f| is {residual:.3g} and the "
            f"scaled increment {size:.3g}, tolerance {solver.tol:.3g}){hint}. Reduce step_size, or raise "
            "max_iters"
        )
