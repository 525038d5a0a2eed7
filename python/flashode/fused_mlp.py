"""Whole-solve fusion for MLP vector fields.

With a generic Python ``func`` every solver step pays PyTorch's per-op cost inside the network. When
the field is a small MLP, the whole batch solve runs inside one op instead (``flashode::mlp_solve``;
csrc/cpu/mlp_solve_kernels.cpp, csrc/cuda/mlp_solve_kernels.cu): the network evaluated on tiles of
samples with its weights in cache (CPU) or shared memory (CUDA), every sample with its own adaptive
steps, and no Python in the step loop, forward and backward. odeint, odeint_adjoint, solve_ivp and
the nn layers call it for the fields below (`flashode.fused_dispatch`); `solve_mlp` is the direct
entry, which also takes fixed grids with solve_ivp's per-sample spans.

* `MLPField`: an ordinary nn.Module MLP field f(t, y) (plain PyTorch in ``forward``: it works with
  every solver) that the fused solve recognises.
* `Autonomous(module)`: f(t, y) = module(y), so that an nn.Sequential MLP is a field odeint can call.
* `mlp_spec(module)`: the fused solve's description of an `MLPField`, or of an nn.Sequential of
  nn.Linear layers and one supported activation alternating (a time-independent field, bare or in
  `Autonomous`); None for anything else, and `mlp_spec_reason(module)` says why.
* `solve_mlp(field, y0, t_eval, ...)`: `solve_ivp`'s contract (per-sample adaptive steps, the same
  controller, initial step heuristic and dense output, so the same steps) on the fused op, or a
  fixed grid (euler, rk4, ...: odeint's) with ``step_size``. Differentiable in y0 and the field's
  parameters: exact gradients of the discrete solve (step sizes are not differentiated), from a
  checkpoint per accepted step.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _ops, _reference
from .batch import Solution, _per_sample_time, make_controller, prepare_batch_problem
from .solvers.fixed_grid import linear_dense
from .tableaus import ADAPTIVE, FIXED, Tableau

__all__ = ["ACTIVATIONS", "Autonomous", "MLPField", "MLPSpec", "mlp_spec", "mlp_spec_reason", "solve_mlp"]

# Activation names, in the order of their codes in the op (csrc/common/mlp_solve_args.h).
ACTIVATIONS = _reference.MLP_ACTIVATIONS
TIME_MODES = ("none", "concat")

_ACTIVATION_FUNCTIONS = {
    "tanh": torch.tanh,
    "softplus": nn.functional.softplus,
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
    "elu": nn.functional.elu,
    "sigmoid": torch.sigmoid,
}


class MLPField(nn.Module):
    """dy/dt = MLP(y) (or MLP(y, t) with ``time="concat"``): ``depth`` hidden layers of ``hidden``
    units, so ``MLPField(2, 64, 2)`` is 2 -> 64 -> 64 -> 2 (three nn.Linear layers in ``layers``),
    with ``activation`` between layers (not after the last).

    ``time="concat"`` appends t as one more input of the first layer (t broadcast over the samples:
    a scalar or one time per sample). ``forward`` is plain PyTorch, so the field works with every
    solver; `solve_mlp` (and the dispatch built on `mlp_spec`) runs it fused.
    """

    def __init__(
        self, dim: int, hidden: int, depth: int, activation: str = "tanh", time: str = "none", bias: bool = True,
        *, device: Any = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value, least in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"MLPField: {name} must be an int >= {least}, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLPField: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if time not in TIME_MODES:
            raise ValueError(f'MLPField: time must be "none" or "concat", got {time!r}')
        widths = [dim + (time == "concat")] + [hidden] * depth + [dim]
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype)
            for fan_in, fan_out in zip(widths[:-1], widths[1:])
        )
        self.dim, self.activation, self.time = dim, activation, time

    def forward(self, t: Tensor | float, y: Tensor) -> Tensor:
        x = y
        if self.time == "concat":
            t_col = torch.as_tensor(t, dtype=y.dtype, device=y.device).expand(y.shape[:-1]).unsqueeze(-1)
            x = torch.cat([y, t_col], -1)
        act = _ACTIVATION_FUNCTIONS[self.activation]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = act(x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, activation={self.activation!r}, time={self.time!r}"


class Autonomous(nn.Module):
    """A field of y alone as f(t, y) = module(y), the form odeint and solve_ivp call: wraps e.g. an
    nn.Sequential MLP, which then runs fused as an `MLPField` does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, t: Tensor | float, y: Tensor) -> Tensor:
        return self.module(y)


