"""odeint, odeint_adjoint, solve_ivp and NeuralODE route MLP fields to the fused whole-solve op
(flashode.fused_dispatch): when they do, what they return, and when they do not."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import flashode
from flashode import fused_dispatch
from flashode.errors import SolverError
from flashode.nn import Autonomous, MLPField, NeuralODE

F64 = torch.float64


def field(time: str = "none", activation: str = "tanh", dtype: torch.dtype = F64, seed: int = 0) -> MLPField:
    torch.manual_seed(seed)
    return MLPField(2, 16, 2, activation=activation, time=time).to(dtype)


def sequential(dtype: torch.dtype = F64) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 12), nn.Softplus(), nn.Linear(12, 12), nn.Softplus(), nn.Linear(12, 2)).to(dtype)


@pytest.fixture
def fused_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="flashode")
    return caplog


def ran_fused(log: pytest.LogCaptureFixture) -> bool:
    fused = any("fused MLP solve" in r.getMessage() for r in log.records)
    log.clear()
    return fused


def generic_per_row(func, y0, t, **kwargs):  # type: ignore[no-untyped-def]
    """odeint on each row of y0 alone (its own steps, as the fused solve takes them)."""
    rows = y0.reshape(-1, y0.shape[-1])
    options = dict(kwargs.pop("options", {}), fused=False)
    out = [flashode.odeint(func, row, t, options=options, **kwargs) for row in rows]
    return torch.stack(out, 1).reshape(len(t), *y0.shape)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun"])
@pytest.mark.parametrize("time", ["none", "concat"])
def test_odeint_runs_fused_and_each_row_takes_its_own_odeint_steps(method, time, fused_log) -> None:
    f = field(time)
    y0 = torch.randn(4, 2, dtype=F64)
    t = torch.linspace(0.0, 1.5, 7, dtype=F64)
    out = flashode.odeint(f, y0, t, method=method, rtol=1e-8, atol=1e-10)
    assert ran_fused(fused_log) and out.shape == (7, 4, 2)
    # The network's rounding differs from torch's: the same steps, values equal to ~rounding. odeint's
    # dopri8 interpolates with extra evaluations, the fused op with the method's own dense output.
    close = dict(rtol=1e-5, atol=1e-6) if method == "dopri8" else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out, generic_per_row(f, y0, t, method=method, rtol=1e-8, atol=1e-10), **close)
    # The generic solve of the whole batch (one step size from the RMS over every row) takes other
    # steps; both are within a small multiple of the tolerance of a tight solve.
    shared = flashode.odeint(f, y0, t, method=method, rtol=1e-8, atol=1e-10, options=dict(fused=False))
    assert not ran_fused(fused_log)
    exact = flashode.odeint(f, y0, t, method="dopri8", rtol=1e-13, atol=1e-15, options=dict(fused=False))
    for solution in (out, shared):
        torch.testing.assert_close(solution, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4"])
def test_fixed_grid_with_step_size_equals_the_generic_grid(method, fused_log) -> None:
    f = field("concat")
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.35, 1.0], dtype=F64)
    options = dict(step_size=0.07)
    out = flashode.odeint(f, y0, t, method=method, options=options)
    assert ran_fused(fused_log)
    expected = flashode.odeint(f, y0, t, method=method, options=dict(options, fused=False))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2,), (5, 2), (2, 3, 2)])
def test_leading_dimensions_are_samples_and_decreasing_t_works(shape, fused_log) -> None:
    f = field()
    y0 = torch.randn(shape, dtype=F64)
    t = torch.tensor([1.0, 0.5, -0.5], dtype=F64)
    out = flashode.odeint(f, y0, t, rtol=1e-9, atol=1e-11)
    assert ran_fused(fused_log) and out.shape == (3, *shape)
    torch.testing.assert_close(out[0], y0, rtol=0, atol=0)
    torch.testing.assert_close(out, generic_per_row(f, y0, t, rtol=1e-9, atol=1e-11), rtol=1e-9, atol=1e-11)


def test_per_element_tolerances_are_broadcast_per_row(fused_log) -> None:
    f = field()
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.linspace(0, 1, 4, dtype=F64)
    rtol = torch.tensor([1e-9, 1e-5], dtype=F64)  # broadcasts over y0 (3, 2)
    out = flashode.odeint(f, y0, t, rtol=rtol, atol=1e-10)
    assert ran_fused(fused_log)
    rows = [flashode.odeint(f, y0[i], t, rtol=rtol, atol=1e-10, options=dict(fused=False)) for i in range(3)]
    torch.testing.assert_close(out, torch.stack(rows, 1), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradients_equal_the_generic_paths_for_the_same_steps(adjoint) -> None:
    """One row: the generic odeint takes the fused solve's steps, so backpropagating through it
    gives the gradients of the same discrete solve (the issue: within 1e-6 relative in float64)."""
    f = field("concat", activation="silu")
    y0 = torch.randn(2, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64)
    solve = flashode.odeint_adjoint if adjoint else flashode.odeint
    out = solve(f, y0, t, rtol=1e-7, atol=1e-9)
    grads = torch.autograd.grad(out.square().sum(), [y0, *f.parameters()])
    reference = flashode.odeint(f, y0, t, rtol=1e-7, atol=1e-9, options=dict(fused=False))
    expected = torch.autograd.grad(reference.square().sum(), [y0, *f.parameters()])
    for got, want in zip(grads, expected, strict=True):
        assert float((got - want).norm() / want.norm()) < 1e-6


def test_odeint_adjoint_fused_gradients_match_the_continuous_adjoint_to_its_tolerance() -> None:
    f = field()
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 6, dtype=F64)
    grads = []
    for options in (None, dict(fused=False)):
        out = flashode.odeint_adjoint(f, y0, t, rtol=1e-10, atol=1e-12, options=options)
        grads.append(torch.autograd.grad(out.square().sum(), [y0, *f.parameters()]))
    for fused, continuous in zip(*grads, strict=True):
        torch.testing.assert_close(fused, continuous, rtol=1e-6, atol=1e-8)


class _Solve(nn.Module):
    """odeint of a field as a module, so torch.func.functional_call can substitute its weights."""

    def __init__(self, f: nn.Module, t: torch.Tensor) -> None:
        super().__init__()
        self.f, self.t = f, t

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        return flashode.odeint(self.f, y0, self.t, method="rk4", options=dict(step_size=0.1))


def test_gradcheck_through_odeint_on_a_tiny_field(fused_log) -> None:
    torch.manual_seed(3)
    solve = _Solve(MLPField(2, 3, 1, activation="tanh", time="concat").double(), torch.linspace(0, 0.5, 3, dtype=F64))
    y0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    names = [name for name, _ in solve.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in solve.parameters())

    def run(y0, *params):  # type: ignore[no-untyped-def]
        return torch.func.functional_call(solve, dict(zip(names, params)), (y0,))

    assert torch.autograd.gradcheck(run, (y0, *values))
    assert ran_fused(fused_log)


def test_autonomous_sequential_runs_fused_and_a_bare_one_fails_as_in_torchdiffeq(fused_log) -> None:
    seq = sequential()
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    out = flashode.odeint(Autonomous(seq), y0, t)
    assert ran_fused(fused_log)
    expected = flashode.odeint(lambda t, y: seq(y), y0, t, options=dict(fused=False))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)
    with pytest.raises(TypeError):  # nn.Sequential.forward takes one input: odeint calls f(t, y)
        flashode.odeint(seq, y0, t)
    assert "wrap it in flashode.nn.Autonomous" in fused_dispatch.fused_reason(seq, y0, t)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(method="implicit_euler"), "no fused implementation"),
        (dict(method="rk4"), "numeric options['step_size'] only"),
        (dict(method="rk4", options=dict(step_size=0.1, interp="cubic")), "interpolates linearly"),
        (dict(options=dict(norm=lambda x: x.abs().max())), "options ['norm']"),
        (dict(options=dict(progress=True)), "options ['progress']"),
        (dict(options=dict(max_step=0.1)), "options ['max_step']"),
        (dict(options=dict(fused=False)), "options['fused'] is False"),
    ],
)
def test_calls_the_fused_op_cannot_run_take_the_generic_path_and_say_why(kwargs, reason, fused_log) -> None:
    f = field()
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    assert reason in fused_dispatch.fused_reason(f, y0, t, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `fused` is never an unexpected option to the generic solvers
        flashode.odeint(f, y0, t, **kwargs)
    assert not ran_fused(fused_log)
    options = dict(kwargs.pop("options", {}), fused=True)
    if reason != "options['fused'] is False":
        with pytest.raises(ValueError, match="options\\['fused'\\] is True but the fused MLP solve cannot run"):
            flashode.odeint(f, y0, t, options=options, **kwargs)


def test_other_reasons_for_the_generic_path(fused_log) -> None:
    f = field()
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    reason = fused_dispatch.fused_reason
    assert "differ in dtype" in reason(f, y0.float(), t)
    assert "last dimension" in reason(f, torch.randn(3, 5, dtype=F64), t)
    assert "requires grad" in reason(f, y0, t.clone().requires_grad_(True))
    assert "strictly monotone" in reason(f, y0, torch.tensor([0.0, 1.0, 0.5], dtype=F64))
    assert "adjoint_params" in reason(f, y0, t, adjoint_params=list(f.parameters())[:1])
    f.register_forward_hook(lambda *args: None)
    assert "hooks" in reason(f, y0, t)
    with pytest.raises(AssertionError, match="strictly increasing or decreasing"):  # the generic path's check
        flashode.odeint(field(), y0, torch.tensor([0.0, 1.0, 0.5], dtype=F64))
    with pytest.raises(TypeError, match="options\\['fused'\\] must be True, False or None"):
        flashode.odeint(field(), y0, t, options=dict(fused="yes"))
    with pytest.raises(ValueError, match="no event handling"):
        flashode.odeint(field(), y0, t[:2], event_fn=lambda t, y: y[..., 0], options=dict(fused=True))


def test_a_device_without_a_fused_kernel_takes_the_generic_path(monkeypatch, fused_log) -> None:
    monkeypatch.setattr(flashode._ops, "has_kernel", lambda name, device_type: False)
    f = field()
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    assert "no compiled fused MLP kernel for cpu" in fused_dispatch.fused_reason(f, y0, t)
    flashode.odeint(f, y0, t)
    assert not ran_fused(fused_log)


def test_failures_raise_the_generic_paths_errors_with_the_time_reached() -> None:
    f = field()
    t = torch.linspace(0, 1, 3, dtype=F64)
    y0 = torch.randn(3, 2, dtype=F64)
    with pytest.raises(SolverError, match=r"max_num_steps exceeded .* at t=0\.\d+ \(row 0 of y0"):
        flashode.odeint(f, y0, t, rtol=1e-12, atol=1e-14, options=dict(max_num_steps=2))
    bad = y0.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in the initial state y0 at t=0 \(row 1 of y0"):
        flashode.odeint(f, bad, t)
    with pytest.raises(ValueError, match="non-finite values in the initial state y0"):  # the generic path's too
        flashode.odeint(f, bad, t, options=dict(fused=False))


def test_solve_ivp_dispatches_and_can_be_told_not_to() -> None:
    f = field()
    y0 = torch.randn(6, 2, dtype=F64)
    t_eval = torch.linspace(0, 1, 5, dtype=F64)
    fused = flashode.solve_ivp(f, y0, t_eval, rtol=1e-8, atol=1e-10)
    generic = flashode.solve_ivp(f, y0, t_eval, rtol=1e-8, atol=1e-10, fused=False)
    assert fused.loop_reads == 0 and generic.loop_reads > 0
    torch.testing.assert_close(fused.ys, generic.ys, rtol=1e-9, atol=1e-11)
    assert torch.equal(fused.stats["n_steps"], generic.stats["n_steps"])
    explicit = flashode.fused_mlp.solve_mlp(f, y0, t_eval, rtol=1e-8, atol=1e-10)
    assert torch.equal(fused.ys, explicit.ys)
    with pytest.raises(ValueError, match="fused=True but the fused MLP solve cannot run: y0 must have shape"):
        flashode.solve_ivp(f, y0[:, None], t_eval, fused=True)
    # adjoint=True runs fused too: the discrete solve's gradients.
    y0.requires_grad_(True)
    out = flashode.solve_ivp(f, y0, t_eval, rtol=1e-8, atol=1e-10, adjoint=True)
    assert out.loop_reads == 0
    grad = torch.autograd.grad(out.ys.sum(), y0)[0]
    expected = torch.autograd.grad(flashode.solve_ivp(f, y0, t_eval, rtol=1e-8, atol=1e-10, fused=False).ys.sum(),
                                   y0)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gradient", ["autograd", "adjoint"])
def test_neural_ode_layers_run_fused_and_report_it(gradient) -> None:
    t = torch.linspace(0, 1, 4)
    for vector_field in (MLPField(2, 16, 2, time="concat"), sequential(torch.float32)):
        layer = NeuralODE(vector_field, t, gradient=gradient, rtol=1e-5, atol=1e-7, return_trajectory=True)
        y0 = torch.randn(8, 2, requires_grad=True)
        out = layer(y0)
        assert layer.last_path == "fused" and out.shape == (4, 8, 2)
        grads = torch.autograd.grad(out.square().sum(), [y0, *layer.parameters()])
        assert layer.nfe_forward > 0 and layer.nfe_backward == 0
        generic = NeuralODE(vector_field, t, gradient=gradient, rtol=1e-5, atol=1e-7, return_trajectory=True,
                            options=dict(fused=False))
        expected_out = generic(y0)
        assert generic.last_path == "generic"
        torch.testing.assert_close(out, expected_out, rtol=1e-3, atol=2e-4)  # float32, rtol 1e-5 apart
        expected = torch.autograd.grad(expected_out.square().sum(), [y0, *generic.parameters()])
        for got, want in zip(grads, expected, strict=True):  # float32 solves with different steps
            assert float((got - want).norm() / want.norm()) < 5e-3


def test_neural_ode_under_autocast_keeps_the_generic_path() -> None:
    layer = NeuralODE(MLPField(2, 8, 1), rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(3, 2))
    assert layer.last_path == "generic"


def test_show_config_names_the_fused_path() -> None:
    assert any("fused MLP solve" in line and "cpu" in line for line in flashode._config.config_lines())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_fused_and_too_wide_networks_fall_back(fused_log) -> None:
    f = field(dtype=torch.float32).cuda()
    y0 = torch.randn(300, 2, device="cuda")
    t = torch.linspace(0, 1, 5, device="cuda")
    out = flashode.odeint(f, y0, t, rtol=1e-6, atol=1e-8)
    assert ran_fused(fused_log)
    on_cpu = flashode.odeint(f.cpu(), y0.cpu(), t.cpu(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.cpu(), on_cpu, rtol=1e-4, atol=1e-5)
    wide = MLPField(2, 1024, 8).cuda()
    assert "shared memory" in fused_dispatch.fused_reason(wide, y0, t)
    flashode.odeint(wide, y0[:4], t, rtol=1e-3, atol=1e-4)
    assert not ran_fused(fused_log)
