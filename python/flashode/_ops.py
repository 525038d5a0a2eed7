"""Loads flashode's compiled kernels and exposes every fused op through one Python function each.

The libraries register the ops `torch.ops.flashode.*` through the LibTorch stable ABI. Here we add
what the stable ABI cannot: fake (meta) implementations so `torch.compile` can trace the ops, and
autograd formulas so a whole solve can be backpropagated. When a library is missing, fails to load,
or a device has no kernel, the same functions run the pure-PyTorch reference (`_reference.py`);
`flashode.show_config()` reports which path each op takes on each device.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from . import _reference

OP_NAMES = ("rk_stage", "rk_finalize", "rk_dense", "batch_stage", "batch_step")

# device types whose kernels are loaded; for the others, why not (shown by show_config)
kernel_devices: set[str] = set()
load_errors: dict[str, str] = {}


def _library_dirs() -> list[Path]:
    """Where the compiled libraries may be: next to this file (regular install), or in a
    `flashode/_lib` on sys.path (an editable install keeps the sources here and installs the
    libraries into site-packages)."""
    dirs = [Path(__file__).resolve().parent / "_lib"]
    dirs += [Path(entry) / "flashode" / "_lib" for entry in sys.path if entry]
    return dirs


def _find_library(filename: str) -> Path:
    for directory in _library_dirs():
        if (directory / filename).exists():
            return directory / filename
    return _library_dirs()[0] / filename


def _load_library(device: str, filename: str) -> None:
    path = _find_library(filename)
    if not path.exists():
        load_errors[device] = f"{path} is missing (flashode was not built with kernels for {device})"
        return
    try:
        torch.ops.load_library(str(path))
    except Exception as exc:  # any loader failure must leave flashode importable
        load_errors[device] = f"loading {path.name} failed: {exc}"
        return
    kernel_devices.add(device)


def _load_all() -> None:
    _load_library("cpu", "libflashode_cpu.so")
    if "cpu" not in kernel_devices:
        warnings.warn(
            f"flashode: compiled kernels unavailable ({load_errors['cpu']}); "
            "every op runs on the pure-PyTorch reference path",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if torch.version.cuda:
        _load_library("cuda", "libflashode_cuda.so")
        if "cuda" not in kernel_devices and torch.cuda.is_available():
            warnings.warn(
                f"flashode: CUDA kernels unavailable ({load_errors['cuda']}); "
                "CUDA tensors use the pure-PyTorch reference path",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        load_errors["cuda"] = f"torch {torch.__version__} is not a CUDA build"


_load_all()


# ----------------------------------------------------------------------------- fake + autograd


def _register_fake_and_autograd() -> None:
    lib = "flashode::"

    @torch.library.register_fake(lib + "rk_stage")
    def _(y: Tensor, k: Tensor, a: list[float], h: float) -> Tensor:
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "rk_finalize")
    def _(y, k, b, b_error, h, rtol, atol, segment_ends, return_error, per_segment=False):  # type: ignore[no-untyped-def]
        y1 = torch.empty_like(y, memory_format=torch.contiguous_format)
        err = torch.empty_like(y1) if return_error else y.new_empty(0)
        # per_segment: one RMS per segment ([] is one segment), else their max as a 0-dim tensor
        ratio_shape = (max(len(segment_ends), 1),) if per_segment else ()
        return y1, err, y.new_empty(ratio_shape, dtype=torch.float64)

    @torch.library.register_fake(lib + "rk_dense")
    def _(y: Tensor, k: Tensor, poly: list[float], theta: list[float], h: float) -> Tensor:
        return y.new_empty((len(theta), *y.shape))

    @torch.library.register_fake(lib + "batch_stage")
    def _(y: Tensor, k: Tensor, a: list[float], h: Tensor, t: Tensor, c: float) -> tuple[Tensor, Tensor]:
        return torch.empty_like(y, memory_format=torch.contiguous_format), y.new_empty(y.shape[0])

    @torch.library.register_fake(lib + "batch_step")
    def _(y, k, *args):  # type: ignore[no-untyped-def]
        return y.new_empty(y.shape[0], dtype=torch.bool)

    def batch_stage_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        _save_batch_stage(ctx, *inputs)
        ctx.mark_non_differentiable(output[1])

    def batch_stage_backward(ctx, grad, _grad_t):  # type: ignore[no-untyped-def]
        return (*_batch_stage_grads(ctx, grad), None, None, None, None)

    torch.library.register_autograd(lib + "batch_stage", batch_stage_backward, setup_context=batch_stage_setup)

    def stage_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        _save_stage(ctx, *inputs)

    def stage_backward(ctx, grad):  # type: ignore[no-untyped-def]
        return (*_stage_grads(ctx, grad), None, None)

    torch.library.register_autograd(lib + "rk_stage", stage_backward, setup_context=stage_setup)

    def finalize_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        # inputs: (y, k, b, b_error, h, rtol, atol, segment_ends, return_error, per_segment)
        _save_finalize(ctx, *inputs[1:5], inputs[8])
        ctx.mark_non_differentiable(output[2])

    def finalize_backward(ctx, grad_y1, grad_err, _grad_ratio):  # type: ignore[no-untyped-def]
        # y, k, then b, b_error, h, rtol, atol, segment_ends, return_error, per_segment
        return (*_finalize_grads(ctx, grad_y1, grad_err), None, None, None, None, None, None, None, None)

    torch.library.register_autograd(lib + "rk_finalize", finalize_backward, setup_context=finalize_setup)

    def dense_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        _save_dense(ctx, *inputs)

    def dense_backward(ctx, grad):  # type: ignore[no-untyped-def]
        return (*_dense_grads(ctx, grad), None, None, None)

    torch.library.register_autograd(lib + "rk_dense", dense_backward, setup_context=dense_setup)


# The ops' reverse-mode formulas, shared by the registered autograd (torch.ops.flashode.*) and the
# eager recording path (RecordingOps): what each op saves, and the gradients of (y, k).


def _save_stage(ctx, y: Tensor, k: Tensor, a: list[float], h: float) -> None:  # type: ignore[no-untyped-def]
    ctx.k_shape, ctx.weights = k.shape, [h * c for c in a]


def _stage_grads(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    return grad, _stage_grad(grad, ctx.k_shape, [ctx.weights])


def _save_finalize(  # type: ignore[no-untyped-def]
    ctx, k: Tensor, b: list[float], b_error: list[float], h: float, return_error: bool
) -> None:
    ctx.k_shape = k.shape
    ctx.return_error = return_error
    ctx.b = [h * c for c in b]
    ctx.e = [h * c for c in b_error]


def _finalize_grads(ctx, grad_y1: Tensor, grad_err: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    grads, weights = [grad_y1], [ctx.b]
    if ctx.return_error and grad_err is not None:
        grads.append(grad_err)
        weights.append(ctx.e)
    return grad_y1, _stage_grad(torch.stack(grads), ctx.k_shape, weights)


def _save_dense(ctx, y: Tensor, k: Tensor, poly: list[float], theta: list[float], h: float) -> None:  # type: ignore[no-untyped-def]
    ctx.k_shape = k.shape
    ctx.weights = _reference.dense_weights(list(poly), list(theta), k.shape[0], h)


def _dense_grads(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    return grad.sum(0), _stage_grad(grad, ctx.k_shape, ctx.weights)


def _save_batch_stage(ctx, y: Tensor, k: Tensor, a: list[float], h: Tensor, t: Tensor, c: float) -> None:  # type: ignore[no-untyped-def]
    # Per-sample weights a[j] * h[b]: steps are data, not differentiated (as in odeint).
    ctx.k_shape, ctx.weights = k.shape, torch.tensor(list(a), dtype=torch.float64, device=h.device)[:, None] * h


def _batch_stage_grads(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    return grad, batch_stage_grad(grad, ctx.k_shape, ctx.weights)


def batch_stage_grad(grad: Tensor, k_shape: torch.Size, weights: Tensor) -> Tensor:
    """d/dk of <grad, sum_j weights[j, b] k[j, b]> for per-sample (J, B) weights, J <= S stages."""
    batch = grad.shape[0]
    rows = weights.to(grad.dtype)[:, :, None] * grad.reshape(1, batch, -1)
    out = grad.new_zeros((k_shape[0], batch, rows.shape[-1]))
    out[: rows.shape[0]] = rows
    return out.reshape(k_shape)


def _stage_grad(grads: Tensor, k_shape: torch.Size, weights: list[list[float]]) -> Tensor:
    """d/dk of sum_m <grads[m], sum_j weights[m][j] k[j]>: (S, *state) from (M, *state) grads."""
    stages = k_shape[0]
    if not weights:  # no output rows (e.g. rk_dense at no times): k gets no gradient
        return grads.new_zeros(k_shape)
    w = torch.tensor(
        [row + [0.0] * (stages - len(row)) for row in weights], dtype=grads.dtype, device=grads.device
    )
    flat = grads.reshape(len(weights), -1)
    return (w.t() @ flat).reshape(k_shape)


if kernel_devices:
    _register_fake_and_autograd()


# ----------------------------------------------------------------------------- dispatch


def _kernel_or_reference(name: str) -> Callable[..., object]:
    kernel = getattr(torch.ops.flashode, name).default if kernel_devices else None
    reference = getattr(_reference, name)
    devices = kernel_devices

    def op(y: Tensor, *args: object) -> object:
        if kernel is not None and y.device.type in devices:
            return kernel(y, *args)
        return reference(y, *args)

    op.__name__ = name
    op.__doc__ = f"flashode.{name}: compiled kernel where loaded for y's device, else the reference."
    return op


rk_stage = _kernel_or_reference("rk_stage")
rk_finalize = _kernel_or_reference("rk_finalize")
rk_dense = _kernel_or_reference("rk_dense")
batch_stage = _kernel_or_reference("batch_stage")
batch_step = _kernel_or_reference("batch_step")


class NoGradOps:
    """The ops for one device with autograd bypassed, for solves that record no graph.

    Calling an op through the dispatcher's Autograd key runs the Python autograd wrapper of
    register_autograd (~15 us per call on CPU) even under no_grad; redispatching straight to the
    device's kernel skips it. Only valid when no input requires grad and grad mode is off.
    """

    def __init__(self, device: torch.device) -> None:
        keys = _kernel_keys(device)
        self.rk_stage = _redispatcher("rk_stage", keys)
        self.rk_finalize = _redispatcher("rk_finalize", keys)
        self.rk_dense = _redispatcher("rk_dense", keys)
        self.batch_stage = _redispatcher("batch_stage", keys)
        self.batch_step = _redispatcher("batch_step", keys)


def _kernel_keys(device: torch.device) -> torch._C.DispatchKeySet:
    """The dispatch key of a device's kernels, to redispatch to past the Autograd key."""
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU)


