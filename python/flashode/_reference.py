"""Pure-PyTorch reference implementations of flashode's fused ops.

Same contracts as the kernels in csrc/ (see csrc/ops.cpp): tests compare every kernel against
these, and flashode runs on them when a compiled library is missing or a device has no kernel.
They are written for clarity, not speed, and are differentiable by plain autograd.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

_MAX_STAGES = 32


def _check(y: Tensor, k: Tensor, needed: int, op: str) -> None:
    if y.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"flashode.{op}: states must be float32 or float64, got {str(y.dtype).replace('torch.', '')}"
        )
    if k.dim() < 1 or k.numel() != k.shape[0] * y.numel():
        raise RuntimeError(f"flashode.{op}: k must have shape (S, *y.shape)")
    if k.dtype != y.dtype:
        raise RuntimeError(f"flashode.{op}: k and y must have the same dtype")
    if k.device != y.device:
        raise RuntimeError(f"flashode.{op}: k and y must be on the same device")
    if k.shape[0] < needed:
        raise RuntimeError(f"flashode.{op}: {needed} coefficients need at least as many stages")
    if k.shape[0] > _MAX_STAGES:
        raise RuntimeError(f"flashode.{op}: at most {_MAX_STAGES} stages are supported")


def _combine(y: Tensor, k: Tensor, weights: list[float]) -> Tensor:
    """y + sum_j weights[j] * k[j] (weights already include h)."""
    flat_k = k.reshape(k.shape[0], -1)
    acc = torch.zeros_like(y).reshape(-1)
    for j, w in enumerate(weights):
        if w != 0.0:
            acc = acc + w * flat_k[j]
    return y + acc.view_as(y)


def rk_stage(y: Tensor, k: Tensor, a: list[float], h: float) -> Tensor:
    _check(y, k, len(a), "rk_stage")
    return _combine(y, k, [h * c for c in a])


def rk_finalize(
    y: Tensor,
    k: Tensor,
    b: list[float],
    b_error: list[float],
    h: float,
    rtol: Tensor,
    atol: Tensor,
    segment_ends: list[int],
    return_error: bool,
    per_segment: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    _check(y, k, max(len(b), len(b_error)), "rk_finalize")
    n = y.numel()
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol.numel() not in (1, n):
            raise RuntimeError(f"flashode.rk_finalize: {name} must have 1 or {n} elements")
        if tol.dtype != y.dtype:
            raise RuntimeError(f"flashode.rk_finalize: {name} must have the state's dtype")
    ends = list(segment_ends) if segment_ends else [n]
    begins = [0] + ends[:-1]
    if any(end < begin for begin, end in zip(begins, ends)):
        raise RuntimeError("flashode.rk_finalize: segment_ends must be non-negative and non-decreasing")
    if ends[-1] > n:
        raise RuntimeError(
            f"flashode.rk_finalize: the last segment end ({ends[-1]}) must not exceed the state size ({n})"
        )
    y1 = _combine(y, k, [h * c for c in b])
    err = _combine(torch.zeros_like(y), k, [h * c for c in b_error])
    flat_y1 = y1.detach().reshape(-1)
    scale = atol.reshape(-1) + rtol.reshape(-1) * torch.maximum(y.detach().reshape(-1).abs(), flat_y1.abs())
    scaled = (err.detach().reshape(-1) / scale).double()
    # One RMS per segment (0 for an empty one); the elements after the last end are in none.
    zero = torch.zeros((), dtype=torch.float64, device=y.device)
    rms = torch.stack(
        [scaled[begin:end].pow(2).mean().sqrt() if end > begin else zero for begin, end in zip(begins, ends)]
    )
    # A non-finite y1 anywhere, the excluded tail included, makes every value NaN.
    rms = torch.where(torch.isfinite(flat_y1).all(), rms, math.nan)
    ratio = rms if per_segment else rms.amax()  # amax propagates NaN
    err_out = err if return_error else y.new_empty(0)
    return y1, err_out, ratio.detach()


def dense_weights(poly: list[float], theta: list[float], stages: int, h: float) -> list[list[float]]:
    """h * B_j(theta_m) for every output m and stage j (B_j(x) = sum_p poly[j*D+p] x^(p+1))."""
    if stages <= 0 or len(poly) % stages != 0:
        raise RuntimeError("flashode.rk_dense: poly must hold S * D coefficients")
    degree = len(poly) // stages
    if not all(math.isfinite(x) for x in theta):
        raise RuntimeError("flashode.rk_dense: theta must be finite")
    weights = []
    for x in theta:
        row = []
        for j in range(stages):
            acc, power = 0.0, x
            for p in range(degree):
                acc += poly[j * degree + p] * power
                power *= x
            row.append(acc * h)
        weights.append(row)
    return weights


def rk_dense(y: Tensor, k: Tensor, poly: list[float], theta: list[float], h: float) -> Tensor:
    _check(y, k, 1, "rk_dense")
    weights = dense_weights(poly, theta, k.shape[0], h)
    if not weights:
        return y.new_empty((0, *y.shape))
    return torch.stack([_combine(y, k, row) for row in weights])


# ----------------------------------------------------------------------------- batch-parallel ops
# Same contracts as csrc/common/batch_args.h and csrc/cpu/batch_kernels.cpp: y (B, N), k (S, B, N),
# per-sample float64 times and signed steps h (0 once a sample has stopped).

RUNNING, SUCCESS, MAX_STEPS_REACHED, DT_UNDERFLOW, NON_FINITE = -1, 0, 1, 2, 3
_F_EVALS, _STEPS, _ACCEPTED, _REJECTED = range(4)


def _batch_rows(y: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    batch = y.shape[0]
    return y.reshape(batch, -1), k.reshape(k.shape[0], batch, -1)


def _batch_combine(y: Tensor, k: Tensor, weights: Tensor) -> Tensor:
    """y + sum_j weights[j][:, None] * k[j] for (S, B) per-sample weights (zero weights skipped)."""
    acc = torch.zeros_like(y)
    for j in range(weights.shape[0]):
        w = weights[j].to(y.dtype)[:, None]
        acc = acc + torch.where(w != 0, w * k[j], torch.zeros_like(acc))
    return y + acc


def batch_stage(y: Tensor, k: Tensor, a: list[float], h: Tensor, t: Tensor, c: float) -> tuple[Tensor, Tensor]:
    _check(y, k, len(a), "batch_stage")
    y2, k2 = _batch_rows(y, k)
    coefficients = torch.tensor(list(a), dtype=torch.float64, device=y.device).reshape(-1, 1)
    weights = coefficients * h
    out = torch.where((h == 0)[:, None], y2, _batch_combine(y2, k2, weights))
    return out.reshape(y.shape), (t + c * h).to(y.dtype)


def _propose_dt(controller: list[float], dt: Tensor, ratio: Tensor, history: Tensor) -> Tensor:
    pid, safety, ifactor, dfactor, beta1, beta2, beta3 = controller[:7]
    if pid:
        floor = 1e-12
        factor = safety * (1.0 / ratio.clamp_min(floor)) ** beta1
        factor = factor * (1.0 / history[:, 0].clamp_min(floor)) ** beta2
        factor = factor * (1.0 / history[:, 1].clamp_min(floor)) ** beta3
    else:
        factor = safety / ratio**beta1
    lower = torch.where(ratio < 1.0, torch.ones_like(ratio), torch.full_like(ratio, dfactor))
    proposal = dt * torch.clamp(torch.maximum(factor, lower), max=ifactor)
    proposal = torch.where(ratio == 0.0, dt * ifactor, proposal)
    return torch.where(torch.isfinite(ratio), proposal, dt * dfactor)


def batch_step(
    y: Tensor, k: Tensor, rtol: Tensor, atol: Tensor, b: list[float], b_error: list[float], poly: list[float],
    t_eval: Tensor, t_end: Tensor, direction: Tensor, y_next: Tensor, f_next: Tensor, ys: Tensor, t: Tensor,
    dt: Tensor, h: Tensor, status: Tensor, stats: Tensor, next_out: Tensor, history: Tensor,
    controller: list[float], max_steps: int,
) -> Tensor:
    _check(y, k, max(len(b), len(b_error)), "batch_step")
    y2, k2 = _batch_rows(y, k)
    batch, n = y2.shape
    stages = k2.shape[0]
    running = status == RUNNING
    coef = functools.partial(torch.tensor, dtype=torch.float64, device=y.device)
    y1 = _batch_combine(y2, k2, coef(list(b))[:, None] * h)
    err = _batch_combine(torch.zeros_like(y2), k2, coef(list(b_error))[:, None] * h)
    tol_rows = lambda tol: tol.reshape(-1, n) if tol.numel() > 1 else tol.reshape(1, 1)  # noqa: E731
    # Step-size control is data, not differentiated: the ratio and everything after it are detached.
    scale = tol_rows(atol) + tol_rows(rtol) * torch.maximum(y2.detach().abs(), y1.detach().abs())
    scaled = (err.detach() / scale).double()
    ratio = (scaled.pow(2).mean(1) if n else y2.new_zeros(batch, dtype=torch.float64)).sqrt()
    ratio = torch.where(torch.isfinite(y1.detach()).all(1), ratio, math.nan)
    accept = running & (ratio <= 1.0)

    clip, stage_evals = controller[9] != 0.0, int(controller[10])
    lands = (h == t_end - t) if clip else torch.zeros_like(accept)
    t1 = torch.where(accept, torch.where(lands, t_end, t + h), t)
    # Outputs: every t_eval this accepted step reached, in order from next_out.
    degree = len(poly) // stages
    poly_t = coef(list(poly)).reshape(stages, degree)
    index = next_out.clone()
    for j in range(t_eval.shape[1]):
        write = accept & (index == j) & ((t_eval[:, j] - t1) * direction <= 0)
        if bool(write.any()):
            theta = torch.where(write, (t_eval[:, j] - t) / torch.where(h == 0, 1.0, h), 0.0)
            powers = torch.stack([theta ** (p + 1) for p in range(degree)])  # (D, B)
            weights = (poly_t @ powers) * h  # (S, B)
            rows = ys.view(batch, -1, n)
            rows[:, j] = torch.where(write[:, None], _batch_combine(y2, k2, weights), rows[:, j])
            index = index + write.long()
    outputs_done = index >= t_eval.shape[1]

    y_next.view(batch, n).copy_(torch.where(accept[:, None], y1, y2))
    f_next.view(batch, n).copy_(torch.where(accept[:, None], k2[stages - 1], k2[0]))
    # scaled from the step actually taken (|h|: less than dt after clipping to t_end)
    proposal = torch.clamp(_propose_dt(controller, h.abs(), ratio, history), max=controller[8])
    increments = [torch.full_like(next_out, stage_evals), torch.ones_like(next_out), accept.long(), (~accept).long()]
    new_stats = stats + running[:, None].long() * torch.stack(increments, 1)
    new_history = torch.where(accept[:, None], torch.stack([ratio, history[:, 0]], 1), history)
    remaining = (t_end - t1) * direction
    success = accept & outputs_done & (remaining <= 0)
    underflow = ~(proposal >= controller[7]) | ~(t1 + direction * proposal != t1) | ~(proposal < math.inf)
    new_status = torch.where(
        new_stats[:, _STEPS] >= max_steps,
        MAX_STEPS_REACHED,
        torch.where(underflow, torch.where(torch.isfinite(ratio), DT_UNDERFLOW, NON_FINITE), RUNNING),
    )
    new_status = torch.where(success, SUCCESS, new_status)
    step = torch.where((remaining > 0) & (proposal >= remaining), remaining, proposal) if clip else proposal
    new_h = torch.where(new_status == RUNNING, direction * step, 0.0)
    keep = ~running  # stopped samples change nothing
    t.copy_(torch.where(keep, t, t1))
    dt.copy_(torch.where(keep, dt, proposal))  # the unclipped proposal, also on success
    h.copy_(torch.where(keep, h, new_h))
    status.copy_(torch.where(keep, status, new_status))
    stats.copy_(new_stats)
    next_out.copy_(torch.where(keep, next_out, index))
    history.copy_(torch.where(keep[:, None], history, new_history))
    return accept


# ----------------------------------------------------------------------------- fused MLP solve
# Same contracts as csrc/ops.cpp (mlp_solve, mlp_solve_backward) and csrc/cpu/mlp_solve_kernels.cpp:
# the whole batch solve with an MLP field, vectorised over the samples with the batch ops above (so
# every per-sample decision is batch_step's), recording each accepted step for the backward pass.

MLP_ACTIVATIONS = ("tanh", "softplus", "relu", "silu", "elu", "sigmoid")
_OUTPUT_AT_START, _OUTPUT_NOT_REACHED = -1, -2


def _mlp_layers(params: Tensor, widths: list[int], bias: bool) -> list[tuple[Tensor, Tensor | None]]:
    """Views of the packed parameters: per layer its (out, in) weight and its bias (or None)."""
    layers, offset = [], 0
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        weight = params[offset : offset + fan_out * fan_in].view(fan_out, fan_in)
        offset += fan_out * fan_in
        b = None
        if bias:
            b = params[offset : offset + fan_out]
            offset += fan_out
        layers.append((weight, b))
    if offset != params.numel():
        raise RuntimeError(
            f"flashode.mlp_solve: params must hold {offset} values for these widths, got {params.numel()}"
        )
    return layers


def _mlp_activation(code: int) -> Callable[[Tensor], Tensor]:
    if not 0 <= code < len(MLP_ACTIVATIONS):
        raise RuntimeError(f"flashode.mlp_solve: unknown activation code {code}")
    name = MLP_ACTIVATIONS[code]
    return {"elu": torch.nn.functional.elu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}.get(
        name, getattr(torch.nn.functional, name)
    )


def mlp_eval(params: Tensor, widths: list[int], activation: int, time_concat: bool, bias: bool, t: Tensor,
             y: Tensor) -> Tensor:
    """The MLP field at per-sample times t (B,) and states y (B, D)."""
    act = _mlp_activation(activation)
    x = torch.cat([y, t.to(y.dtype)[:, None]], 1) if time_concat else y
    layers = _mlp_layers(params, widths, bias)
    for i, (weight, b) in enumerate(layers):
        x = torch.nn.functional.linear(x, weight, b)
        if i + 1 < len(layers):
            x = act(x)
    return x


def _mlp_check(y0: Tensor, params: Tensor, widths: list[int], time_concat: bool, op: str) -> None:
    if y0.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"flashode.{op}: states must be float32 or float64, got {y0.dtype}")
    if y0.dim() != 2:
        raise RuntimeError(f"flashode.{op}: y0 must be a (B, D) tensor, got {y0.dim()} dims")
    if params.dtype != y0.dtype:
        raise RuntimeError(f"flashode.{op}: params must have the state's dtype")
    if len(widths) < 2 or widths[0] != y0.shape[1] + int(time_concat) or widths[-1] != y0.shape[1]:
        raise RuntimeError(f"flashode.{op}: widths {list(widths)} do not fit a state of {y0.shape[1]} values")


def _unpack_tableau(a: list[float], c: list[float]) -> list[list[float]]:
    rows, at = [[]], 0
    for i in range(1, len(c)):
        rows.append(list(a[at : at + i]))
        at += i
    if at != len(a):
        raise RuntimeError("flashode.mlp_solve: a must hold the coefficients below the diagonal, row by row")
    return rows


def _fixed_grid_steps(t_start: Tensor, t_end: Tensor, direction: Tensor, step: float) -> Tensor:
    span = (t_end - t_start) * direction
    return torch.where(span > 0, torch.ceil(span / step + 1.0) - 1, 0.0).long()


def _fixed_grid_time(n: Tensor, steps: Tensor, t_start: Tensor, t_end: Tensor, direction: Tensor,
                     step: float) -> Tensor:
    return torch.where(n >= steps, t_end, direction * (n.double() * step + direction * t_start))


def _mlp_initial_dt(f: Callable[[Tensor, Tensor], Tensor], y0: Tensor, f0: Tensor, t_start: Tensor,
                    direction: Tensor, rtol: Tensor, atol: Tensor, order: int) -> Tensor:
    """batch.BatchSolver._initial_step (Hairer's heuristic per sample, in the state's dtype)."""
    rms = lambda x: x.pow(2).mean(1).sqrt()  # noqa: E731
    scale = atol + rtol * y0.abs()
    d0, d1 = rms(y0 / scale), rms(f0 / scale)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1).abs()
    h0 = torch.where(torch.isfinite(h0), h0, 1e-6)
    signed = (direction * h0.double()).to(y0.dtype)
    f1 = f((t_start + signed.double()).to(y0.dtype), y0 + signed[:, None] * f0)
    d2 = (rms((f1 - f0) / scale) / h0).abs()
    flat = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(flat, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.maximum(d1, d2)) ** (1.0 / order))
    dt = torch.minimum(100 * h0, h1.abs()).double()
    return torch.where(torch.isfinite(dt) & (dt > 0), dt, 1e-6)


class _Checkpoints:
    """Accepted steps per sample, in order: (t0, h, t1) and the state and first stage at t0."""

    def __init__(self, batch: int) -> None:
        self.rows: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(batch)]

    def add(self, mask: Tensor, t0: Tensor, h: Tensor, t1: Tensor, y: Tensor, k0: Tensor) -> None:
        times = torch.stack([t0, h, t1], 1)
        values = torch.stack([y, k0], 1)
        for b in mask.nonzero().flatten().tolist():
            self.rows[b].append((times[b], values[b]))

    def tensors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        counts = torch.tensor([len(r) for r in self.rows], dtype=torch.int64)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(like.device)
        flat = [row for rows in self.rows for row in rows]
        if not flat:
            return like.new_empty((0, 2, like.shape[1])), like.new_empty((0, 3), dtype=torch.float64), offsets
        return torch.stack([v for _, v in flat]), torch.stack([t for t, _ in flat]), offsets


def mlp_solve(
    y0: Tensor, params: Tensor, widths: list[int], activation: int, time_concat: bool, bias: bool, t_eval: Tensor,
    t_start: Tensor, t_end: Tensor, rtol: Tensor, atol: Tensor, first_step: Tensor, a: list[float], b: list[float],
    b_error: list[float], c: list[float], poly: list[float], order: int, controller: list[float], max_steps: int,
    step_size: float, record: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _mlp_check(y0, params, widths, time_concat, "mlp_solve")
    with torch.no_grad():
        f = functools.partial(mlp_eval, params.detach(), list(widths), activation, time_concat, bias)
        y0 = y0.detach()
        batch, dim = y0.shape
        times = t_eval.expand(batch, -1).contiguous() if t_eval.dim() == 1 else t_eval.contiguous()
        outputs = times.shape[1]
        direction = torch.where(t_end >= t_start, 1.0, -1.0).to(torch.float64)
        nan = torch.full((), math.nan, dtype=y0.dtype, device=y0.device)
        at_start = times[:, 0] == t_start
        ys = nan.expand(batch, outputs, dim).clone()
        ys[:, 0] = torch.where(at_start[:, None], y0, nan)
        out_step = torch.full((batch, outputs), _OUTPUT_NOT_REACHED, dtype=torch.int64, device=y0.device)
        out_step[:, 0] = torch.where(at_start, _OUTPUT_AT_START, _OUTPUT_NOT_REACHED)
        finite = torch.isfinite(y0).all(1)
        y = torch.where(finite[:, None], y0, 0.0)
        solve = _mlp_solve_fixed if step_size > 0 else _mlp_solve_adaptive
        ckpt = _Checkpoints(batch)
        status, t, stats = solve(
            f, y, finite, times, t_start.clone(), t_end, direction, rtol, atol, first_step, _unpack_tableau(a, c),
            list(b), list(b_error), list(c), list(poly), order, list(controller), max_steps, step_size, ys, out_step,
            at_start.long(), ckpt,
        )
        ckpt_y, ckpt_t, offsets = ckpt.tensors(y0) if record else (
            y0.new_empty((0, 2, dim)), y0.new_empty((0, 3), dtype=torch.float64),
            torch.zeros(batch + 1, dtype=torch.int64, device=y0.device),
        )
    return ys, status, t, stats, ckpt_y, ckpt_t, offsets, out_step


def _mark_outputs(out_step: Tensor, before: Tensor, after: Tensor, step: Tensor) -> None:
    """out_step[b, before[b]:after[b]] = step[b]: the outputs this step wrote."""
    columns = torch.arange(out_step.shape[1], device=out_step.device)[None]
    written = (columns >= before[:, None]) & (columns < after[:, None])
    out_step.copy_(torch.where(written, step[:, None], out_step))


def _mlp_solve_adaptive(f, y, finite, times, t, t_end, direction, rtol, atol, first_step, rows, b, b_error, c,  # type: ignore[no-untyped-def]
                        poly, order, controller, max_steps, step_size, ys, out_step, next_out, ckpt):
    """BatchSolver._start and its step loop, with the batch reference ops."""
    batch, dim = y.shape
    stages = len(c)
    tol = lambda x: x.reshape(-1, dim) if x.numel() > 1 else x.reshape(())  # noqa: E731
    rtol, atol = tol(rtol), tol(atol)
    f0 = f(t.to(y.dtype), y)
    finite = finite & torch.isfinite(f0).all(1)
    stats = torch.zeros((batch, 4), dtype=torch.int64, device=y.device)
    if first_step.numel():
        dt, stats[:, _F_EVALS] = first_step.clone(), 1
    else:
        dt, stats[:, _F_EVALS] = _mlp_initial_dt(f, y, f0, t, direction, rtol, atol, order), 2
    dt_min, dt_max, clip = controller[7], controller[8], controller[9] != 0.0
    dt = torch.clamp(dt, max=dt_max)
    remaining = (t_end - t) * direction
    step = torch.where(dt >= remaining, remaining, dt) if clip else dt
    done = (remaining <= 0) & (next_out >= times.shape[1])
    status = torch.where(done, SUCCESS, torch.where(finite, RUNNING, NON_FINITE))
    status = torch.where((status == RUNNING) & ~(dt >= dt_min), DT_UNDERFLOW, status)
    h = torch.where(status == RUNNING, direction * step, 0.0)
    k = torch.zeros((stages, batch, dim), dtype=y.dtype, device=y.device)
    k[0] = torch.where(finite[:, None], f0, 0.0)
    history = torch.ones((batch, 2), dtype=torch.float64, device=y.device)
    dt = dt.contiguous()
    while bool((status == RUNNING).any()):
        for i in range(1, stages):
            y_i, t_i = batch_stage(y, k, rows[i], h, t, c[i])
            k[i] = f(t_i, y_i)
        t0, h0, first, accepted = t.clone(), h.clone(), next_out.clone(), stats[:, _ACCEPTED].clone()
        y_next, f_next = torch.empty_like(y), torch.empty_like(y)
        accept = batch_step(y, k, rtol, atol, b, b_error, poly, times, t_end, direction, y_next, f_next, ys, t, dt,
                            h, status, stats, next_out, history, controller, max_steps)
        ckpt.add(accept, t0, h0, t, y, k[0])
        _mark_outputs(out_step, first, next_out, accepted)
        y = y_next
        k[0] = f_next
    return status, t, stats


def _mlp_solve_fixed(f, y, finite, times, t, t_end, direction, rtol, atol, first_step, rows, b, b_error, c,  # type: ignore[no-untyped-def]
                     poly, order, controller, max_steps, step_size, ys, out_step, next_out, ckpt):
    """odeint's fixed grid per sample: every stage evaluated afresh, outputs from `poly`."""
    batch, dim = y.shape
    stages, outputs = len(c), times.shape[1]
    t_start = t.clone()
    steps = _fixed_grid_steps(t_start, t_end, direction, step_size)
    status = torch.where(steps == 0, SUCCESS, torch.where(finite, RUNNING, NON_FINITE))
    stats = torch.zeros((batch, 4), dtype=torch.int64, device=y.device)
    n = torch.zeros(batch, dtype=torch.int64, device=y.device)
    k = torch.zeros((stages, batch, dim), dtype=y.dtype, device=y.device)
    poly_t = torch.tensor(poly, dtype=torch.float64, device=y.device).reshape(stages, -1)
    while bool((status == RUNNING).any()):
        running = status == RUNNING
        t1 = _fixed_grid_time(n + 1, steps, t_start, t_end, direction, step_size)
        h = torch.where(running, t1 - t, 0.0)
        for i in range(stages):
            y_i, t_i = batch_stage(y, k, rows[i], h, t, c[i])
            k[i] = f(t_i, y_i)
        y1 = _batch_combine(y, k, torch.tensor(b, dtype=torch.float64, device=y.device)[:, None] * h)
        ok = torch.isfinite(y1).all(1)
        accept = running & ok
        ckpt.add(accept, t, h, t1, y, k[0])
        first, index = next_out.clone(), next_out.clone()
        for j in range(outputs):
            write = accept & (index == j) & ((times[:, j] - t1) * direction <= 0)
            if bool(write.any()):
                theta = torch.where(write, (times[:, j] - t) / torch.where(h == 0, 1.0, h), 0.0)
                weights = (poly_t @ torch.stack([theta ** (p + 1) for p in range(poly_t.shape[1])])) * h
                ys[:, j] = torch.where(write[:, None], _batch_combine(y, k, weights), ys[:, j])
                index = index + write.long()
        next_out.copy_(index)
        _mark_outputs(out_step, first, next_out, stats[:, _ACCEPTED])
        increments = torch.stack([torch.full_like(n, stages), torch.ones_like(n), ok.long(), (~ok).long()], 1)
        stats += running[:, None].long() * increments
        y = torch.where(accept[:, None], y1, y)
        t = torch.where(accept, t1, t)
        n = n + accept.long()
        new_status = torch.where(
            ~ok, NON_FINITE, torch.where(n >= steps, SUCCESS, torch.where(stats[:, _STEPS] >= max_steps,
                                                                         MAX_STEPS_REACHED, RUNNING))
        )
        status = torch.where(running, new_status, status)
    return status, t, stats


