"""odeint_adjoint: gradients against backprop through odeint, finite differences and torchdiffeq's
adjoint semantics (options, norms, callbacks, errors), and the constant-memory property."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import flashode
import pytest
import torch
from problems import ADAPTIVE, FIXED, FIXED_ORDER

F64 = torch.float64


class Linear(torch.nn.Module):
    """y' = A y with a trainable rotation-plus-decay A."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.a.T


class Sine(torch.nn.Module):
    """y' = sin(w t + phase) * y + c: non-autonomous, so the t-adjoint is non-trivial."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.3, dtype=F64))
        self.phase = torch.nn.Parameter(torch.tensor([0.2, -0.4, 0.7], dtype=F64))
        self.c = torch.nn.Parameter(torch.tensor(0.1, dtype=F64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w * t + self.phase) * y + self.c


class MLP(torch.nn.Module):
    def __init__(self, width: int = 16, dim: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, dim)
        ).to(F64)
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.net(y)


def make_problem(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    if name == "linear":
        return Linear(), torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    if name == "sine":
        return Sine(), torch.tensor([0.5, 1.0, -0.3], dtype=F64), torch.tensor([0.0, 0.3, 0.8], dtype=F64)
    torch.manual_seed(1)
    return MLP(), torch.randn(3, 2, dtype=F64), torch.tensor([0.0, 0.5, 1.0], dtype=F64)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    # Weights every output time differently, so each reset adds a distinct dL/dy(t_i).
    w = torch.arange(1, out.shape[0] + 1, dtype=out.dtype).view(-1, *([1] * (out.dim() - 1)))
    return (w * out.pow(2)).sum() + out[..., 0].sum()


def gradients(solve, func, y0, t, **kwargs) -> list[torch.Tensor]:
    y0 = y0.detach().requires_grad_()
    t = t.detach().requires_grad_(t.requires_grad)
    params = list(func.parameters())
    out = solve(func, y0, t, **kwargs)
    inputs = [y0, *params] + ([t] if t.requires_grad else [])
    return list(torch.autograd.grad(loss_of(out), inputs))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def fixed_options(method: str) -> dict:
    # Optimise-then-discretise differs from discretise-then-optimise by O(h^p): steps small
    # enough for both to agree to 1e-5 on these problems.
    return {"step_size": {1: 4e-6, 2: 1e-3, 3: 1e-2, 4: 1e-2}[FIXED_ORDER[method]]}


@pytest.mark.parametrize("method", ADAPTIVE + FIXED)
@pytest.mark.parametrize("problem", ["linear", "sine", "mlp"])
def test_adjoint_matches_backprop(problem: str, method: str) -> None:
    func, y0, t = make_problem(problem)
    if method == "euler":
        # First order needs h = 4e-6 for 1e-5, so a short span keeps the steps few; away from t=0
        # so that no gradient (sine's dL/dw grows with t) is itself small against the O(h) error.
        t = torch.tensor([1.0, 1.02], dtype=F64)
    if method == "adaptive_heun":
        t = t * 0.1  # second order at rtol 1e-9: ~10^4 steps per unit time
    kwargs = dict(method=method, rtol=1e-9, atol=1e-12)
    if method in FIXED:
        kwargs["options"] = fixed_options(method)
    expected = gradients(flashode.odeint, func, y0, t, **kwargs)
    actual = gradients(flashode.odeint_adjoint, func, y0, t, **kwargs)
    for a, e in zip(actual, expected):
        assert rel_diff(a, e) <= 1e-5


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_adjoint_decreasing_time_matches_backprop(method: str) -> None:
    func, y0, t = make_problem("sine")
    t = t.flip(0)
    kwargs = dict(method=method, rtol=1e-10, atol=1e-12, options=None if method == "dopri5" else {"step_size": 0.005})
    expected = gradients(flashode.odeint, func, y0, t, **kwargs)
    actual = gradients(flashode.odeint_adjoint, func, y0, t, **kwargs)
    for a, e in zip(actual, expected):
        assert rel_diff(a, e) <= 1e-5


@pytest.mark.parametrize("decreasing", [False, True])
def test_time_gradients_match_finite_differences(decreasing: bool) -> None:
    func, y0, t = make_problem("sine")
    if decreasing:
        t = t.flip(0)
    t = t.clone().requires_grad_()
    grads = gradients(flashode.odeint_adjoint, func, y0, t, rtol=1e-11, atol=1e-12)
    dt = grads[-1]

    def loss_at(times: torch.Tensor) -> float:
        # Steps land on the output times, so no interpolation error enters the differences.
        with torch.no_grad():
            out = flashode.odeint(func, y0, times, rtol=1e-12, atol=1e-13, options={"step_t": times})
            return float(loss_of(out))

    eps = 1e-5
    for i in range(len(t)):
        bump = torch.zeros_like(t)
        bump[i] = eps
        fd = (loss_at(t.detach() + bump) - loss_at(t.detach() - bump)) / (2 * eps)
        assert dt[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-7)


def test_tuple_state_matches_backprop() -> None:
    class Coupled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor([0.7, -0.3], dtype=F64))

        def forward(self, t, state):
            x, v = state
            return v.sum() * self.k[0], -torch.sin(x) * self.k[1] * torch.ones_like(v) - 0.1 * v

    func = Coupled()
    x0 = torch.tensor(0.4, dtype=F64, requires_grad=True)
    v0 = torch.tensor([[0.5, -0.2], [0.1, 0.3]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.6, 1.5], dtype=F64)

    def grads(solve):
        x, v = solve(func, (x0, v0), t, rtol=1e-10, atol=1e-12)
        loss = x.pow(2).sum() + (v * v.detach().sign()).sum()
        return torch.autograd.grad(loss, [x0, v0, func.k])

    for a, e in zip(grads(flashode.odeint_adjoint), grads(flashode.odeint)):
        assert a.shape == e.shape
        assert rel_diff(a, e) <= 1e-5


def test_matches_torchdiffeq_adjoint() -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func, y0, t = make_problem("mlp")
    kwargs = dict(rtol=1e-8, atol=1e-10, adjoint_options=dict(norm="seminorm"))
    actual = gradients(flashode.odeint_adjoint, func, y0, t, **kwargs)
    expected = gradients(torchdiffeq.odeint_adjoint, func, y0, t, **kwargs)
    for a, e in zip(actual, expected):
        assert rel_diff(a, e) <= 1e-5


def test_unused_parameters_get_zero_gradients() -> None:
    func = Linear()
    func.unused = torch.nn.Parameter(torch.ones(3, dtype=F64))
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    out = flashode.odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=F64))
    out.sum().backward()
    assert func.unused.grad is not None and torch.equal(func.unused.grad, torch.zeros(3, dtype=F64))
    assert func.a.grad.abs().sum() > 0


def test_explicit_params_and_no_params() -> None:
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    out = flashode.odeint_adjoint(lambda t, y: -w * y, y0, t, adjoint_params=(w,), rtol=1e-10, atol=1e-12)
    gw, gy0 = torch.autograd.grad(out[-1].sum(), [w, y0])
    # y(1) = y0 e^{-w}: d/dw sum = -sum(y0) e^{-w}, d/dy0 = e^{-w}
    assert gw.item() == pytest.approx(-3.0 * math.exp(-0.5), rel=1e-8)
    assert torch.allclose(gy0, torch.full((2,), math.exp(-0.5), dtype=F64), rtol=1e-8)

    out = flashode.odeint_adjoint(lambda t, y: -y, y0, t, adjoint_params=())
    (g,) = torch.autograd.grad(out[-1].sum(), [y0])
    assert torch.allclose(g, torch.full((2,), math.exp(-1.0), dtype=F64), rtol=1e-6)


def test_func_independent_of_state() -> None:
    # f does not depend on y (or on anything requiring grad): every product is zero.
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    out = flashode.odeint_adjoint(lambda t, y: torch.ones_like(y), y0, t, adjoint_params=())
    (g,) = torch.autograd.grad(out[-1].sum(), [y0])
    assert torch.equal(g, torch.ones(2, dtype=F64))


def test_float32() -> None:
    func, y0, t = make_problem("mlp")
    func = func.float()
    y0 = y0.float().requires_grad_()
    out = flashode.odeint_adjoint(func, y0, t.float(), rtol=1e-6, atol=1e-8)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(loss_of(out), [y0, *func.parameters()])
    backprop = flashode.odeint(func, y0, t.float(), rtol=1e-6, atol=1e-8)
    expected = torch.autograd.grad(loss_of(backprop), [y0, *func.parameters()])
    for a, e in zip(grads, expected):
        assert a.dtype == torch.float32
        assert rel_diff(a, e) <= 1e-3


def test_different_adjoint_method() -> None:
    func, y0, t = make_problem("sine")
    expected = gradients(flashode.odeint, func, y0, t, rtol=1e-10, atol=1e-12)
    actual = gradients(
        flashode.odeint_adjoint, func, y0, t, method="dopri5", options={"max_num_steps": 10**6},
        adjoint_method="rk4", adjoint_options={"step_size": 0.002}, rtol=1e-10, atol=1e-12,
    )
    for a, e in zip(actual, expected):
        assert rel_diff(a, e) <= 1e-5


def test_func_using_a_graph_built_outside_it() -> None:
    # A hypernetwork-style weight computed before the solve: every evaluation backpropagates
    # through the same outside graph node to the adjoint parameter.
    w = torch.tensor([[0.3, -1.2], [0.8, 0.1]], dtype=F64, requires_grad=True)

    class Field(torch.nn.Module):
        def forward(self, t, y):
            return y @ self.weight.T

    func = Field()
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    grads = []
    for solve, kwargs in ((flashode.odeint_adjoint, {"adjoint_params": (w,)}), (flashode.odeint, {})):
        func.weight = torch.tanh(w)
        out = solve(func, y0, t, rtol=1e-10, atol=1e-12, **kwargs)
        grads.append(torch.autograd.grad(loss_of(out), [w])[0])
    assert rel_diff(grads[0], grads[1]) <= 1e-8


def test_many_parameter_tensors_beyond_the_kernel_segment_limit() -> None:
    # 300 parameter tensors: more norm segments than the kernel takes, so the norm moves to Python.
    params = [torch.tensor(0.01 * (i % 7 - 3), dtype=F64, requires_grad=True) for i in range(300)]

    def func(t, y):
        return -y * (1.0 + torch.stack(params).sum())

    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    expected = torch.autograd.grad(flashode.odeint(func, y0, t, rtol=1e-10, atol=1e-12)[-1].sum(), [y0, params[0]])
    for options in (None, {"norm": lambda y: y.abs().max()}):
        out = flashode.odeint_adjoint(func, y0, t, rtol=1e-10, atol=1e-12, options=options, adjoint_params=params)
        actual = torch.autograd.grad(out[-1].sum(), [y0, params[0]])
        for a, e in zip(actual, expected):
            assert rel_diff(a, e) <= 1e-6


def test_odeint_tuple_state_beyond_the_kernel_segment_limit() -> None:
    y0 = tuple(torch.full((2,), float(i + 1), dtype=F64) for i in range(300))
    out = flashode.odeint(lambda t, ys: tuple(-y for y in ys), y0, torch.tensor([0.0, 1.0], dtype=F64))
    assert len(out) == 300
    assert torch.allclose(out[17][-1], torch.full((2,), 18 * math.exp(-1.0), dtype=F64), rtol=1e-6)


def test_adjoint_grid_constructor_sees_the_augmented_problem_like_torchdiffeq() -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func, y0, t = make_problem("sine")

    def run(solve):
        seen = []

        def grid(f, state, times):
            # torchdiffeq: the augmented dynamics over its flat state [t_adj, y, adj_y, params], at
            # the interval's starting state. (Its func and times are in its internal, reversed time
            # frame; flashode's in user time: only the state is compared.)
            assert f(times[0], state).shape == state.shape
            seen.append((state.shape, float(state[1:4].sum()), float(state[4:7].sum())))
            return torch.linspace(float(times[0]), float(times[-1]), 41, dtype=times.dtype)

        grads = gradients(solve, func, y0, t, adjoint_method="rk4", adjoint_options={"grid_constructor": grid})
        return seen, grads

    (seen, grads), (seen_tdq, grads_tdq) = run(flashode.odeint_adjoint), run(torchdiffeq.odeint_adjoint)
    assert len(seen) == len(seen_tdq) == 2
    for (shape, y_sum, a_sum), (shape_tdq, y_sum_tdq, a_sum_tdq) in zip(seen, seen_tdq):
        assert shape == shape_tdq
        assert y_sum == pytest.approx(y_sum_tdq, rel=1e-9) and a_sum == pytest.approx(a_sum_tdq, rel=1e-9)
    for a, e in zip(grads, grads_tdq):
        assert rel_diff(a, e) <= 1e-9


def test_seminorm_string_set_on_the_node_is_explained() -> None:
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    out = flashode.odeint_adjoint(Linear(), y0, torch.tensor([0.0, 1.0], dtype=F64))
    out.grad_fn.adjoint_options["norm"] = "seminorm"
    with pytest.raises(TypeError, match="pass adjoint_options=dict\\(norm='seminorm'\\)"):
        out.sum().backward()


# --------------------------------------------------------------------------- options and norms


def test_seminorm_takes_fewer_backward_evaluations() -> None:
    func = MLP(width=256)
    y0 = torch.tensor([[1.0, 2.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    counts, grads = {}, {}
    for name, adjoint_options in (("default", None), ("seminorm", {"norm": "seminorm"})):
        out = flashode.odeint_adjoint(func, y0, t, rtol=1e-8, atol=1e-8, adjoint_options=adjoint_options)
        func.nfe = 0
        grads[name] = torch.autograd.grad(out.sum(), list(func.parameters()))
        counts[name] = func.nfe
    assert counts["seminorm"] < counts["default"]
    for a, e in zip(grads["seminorm"], grads["default"]):
        assert rel_diff(a, e) <= 1e-5


def _expected_norm(tensors, seminorm: bool) -> torch.Tensor:
    t, y, adj_y, *params = tensors
    values = [t.abs(), y.pow(2).mean().sqrt(), adj_y.pow(2).mean().sqrt()]
    if not seminorm:
        values += [p.pow(2).mean().sqrt() for p in params]
    return max(values)


@pytest.mark.parametrize("adjoint_options,seminorm", [(None, False), ({}, False), ({"norm": "seminorm"}, True)])
def test_adjoint_norm_on_grad_fn_can_be_inspected_and_replaced(adjoint_options, seminorm) -> None:
    params = (torch.rand(7, dtype=F64, requires_grad=True), torch.rand((), dtype=F64, requires_grad=True))
    x0 = torch.full((2, 2), 1.0, dtype=F64)
    out = flashode.odeint_adjoint(
        lambda t, x: x, x0, torch.tensor([0.0, 1.0], dtype=F64), adjoint_params=params,
        adjoint_options=adjoint_options,
    )
    options = out.grad_fn.adjoint_options
    built = options["norm"]
    sample = (torch.tensor(-0.3, dtype=F64), torch.randn(2, 2, dtype=F64), torch.randn(2, 2, dtype=F64),
              torch.randn(7, dtype=F64), torch.tensor(2.5, dtype=F64))
    value = built(sample)
    assert isinstance(value, torch.Tensor) and value.shape == ()
    assert value.item() == pytest.approx(_expected_norm(sample, seminorm).item())

    calls = []

    def spy(tensors):
        calls.append([x.shape for x in tensors])
        return built(tensors)

    options["norm"] = spy  # torchdiffeq's tests replace the norm on the node before backward
    out.sum().backward()
    assert calls and calls[0] == [(), (2, 2), (2, 2), (7,), ()]


def _max_norm(y):
    return max(p.abs().max() for p in (y if isinstance(y, tuple) else (y,)))


@pytest.mark.parametrize("forward_norm", [None, _max_norm])
@pytest.mark.parametrize("seminorm", [False, True])
@pytest.mark.parametrize("tuple_state", [False, True])
def test_fused_adjoint_norm_equals_the_python_norm(tuple_state, seminorm, forward_norm) -> None:
    # The error ratio the solver gets from rk_finalize's segments (or per-segment values with a
    # user forward norm) equals AdjointNorm called on torchdiffeq's tuple view of the scaled error.
    from flashode._augmented import AdjointNorm, AugmentedDynamics, adjoint_layout
    from flashode._func import _flat_to_shape
    from flashode.solvers.common import ErrorNorm

    torch.manual_seed(0)
    params = (torch.randn(7, dtype=F64), torch.randn((), dtype=F64), torch.randn(3, 2, dtype=F64))
    if tuple_state:
        shapes = [torch.Size([]), torch.Size([2, 2])]
        y0 = torch.randn(5, dtype=F64)
    else:
        shapes = None
        y0 = torch.randn(3, 2, dtype=F64)
    field = AugmentedDynamics(lambda t, y: y, y0, shapes, params, False, -1.0)

    def shape(flat):
        return flat.view(y0.shape) if shapes is None else _flat_to_shape(flat, shapes)

    norm = AdjointNorm(forward_norm, shape, seminorm)
    layout = adjoint_layout(norm, field)
    error_norm = ErrorNorm(
        torch.tensor(1e-3, dtype=F64), torch.tensor(1e-4, dtype=F64), layout.segment_ends, layout.norm,
        layout.per_segment,
    )
    x = torch.randn(field.size, dtype=F64)
    k = torch.randn(7, field.size, dtype=F64) * torch.logspace(-3, 1, field.size, dtype=F64)
    b, b_error = [0.1] * 7, [0.02, -0.01, 0.0, 0.03, -0.02, 0.01, 0.005]
    y1, err, ratio_t = flashode._ops.rk_finalize(
        x, k, b, b_error, 0.3, error_norm.rtol, error_norm.atol, error_norm.segment_ends,
        error_norm.custom is not None, error_norm.per_segment,
    )
    fused = error_norm.ratio(ratio_t, err, x, y1)
    _, full_err, _ = flashode._ops.rk_finalize(
        x, k, b, b_error, 0.3, error_norm.rtol, error_norm.atol, [], True, False
    )
    scaled = full_err / (1e-4 + 1e-3 * torch.maximum(x.abs(), y1.abs()))
    assert fused == pytest.approx(float(norm(field.view(scaled))), rel=1e-12)


def test_user_adjoint_norm_for_tuple_state() -> None:
    shapes = []

    def adjoint_norm(tensors):
        shapes.append([x.shape for x in tensors])
        return max(x.abs().max() for x in tensors)

    p = torch.rand(7, dtype=F64, requires_grad=True)
    x0 = (torch.tensor(1.0, dtype=F64), torch.tensor([[0.5, 0.5], [0.1, 0.1]], dtype=F64))
    xs = flashode.odeint_adjoint(
        lambda t, x: (x[0] * p.sum(), x[1]), x0, torch.tensor([0.0, 1.0], dtype=F64), adjoint_params=(p,),
        adjoint_options={"norm": adjoint_norm},
    )
    xs[0].sum().backward()
    assert shapes[0] == [(), (), (2, 2), (), (2, 2), (7,)]


def test_forward_custom_norm_is_used_on_state_parts_of_the_adjoint() -> None:
    seen = []

    def norm(y):
        seen.append(y.shape)
        return y.abs().max()

    func, y0, t = make_problem("mlp")
    out = flashode.odeint_adjoint(func, y0, t, options={"norm": norm}, rtol=1e-6, atol=1e-8)
    forward_calls = len(seen)
    expected = gradients(flashode.odeint, func, y0, t, options={"norm": norm}, rtol=1e-9, atol=1e-12)
    out_grads = torch.autograd.grad(loss_of(out), [*func.parameters()])
    assert len(seen) > forward_calls and set(seen) == {y0.shape}
    for a, e in zip(out_grads, expected[1:]):
        assert rel_diff(a, e) <= 1e-3


def test_adjoint_callbacks() -> None:
    class F(Linear):
        def __init__(self) -> None:
            super().__init__()
            self.forward_steps = self.adjoint_steps = self.adjoint_accepts = 0

        def callback_step(self, t, y, dt):
            self.forward_steps += 1

        def callback_step_adjoint(self, t, y, dt):
            self.adjoint_steps += 1
            assert isinstance(y, tuple) and len(y) == 4 and y[0].shape == () and y[1].shape == (2,)

        def callback_accept_step_adjoint(self, t, y, dt):
            self.adjoint_accepts += 1

    f = F()
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    out = flashode.odeint_adjoint(f, y0, torch.tensor([0.0, 1.0], dtype=F64))
    steps = f.forward_steps
    out.sum().backward()
    assert steps > 0 and f.forward_steps == steps
    assert f.adjoint_steps > 0 and 0 < f.adjoint_accepts <= f.adjoint_steps


# --------------------------------------------------------------------------- errors


def test_non_module_func_needs_adjoint_params() -> None:
    with pytest.raises(ValueError, match="adjoint_params=\\(\\)"):
        flashode.odeint_adjoint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))


def test_adjoint_method_with_options_needs_adjoint_options() -> None:
    with pytest.raises(ValueError, match="adjoint_options"):
        flashode.odeint_adjoint(
            Linear(), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]), method="dopri5",
            options={"max_num_steps": 100}, adjoint_method="rk4",
        )


def test_per_element_adjoint_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="adjoint_rtol must be a scalar"):
        flashode.odeint_adjoint(
            Linear(), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]), rtol=torch.tensor([1e-6, 1e-7])
        )


def test_frozen_parameter_with_custom_norm_warns() -> None:
    func = Linear()
    func.frozen = torch.nn.Parameter(torch.ones(2, dtype=F64), requires_grad=False)
    with pytest.warns(UserWarning, match="without requiring gradient"):
        flashode.odeint_adjoint(
            func, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]), adjoint_options={"norm": lambda x: x[0].abs()}
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashode.odeint_adjoint(func, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]))


def test_backward_failure_names_the_time() -> None:
    class BadJacobian(torch.nn.Module):
        """Fine forward; under grad (the adjoint's evaluations) it turns non-finite before t=0.5."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))

        def forward(self, t, y):
            if torch.is_grad_enabled() and t < 0.5:
                return self.w * y * math.inf
            return -self.w * y

    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    out = flashode.odeint_adjoint(BadJacobian(), y0, torch.tensor([0.0, 1.0], dtype=F64))
    with pytest.raises(flashode.SolverError, match=r"backward \(adjoint\) solve failed.* at t=0\.5"):
        out.sum().backward()


# --------------------------------------------------------------------------- memory


def test_backward_memory_does_not_grow_with_steps() -> None:
    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")):
        pytest.skip("peak resident memory is read from Linux /proc")
    probe = os.path.join(os.path.dirname(__file__), "adjoint_memory_probe.py")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, probe], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    short, long = report["adjoint"]
    assert long["backward_nfe"] >= 10 * short["backward_nfe"]
    # At least the solver's two 7-stage buffers of (y, dL/dy): the probe does measure the solve.
    assert short["peak_bytes"] > 2 * 7 * 2 * 8 * report["state_numel"]
    assert long["peak_bytes"] < 1.10 * short["peak_bytes"], report
    # The measurement can fail: backprop through odeint keeps every step and grows with them.
    stored_short, stored_long = report["backprop"]
    assert stored_long["peak_bytes"] > 3 * stored_short["peak_bytes"], report