def _redispatcher(name: str, keys: torch._C.DispatchKeySet) -> Callable[..., object]:
    """Op `name` redispatched to `keys`. OpOverload.redispatch is a thin Python wrapper around the
    handle's boxed redispatch; calling the handle directly saves a frame per op (it fills in schema
    defaults such as rk_finalize's per_segment, but the solvers pass every argument anyway), and a
    partial object calls straight into C++, with no Python frame at all."""
    return functools.partial(getattr(torch.ops.flashode, name).default._handle.redispatch_boxed, keys)


class AutogradOps:
    """The registered ops with their autograd formulas (what torch.compile traces)."""

    rk_stage = staticmethod(rk_stage)
    rk_finalize = staticmethod(rk_finalize)
    rk_dense = staticmethod(rk_dense)
    batch_stage = staticmethod(batch_stage)
    batch_step = staticmethod(batch_step)


class _StageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, y, k, a, h):  # type: ignore[no-untyped-def]
        _save_stage(ctx, y, k, a, h)
        return kernel(y, k, a, h)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return (None, *_stage_grads(ctx, grad), None, None)


class _FinalizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, y, k, b, b_error, h, rtol, atol, segment_ends, return_error, per_segment):  # type: ignore[no-untyped-def]
        _save_finalize(ctx, k, b, b_error, h, return_error)
        y1, err, ratio = kernel(y, k, b, b_error, h, rtol, atol, segment_ends, return_error, per_segment)
        ctx.mark_non_differentiable(ratio)
        return y1, err, ratio

    @staticmethod
    def backward(ctx, grad_y1, grad_err, _grad_ratio):  # type: ignore[no-untyped-def]
        return (None, *_finalize_grads(ctx, grad_y1, grad_err), None, None, None, None, None, None, None, None)


