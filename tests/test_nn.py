"""flashode.nn: NeuralODE and ODEBlock as modules (solve, gradients, NFE counts, moving, saving,
pickling, autocast, composition, errors)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import flashode
from flashode.nn import NeuralODE, ODEBlock, takes_time

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def mlp(dim: int = 2, hidden: int = 16, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(dtype)


class TimeField(nn.Module):
    """f(t, y) = MLP(y) * (1 + t): depends on t, so dropping t would change the answer."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.net = mlp(dtype=dtype)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y) * (1 + t)


class Counting(nn.Module):
    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.field(t, y)


def module_level_field(y: torch.Tensor) -> torch.Tensor:
    return -y


# --- telling f(t, y) from f(y) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, expected",
    [
        (mlp(), False),
        (TimeField(), True),
        (lambda y: -y, False),
        (lambda t, y: -y, True),
        (lambda t, y, scale=2.0: -y, True),
        (lambda *args: -args[-1], True),
        (module_level_field, False),
    ],
)
def test_signature_decides_between_f_of_t_y_and_f_of_y(field, expected) -> None:
    assert takes_time(field) is expected


def test_unreadable_signature_asks_for_time_dependent() -> None:
    class Opaque:
        __signature__ = "not a signature"

        def __call__(self, y):
            return -y

    with pytest.raises(ValueError, match="time_dependent"):
        NeuralODE(Opaque())
    layer = NeuralODE(Opaque(), time_dependent=False)
    y0 = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(layer(y0), y0 * torch.exp(torch.tensor(-1.0, dtype=torch.float64)))


@pytest.mark.parametrize("time_dependent, arity", [(True, 2), (False, 1)])
def test_time_dependent_override_decides_the_call(time_dependent: bool, arity: int) -> None:
    arities: list[int] = []

    def field(*args: torch.Tensor) -> torch.Tensor:
        arities.append(len(args))
        return -args[-1]

    NeuralODE(field, time_dependent=time_dependent)(torch.ones(2))
    assert set(arities) == {arity}