@dataclass(frozen=True)
class MLPSpec:
    """What the fused solve needs to know of an MLP field: its Linear layers (their parameters are
    read at solve time, so a spec follows training), the activation between them and whether t
    is the first layer's last input."""

    linears: tuple[nn.Linear, ...]
    activation: str
    time_concat: bool

    @property
    def bias(self) -> bool:
        return self.linears[0].bias is not None

    @property
    def widths(self) -> list[int]:
        return [self.linears[0].in_features] + [layer.out_features for layer in self.linears]

    @property
    def dim(self) -> int:
        return self.linears[-1].out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.linears[0].weight.dtype

    def parameters(self) -> list[Tensor]:
        """Every weight and bias, in the packing order of `params`."""
        out = []
        for layer in self.linears:
            out.append(layer.weight)
            if layer.bias is not None:
                out.append(layer.bias)
        return out

    def params(self) -> Tensor:
        """The parameters packed into one flat tensor (per layer its weight, then its bias), as the
        op takes them; differentiable, so gradients reach the layers' own parameters."""
        return torch.cat([p.reshape(-1) for p in self.parameters()])

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        """The field in plain PyTorch (t: per-sample times (B,) or a scalar; y: (B, D))."""
        t_b = torch.as_tensor(t, dtype=torch.float64, device=y.device).expand(y.shape[0])
        return _reference.mlp_eval(self.params(), self.widths, ACTIVATIONS.index(self.activation),
                                   self.time_concat, self.bias, t_b, y)


def _activation_name(module: nn.Module) -> str | None:
    """The supported activation a module is (exact types: a subclass may change forward)."""
    kind = type(module)
    if kind is nn.Softplus:
        return "softplus" if module.beta == 1 and module.threshold == 20 else None
    if kind is nn.ELU:
        return "elu" if module.alpha == 1.0 else None
    return {nn.Tanh: "tanh", nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}.get(kind)


def _has_hooks(modules: list[nn.Module]) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
        for m in modules
    )


def _inspect(module: Any) -> MLPSpec | str:
    """The spec of a supported field, else the reason it is not one."""
    if type(module) is Autonomous:
        if _has_hooks([module]):
            return "the field has forward or backward hooks, which the fused solve would skip"
        if type(module.module) is not nn.Sequential:
            return "Autonomous(m) runs fused when m is an nn.Sequential MLP (an MLPField is already f(t, y))"
        return _inspect(module.module)
    if type(module) is MLPField:
        if any(type(m) is not nn.Linear for m in module.layers) or module.activation not in ACTIVATIONS:
            return "the MLPField's layers or activation were replaced by unsupported ones"
        spec = MLPSpec(tuple(module.layers), module.activation, module.time == "concat")
        modules = [module, module.layers, *module.layers]
    elif type(module) is nn.Sequential:
        children = list(module)
        modules = [module, *children]
        if len(children) % 2 == 0:
            return "an nn.Sequential MLP field must start and end with nn.Linear, alternating with activations"
        linears, acts = children[0::2], children[1::2]
        if any(type(m) is not nn.Linear for m in linears):
            return "every other module of an nn.Sequential MLP field (from the first) must be an nn.Linear"
        names = [_activation_name(m) for m in acts]
        if any(name is None for name in names):
            bad = acts[names.index(None)]
            return (f"unsupported activation {bad!r}: the fused solve supports nn.Tanh, nn.Softplus (beta 1, "
                    "threshold 20), nn.ReLU, nn.SiLU, nn.ELU (alpha 1) and nn.Sigmoid")
        if len(set(names)) > 1:
            return f"the activations differ between layers ({sorted(set(names))}): the fused solve uses one"
        spec = MLPSpec(tuple(linears), names[0] if names else "tanh", False)
    else:
        return (f"{type(module).__name__} is neither a flashode.fused_mlp.MLPField nor an nn.Sequential of "
                "nn.Linear layers and activations")
    if _has_hooks(modules):
        return "the field has forward or backward hooks, which the fused solve would skip"
    ins = [m.in_features for m in spec.linears]
    outs = [m.out_features for m in spec.linears]
    if ins[1:] != outs[:-1]:
        return f"the Linear layers do not chain: {list(zip(ins, outs))}"
    params = spec.parameters()
    if len(params) not in (len(ins), 2 * len(ins)):
        return "some Linear layers have a bias and some do not: the fused solve needs all or none"
    if ins[0] != outs[-1] + spec.time_concat:
        return f"the field maps {ins[0]} values to {outs[-1]}: a vector field's input and output must match"
    if len(ins) > 16 or max(ins + outs) > 1024:
        return "the fused solve supports up to 16 Linear layers of width at most 1024"
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        return "the field's parameters differ in dtype or device"
    if dtype not in (torch.float32, torch.float64):
        return f"the field's parameters are {dtype}: the fused solve runs float32 and float64"
    return spec