class _CountCalls:
    """Counts func evaluations through a forward pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1

    def stop(self) -> int:
        self.handle.remove()
        return self.count


# --------------------------------------------------------------------------- CUDA

@pytest.mark.parametrize("seminorm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_adjoint_matches_cpu(dtype, seminorm) -> None:
    func, y0, t = make_problem("mlp")
    options = {"norm": "seminorm"} if seminorm else None
    rtol, atol, tol = (1e-9, 1e-12, 1e-7) if dtype == F64 else (1e-5, 1e-7, 1e-3)
    cpu = gradients(flashode.odeint_adjoint, func.to(dtype), y0.to(dtype), t.to(dtype), rtol=rtol, atol=atol,
                    adjoint_options=options)
    gpu = gradients(flashode.odeint_adjoint, func.cuda(), y0.to("cuda", dtype), t.to("cuda", dtype), rtol=rtol,
                    atol=atol, adjoint_options=options)
    for a, e in zip(gpu, cpu):
        assert rel_diff(a.cpu(), e) <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backward_memory_does_not_grow_with_steps() -> None:
    func = Linear().cuda()
    y0 = torch.randn(250_000, 2, dtype=F64, device="cuda")
    peaks, nfes = {}, {}
    for span in (1.0, 12.0):
        y = y0.clone().requires_grad_()
        t = torch.tensor([0.0, span], dtype=F64, device="cuda")
        out = flashode.odeint_adjoint(func, y, t, rtol=1e-5, atol=1e-7)
        loss = out[-1].pow(2).sum()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        counter = _CountCalls(func)
        torch.autograd.grad(loss, [y, func.a])
        torch.cuda.synchronize()
        nfes[span] = counter.stop()
        peaks[span] = torch.cuda.max_memory_allocated() - base
        del out, loss
    assert nfes[12.0] >= 10 * nfes[1.0]
    assert peaks[12.0] < 1.10 * peaks[1.0], peaks
