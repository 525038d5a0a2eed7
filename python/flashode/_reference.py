"""Pure-PyTorch reference implementations of flashode's fused ops.

Same contracts as the kernels in csrc/ (see csrc/ops.cpp): tests compare every kernel against
these, and flashode runs on them when a compiled library is missing or a device has no kernel.
They are written for clarity, not speed, and are differentiable by plain autograd.
"""

from __future__ import annotations

import functools
import math

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