# --- solving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4"])
def test_forward_equals_odeint(method: str) -> None:
    field = TimeField()
    t = torch.linspace(0.0, 1.5, 6, dtype=torch.float64)
    options = dict(step_size=0.05) if method == "rk4" else None
    y0 = torch.randn(4, 2, dtype=torch.float64)
    expected = flashode.odeint(field, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
    final = NeuralODE(field, t, method=method, options=options, rtol=1e-6, atol=1e-8)(y0)
    trajectory = NeuralODE(field, t, method=method, options=options, rtol=1e-6, atol=1e-8, return_trajectory=True)(y0)
    torch.testing.assert_close(final, expected[-1], rtol=0, atol=0)
    torch.testing.assert_close(trajectory, expected, rtol=0, atol=0)


def test_field_of_y_only_is_autonomous_solve() -> None:
    field = mlp()
    t = torch.tensor([1.0, 0.25], dtype=torch.float64)  # decreasing
    y0 = torch.randn(3, 2, dtype=torch.float64)
    generic = NeuralODE(field, t, options=dict(fused=False))
    expected = flashode.odeint(lambda t, y: field(y), y0, t)
    torch.testing.assert_close(generic(y0), expected[-1], rtol=0, atol=0)
    assert generic.last_path == "generic"
    # The same MLP runs fused by default: each sample its own steps, the same answer to the tolerance.
    layer = NeuralODE(field, t)
    torch.testing.assert_close(layer(y0), expected[-1], rtol=1e-6, atol=1e-8)
    assert layer.last_path == "fused"


def test_times_given_to_forward_replace_the_layers_for_one_call() -> None:
    layer = NeuralODE(TimeField(), [0.0, 1.0], return_trajectory=True)
    y0 = torch.randn(3, 2, dtype=torch.float64)
    there = layer(y0)[-1]
    back = layer(there, torch.tensor([1.0, 0.5, 0.0]))
    assert back.shape == (3, 3, 2) and layer.t.tolist() == [0.0, 1.0]
    torch.testing.assert_close(back[-1], y0, rtol=1e-5, atol=1e-6)


def test_exact_solution_of_linear_decay() -> None:
    layer = NeuralODE(nn.Identity(), [0.0, -2.0], rtol=1e-10, atol=1e-12)  # dy/dt = y backwards: y e^-2
    y0 = torch.tensor([1.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(layer(y0), y0 * torch.exp(torch.tensor(-2.0, dtype=torch.float64)), rtol=1e-9, atol=0)


# --- gradients and NFE --------------------------------------------------------------------------


def loss_and_grads(layer: NeuralODE, y0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y0 = y0.clone().requires_grad_()
    loss = (layer(y0) ** 2).sum()
    params = list(layer.parameters())
    return (loss.detach(), *torch.autograd.grad(loss, [y0, *params]))


def test_autograd_and_adjoint_gradients_agree_with_finite_differences() -> None:
    field = TimeField()
    t = torch.tensor([0.0, 0.7], dtype=torch.float64)
    y0 = torch.randn(3, 2, dtype=torch.float64)
    tight = dict(rtol=1e-11, atol=1e-12)
    backprop = loss_and_grads(NeuralODE(field, t, gradient="autograd", **tight), y0)
    adjoint = loss_and_grads(NeuralODE(field, t, gradient="adjoint", **tight), y0)
    for a, b in zip(backprop, adjoint):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    # central differences on one weight entry and one y0 entry
    layer = NeuralODE(field, t, **tight)
    weight = field.net[0].weight
    eps = 1e-6
    with torch.no_grad():
        weight[0, 1] += eps
        up = (layer(y0) ** 2).sum()
        weight[0, 1] -= 2 * eps
        down = (layer(y0) ** 2).sum()
        weight[0, 1] += eps
        bump = torch.zeros_like(y0)
        bump[1, 0] = eps
        y_up, y_down = (layer(y0 + bump) ** 2).sum(), (layer(y0 - bump) ** 2).sum()
    torch.testing.assert_close(backprop[2][0, 1], (up - down) / (2 * eps), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(backprop[1][1, 0], (y_up - y_down) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_nfe_forward_and_backward_are_the_fields_calls() -> None:
    counting = Counting(TimeField())
    y0 = torch.randn(5, 2, dtype=torch.float64)
    autograd_layer = NeuralODE(counting, [0.0, 1.0])
    out = autograd_layer(y0)
    assert autograd_layer.nfe_forward == counting.calls > 0
    calls = counting.calls
    out.sum().backward()
    assert counting.calls == calls and autograd_layer.nfe_backward == 0  # backprop replays the graph

    adjoint_layer = NeuralODE(counting, [0.0, 1.0], gradient="adjoint")
    counting.calls = 0
    out = adjoint_layer(y0)
    assert adjoint_layer.nfe_forward == counting.calls > 0
    out.sum().backward()
    assert adjoint_layer.nfe_backward == counting.calls - adjoint_layer.nfe_forward > 0
    # a new forward starts new counts
    adjoint_layer(y0)
    assert adjoint_layer.nfe_backward == 0 and adjoint_layer.nfe_forward > 0


def test_adjoint_gives_parameter_gradients_of_a_plain_callable_field_none() -> None:
    layer = NeuralODE(lambda t, y: -y * t, gradient="adjoint")
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    layer(y0).sum().backward()
    torch.testing.assert_close(y0.grad, torch.exp(torch.tensor(-0.5, dtype=torch.float64)).expand(2))


# --- modules: moving, saving, pickling, composing -----------------------------------------------


def test_parameters_buffers_and_dtype_move_with_to() -> None:
    layer = NeuralODE(mlp(dtype=torch.float32), torch.linspace(0, 1, 3))
    assert [name for name, _ in layer.named_parameters()] == [
        "vector_field.0.weight", "vector_field.0.bias", "vector_field.2.weight", "vector_field.2.bias"
    ]
    layer = layer.to(torch.float64)
    assert layer.t.dtype == torch.float64 and all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer(torch.randn(2, 2, dtype=torch.float64)).dtype == torch.float64


def test_state_dict_round_trips_weights_and_times() -> None:
    source = NeuralODE(mlp(), torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64), return_trajectory=True)
    target = NeuralODE(mlp(hidden=16), torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64), return_trajectory=True)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    y0 = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(target(y0), source(y0), rtol=0, atol=0)
    torch.testing.assert_close(target.t, source.t)


@pytest.mark.parametrize("gradient", ["autograd", "adjoint"])
def test_pickle_and_deepcopy(gradient: str) -> None:
    layer = NeuralODE(TimeField(), [0.0, 0.5], gradient=gradient)
    y0 = torch.randn(2, 2, dtype=torch.float64)
    expected = layer(y0)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(y0), expected, rtol=0, atol=0)
        clone(y0.requires_grad_()).sum().backward()


def test_inside_sequential_with_other_layers() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 4), NeuralODE(mlp(dim=4, dtype=torch.float32), [0.0, 1.0], rtol=1e-5, atol=1e-6), nn.Linear(4, 1)
    )
    x = torch.randn(8, 3)
    model(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model[1].nfe_forward > 0


# --- autocast -----------------------------------------------------------------------------------


def test_autocast_runs_the_field_in_bf16_and_keeps_the_state_float32() -> None:
    field = mlp(dtype=torch.float32)
    seen: list[torch.dtype] = []
    field[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    layer = NeuralODE(field, [0.0, 1.0], rtol=1e-3, atol=1e-4)
    y0 = torch.randn(6, 2)
    exact = layer(y0)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(y0.bfloat16())  # a bf16 input (from an earlier autocast layer) is promoted
    assert set(seen) == {torch.bfloat16} and out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=0.05, atol=0.05)  # bf16 keeps ~3 digits
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in field.parameters())


def test_half_state_without_autocast_is_a_clear_error() -> None:
    layer = NeuralODE(mlp(dtype=torch.bfloat16), [0.0, 1.0])
    with pytest.raises(TypeError, match="bfloat16.*float32"):
        layer(torch.randn(2, 2, dtype=torch.bfloat16))


# --- ODEBlock ------------------------------------------------------------------------------------


class ConvField(nn.Module):
    """A time-dependent conv field for image-shaped states: t is appended as a channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        tt = t.expand(h.shape[0], 1, *h.shape[2:])
        return torch.tanh(self.conv(torch.cat([h, tt], 1)))


def test_odeblock_integrates_images_over_unit_interval() -> None:
    torch.manual_seed(0)
    block = ODEBlock(ConvField(3))
    h = torch.randn(2, 3, 5, 5)
    out = block(h)
    assert out.shape == h.shape and block.nfe_forward > 0
    expected = flashode.odeint(block.vector_field, h, torch.tensor([0.0, 1.0]), rtol=1e-3, atol=1e-3)[-1]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().mean().backward()
    assert block.vector_field.conv.weight.grad is not None


def test_odeblock_fixes_its_interval() -> None:
    with pytest.raises(TypeError, match="NeuralODE"):
        ODEBlock(mlp(), t=[0.0, 2.0])


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(gradient="backprop"), ValueError, "gradient must be one of"),
        (dict(t=1.0), ValueError, "1-D sequence of at least two times"),
        (dict(t=[0.0]), ValueError, "at least two times"),
        (dict(t=[0.0, 1.0, 0.5]), AssertionError, "strictly increasing or decreasing"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        NeuralODE(mlp(), **kwargs)(torch.zeros(1, 2, dtype=torch.float64))


def test_non_callable_field_and_non_tensor_input() -> None:
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        NeuralODE(3.0)
    with pytest.raises(TypeError, match="takes a tensor y0"):
        NeuralODE(mlp())([1.0, 2.0])


@cuda
@pytest.mark.parametrize("gradient", ["autograd", "adjoint"])
def test_cuda_layer_matches_cpu(gradient: str) -> None:
    layer = NeuralODE(TimeField(), [0.0, 1.0], gradient=gradient, rtol=1e-9, atol=1e-10)
    y0 = torch.randn(16, 2, dtype=torch.float64)
    cpu = loss_and_grads(layer, y0)
    gpu = loss_and_grads(layer.to("cuda"), y0.cuda())
    assert layer.t.device.type == "cuda"
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-7, atol=1e-9)
