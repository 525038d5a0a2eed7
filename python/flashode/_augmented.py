"""The adjoint system of an ODE solve, as one flat state the fused kernels integrate.

For dy/dt = f(t, y, theta) and a loss L, the adjoint a = dL/dy obeys da/dt = -a^T df/dy, and the
gradients with respect to theta and t accumulate as d(dL/dtheta)/dt = -a^T df/dtheta and
d(dL/dt)/dt = -a^T df/dt, integrated backwards in time (Chen et al. 2018, appendix B). The
augmented state is one contiguous buffer

    [ y (n) | a (n) | t-adjoint (1) | dL/dtheta_1 | ... | dL/dtheta_P ]

so every solver pass (stages, finalisation with the error norm, interpolation) is one kernel over
all of it. y comes first so func sees an aligned, contiguous state; the parameter channels come
last so the seminorm is "every segment but the tail" (see `StateLayout`).

Adjoint callbacks and adjoint norms see torchdiffeq's tuple `(t_adj, y, adj_y, *adj_params)`, with
y in its flattened forward form (y0's shape for a tensor state, (n,) for a tuple state); grid
constructors get torchdiffeq's flat order, [t_adj | y | adj_y | adj_params].
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import Tensor

from ._func import Perturb, VectorField, _flat_to_shape
from .solvers.common import MAX_KERNEL_SEGMENTS, StateLayout, nan_max, segment_layout, segment_rms


class AugmentedDynamics(VectorField):
    """The adjoint system's right-hand side, written straight into slices of a stage row.

    Each evaluation runs func once under grad and takes one vector-Jacobian product for (y, t,
    theta) through the autograd engine (torch.autograd.grad's path; benchmarks/adjoint.py --vjp
    measures it against torch.func.vjp), then copies f and the products into the row with one
    foreach copy.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        y0: Tensor,
        tuple_shapes: list[torch.Size] | None,
        params: tuple[Tensor, ...],
        t_requires_grad: bool,
        direction: float,
    ) -> None:
        super().__init__(func, y0, direction, tuple_shapes)
        for p in params:
            if p.device != y0.device:
                raise ValueError(
                    f"odeint_adjoint: adjoint parameter on {p.device} but y0 on {y0.device}; "
                    "the augmented state holds both, so they must share a device"
                )
        self.n = n = y0.numel()
        self.params = params
        self.t_requires_grad = t_requires_grad
        self.param_ends = list(itertools.accumulate((p.numel() for p in params), initial=2 * n + 1))
        self.size = self.param_ends[-1]
        # The y leaf func differentiates through: y0's shape, or flat with tuple parts viewed off it.
        self.leaf_shape = y0.shape if tuple_shapes is None else torch.Size([n])
        self._zero = torch.zeros((), dtype=y0.dtype, device=y0.device)
        self._row_views: dict[int, tuple[Tensor, list[Tensor]]] = {}

    # -- the user's view of the augmented state

    def view(self, flat: Tensor) -> tuple[Tensor, ...]:
        """torchdiffeq's `(t_adj, y, adj_y, *adj_params)` as views of a flat augmented state."""
        n = self.n
        return (flat[2 * n], flat[:n].view(self.leaf_shape), flat[n : 2 * n].view(self.leaf_shape),
                *self.param_views(flat))

    def param_views(self, flat: Tensor) -> list[Tensor]:
        """Each parameter's gradient channel of a flat augmented state, shaped like the parameter."""
        return [flat[a:b].view(p.shape) for p, a, b in zip(self.params, self.param_ends, self.param_ends[1:])]

    def torchdiffeq_flat(self, flat: Tensor) -> Tensor:
        """The state in torchdiffeq's flat order, [t_adj | y | adj_y | adj_params]."""
        n = self.n
        return torch.cat([flat[2 * n : 2 * n + 1], flat[: 2 * n], flat[2 * n + 1 :]])

    def torchdiffeq_dynamics(self, t: Tensor | float, x: Tensor) -> Tensor:
        """The augmented right-hand side at user time t, on and in torchdiffeq's flat order: what
        torchdiffeq hands a grid constructor in the adjoint solve."""
        n = self.n
        ours = torch.cat([x[1 : 2 * n + 1], x[:1], x[2 * n + 1 :]])
        return self.torchdiffeq_flat(self(self.direction * float(t), ours))

    # -- evaluation

    def __call__(self, tau: float, x: Tensor, perturb: Perturb = Perturb.NONE) -> Tensor:
        out = torch.empty_like(x)
        self._write(self._views(out), tau, x, perturb)
        return out

    def into(self, out: Tensor, tau: float, x: Tensor, perturb: Perturb = Perturb.NONE) -> None:
        # Stage rows are long-lived views of the solver's buffers: their slice views are made once.
        # The cache holds the row itself, so its id cannot be reused by another tensor.
        cached = self._row_views.get(id(out))
        if cached is None or cached[0] is not out:
            cached = self._row_views[id(out)] = (out, self._views(out))
        self._write(cached[1], tau, x, perturb)

    def _views(self, out: Tensor) -> list[Tensor]:
        """Destinations in `out`: f (one per tuple part), then a, t-adjoint, each parameter."""
        n = self.n
        f_views = [out[:n].view(self.state_shape)] if self.tuple_shapes is None else list(
            _flat_to_shape(out[:n], self.tuple_shapes)
        )
        return f_views + [out[n : 2 * n].view(self.leaf_shape), out[2 * n]] + self.param_views(out)

    def _write(self, views: list[Tensor], tau: float, x: Tensor, perturb: Perturb) -> None:
        self.nfe += 1
        n = self.n
        t = self.time_tensor(tau, perturb)
        with torch.enable_grad():
            y = x[:n].view(self.leaf_shape).detach().requires_grad_()
            t_in = t.detach().requires_grad_() if self.t_requires_grad else t
            # -a as the cotangent: the products are linear in it, so they come out negated.
            if self.tuple_shapes is None:  # the common case, without tuple bookkeeping
                f = self.func(t_in, y)
                if not isinstance(f, Tensor) or f.shape != self.state_shape:
                    self.checked_parts(f, tau)  # raises, naming the problem
                parts: tuple[Tensor, ...] = (f,)
                cotangents = (torch.neg(x[n : 2 * n]).view(self.state_shape),)
            else:
                parts = self.checked_parts(self.func(t_in, _flat_to_shape(y, self.tuple_shapes)), tau)
                cotangents = _flat_to_shape(torch.neg(x[n : 2 * n]), self.tuple_shapes)
            inputs = (y, t_in, *self.params) if self.t_requires_grad else (y, *self.params)
            grads = _vjp(parts, cotangents, inputs)
        if not self.t_requires_grad:
            grads = (grads[0], self._zero, *grads[1:])
        sources = [part if part.shape == view.shape else part.reshape(view.shape) for part, view in zip(parts, views)]
        if all(g is not None for g in grads):
            torch._foreach_copy_(views, sources + list(grads))
            return
        destinations = views[: len(parts)]
        for view, grad in zip(views[len(parts) :], grads):
            if grad is None:  # func does not use this input: its product is zero
                view.zero_()
            else:
                destinations.append(view)
                sources.append(grad)
        torch._foreach_copy_(destinations, sources)