def mlp_spec(module: Any) -> MLPSpec | None:
    """The fused solve's spec of `module` if it is an `MLPField` or an nn.Sequential of nn.Linear
    layers and one supported activation alternating (a field of y alone), else None
    (`mlp_spec_reason` says why)."""
    found = _inspect(module)
    return found if isinstance(found, MLPSpec) else None


def mlp_spec_reason(module: Any) -> str | None:
    """Why `mlp_spec(module)` is None (None when the module is supported)."""
    found = _inspect(module)
    return None if isinstance(found, MLPSpec) else found


# ----------------------------------------------------------------------------- the solve


class _MLPSolveFunction(torch.autograd.Function):
    """mlp_solve under autograd in eager mode: the registered formula (_ops.mlp_solve_grads) around
    the op without its autograd wrapper (the CPU kernel, or the reference on other devices)."""

    @staticmethod
    def forward(ctx, y0, params, *args):  # type: ignore[no-untyped-def]
        output = _ops.mlp_solve_direct(y0.device)(y0, params, *args)
        _ops.save_mlp_solve(ctx, (y0, params, *args), output)
        return tuple(output)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward op has no derivative of its own
    def backward(ctx, grad_ys, *_rest):  # type: ignore[no-untyped-def]
        grad_y0, grad_params = _ops.mlp_solve_grads(ctx, grad_ys, _ops.mlp_solve_backward_direct(grad_ys.device))
        return (grad_y0, grad_params) + (None,) * 20


def _method(method: str, step_size: float | None) -> tuple[Tableau, bool]:
    if method in ADAPTIVE:
        if step_size is not None:
            raise ValueError(f"step_size applies to the fixed-grid methods {sorted(FIXED)}, not to {method}")
        return ADAPTIVE[method], False
    if method in FIXED:
        if step_size is None or not (isinstance(step_size, (int, float)) and math.isfinite(step_size)
                                     and step_size > 0):
            raise ValueError(f"method {method} needs a positive step_size, got {step_size!r}")
        return FIXED[method], True
    raise ValueError(f'Invalid method "{method}" for solve_mlp. Must be one of {sorted(ADAPTIVE) + sorted(FIXED)}')


def _tableau_args(tab: Tableau, fixed: bool) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """(a, b, b_error, c, poly) as the op takes them: a's rows concatenated; a fixed grid has no error
    weights and interpolates linearly (odeint's fixed-grid default)."""
    a = [x for row in tab.a[1:] for x in row]
    poly = linear_dense(tab.b) if fixed else [p for row in tab.dense for p in row]
    return a, list(tab.b), [] if fixed else list(tab.b_error or ()), list(tab.c), poly