class _DenseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, y, k, poly, theta, h):  # type: ignore[no-untyped-def]
        _save_dense(ctx, y, k, poly, theta, h)
        return kernel(y, k, poly, theta, h)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return (None, *_dense_grads(ctx, grad), None, None, None)


class _BatchStageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, y, k, a, h, t, c):  # type: ignore[no-untyped-def]
        _save_batch_stage(ctx, y, k, a, h, t, c)
        out, t_out = kernel(y, k, a, h, t, c)
        ctx.mark_non_differentiable(t_out)
        return out, t_out

    @staticmethod
    def backward(ctx, grad, _grad_t):  # type: ignore[no-untyped-def]
        return (None, *_batch_stage_grads(ctx, grad), None, None, None, None)


class _BatchStepFunction(torch.autograd.Function):
    """batch_step under autograd: y_next, f_next and ys are written in place (marked dirty). Steps,
    times and the accept decision are data, not differentiated (as in odeint).

    Backward: y_next = y + [accept] h sum_j b_j k_j, f_next = k[S-1] or k[0], and each output
    written in this step = y + h sum_j B_j(theta) k_j. Every output position is written by exactly
    one step, so the gradient of ys passes through unchanged: earlier steps read only their own
    positions."""

    @staticmethod
    def forward(ctx, kernel, y, k, rtol, atol, b, b_error, poly, t_eval, t_end, direction,  # type: ignore[no-untyped-def]
                y_next, f_next, ys, t, dt, h, status, stats, next_out, history, controller, max_steps):
        ctx.k_shape, ctx.b, ctx.poly = k.shape, list(b), list(poly)
        t0, h0, first = t.clone(), h.clone(), next_out.clone()
        accept = kernel(y, k, rtol, atol, b, b_error, poly, t_eval, t_end, direction, y_next, f_next, ys,
                        t, dt, h, status, stats, next_out, history, controller, max_steps)
        ctx.save_for_backward(t_eval, t0, h0, first, next_out.clone(), accept)
        ctx.mark_dirty(y_next, f_next, ys)
        ctx.mark_non_differentiable(accept)
        return y_next, f_next, ys, accept

    @staticmethod
    def backward(ctx, grad_y_next, grad_f_next, grad_ys, _grad_accept):  # type: ignore[no-untyped-def]
        t_eval, t0, h, first, last, accept = ctx.saved_tensors
        stages, batch = ctx.k_shape[0], ctx.k_shape[1]
        like = grad_y_next if grad_y_next is not None else grad_ys
        rows = like.reshape(batch, -1)
        grad_y = torch.zeros_like(rows) if grad_y_next is None else grad_y_next.reshape(batch, -1).clone()
        grad_k = rows.new_zeros((stages, batch, rows.shape[1]))
        step = torch.where(accept, h, 0.0)
        if grad_y_next is not None:
            b = torch.tensor(ctx.b, dtype=torch.float64, device=h.device)[:, None]
            grad_k += batch_stage_grad(grad_y_next.reshape(batch, -1), grad_k.shape, b * step)
        if grad_f_next is not None:
            g_f = grad_f_next.reshape(batch, -1)
            grad_k[stages - 1] += accept[:, None] * g_f
            grad_k[0] += (~accept)[:, None] * g_f
        written = last - first
        if grad_ys is not None and bool((written > 0).any()):
            g_ys = grad_ys.reshape(batch, t_eval.shape[1], -1)
            degree = len(ctx.poly) // stages
            poly = torch.tensor(ctx.poly, dtype=torch.float64, device=h.device).reshape(stages, degree)
            for m in range(int(written.max())):
                valid = m < written
                j = torch.where(valid, first + m, 0)
                theta = (t_eval.gather(1, j[:, None])[:, 0] - t0) / torch.where(valid, h, 1.0)
                powers = torch.stack([theta ** (p + 1) for p in range(degree)])
                weights = (poly @ powers) * torch.where(valid, h, 0.0)
                g = g_ys[torch.arange(batch, device=j.device), j] * valid[:, None]
                grad_y += g
                grad_k += batch_stage_grad(g, grad_k.shape, weights)
        shape = ctx.k_shape[1:]
        return (None, grad_y.reshape(shape), grad_k.reshape(ctx.k_shape), None, None, None, None, None, None, None,
                None, None, None, grad_ys, None, None, None, None, None, None, None, None, None)


