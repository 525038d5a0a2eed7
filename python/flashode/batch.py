"""Batch-parallel solving: every sample of a batch is its own initial value problem, with its own
adaptive steps, time span, direction and output times, and no device->host read inside the step
loop.

`odeint` steps a whole batch with one step size, so one stiff sample slows every sample down. Here
each step is `S - 1` fused `batch_stage` ops (one per stage, between the evaluations of func) and one
fused `batch_step` op that, per sample, finalises the step, decides acceptance, writes the outputs
the step reached, and runs the step-size controller, all on the device. The loop reads one boolean
("is any sample still running?") every `check_every` steps; the step body is traceable by
`torch.compile(fullgraph=True)` and capturable as a CUDA graph (`cuda_graph=True`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _ops
from .errors import SolverError
from .solvers.common import tolerance
from .tableaus import ADAPTIVE, Tableau

# The step loop's default completion check interval, by device type. On CPU a read costs about a
# microsecond while every step run after the last sample finished costs a whole-batch step
# (benchmarks/batch.py --check-every: 1 is fastest, 4 is 1.3x slower on a 6-step solve). On CUDA
# every read drains the queue of launched kernels; 8 is a guess until measured on a GPU.
DEFAULT_CHECK_EVERY = {"cpu": 1, "cuda": 8}


class Status(enum.IntEnum):
    """Per-sample outcome of `solve_ivp` (csrc/common/batch_args.h: SampleStatus)."""

    RUNNING = -1  # only while solving
    SUCCESS = 0
    MAX_STEPS_REACHED = 1  # `max_steps` step attempts without reaching the end
    DT_UNDERFLOW = 2  # the step size fell below `dt_min` or no longer advances t
    NON_FINITE = 3  # y0, func or the state gave NaN/inf for every step size tried


@dataclass
class Solution:
    """What `solve_ivp` returns.

    ts: (B, T) output times; ys: (B, T, *y0.shape[1:]) states there (NaN where a sample stopped
    before reaching the time); status: (B,) `Status` codes; t_final: (B,) the time each sample
    reached; stats: per-sample int64 counts `n_f_evals`, `n_steps`, `n_accepted`, `n_rejected`;
    loop_reads: how many device->host reads the step loop made (about steps / check_every).
    `n_f_evals` counts the evaluations of func while the sample was running; func is called on the
    whole batch every time, finished samples included.
    """

    ts: Tensor
    ys: Tensor
    status: Tensor
    t_final: Tensor
    stats: dict[str, Tensor]
    loop_reads: int = 0  # device->host reads the step loop made (one per check_every steps)

    @property
    def success(self) -> Tensor:
        """(B,) bool: which samples reached every output time."""
        return self.status == int(Status.SUCCESS)

    def raise_for_status(self) -> None:
        """Raise SolverError naming every sample that did not succeed, its status and the time it
        reached; do nothing if all succeeded."""
        failed = (~self.success).nonzero().flatten().tolist()
        if not failed:
            return
        shown = ", ".join(
            f"sample {b}: {Status(int(self.status[b])).name} at t={float(self.t_final[b]):.10g}" for b in failed[:10]
        )
        more = f" (and {len(failed) - 10} more)" if len(failed) > 10 else ""
        raise SolverError(f"solve_ivp: {len(failed)} of {self.status.numel()} samples failed: {shown}{more}")


@dataclass(frozen=True)
class Controller:
    """The step-size controller: torchdiffeq's integral controller, or a PID controller in
    diffrax's form (factor = safety * r_n^-beta1 * r_{n-1}^-beta2 * r_{n-2}^-beta3 with
    beta1 = (p + i + d) / q, beta2 = -(p + 2 d) / q, beta3 = d / q for the method's order q), each
    clamped to [dfactor (1 after an accepted step), ifactor]."""

    kind: str
    order: int
    safety: float
    ifactor: float
    dfactor: float
    pcoeff: float
    icoeff: float
    dcoeff: float
    dt_min: float
    dt_max: float

    def pack(self, clip_to_end: bool, stage_evals: int) -> list[float]:
        """The `controller` argument of the batch_step op (batch_args.h: unpack_controller)."""
        q = float(self.order)
        if self.kind == "integral":
            betas = [1.0 / q, 0.0, 0.0]
        else:
            p, i, d = self.pcoeff, self.icoeff, self.dcoeff
            betas = [(p + i + d) / q, -(p + 2 * d) / q, d / q]
        return [float(self.kind == "pid"), self.safety, self.ifactor, self.dfactor, *betas, self.dt_min,
                self.dt_max, float(clip_to_end), float(stage_evals)]


def make_controller(
    controller: str, order: int, safety: float, ifactor: float, dfactor: float, pcoeff: float | None,
    icoeff: float | None, dcoeff: float | None, dt_min: float, dt_max: float,
) -> Controller:
    if controller not in ("integral", "pid"):
        raise ValueError(f'controller must be "integral" or "pid", got {controller!r}')
    coefficients = (pcoeff, icoeff, dcoeff)
    if controller == "integral" and any(c is not None for c in coefficients):
        raise ValueError('pcoeff/icoeff/dcoeff apply to controller="pid" only')
    # PID defaults: diffrax's suggested PI values for non-stiff problems (Hairer, Wanner II.4).
    p, i, d = (0.3 if pcoeff is None else pcoeff, 0.4 if icoeff is None else icoeff, 0.0 if dcoeff is None else dcoeff)
    if not (safety > 0 and ifactor >= 1 and 0 < dfactor <= 1):
        raise ValueError(f"need safety > 0, ifactor >= 1 and 0 < dfactor <= 1, got {safety}, {ifactor}, {dfactor}")
    if not (0 <= dt_min <= dt_max) or math.isnan(dt_max):
        raise ValueError(f"need 0 <= dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    return Controller(controller, order, float(safety), float(ifactor), float(dfactor), float(p), float(i),
                      float(d), float(dt_min), float(dt_max))


# ----------------------------------------------------------------------------- the problem


@dataclass
class BatchProblem:
    """The checked inputs of a batch solve: flat (B, N) state, float64 (B,) spans and (B, T) times."""

    func: Callable[[Tensor, Tensor], Tensor]
    y0: Tensor  # (B, N)
    shape: torch.Size  # y0's full shape (B, ...)
    t_eval: Tensor  # (B, T) float64
    t_start: Tensor  # (B,) float64
    t_end: Tensor
    direction: Tensor  # (B,) +-1.0
    rtol: Tensor  # () or (B, N), state dtype
    atol: Tensor

    def call(self, t: Tensor, y_flat: Tensor) -> Tensor:
        """func on the user's view; its result as (B, N)."""
        out = self.func(t, y_flat.view(self.shape))
        return out.reshape(y_flat.shape)


