"""Pure-PyTorch reference implementations of flashode's fused ops.

Same contracts as the kernels in csrc/ (see csrc/ops.cpp): tests compare every kernel against
these, and flashode runs on them when a compiled library is missing or a device has no kernel.
They are written for clarity, not speed, and are differentiable by plain autograd.
"""

from __future__ import annotations

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