class RecordingOps:
    """The ops for one device, for eager solves that record a graph: the same formulas as the
    registered autograd, as autograd.Functions around the device kernel. The registered op's
    Python autograd wrapper costs ~39 us per call on CPU, this ~12 us (measured at 32 elements);
    a recorded solve makes one such call per stage."""

    def __init__(self, kernels: NoGradOps) -> None:
        self._kernels = kernels

    def rk_stage(self, y: Tensor, k: Tensor, a: list[float], h: float) -> Tensor:
        return _StageFunction.apply(self._kernels.rk_stage, y, k, a, h)

    def rk_finalize(self, *args: object) -> tuple[Tensor, Tensor, Tensor]:
        return _FinalizeFunction.apply(self._kernels.rk_finalize, *args)

    def rk_dense(self, y: Tensor, k: Tensor, poly: list[float], theta: list[float], h: float) -> Tensor:
        return _DenseFunction.apply(self._kernels.rk_dense, y, k, poly, theta, h)

    def batch_stage(
        self, y: Tensor, k: Tensor, a: list[float], h: Tensor, t: Tensor, c: float
    ) -> tuple[Tensor, Tensor]:
        return _BatchStageFunction.apply(self._kernels.batch_stage, y, k, a, h, t, c)

    def batch_step(self, *args: object) -> Tensor:
        """As the kernel: y_next, f_next and ys are updated in place (and join the graph)."""
        return _BatchStepFunction.apply(self._kernels.batch_step, *args)[3]


