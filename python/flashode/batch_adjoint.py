"""`solve_ivp(..., adjoint=True)`: gradients by the continuous adjoint, each sample solved
backwards with its own adaptive steps (torchode's BacksolveAdjoint, in flashode's batch loop).

Backward, interval by interval from the last output time to t_start, every sample integrates its
augmented state z = [y | a] (the state and its adjoint a = dL/dy) with dz/dt = [f, -a^T df/dy],
each step landing exactly on the sample's next output time, where y is reset to the stored forward
output and dL/dy(t_i) is added to a. The parameters' adjoint dL/dθ = ∫ a^T df/dθ dt is shared by
the batch, so it is not part of z: after each step, once the per-sample accept decisions are known,
one vector-Jacobian product through the step's stage evaluations adds
sum_b accept_b h_b sum_j b_j a_{j,b}^T df/dθ (stage j). Its error is not controlled (the seminorm
of Kidger et al. 2021), and memory stays independent of the number of steps.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .batch import BatchProblem, BatchSolver, Controller, Solution, Status, _batch_tolerance
from .errors import SolverError
from .tableaus import Tableau


class _AugmentedField:
    """dz/dt = [f(t, y), -a^T df/dy] on z = [y | a] (B, 2N); keeps each evaluation's graph for the
    step's parameter product."""

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], shape: torch.Size, params: list[Tensor]) -> None:
        self.func = func
        self.shape = shape
        self.n = shape.numel() // shape[0]
        self.params = params
        self.stage_graphs: list[tuple[Tensor, Tensor]] = []  # (f, -a) per evaluation of this step

    def evaluate(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """f(t, y) with its graph, and y as the graph's input."""
        with torch.enable_grad():
            y_ = z[:, : self.n].detach().requires_grad_()
            return self.func(t, y_.view(self.shape)).reshape(y_.shape), y_

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        keep = bool(self.params)
        f, y = self.evaluate(t, z)
        vjp_y = None
        if f.requires_grad:  # else f depends on neither y nor anything that wants a gradient
            (vjp_y,) = torch.autograd.grad(f, y, -z[:, self.n :], retain_graph=keep, allow_unused=True)
        if vjp_y is None:  # f does not depend on y
            vjp_y = torch.zeros_like(y)
        if keep:  # every stage, so stage j stays at index j (those without a graph are skipped later)
            self.stage_graphs.append((f, -z[:, self.n :]))
        return torch.cat([f.detach(), vjp_y], 1).view(z.shape)


class _ParameterAdjoint:
    """Accumulates dL/dθ after each backward step (BatchSolver.on_step)."""

    def __init__(self, field: _AugmentedField, b: list[float]) -> None:
        self.field = field
        self.b = b
        self.grads = [torch.zeros_like(p) for p in field.params]

    def __call__(self, z: Tensor, t: Tensor, h: Tensor, accept: Tensor) -> None:
        field = self.field
        stage_graphs, field.stage_graphs = field.stage_graphs, []
        if not field.params:
            return
        # The first stage is carried over from an earlier step (whose graph may be gone), so it is
        # evaluated afresh here: one extra evaluation of f per step.
        f0, _ = field.evaluate(t.to(z.dtype), z)
        graphs = [(f0, -z[:, field.n :])] + stage_graphs
        weight = torch.where(accept, h, 0.0).to(z.dtype)[:, None]
        outputs, cotangents = [], []
        for b_j, (f, minus_a) in zip(self.b, graphs):
            if b_j != 0.0 and f.requires_grad:
                outputs.append(f)
                cotangents.append((b_j * weight) * minus_a)  # the step's h b_j (-a_j)^T df/dθ
        if not outputs:
            return
        grads = torch.autograd.grad(outputs, field.params, cotangents, allow_unused=True)
        for acc, g in zip(self.grads, grads):
            if g is not None:
                acc.add_(g)


def _solve_forward(problem: BatchProblem, tableau: Tableau, ctrl: Controller, first_step: Any, max_steps: int,
                   clip_to_end: bool, check_every: int, cuda_graph: bool) -> BatchSolver:
    with torch.no_grad():
        solver = BatchSolver(problem, tableau, ctrl, first_step, max_steps, clip_to_end)
        solver.solve(check_every, cuda_graph)
    return solver


class _BatchAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: dict[str, Any], y0: Tensor, *params: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        solver = _solve_forward(run["problem"], run["tableau"], run["ctrl"], run["first_step"], run["max_steps"],
                                run["clip_to_end"], run["check_every"], run["cuda_graph"])
        run["solver"] = solver
        ctx.run = run
        ys = solver.ys
        ctx.save_for_backward(ys, solver.status)
        return ys.clone()

    @staticmethod
    def backward(ctx, grad_ys: Tensor):  # type: ignore[no-untyped-def]
        ys, status = ctx.saved_tensors
        run = ctx.run
        problem: BatchProblem = run["problem"]
        params: list[Tensor] = run["params"]
        batch, outputs, n = ys.shape
        ok = (status == int(Status.SUCCESS))[:, None]
        grad_ys = torch.where(ok[:, :, None], grad_ys, 0.0)  # samples that failed forward get no gradient
        field = _AugmentedField(problem.func, problem.shape, params)
        accumulate = _ParameterAdjoint(field, list(run["tableau"].b))
        y, a = ys[:, -1], grad_ys[:, -1]
        first_step = None
        # Interval ends: every output time down to the first, then t_start (a zero-length last
        # interval where the first output is at t_start).
        ends = [problem.t_eval[:, i] for i in range(outputs - 2, -1, -1)] + [problem.t_start]
        starts = [problem.t_eval[:, i] for i in range(outputs - 1, -1, -1)]
        for i, (t0, t1) in enumerate(zip(starts, ends)):
            z = torch.cat([torch.where(ok, y, 0.0), a], 1)  # failed samples: finite inputs for func
            if bool((t0 != t1).any()):
                z, first_step = _backward_interval(run, problem, field, accumulate, z, t0, t1, first_step, ok[:, 0])
            out = outputs - 2 - i  # the output reached at this interval's end (none for t_start)
            a = z[:, n:]
            if out >= 0:
                y, a = ys[:, out], a + grad_ys[:, out]
        return (None, a, *accumulate.grads)  # a is (B, N), as the flat y0 the Function received


def _backward_interval(
    run: dict[str, Any], problem: BatchProblem, field: _AugmentedField, accumulate: _ParameterAdjoint, z: Tensor,
    t0: Tensor, t1: Tensor, first_step: Tensor | None, active: Tensor,
) -> tuple[Tensor, Tensor]:
    """Integrates the augmented state from t0 to t1 (per sample), landing on t1 exactly; samples
    not `active` (failed forward) stay where they are."""
    t1 = t1.contiguous()
    aug = BatchProblem(
        field, z, z.shape, t1[:, None].contiguous(), t0.contiguous(), t1,
        torch.where(t1 >= t0, 1.0, -1.0).to(torch.float64), run["adjoint_rtol"], run["adjoint_atol"],
    )
    solver = BatchSolver(aug, run["tableau"], run["ctrl"], first_step, run["max_steps"], clip_to_end=True)
    solver.stop(~active)
    solver.on_step = accumulate
    field.stage_graphs = []  # the starting evaluations are no step's stages
    solver.solve(run["check_every"], False)
    failed = solver.status != int(Status.SUCCESS)
    if bool(failed.any()):
        b = int(failed.nonzero()[0])
        raise SolverError(
            f"solve_ivp(adjoint=True): the backward solve of sample {b} failed with "
            f"{Status(int(solver.status[b])).name} at t={float(solver.t[b]):.10g}"
        )
    return solver.y, solver.dt


def solve_with_adjoint(
    problem: BatchProblem, tableau: Tableau, ctrl: Controller, first_step: Any, max_steps: int, clip_to_end: bool,
    check_every: int, cuda_graph: bool, t_user: Tensor, adjoint_rtol: Any, adjoint_atol: Any, adjoint_params: Any,
) -> Solution:
    func = problem.func
    if adjoint_params is None:
        params = [p for p in func.parameters() if p.requires_grad] if isinstance(func, torch.nn.Module) else []
    else:
        params = [p for p in adjoint_params if isinstance(p, Tensor) and p.requires_grad]
    if adjoint_params is None and not isinstance(func, torch.nn.Module):
        warnings.warn(
            "solve_ivp(adjoint=True): func is not an nn.Module, so no parameters receive gradients; "
            "pass adjoint_params=... to name them",
            stacklevel=3,
        )
    n = problem.y0.shape[1]
    aug_like = torch.cat([problem.y0, problem.y0], 1)

    def tolerance(value: Any, default: Tensor) -> Tensor:
        user_y0 = problem.y0.reshape(problem.shape)
        tol = default if value is None else _batch_tolerance(value, user_y0, "adjoint tolerance")
        return tol if tol.dim() == 0 else torch.cat([tol, tol], 1).reshape(aug_like.shape[0], 2 * n)

    run = dict(
        problem=problem, tableau=tableau, ctrl=ctrl, first_step=first_step, max_steps=max_steps,
        clip_to_end=clip_to_end, check_every=check_every, cuda_graph=cuda_graph, params=params,
        adjoint_rtol=tolerance(adjoint_rtol, problem.rtol), adjoint_atol=tolerance(adjoint_atol, problem.atol),
    )
    y0 = problem.y0
    if torch.is_grad_enabled() and (y0.requires_grad or params):
        ys = _BatchAdjoint.apply(run, y0, *params)
        solver = run["solver"]
    else:
        solver = _solve_forward(problem, tableau, ctrl, first_step, max_steps, clip_to_end, check_every, cuda_graph)
        ys = solver.ys
    return solver.solution(t_user, ys)