def _vjp(
    outputs: tuple[Tensor, ...], cotangents: tuple[Tensor, ...], inputs: tuple[Tensor, ...]
) -> tuple[Tensor | None, ...]:
    """sum_i cotangents[i]^T d outputs[i] / d inputs, None where an input is not used.

    Runs the autograd engine directly, as torch.autograd.grad does after normalising its
    arguments: that normalisation (shape checks, tuple building) costs ~25 us a call, a sizeable
    part of a small network's evaluation, and the shapes here match by construction.
    """
    pairs = [
        (out, cot if cot.shape == out.shape else cot.view(out.shape))
        for out, cot in zip(outputs, cotangents)
        if out.requires_grad  # a part independent of y, t and theta contributes nothing
    ]
    if not pairs:
        return (None,) * len(inputs)
    outs, cots = zip(*pairs)
    # keep_graph: func may use tensors computed outside it (a hypernetwork's weights, an encoder's
    # context), whose graph every evaluation traverses again; func's own graph goes with its output.
    return _ENGINE.run_backward(outs, cots, True, False, inputs, True, False)


# The engine behind torch.autograd.grad: run_backward(outputs, cotangents, keep_graph,
# create_graph, inputs, allow_unreachable, accumulate_grad).
_ENGINE = torch.autograd.Variable._execution_engine