@dataclass
class _Problem:
    """What solve_mlp takes from batch.BatchProblem (the fast path builds only this)."""

    t_eval: Tensor  # (T,) or (B, T) float64
    t_start: Tensor  # (B,) float64
    t_end: Tensor
    rtol: Tensor
    atol: Tensor


def _fast_problem(y0: Tensor, t_eval: Any, t_start: Any, t_end: Any, rtol: Any, atol: Any) -> _Problem | None:
    """The common call (a few shared 1-d output times, the span they give, scalar tolerances),
    checked as prepare_batch_problem checks it but on host floats (one device read instead of a
    dozen small ops: at small batches those cost more than the solve); None for anything else."""
    scalar = (int, float)
    if not (t_start is None and t_end is None and isinstance(t_eval, Tensor) and t_eval.dim() == 1
            and 1 <= t_eval.numel() <= 64 and not t_eval.requires_grad and type(rtol) in scalar
            and type(atol) in scalar and rtol >= 0 and atol >= 0 and y0.shape[0] >= 1):
        return None  # prepare_batch_problem checks it (and raises its own messages)
    times = t_eval.tolist()  # float32 values convert to float64 exactly
    if not all(math.isfinite(x) for x in times):
        return None
    pairs = list(zip(times[:-1], times[1:]))
    if not (all(b > a for a, b in pairs) or all(b < a for a, b in pairs)):
        return None
    batch = y0.shape[0]
    f64 = dict(dtype=torch.float64, device=y0.device)
    tol = dict(dtype=y0.dtype, device=y0.device)
    return _Problem(
        torch.tensor(times, **f64), torch.full((batch,), times[0], **f64), torch.full((batch,), times[-1], **f64),
        torch.full((), rtol, **tol), torch.full((), atol, **tol),
    )


# In solves that record no graph, the packed parameters of a field are reused while none of its
# parameters changed (the very same tensors, held by weak references, at the same version counters):
# packing copies every weight.
_packed_cache: dict[int, tuple[list[tuple[weakref.ref, int]], Tensor]] = {}


def _packed_params(spec: MLPSpec, params: list[Tensor], record: bool) -> Tensor:
    if record:
        return torch.cat([p.reshape(-1) for p in params])
    cached = _packed_cache.get(id(spec.linears[0]))
    if cached is not None and len(cached[0]) == len(params) and all(
        ref() is p and version == p._version for (ref, version), p in zip(cached[0], params)
    ):
        return cached[1]
    packed = torch.cat([p.detach().reshape(-1) for p in params])
    if len(_packed_cache) > 64:
        _packed_cache.clear()
    _packed_cache[id(spec.linears[0])] = ([(weakref.ref(p), p._version) for p in params], packed)
    return packed