def mlp_solve_backward(
    grad_ys: Tensor, params: Tensor, widths: list[int], activation: int, time_concat: bool, bias: bool,
    t_eval: Tensor, ckpt_y: Tensor, ckpt_t: Tensor, ckpt_offsets: Tensor, out_step: Tensor, a: list[float],
    b: list[float], c: list[float], poly: list[float], step_size: float,
) -> tuple[Tensor, Tensor]:
    """Replays every sample's accepted steps from the checkpoints under autograd (step i of every
    sample at once; finished samples masked) and differentiates <grad_ys, ys>."""
    batch, outputs, dim = grad_ys.shape
    _mlp_check(grad_ys[:, 0], params, widths, time_concat, "mlp_solve_backward")
    rows = _unpack_tableau(a, c)
    stages = len(c)
    poly_t = torch.tensor(poly, dtype=torch.float64, device=grad_ys.device).reshape(stages, -1)
    times = t_eval.expand(batch, -1) if t_eval.dim() == 1 else t_eval
    counts = ckpt_offsets[1:] - ckpt_offsets[:-1]
    with torch.enable_grad():
        theta_params = params.detach().requires_grad_()
        f = functools.partial(mlp_eval, theta_params, list(widths), activation, time_concat, bias)
        first = ckpt_offsets[:-1].clamp(max=max(ckpt_y.shape[0] - 1, 0))
        has_steps = counts > 0
        y = ckpt_y[first, 0].detach().clone() if ckpt_y.shape[0] else grad_ys.new_zeros(batch, dim)
        y = torch.where(has_steps[:, None], y, 0.0).requires_grad_()
        y_start = y
        total = grad_ys.new_zeros(())
        k0 = None
        for n in range(int(counts.max()) if batch else 0):
            active = n < counts
            row = (ckpt_offsets[:-1] + n).clamp(max=ckpt_y.shape[0] - 1)
            t0, h = ckpt_t[row, 0], torch.where(active, ckpt_t[row, 1], 0.0)
            k = [None] * stages
            for i in range(stages):
                if i == 0 and step_size == 0 and k0 is not None:
                    k[0] = k0  # carried: the previous step's last stage (the first one is f(t0, y0))
                    continue
                y_i = y
                if i:
                    weights = torch.tensor(rows[i], dtype=torch.float64, device=y.device)[:, None] * h
                    y_i = _batch_combine(y, torch.stack(k[:i]), weights)
                k[i] = f((t0 + c[i] * h).to(y.dtype), y_i)
            k_all = torch.stack(k)
            for j in range(outputs):
                write = active & (out_step[:, j] == n)
                if bool(write.any()):
                    theta = (times[:, j] - t0) / torch.where(h == 0, 1.0, h)
                    weights = (poly_t @ torch.stack([theta ** (p + 1) for p in range(poly_t.shape[1])])) * h
                    out = _batch_combine(y, k_all, weights)
                    total = total + torch.where(write[:, None], grad_ys[:, j] * out, 0.0).sum()
            y1 = _batch_combine(y, k_all, torch.tensor(b, dtype=torch.float64, device=y.device)[:, None] * h)
            y = torch.where(active[:, None], y1, y)
            k0 = k[stages - 1] if k0 is None else torch.where(active[:, None], k[stages - 1], k0)
        if not total.requires_grad:
            grad_y, grad_p = torch.zeros_like(y_start), torch.zeros_like(theta_params)
        else:
            grad_y, grad_p = torch.autograd.grad(total, (y_start, theta_params), allow_unused=True)
            grad_y = torch.zeros_like(y_start) if grad_y is None else grad_y
            grad_p = torch.zeros_like(theta_params) if grad_p is None else grad_p
    at_start = (out_step[:, 0] == _OUTPUT_AT_START)[:, None]
    grad_y0 = grad_y.detach() + torch.where(at_start, grad_ys[:, 0], 0.0)
    return grad_y0.contiguous(), grad_p.detach().contiguous()