class AdjointNorm:
    """The error norm torchdiffeq builds for the adjoint state, `adjoint_options['norm']`.

    Called on `(t_adj, y, adj_y, *adj_params)` it returns max(|t_adj|, state_norm(y),
    state_norm(adj_y), max_i RMS(adj_param_i)), leaving the parameter channels out for the
    seminorm (Kidger, Chen & Lyons 2021). state_norm is the forward solve's norm: RMS, the mixed
    norm over tuple parts, or the user's `options['norm']`. The solver does not call this object:
    while it is the one in adjoint_options, the same norm comes out of the fused finalisation
    (see `adjoint_layout`); replacing it with another callable makes the solver call that instead.
    """

    def __init__(
        self, forward_norm: Callable[[Any], Any] | None, shape: Callable[[Tensor], Any], seminorm: bool
    ) -> None:
        self.forward_norm = forward_norm
        self.shape = shape
        self.seminorm = seminorm

    def state_norm(self, flat: Tensor) -> Tensor:
        shaped = self.shape(flat)
        if self.forward_norm is not None:
            return torch.as_tensor(self.forward_norm(shaped))
        parts = (shaped,) if isinstance(shaped, Tensor) else shaped
        return torch.stack([_rms(p) for p in parts]).max()

    def __call__(self, tensors: tuple[Tensor, ...]) -> Tensor:
        t, y, adj_y, *adj_params = tensors
        values = [t.abs(), self.state_norm(y), self.state_norm(adj_y)]
        if not self.seminorm:
            values += [_rms(p) for p in adj_params]
        return torch.stack([v.to(t.dtype).reshape(()) for v in values]).max()


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / max(x.numel(), 1) ** 0.5


def adjoint_layout(norm: Any, field: AugmentedDynamics) -> StateLayout:
    """How the adjoint solve takes its error norm, given `adjoint_options['norm']`.

    An AdjointNorm over a default forward norm becomes kernel segments: each y part, each adj_y
    part, the t-adjoint and (unless seminorm) each parameter, with the max of their RMS taken in
    the finalisation pass. Over a user forward norm, the kernel still supplies the t-adjoint and
    parameter RMS values and Python applies the user's norm to y and adj_y. Any other callable is
    called on the tuple view of the scaled error.
    """
    n = field.n
    if not isinstance(norm, AdjointNorm):
        if not callable(norm):
            raise TypeError(
                f"adjoint_options['norm'] on the graph node must be a callable, got {norm!r} ('seminorm' is "
                "understood by odeint_adjoint itself: pass adjoint_options=dict(norm='seminorm') to it)"
            )
        return StateLayout(field.view, norm=lambda flat, _seg: float(norm(field.view(flat))))
    param_ends = [] if norm.seminorm else field.param_ends[1:]
    if norm.forward_norm is None:
        part_ends = [n] if field.tuple_shapes is None else list(
            itertools.accumulate(s.numel() for s in field.tuple_shapes)
        )
        return segment_layout(field.view, part_ends + [n + e for e in part_ends] + [2 * n + 1] + param_ends)

    # A user forward norm on y and adj_y; the RMS of the t-adjoint and parameter segments.
    ends = [n, 2 * n, 2 * n + 1] + param_ends
    from_kernel = len(ends) <= MAX_KERNEL_SEGMENTS

    def mixed(flat: Tensor, segments: list[float] | None) -> float:
        rest = (segments if from_kernel else segment_rms(flat, ends))[2:]
        y_norm = float(norm.state_norm(flat[:n].view(field.leaf_shape)))
        adj_norm = float(norm.state_norm(flat[n : 2 * n].view(field.leaf_shape)))
        return nan_max([y_norm, adj_norm, *rest])

    return StateLayout(field.view, ends if from_kernel else [], norm=mixed, per_segment=from_kernel)


def wrap_user_adjoint_norm(
    norm: Callable[[Any], Any], tuple_shapes: list[torch.Size]
) -> Callable[[tuple[Tensor, ...]], Any]:
    """torchdiffeq hands a user's adjoint norm of a tuple state `(t, *y, *adj_y, *adj_params)`."""

    def tuple_norm(tensors: tuple[Tensor, ...]) -> Any:
        t, y, adj_y, *adj_params = tensors
        return norm((t, *_flat_to_shape(y, tuple_shapes), *_flat_to_shape(adj_y, tuple_shapes), *adj_params))

    return tuple_norm
