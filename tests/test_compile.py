"""torch.compile of models that contain a solve: outputs and gradients equal eager's.

A fixed-grid explicit method traces whole (fullgraph=True: any graph break raises), its times a
tensor read when tracing or host floats (HostTimes); every other solve, and odeint_adjoint, runs
eagerly as one graph break. Most cases compile with the aot_eager backend (dynamo and
AOTAutograd, which decide traceability and the gradients), one forward with inductor. The ops
themselves are checked by torch.library.opcheck in test_ops_rk.py and test_ops_batch.py.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import flashode
from flashode.odeint import HostTimes

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=F64)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return torch.tanh(self.lin(y)) * (1 + t)


class ODEModel(nn.Module):
    """A solve between two layers, its output times a buffer (or host floats)."""

    def __init__(
        self, times: list[float], method: str, options: dict[str, Any] | None = None,
        solve: Callable[..., Any] = flashode.odeint, host_times: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encode = nn.Linear(3, 3, dtype=F64)
        self.func = Field()
        self.register_buffer("t", torch.tensor(times, dtype=F64))
        self.times = tuple(times)
        self.method, self.options, self.solve, self.host_times = method, options, solve, host_times

    def forward(self, x: Tensor) -> Tensor:
        t = HostTimes(self.times) if self.host_times else self.t
        ys = self.solve(self.func, self.encode(x), t, method=self.method, options=self.options, rtol=1e-6, atol=1e-8)
        return ys.square().sum(-1)


def outputs_and_grads(model: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor) -> list[Tensor]:
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = fn(x)
    out.sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


def assert_compiled_matches_eager(model: nn.Module, backend: str = "aot_eager", **compile_kwargs: Any) -> None:
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    eager = outputs_and_grads(model, model, x)
    compiled = outputs_and_grads(model, torch.compile(model, backend=backend, **compile_kwargs), x)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- fixed grid: one graph


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "heun3"])
def test_fixed_grid_traces_whole_with_t_a_buffer(method: str) -> None:
    assert_compiled_matches_eager(ODEModel([0.0, 0.3, 1.0], method), fullgraph=True)


@pytest.mark.parametrize(
    ("times", "options"),
    [
        pytest.param([0.0, 0.35, 1.0], dict(step_size=0.25), id="step_size"),
        pytest.param([1.0, 0.6, -0.2], dict(step_size=0.3), id="step_size-decreasing"),
        pytest.param([0.0, 0.5], dict(step_size=0.25, interp="cubic", perturb=True), id="cubic-perturb"),
    ],
)
def test_fixed_grid_options_trace_whole(times: list[float], options: dict[str, Any]) -> None:
    assert_compiled_matches_eager(ODEModel(times, "rk4", options), fullgraph=True)


def test_fixed_grid_compiles_once_and_reruns_without_recompiling() -> None:
    model = ODEModel([0.0, 0.5, 1.0], "midpoint")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for seed in range(3):
        x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-14)
    assert counter.frame_count == 1


def test_fixed_grid_under_no_grad_matches_eager() -> None:
    # Without grad the solver reuses its stage buffers, written in place.
    model = ODEModel([0.0, 0.5, 1.0], "rk4", dict(step_size=0.25))
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), model(x))


def test_host_times_trace_whole_and_recompile_when_changed() -> None:
    model = ODEModel([0.0, 0.5, 1.0], "midpoint", host_times=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-14)
        model.times = (0.0, 0.25, 2.0)  # host floats are guarded: a new graph, not a stale one
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solve", [flashode.odeint, flashode.odeint_adjoint])
def test_host_times_solve_like_tensor_times(solve: Callable[..., Any]) -> None:
    x = torch.ones(2, 3, dtype=F64)
    with_tensor = ODEModel([1.0, 0.4, 0.0], "dopri5", solve=solve)
    with_floats = ODEModel([1.0, 0.4, 0.0], "dopri5", solve=solve, host_times=True)
    expected = outputs_and_grads(with_tensor, with_tensor, x)
    for got, want in zip(outputs_and_grads(with_floats, with_floats, x), expected, strict=True):
        assert torch.equal(got, want)


def test_changed_t_raises_instead_of_using_the_traced_times() -> None:
    model = ODEModel([0.0, 0.5, 1.0], "euler")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, dtype=F64)
    compiled(x)
    model.t.copy_(torch.tensor([0.0, 0.5, 2.0]))
    with pytest.raises(RuntimeError, match="t no longer holds the times it held when the graph was traced"):
        compiled(x)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_non_finite_state_raises_inside_the_compiled_graph(backend: str) -> None:
    # Forward only: inductor compiles a backward graph slowly on a few cores, and which graphs
    # AOTAutograd makes (the gradients) is the aot_eager tests' business.
    def solve(y0: Tensor) -> Tensor:
        t = torch.tensor([0.0, 1.0], dtype=F64)
        return flashode.odeint(lambda t, y: y * y, y0, t, method="euler", options=dict(step_size=0.5))

    compiled = torch.compile(solve, backend=backend, fullgraph=True)
    y0 = torch.full((2,), 0.5, dtype=F64)
    torch.testing.assert_close(compiled(y0), solve(y0), rtol=1e-12, atol=0)
    # No host read to break the graph: the check runs inside it, with eager's message.
    with pytest.raises(RuntimeError, match=r"non-finite values in the state at t=1 \(fixed step dt=0.5"):
        compiled(torch.full((2,), 1e300, dtype=F64))


# ----------------------------------------------------------------------------- host-driven: one graph break


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_adaptive_solve_gives_eagers_outputs_and_gradients(method: str) -> None:
    assert_compiled_matches_eager(ODEModel([0.0, 0.3, 1.0], method))


def test_adjoint_gives_eagers_outputs_and_gradients() -> None:
    assert_compiled_matches_eager(ODEModel([0.0, 0.3, 1.0], "dopri5", solve=flashode.odeint_adjoint))


@pytest.mark.parametrize("method", ["dopri5", "implicit_euler"])
def test_host_driven_solve_is_one_graph_break_without_recompiling(method: str) -> None:
    # Traced, every step's host read would break the graph and every new step size recompile.
    model = ODEModel([0.0, 0.5, 1.0], method, None if method == "dopri5" else dict(step_size=0.25))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for seed in range(3):
        x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-14)
    assert counter.frame_count <= 2  # the graphs before and after the solve


def test_adaptive_solve_under_fullgraph_names_the_fixed_grid_methods() -> None:
    with pytest.raises(torch._dynamo.exc.Unsupported, match="fullgraph=True.*euler, midpoint, heun2, heun3 or rk4"):
        torch.compile(ODEModel([0.0, 1.0], "dopri5"), backend="aot_eager", fullgraph=True)(torch.ones(3, dtype=F64))


def test_progress_is_off_in_a_traced_solve(capsys: pytest.CaptureFixture[str]) -> None:
    model = ODEModel([0.0, 1.0], "rk4", dict(step_size=0.5, progress=True))
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        assert capsys.readouterr().err == ""
        torch.testing.assert_close(compiled, ODEModel([0.0, 1.0], "rk4", dict(step_size=0.5))(x))


# ----------------------------------------------------------------------------- the nn layers


def layer_model(method: str, gradient: str = "autograd", options: dict[str, Any] | None = None) -> nn.Module:
    from flashode.nn import NeuralODE

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 3, dtype=F64),
        NeuralODE(Field(), torch.linspace(0.0, 1.0, 4, dtype=F64), method=method, options=options,
                  gradient=gradient, rtol=1e-6, atol=1e-8),
        nn.Linear(3, 1, dtype=F64),
    )


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_model_with_a_fixed_grid_neural_ode_compiles_fullgraph(method: str) -> None:
    assert_compiled_matches_eager(layer_model(method, options=dict(step_size=0.1)), fullgraph=True)


@pytest.mark.parametrize("gradient", ["autograd", "adjoint"])
def test_model_with_an_adaptive_neural_ode_compiles_with_graph_breaks(gradient: str) -> None:
    model = layer_model("dopri5", gradient)
    assert_compiled_matches_eager(model)
    assert model[1].nfe_forward > 0