def _per_sample_time(value: Any, batch: int, name: str, like: Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64, device=like.device).detach()
    if t.numel() == 1:
        return t.reshape(1).expand(batch).contiguous()
    if t.shape != (batch,):
        shape = tuple(t.shape)
        raise ValueError(f"{name} must be a scalar or have one value per sample, shape ({batch},); got {shape}")
    return t.contiguous()


def _batch_tolerance(tol: Any, y0: Tensor, name: str) -> Tensor:
    """odeint's tolerance broadcasting (solvers.common.tolerance), as () or one (B, N) row per sample."""
    tol_t = tolerance(tol, y0, name)
    if bool((tol_t < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    return tol_t if tol_t.dim() == 0 else tol_t.reshape(y0.shape[0], -1)


def prepare_batch_problem(
    func: Callable[[Tensor, Tensor], Tensor], y0: Tensor, t_eval: Any, t_start: Any, t_end: Any, rtol: Any, atol: Any
) -> BatchProblem:
    if not callable(func):
        raise TypeError("func must be callable as func(t, y) with t of shape (B,) and y of shape (B, ...)")
    if not isinstance(y0, Tensor) or y0.dim() < 1 or y0.shape[0] == 0:
        raise ValueError("y0 must be a tensor of shape (B, ...) with B >= 1 samples")
    if y0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"y0 must be float32 or float64, got {y0.dtype} (cast half-precision states to float32)")
    batch = y0.shape[0]
    if isinstance(t_eval, Tensor) and t_eval.requires_grad:
        raise ValueError("solve_ivp does not differentiate with respect to t_eval; pass t_eval.detach()")
    times = torch.as_tensor(t_eval, dtype=torch.float64, device=y0.device)
    if times.dim() == 1:
        times = times.expand(batch, -1)
    if times.dim() != 2 or times.shape[0] != batch or times.shape[1] == 0:
        raise ValueError(f"t_eval must have shape (T,) or (B, T) = ({batch}, T) with T >= 1, got {tuple(times.shape)}")
    times = times.contiguous()
    if not bool(torch.isfinite(times).all()):
        raise ValueError("t_eval must be finite")
    start = times[:, 0].clone() if t_start is None else _per_sample_time(t_start, batch, "t_start", y0)
    end = times[:, -1].clone() if t_end is None else _per_sample_time(t_end, batch, "t_end", y0)
    if not bool(torch.isfinite(start).all() & torch.isfinite(end).all()):
        raise ValueError("t_start and t_end must be finite")
    direction = torch.where(end >= start, 1.0, -1.0).to(torch.float64)
    steps = (times[:, 1:] - times[:, :-1]) * direction[:, None]
    if not bool((steps > 0).all()):
        bad = int((steps <= 0).any(1).nonzero()[0])
        raise ValueError(
            f"t_eval must be strictly monotone in each sample's direction (from t_start to t_end); sample {bad} is not"
        )
    inside = ((times - start[:, None]) * direction[:, None] >= 0) & ((end[:, None] - times) * direction[:, None] >= 0)
    if not bool(inside.all()):
        bad = int((~inside).any(1).nonzero()[0])
        raise ValueError(f"t_eval must lie within [t_start, t_end] for every sample; sample {bad} has times outside")
    return BatchProblem(
        func, y0.reshape(batch, -1), y0.shape, times, start.contiguous(), end.contiguous(), direction.contiguous(),
        _batch_tolerance(rtol, y0, "rtol"), _batch_tolerance(atol, y0, "atol"),
    )


# ----------------------------------------------------------------------------- the solver


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(1).sqrt() if x.shape[1] else x.new_zeros(x.shape[0])


class BatchSolver:
    """Integrates a BatchProblem with an adaptive tableau; `step()` is the loop body.

    State lives in tensors on the device: y (B, N), the stage buffer k (S, B, N) whose row 0 is
    f at the step's start, per-sample float64 t, dt, h (signed step, 0 once stopped), int64 status,
    stats (B, 4), next output index, and the PID history (B, 2). Without autograd every buffer is
    reused (two of each, swapped after a step) so a chunk of steps replays as a CUDA graph; under
    autograd each step gets fresh ones, so no recorded op sees its input overwritten.
    """

    def __init__(
        self, problem: BatchProblem, tableau: Tableau, controller: Controller, first_step: Any, max_steps: int,
        clip_to_end: bool = False,
    ) -> None:
        self.problem = problem
        self.tab = tableau
        self.stages = len(tableau.c)
        self.plan = [(list(tableau.a[i]), float(tableau.c[i])) for i in range(1, self.stages)]
        self.b, self.b_error = list(tableau.b), list(tableau.b_error or ())
        self.poly = [p for row in tableau.dense for p in row]
        self.ctrl = controller.pack(clip_to_end, self.stages - 1)
        self.max_steps = int(max_steps)
        self.record = torch.is_grad_enabled() and (problem.y0.requires_grad or _func_has_grad(problem.func))
        # Called after every step as on_step(y, t, h, accept) with the step's start state, time and
        # signed step (the adjoint accumulates its parameter gradients here).
        self.on_step: Callable[[Tensor, Tensor, Tensor, Tensor], None] | None = None
        self.loop_reads = 0
        self._start(first_step, controller, clip_to_end)

    # -- setup (host reads allowed)

    def _start(self, first_step: Any, controller: Controller, clip_to_end: bool) -> None:
        p = self.problem
        y0, batch, outputs = p.y0, p.y0.shape[0], p.t_eval.shape[1]
        f64 = dict(dtype=torch.float64, device=y0.device)
        self.t = p.t_start.clone()
        self.status = torch.full((batch,), int(Status.RUNNING), dtype=torch.int64, device=y0.device)
        self.stats = torch.zeros((batch, 4), dtype=torch.int64, device=y0.device)
        self.history = torch.ones((batch, 2), **f64)
        at_start = p.t_eval[:, 0] == p.t_start
        self.next_out = at_start.long()
        nan = torch.full((), math.nan, dtype=y0.dtype, device=y0.device)
        ys = nan.expand(batch, outputs, y0.shape[1]).clone()
        ys[:, 0] = torch.where(at_start[:, None], y0, nan)
        self.ys = ys

        # A sample with a non-finite start is stopped and carried as zeros, so func never sees its
        # NaN/inf (a NaN input would reach shared parameters' gradients as 0 * NaN).
        finite = torch.isfinite(y0).all(1)
        y_start = torch.where(finite[:, None], y0, 0.0)
        f0 = self._checked_call(p.t_start.to(y0.dtype), y_start)
        finite = finite & torch.isfinite(f0).all(1)
        if first_step is None:
            dt, f_evals = self._initial_step(y_start, f0), 2
        else:
            dt, f_evals = _per_sample_time(first_step, batch, "first_step", y0), 1
            if not bool((dt > 0).all()):
                raise ValueError("first_step must be positive")
        dt = torch.clamp(dt, max=controller.dt_max)
        remaining = (p.t_end - p.t_start) * p.direction
        step = torch.where(dt >= remaining, remaining, dt) if clip_to_end else dt
        done = (remaining <= 0) & (self.next_out >= outputs)
        status = torch.where(done, int(Status.SUCCESS), int(Status.RUNNING))
        status = torch.where(~done & ~finite, int(Status.NON_FINITE), status)
        too_small = (status == int(Status.RUNNING)) & ~(dt >= controller.dt_min)
        status = torch.where(too_small, int(Status.DT_UNDERFLOW), status)
        self.status = status
        self.stats[:, 0] = f_evals
        self.dt = dt.contiguous()
        self.h = torch.where(status == int(Status.RUNNING), p.direction * step, 0.0).contiguous()
        self.y = y_start
        self.k = torch.empty((self.stages, *y0.shape), dtype=y0.dtype, device=y0.device)
        self.k[0] = torch.where(finite[:, None], f0, 0.0)
        if not self.record:
            self.y = self.y.detach()
            self.y_spare = torch.empty_like(self.y)
            self.k_spare = torch.empty_like(self.k)

    def _checked_call(self, t: Tensor, y: Tensor) -> Tensor:
        out = self.problem.func(t, y.view(self.problem.shape))
        if not isinstance(out, Tensor) or out.shape != self.problem.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"func(t, y) must return a tensor shaped like y0 {tuple(self.problem.shape)}, got {got}")
        if out.dtype != y.dtype:
            raise ValueError(f"func(t, y) returned {out.dtype} for a {y.dtype} state")
        return out.reshape(y.shape)

    def _initial_step(self, y0: Tensor, f0: Tensor) -> Tensor:
        """Hairer, Nørsett & Wanner's starting step (as odeint takes it), per sample, in the state's
        dtype; non-finite samples get a placeholder (they never step)."""
        p = self.problem
        with torch.no_grad():
            y0, f0 = y0.detach(), f0.detach()
            scale = p.atol + p.rtol * y0.abs()
            d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
            small = (d0 < 1e-5) | (d1 < 1e-5)
            h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1).abs()
            h0 = torch.where(torch.isfinite(h0), h0, 1e-6)
            signed = (p.direction * h0.double()).to(y0.dtype)
            f1 = p.call((p.t_start + signed.double()).to(y0.dtype), y0 + signed[:, None] * f0).detach()
            d2 = (_rms((f1 - f0) / scale) / h0).abs()
            flat = (d1 <= 1e-15) & (d2 <= 1e-15)
            h1 = torch.where(
                flat, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.maximum(d1, d2)) ** (1.0 / self.tab.order)
            )
            dt = torch.minimum(100 * h0, h1.abs()).double()
        return torch.where(torch.isfinite(dt) & (dt > 0), dt, 1e-6).contiguous()

    # -- the loop body: no host reads

    def step(self) -> None:
        p = self.problem
        if self.record and torch.compiler.is_compiling():
            # The in-place batch_step has no registered autograd formula, only the eager Function.
            raise RuntimeError(
                "solve_ivp: torch.compile cannot trace a solve that records an autograd graph; compile the "
                "solve under torch.no_grad(), or use adjoint=True (its forward and backward solves record none)"
            )
        ops = _ops.ops_for(p.y0.device, self.record)  # per call: under torch.compile, the traceable ops
        y, k, h = self.y, self.k, self.h
        if self.on_step is not None:
            t_before, h_before = self.t.clone(), h.clone()
        for i, (a, c) in enumerate(self.plan, start=1):
            y_i, t_i = ops.batch_stage(y, k, a, h, self.t, c)
            k[i] = p.call(t_i, y_i)
        if self.record:
            y_next, k_next = torch.empty_like(y), torch.empty_like(k)
            f_next = torch.empty_like(y)
        else:
            y_next, k_next = self.y_spare, self.k_spare
            f_next = k_next[0]
        accept = ops.batch_step(
            y, k, p.rtol, p.atol, self.b, self.b_error, self.poly, p.t_eval, p.t_end, p.direction,
            y_next, f_next, self.ys, self.t, self.dt, self.h, self.status, self.stats, self.next_out,
            self.history, self.ctrl, self.max_steps,
        )
        if self.on_step is not None:
            self.on_step(y, t_before, h_before, accept)
        if self.record:
            k_next[0] = f_next
        else:
            self.y_spare, self.k_spare = y, k
        self.y, self.k = y_next, k_next

    def stop(self, mask: Tensor) -> None:
        """Marks the masked samples as finished before solving (they keep their state)."""
        self.status = torch.where(mask, int(Status.SUCCESS), self.status)
        self.h = torch.where(mask, 0.0, self.h)

    def running(self) -> bool:
        """Whether any sample is still running (the loop's one device->host read)."""
        self.loop_reads += 1
        return bool((self.status == int(Status.RUNNING)).any())

    def solve(self, check_every: int, cuda_graph: bool) -> None:
        if not self.running():
            return
        if cuda_graph:
            self._solve_with_graph(check_every)
            return
        while True:
            for _ in range(check_every):
                self.step()
            if not self.running():
                return

    def _solve_with_graph(self, check_every: int) -> None:
        """Replays one captured chunk of steps until every sample has stopped. The chunk is an even
        number of steps, so the swapped buffers are back in place at its end."""
        chunk = check_every + check_every % 2
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up steps (real steps) outside the capture
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        if not self.running():
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(chunk):
                self.step()
        while self.running():
            graph.replay()

    def solution(self, t_eval_user: Tensor, ys: Tensor | None = None) -> Solution:
        """The Solution of this solve, with `ys` (B, T, N) in place of the solver's own outputs if
        given (the adjoint's differentiable copy)."""
        stats = {name: self.stats[:, i] for i, name in enumerate(("n_f_evals", "n_steps", "n_accepted", "n_rejected"))}
        shape = (self.problem.shape[0], self.problem.t_eval.shape[1], *self.problem.shape[1:])
        ys = self.ys if ys is None else ys
        return Solution(t_eval_user, ys.reshape(shape), self.status, self.t, stats, self.loop_reads)