def _solve_mlp(
    field: MLPSpec | nn.Module,
    y0: Tensor,
    t_eval: Any,
    *,
    method: str = "dopri5",
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    t_start: Any = None,
    t_end: Any = None,
    first_step: Any = None,
    max_steps: int = 10_000,
    step_size: float | None = None,
    controller: str = "integral",
    pcoeff: float | None = None,
    icoeff: float | None = None,
    dcoeff: float | None = None,
    safety: float = 0.9,
    ifactor: float = 10.0,
    dfactor: float = 0.2,
    dt_min: float = 0.0,
    dt_max: float = math.inf,
    clip_to_end: bool = True,
) -> Solution:
    """Solve B independent initial value problems of an MLP field in one fused op.

    Arguments as `flashode.solve_ivp` (same defaults, same per-sample steps, statuses and stats),
    with ``field`` an `MLPSpec`, an `MLPField` or a supported nn.Sequential (see `mlp_spec`) and y0
    of shape (B, D). ``method`` is an adaptive method of solve_ivp, or a fixed-grid one (euler,
    midpoint, heun2, heun3, rk4) with ``step_size``: odeint's grid (from each sample's t_start, the
    last step shortened to land on t_end) and linear interpolation between grid points.

    Returns a `Solution` whose ys is differentiable with respect to y0 and the field's parameters
    (backpropagation through the discrete solve, replayed from one checkpoint per accepted step;
    step sizes and acceptance are not differentiated). ``loop_reads`` is 0: the step loop runs in
    the op.

    The network is evaluated with the kernel's own summation order, so values differ from torch's
    by rounding. Step sizes inherit that through the error estimate; where an error ratio is at
    rounding-noise level (float32 at tight tolerances, fields with kinks such as relu, the PID
    controller's memory of an earlier ratio) an accept/reject decision can then differ from
    solve_ivp's, with results that agree to the tolerance instead of to rounding.
    """
    spec = field if isinstance(field, MLPSpec) else mlp_spec(field)
    if spec is None:
        raise ValueError(f"solve_mlp: the field is not a supported MLP: {mlp_spec_reason(field)}")
    if not isinstance(y0, Tensor) or y0.dim() != 2 or y0.shape[1] != spec.dim:
        shape = tuple(y0.shape) if isinstance(y0, Tensor) else type(y0).__name__
        raise ValueError(f"solve_mlp: y0 must have shape (B, {spec.dim}) for this field, got {shape}")
    parameters = spec.parameters()
    weight = parameters[0]
    record = torch.is_grad_enabled() and (y0.requires_grad or any(p.requires_grad for p in parameters))
    if y0.dtype != weight.dtype or y0.device != weight.device:
        raise ValueError(
            f"solve_mlp: y0 ({y0.dtype}, {y0.device}) and the field's parameters ({weight.dtype}, {weight.device}) "
            "must share dtype and device"
        )
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    tab, fixed = _method(method, step_size)
    if fixed and first_step is not None:
        raise ValueError("first_step applies to adaptive methods only")
    problem = _fast_problem(y0, t_eval, t_start, t_end, rtol, atol)
    if problem is None:  # anything but the common call: solve_ivp's own checks and broadcasting
        problem = prepare_batch_problem(spec, y0, t_eval, t_start, t_end, rtol, atol)
    batch = y0.shape[0]
    first = torch.empty(0, dtype=torch.float64, device=y0.device)
    if first_step is not None:
        first = _per_sample_time(first_step, batch, "first_step", y0)
        if not bool((first > 0).all()):
            raise ValueError("first_step must be positive")
    ctrl = make_controller(controller, tab.order, safety, ifactor, dfactor, pcoeff, icoeff, dcoeff, dt_min, dt_max)
    a, b, b_error, c, poly = _tableau_args(tab, fixed)
    args = (
        list(spec.widths), ACTIVATIONS.index(spec.activation), spec.time_concat, spec.bias, problem.t_eval,
        problem.t_start, problem.t_end, problem.rtol.contiguous(), problem.atol.contiguous(), first, a, b, b_error,
        c, poly, tab.order, ctrl.pack(clip_to_end, len(c) - 1), max_steps, float(step_size or 0.0),
    )
    params = _packed_params(spec, parameters, record)
    if record:
        ys, status, t_final, stats = _MLPSolveFunction.apply(y0, params, *args, True)[:4]
    else:
        ys, status, t_final, stats = _ops.mlp_solve_direct(y0.device)(y0.detach(), params, *args, False)[:4]
    t_user = t_eval if isinstance(t_eval, Tensor) and t_eval.dim() == 2 else problem.t_eval.to(y0.dtype)
    if t_user.dim() == 1:
        t_user = t_user.expand(batch, -1).contiguous()  # solve_ivp's ts: (B, T)
    return Solution(t_user, ys, status, t_final, dict(zip(_STAT_NAMES, stats.unbind(1))), 0)


_STAT_NAMES = ("n_f_evals", "n_steps", "n_accepted", "n_rejected")

# Input checks read the device, as in solve_ivp: under torch.compile the solve runs eagerly. Callers
# that are themselves compiler-disabled (solve_ivp, odeint's dispatch) call _solve_mlp directly.
solve_mlp = torch.compiler.disable(_solve_mlp)
