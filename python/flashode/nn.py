"""Neural ODE layers: `NeuralODE` (an ODE solve as an nn.Module) and `ODEBlock` (the paper's ODE-Net
block, the continuous-depth replacement of a residual block).

A layer owns its vector field (so `.to()`, `state_dict`, `parameters()` and pickling see it as a
submodule) and its integration times (a buffer, so they move with the layer and round-trip through
`state_dict`). Each forward counts the vector field's evaluations: `nfe_forward` for the solve,
`nfe_backward` for the evaluations the backward pass makes (the adjoint's backward solve; zero for
backpropagation through the solver, which replays the recorded evaluations instead of calling the
field again). Chen et al. report these as the model's cost.

The MLP fields the fused whole-solve op runs (`MLPField`, and `Autonomous` to use an nn.Sequential
MLP as f(t, y) with odeint) live in `flashode.fused_mlp` and are exported here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .adjoint import odeint_adjoint
from .fused_dispatch import FusedSolve, try_odeint_fused, without_fused_option
from .fused_mlp import Autonomous, MLPField
from .odeint import odeint

__all__ = ["Autonomous", "MLPField", "NeuralODE", "ODEBlock"]

GRADIENT_MODES = ("autograd", "adjoint")
_HALF = (torch.float16, torch.bfloat16)


def takes_time(vector_field: Callable[..., Any]) -> bool:
    """Whether `vector_field` is called as f(t, y) (two positional arguments) or f(y) (one).

    Decided from the signature of `forward` (modules) or of the callable itself: one required
    positional parameter means f(y) (e.g. an `nn.Sequential`), two or more, or `*args`, mean f(t, y).
    """
    target = vector_field.forward if isinstance(vector_field, nn.Module) else vector_field
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"cannot read the signature of the vector field {vector_field!r} to tell f(t, y) from f(y); "
            "pass time_dependent=True or False"
        ) from error
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) >= 2:
        return True
    if len(required) == 1 or len(positional) >= 1:
        return False
    raise ValueError(
        f"the vector field {vector_field!r} takes no positional argument; it must be f(t, y) or f(y)"
    )


class _CountingField:
    """What the solver calls during one forward: the layer's field as f(t, y), its evaluations
    counted on the layer, and (under autocast) its low-precision output cast back to the state's
    dtype so that the solver's states and error control stay in float32/float64.

    Made afresh per forward and never stored, so the layer stays picklable; calls made after the
    forward returned (the adjoint's backward solve) count as backward evaluations."""

    def __init__(self, layer: NeuralODE) -> None:
        self.layer = layer
        self.field = layer.vector_field
        self.time_dependent = layer.time_dependent
        self.forward_calls = 0
        self.in_forward = True

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        if self.in_forward:
            self.forward_calls += 1
        else:
            self.layer.nfe_backward += 1
        out = self.field(t, y) if self.time_dependent else self.field(y)
        if isinstance(out, Tensor) and out.dtype in _HALF and y.dtype not in _HALF:
            out = out.to(y.dtype)
        return out


class NeuralODE(nn.Module):
    """dy/dt = vector_field(t, y) integrated over `t` as a layer: `forward(y0)` returns y(t[-1]), or
    the whole trajectory (len(t), *y0.shape) with `return_trajectory=True`.

    Args:
        vector_field: an nn.Module or callable, f(t, y) or f(y) (told apart by its signature, see
            `takes_time`; override with `time_dependent`). It must return a tensor shaped like y.
        t: the integration times, increasing or decreasing (default [0, 1]); stored as the buffer
            `t`.
        method, rtol, atol, options: as for `flashode.odeint` (default dopri5, 1e-7, 1e-9).
        gradient: "autograd" backpropagates through the solver's operations (fast, memory grows
            with the steps); "adjoint" uses `flashode.odeint_adjoint` with the field's parameters
            (memory independent of the steps, one backward ODE solve).
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: the adjoint's backward solve,
            as for `odeint_adjoint` (defaults: the forward ones).
        return_trajectory: return y at every time in `t` instead of only the last.
        progress: show a progress bar over the integration interval (`options["progress"]`).
        time_dependent: force f(t, y) (True) or f(y) (False) instead of reading the signature.

    Under `torch.autocast` the field may compute in float16/bfloat16: a half-precision y0 is
    promoted to float32, the field's output is cast back to the state's dtype, and the solver
    integrates in float32 (the returned state is float32). The solve runs on y0's device.
    Attributes after a forward: `nfe_forward`, `nfe_backward` (see the module docstring), and
    `last_path`: "fused" when the solve ran in the fused MLP op (an `MLPField`, or an nn.Sequential
    MLP of y alone, with an explicit RK method; see `flashode.fused_dispatch`: each sample has its
    own steps, gradients are the discrete solve's in both gradient modes, `nfe_forward` is the
    most any sample made and `nfe_backward` stays 0), else "generic". ``options=dict(fused=False)``
    keeps the generic path.

    Under `torch.compile` a fixed-grid explicit method (euler, midpoint, heun2, heun3, rk4) traces
    whole (`fullgraph=True` works); other methods and the adjoint run eagerly as one graph break.
    """

    t: Tensor

    def __init__(
        self,
        vector_field: Callable[..., Any],
        t: Tensor | Sequence[float] = (0.0, 1.0),
        *,
        method: str = "dopri5",
        rtol: float = 1e-7,
        atol: float = 1e-9,
        options: dict[str, Any] | None = None,
        gradient: str = "autograd",
        adjoint_rtol: float | None = None,
        adjoint_atol: float | None = None,
        adjoint_method: str | None = None,
        adjoint_options: dict[str, Any] | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        time_dependent: bool | None = None,
    ) -> None:
        super().__init__()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if not callable(vector_field):
            raise TypeError(f"vector_field must be an nn.Module or a callable, got {type(vector_field).__name__}")
        times = torch.as_tensor(t).detach().clone()
        if not torch.is_floating_point(times):
            times = times.to(torch.get_default_dtype())
        if times.ndim != 1 or len(times) < 2:
            raise ValueError(f"t must be a 1-D sequence of at least two times, got shape {tuple(times.shape)}")
        self.vector_field = vector_field
        self.register_buffer("t", times)
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.options = dict(options or {})
        if progress:
            self.options["progress"] = progress
        self.gradient = gradient
        self.adjoint_rtol = adjoint_rtol
        self.adjoint_atol = adjoint_atol
        self.adjoint_method = adjoint_method
        self.adjoint_options = adjoint_options
        self.return_trajectory = return_trajectory
        self.time_dependent = takes_time(vector_field) if time_dependent is None else bool(time_dependent)
        self.nfe_forward = 0
        self.nfe_backward = 0
        self.last_path = ""

    def forward(self, y0: Tensor, t: Tensor | None = None) -> Tensor:
        """y at the last of the layer's times (or at all of them with `return_trajectory`); `t`
        replaces the layer's times for this call (e.g. a reversed span to run the flow backwards)."""
        if not isinstance(y0, Tensor):
            raise TypeError(f"{type(self).__name__} takes a tensor y0, got {type(y0).__name__}")
        if y0.dtype in _HALF and torch.is_autocast_enabled(y0.device.type):
            y0 = y0.float()
        self.nfe_backward = 0
        t = (self.t if t is None else torch.as_tensor(t, dtype=self.t.dtype)).to(y0.device)
        fused = self._try_fused(y0, t)
        self.last_path = "generic" if fused is None else "fused"
        if fused is not None:
            self.nfe_forward = fused.nfe
            return fused.ys if self.return_trajectory else fused.ys[-1]
        field = _CountingField(self)
        options = without_fused_option(self.options)
        if self.gradient == "adjoint":
            ys = odeint_adjoint(
                field, y0, t, rtol=self.rtol, atol=self.atol, method=self.method, options=options,
                adjoint_rtol=self.adjoint_rtol, adjoint_atol=self.adjoint_atol, adjoint_method=self.adjoint_method,
                adjoint_options=self.adjoint_options, adjoint_params=self._adjoint_params(),
            )
        else:
            ys = odeint(field, y0, t, rtol=self.rtol, atol=self.atol, method=self.method, options=options)
        field.in_forward = False
        self.nfe_forward = field.forward_calls
        return ys if self.return_trajectory else ys[-1]

    def _try_fused(self, y0: Tensor, t: Tensor) -> FusedSolve | None:
        """The forward as one fused MLP solve when the field is one (an MLPField, or an
        nn.Sequential MLP of y alone) and the call allows it (see `flashode.fused_dispatch`); None
        for the generic path. Under autocast the generic path runs, so the field computes in the
        precision asked for."""
        if torch.is_autocast_enabled(y0.device.type):
            return None
        field = self.vector_field
        if not self.time_dependent and type(field) is nn.Sequential:
            field = Autonomous(field)
        elif not (self.time_dependent and type(field) is MLPField):
            return None
        caller = "NeuralODE" if self.gradient == "autograd" else "NeuralODE (adjoint)"
        params = self._adjoint_params() if self.gradient == "adjoint" else None
        return try_odeint_fused(field, y0, t, self.rtol, self.atol, self.method, self.options, caller=caller,
                                adjoint_params=params)

    def _adjoint_params(self) -> tuple[Tensor, ...]:
        return tuple(self.vector_field.parameters()) if isinstance(self.vector_field, nn.Module) else ()

    def extra_repr(self) -> str:
        span = f"t=[{self.t[0].item():g}, {self.t[-1].item():g}]"
        if len(self.t) > 2:
            span += f" ({len(self.t)} times)"
        return f"{span}, method={self.method}, rtol={self.rtol:g}, atol={self.atol:g}, gradient={self.gradient}"


class ODEBlock(NeuralODE):
    """The ODE-Net block of Chen et al.: h(1) from dh/dt = f(t, h) with h(0) the input, replacing a
    residual block h + f(h) in a network. States may have any shape, e.g. images (B, C, H, W).

    Defaults follow the paper's experiments (dopri5, rtol = atol = 1e-3); the other arguments are
    `NeuralODE`'s.
    """

    def __init__(
        self,
        vector_field: Callable[..., Any],
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        if "t" in kwargs or "return_trajectory" in kwargs:
            raise TypeError("ODEBlock integrates over [0, 1] and returns h(1); use NeuralODE for other times")
        super().__init__(vector_field, (0.0, 1.0), method=method, rtol=rtol, atol=atol, **kwargs)