class ReferenceOps:
    """The pure-PyTorch ops: differentiable in every autograd mode, forward mode included."""

    rk_stage = staticmethod(_reference.rk_stage)
    rk_finalize = staticmethod(_reference.rk_finalize)
    rk_dense = staticmethod(_reference.rk_dense)
    batch_stage = staticmethod(_reference.batch_stage)
    batch_step = staticmethod(_reference.batch_step)


def _forward_ad_active() -> bool:
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def ops_for(device: torch.device, record_graph: bool) -> NoGradOps | RecordingOps | AutogradOps | ReferenceOps:
    """The op set a solve should use: the reference ops on a device without kernels. The kernels
    carry reverse-mode formulas only, so inside a forward-mode AD level (dual tensors, jvp) the
    solve also runs on the reference ops instead of
    silently dropping tangents."""
    if _forward_ad_active() or device.type not in kernel_devices:
        return ReferenceOps()
    if torch.compiler.is_compiling():
        return AutogradOps()  # what the compiler can trace: the registered ops (and their formulas)
    # Built once per device type: looking ops up on torch.ops costs ~10 us.
    ops = _no_grad_ops_cache.get(device.type)
    if ops is None:
        ops = _no_grad_ops_cache[device.type] = NoGradOps(device)
        _recording_ops_cache[device.type] = RecordingOps(ops)
    return _recording_ops_cache[device.type] if record_graph else ops


_no_grad_ops_cache: dict[str, NoGradOps] = {}
_recording_ops_cache: dict[str, RecordingOps] = {}