def _func_has_grad(func: Callable[..., Any]) -> bool:
    """Whether func may carry parameters that want gradients (then the solve records a graph)."""
    if isinstance(func, torch.nn.Module):
        return any(p.requires_grad for p in func.parameters())
    return True  # a closure may capture tensors that require grad: record to be safe


# ----------------------------------------------------------------------------- the front door


# torch.compile runs the solve eagerly (a graph break): its setup and completion checks read the
# device by design, and the recorded steps' in-place op lives in an autograd.Function; traced in
# pieces, the steps' gradients were lost. The step body itself, BatchSolver.step, compiles with
# fullgraph=True when no graph is recorded (tests/test_batch_solve.py).
@torch.compiler.disable
def solve_ivp(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t_eval: Any,
    *,
    method: str = "dopri5",
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    t_start: Any = None,
    t_end: Any = None,
    first_step: Any = None,
    controller: str = "integral",
    pcoeff: float | None = None,
    icoeff: float | None = None,
    dcoeff: float | None = None,
    safety: float = 0.9,
    ifactor: float = 10.0,
    dfactor: float = 0.2,
    max_steps: int = 10_000,
    dt_min: float = 0.0,
    dt_max: float = math.inf,
    clip_to_end: bool = True,
    check_every: int | None = None,
    adjoint: bool = False,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_params: Any = None,
    cuda_graph: bool = False,
    fused: bool | None = None,
) -> Solution:
    """Solve B independent initial value problems at once, each with its own adaptive steps.

    Args:
        func: the vector field, called as ``func(t, y)`` on the whole batch: ``t`` of shape (B,) in
            y's dtype (each sample's own time) and ``y`` of shape (B, ...); returns dy/dt shaped like
            y. Samples are independent: func must not mix them. Stopped samples are still passed
            (their state frozen); their results are ignored.
        y0: (B, ...) initial states, float32 or float64, any trailing shape.
        t_eval: output times, (T,) shared or (B, T) per sample, strictly monotone from t_start
            towards t_end (increasing or decreasing per sample). Not differentiated.
        method: an adaptive Runge–Kutta method: dopri5, tsit5, bosh3, dopri8, fehlberg2,
            adaptive_heun. Outputs come from the same interpolant as `odeint`'s.
        rtol, atol: tolerances, scalars or broadcastable to y0 (per sample and element).
        t_start, t_end: the span per sample (scalar or (B,)), by default t_eval's first and last
            times; t_end sets each sample's direction.
        first_step: the first step size (scalar or (B,)); default: Hairer's heuristic per sample.
        controller: "integral" (torchdiffeq's, as `odeint`'s) or "pid" with
            ``pcoeff``, ``icoeff``, ``dcoeff`` (default 0.3, 0.4, 0); both use ``safety``,
            ``ifactor``, ``dfactor``.
        max_steps: step attempts per sample before it stops with MAX_STEPS_REACHED.
        dt_min, dt_max: step size bounds; a step below dt_min stops the sample (DT_UNDERFLOW).
        clip_to_end: shorten the step that would pass t_end so it lands on t_end (func is never
            evaluated beyond it, and the last outputs come from a step of controlled size).
            False steps past t_end and interpolates, as `odeint` does: with the integral
            controller each sample then takes exactly the steps `odeint` takes on it alone.
        check_every: steps between the loop's checks for completion (its only device->host
            reads); default 1 on CPU (a read costs about a microsecond there), 8 on CUDA. Steps
            run after the last sample finished still call func on the whole batch.
        adjoint: compute gradients by solving each sample's adjoint equation backwards with its
            own steps (memory independent of the number of steps) instead of backpropagating
            through the solver; gradients flow to y0 and to ``adjoint_params`` (default: func's
            parameters if func is an nn.Module). ``adjoint_rtol``/``adjoint_atol`` default to
            rtol/atol and control each sample's state and adjoint together (RMS over both); the
            parameter gradients, shared by the batch, are integrated with the same steps but not
            error-controlled (a seminorm). Samples that failed forward get zero gradients.
        cuda_graph: on CUDA, capture a chunk of ``check_every`` steps as a CUDA graph once and
            replay it (func must be capturable: no host syncs or CPU tensors inside).
        fused: whether an MLP field (`flashode.nn.MLPField`, or an nn.Sequential of Linear layers
            and one activation in `flashode.nn.Autonomous`) with y0 of shape (B, D) runs the whole
            solve in one op (`flashode.fused_mlp`: the same steps and outputs up to rounding, no
            Python per step): None runs it fused when it can, True requires it (an error says why
            it cannot), False never. Fused, the gradients are those of the discrete solve also with
            ``adjoint=True`` (one small checkpoint per accepted step; the adjoint tolerances are
            not used), and ``check_every`` does not apply (``loop_reads`` is 0).

    Returns:
        A `Solution` (ts, ys, status, t_final, stats). A failing sample does not stop the others:
        check ``solution.status`` or call ``solution.raise_for_status()``.

    Gradients: without ``adjoint``, backpropagation through the solve (y0, and anything func's
    output depends on). Step sizes and acceptance are not differentiated (as in `odeint`).
    """
    if method not in ADAPTIVE:
        raise ValueError(f'Invalid method "{method}" for solve_ivp. Must be one of {sorted(ADAPTIVE)}')
    if fused is not False:
        from .fused_dispatch import solve_ivp_fused_spec
        from .fused_mlp import _solve_mlp

        spec = solve_ivp_fused_spec(func, y0, cuda_graph, adjoint_params)
        if not isinstance(spec, str):
            return _solve_mlp(
                spec, y0, t_eval, method=method, rtol=rtol, atol=atol, t_start=t_start, t_end=t_end,
                first_step=first_step, max_steps=max_steps, controller=controller, pcoeff=pcoeff, icoeff=icoeff,
                dcoeff=dcoeff, safety=safety, ifactor=ifactor, dfactor=dfactor, dt_min=dt_min, dt_max=dt_max,
                clip_to_end=clip_to_end,
            )
        if fused:
            raise ValueError(f"solve_ivp: fused=True but the fused MLP solve cannot run: {spec}")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    problem = prepare_batch_problem(func, y0, t_eval, t_start, t_end, rtol, atol)
    tableau = ADAPTIVE[method]
    ctrl = make_controller(controller, tableau.order, safety, ifactor, dfactor, pcoeff, icoeff, dcoeff, dt_min, dt_max)
    check_every = DEFAULT_CHECK_EVERY.get(y0.device.type, 16) if check_every is None else check_every
    if not isinstance(check_every, int) or check_every <= 0:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")
    if cuda_graph and y0.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors; y0 is on {y0.device}")
    t_user = t_eval if isinstance(t_eval, Tensor) and t_eval.dim() == 2 else problem.t_eval.to(y0.dtype)
    if adjoint:
        from .batch_adjoint import solve_with_adjoint

        return solve_with_adjoint(
            problem, tableau, ctrl, first_step, max_steps, clip_to_end, check_every, cuda_graph, t_user,
            adjoint_rtol, adjoint_atol, adjoint_params,
        )
    if cuda_graph and torch.is_grad_enabled() and (y0.requires_grad or _func_has_grad(func)):
        raise ValueError(
            "cuda_graph=True cannot record an autograd graph: use it under torch.no_grad() or with adjoint=True"
        )
    solver = BatchSolver(problem, tableau, ctrl, first_step, max_steps, clip_to_end)
    solver.solve(check_every, cuda_graph)
    return solver.solution(t_user)