def path_for(device_type: str) -> str:
    """Which implementation the ops take on a device type: 'CPU kernel', 'CUDA kernel' or 'reference'."""
    if device_type in kernel_devices:
        return f"{device_type.upper()} kernel"
    return "reference"


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Run every op on the pure-PyTorch reference inside the block (for comparisons and demos)."""
    saved = set(kernel_devices)
    kernel_devices.clear()
    try:
        yield
    finally:
        kernel_devices.update(saved)


# ----------------------------------------------------------------------------- fused MLP solve
# mlp_solve / mlp_solve_backward (csrc/ops.cpp; python/flashode/fused_mlp.py drives them): CPU and
# CUDA kernels, the reference elsewhere (fused_dispatch only routes solves to a device with a kernel).

MLP_OP_NAMES = ("mlp_solve", "mlp_solve_backward")


def has_kernel(name: str, device_type: str) -> bool:
    """Whether op `name` has a compiled kernel for a device type (not only a loaded library)."""
    if device_type not in kernel_devices:
        return False
    key = "CUDA" if device_type == "cuda" else "CPU"
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"flashode::{name}", key))


def mlp_path_for(device_type: str) -> str:
    """Which implementation mlp_solve takes on a device type: 'CPU kernel', 'CUDA kernel' or 'reference'."""
    return f"{device_type.upper()} kernel" if has_kernel("mlp_solve", device_type) else "reference"


def _mlp_direct(name: str, device: torch.device) -> Callable[..., object]:
    """Op `name` for one device without its autograd wrapper (the device's kernel, redispatched
    past the Autograd key, or the reference): for solves that record no graph, and for the
    autograd.Function in fused_mlp, which carries the same formula as the registered one."""
    key = (name, device.type, frozenset(kernel_devices))  # reference_path() empties kernel_devices
    op = _mlp_direct_cache.get(key)
    if op is None:
        if not has_kernel(name, device.type):
            op = getattr(_reference, name)
        else:
            op = _redispatcher(name, _kernel_keys(device))
        _mlp_direct_cache[key] = op
    return op


_mlp_direct_cache: dict[tuple[str, str, frozenset[str]], Callable[..., object]] = {}


def mlp_solve_direct(device: torch.device) -> Callable[..., object]:
    return _mlp_direct("mlp_solve", device)


def mlp_solve_backward_direct(device: torch.device) -> Callable[..., object]:
    return _mlp_direct("mlp_solve_backward", device)


def mlp_solve_grads(ctx, grad_ys: Tensor, backward: Callable[..., object]) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """(dL/dy0, dL/dparams) of an mlp_solve whose inputs and checkpoints `ctx` saved (save_mlp_solve),
    by `backward` (the mlp_solve_backward op, or its direct form)."""
    if not ctx.record:
        raise RuntimeError(
            "flashode.mlp_solve was called with record=False, so it kept no checkpoints to differentiate; "
            "call it with record=True when its result needs gradients"
        )
    params, t_eval, ckpt_y, ckpt_t, offsets, out_step = ctx.saved_tensors
    return backward(grad_ys.contiguous(), params, *ctx.mlp_args, t_eval, ckpt_y, ckpt_t, offsets, out_step,
                    *ctx.method_args)


def save_mlp_solve(ctx, inputs: tuple, output: tuple) -> None:  # type: ignore[no-untyped-def]
    """What mlp_solve's backward needs, from its inputs (the op's argument order) and outputs."""
    (_y0, params, widths, activation, time_concat, bias, t_eval, _t_start, _t_end, _rtol, _atol, _first,
     a, b, _b_error, c, poly, _order, _controller, _max_steps, step_size, record) = inputs
    ctx.mlp_args = (list(widths), activation, time_concat, bias)
    ctx.method_args = (list(a), list(b), list(c), list(poly), step_size)
    ctx.record = record
    ctx.save_for_backward(params, t_eval, *output[4:])
    ctx.mark_non_differentiable(*output[1:])


def _register_mlp_solve() -> None:
    lib = "flashode::"

    @torch.library.register_fake(lib + "mlp_solve")
    def _(y0, params, widths, activation, time_concat, bias, t_eval, *args):  # type: ignore[no-untyped-def]
        batch, dim = y0.shape
        outputs = t_eval.shape[-1]
        rows = torch.library.get_ctx().new_dynamic_size()  # the accepted steps: known only after solving
        long = dict(dtype=torch.int64)
        f64 = dict(dtype=torch.float64)
        return (
            y0.new_empty((batch, outputs, dim)), y0.new_empty(batch, **long), y0.new_empty(batch, **f64),
            y0.new_empty((batch, 4), **long), y0.new_empty((rows, 2, dim)), y0.new_empty((rows, 3), **f64),
            y0.new_empty(batch + 1, **long), y0.new_empty((batch, outputs), **long),
        )

    @torch.library.register_fake(lib + "mlp_solve_backward")
    def _(grad_ys, params, *args):  # type: ignore[no-untyped-def]
        return grad_ys.new_empty((grad_ys.shape[0], grad_ys.shape[2])), torch.empty_like(params)

    def backward(ctx, grad_ys, *_rest):  # type: ignore[no-untyped-def]
        grad_y0, grad_params = mlp_solve_grads(ctx, grad_ys, torch.ops.flashode.mlp_solve_backward.default)
        return (grad_y0, grad_params) + (None,) * 20

    torch.library.register_autograd(lib + "mlp_solve", backward, setup_context=save_mlp_solve)


if has_kernel("mlp_solve", "cpu") or has_kernel("mlp_solve", "cuda"):
    _register_mlp_solve()
