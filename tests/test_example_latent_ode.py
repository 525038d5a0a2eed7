"""Smoke test of examples/latent_ode.py at tiny sizes: the data is irregular per series, the model's
outputs have the right shapes, a short training lowers the loss and the interpolation error, and
the adjoint gives the same finite gradients as backpropagation."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "latent_ode.py"
# Loose solver tolerances and a large learning rate make 100 Adam steps enough; 64 test series keep the
# test MSE steady.
TINY = ["--n-series", "32", "--n-test", "64", "--batch-size", "16", "--n-obs", "10", "--n-held", "4", "--n-extrap",
        "4", "--hidden", "16", "--lr", "3e-2", "--rtol", "1e-2", "--atol", "1e-3", "--quiet"]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("latent_ode_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's postponed annotations there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example()


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    # As in the example's main: tiny tensors only lose from intra-op threads, badly on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_times_are_irregular_and_differ_across_series(example):
    data = example.make_spirals(8, 10, 4, 3, 0.1, torch.Generator().manual_seed(0))
    assert data.obs_t.shape == (8, 10) and data.obs_x.shape == (8, 10, 2)
    assert data.held_t.shape == (8, 4) and data.extrap_t.shape == (8, 3)
    for t in (data.obs_t, data.held_t, data.extrap_t):
        assert bool((torch.diff(t, dim=1) > 0).all())
    # Every series has its own times, and its gaps are not a constant step.
    assert len({tuple(row.tolist()) for row in data.obs_t}) == 8
    assert bool((data.obs_t.std(0) > 0.05).all())
    gaps = torch.diff(data.obs_t, dim=1)
    assert bool((gaps.max(1).values > 2 * gaps.min(1).values).all())
    # Held-out times are unobserved and between the first and last observation; extrapolation after.
    assert not bool(torch.isin(data.held_t, data.obs_t).any())
    assert bool((data.held_t > data.obs_t[:, :1]).all() & (data.held_t < data.obs_t[:, -1:]).all())
    assert bool((data.extrap_t > example.T_OBS).all() & (data.extrap_t <= example.T_END).all())
    assert set(data.direction.tolist()) == {-1.0, 1.0}


def test_output_shapes(example):
    torch.manual_seed(0)
    data = example.make_spirals(5, 7, 3, 2, 0.1, torch.Generator().manual_seed(1))
    model = example.LatentODE(latent_dim=3, hidden=8)
    mean, log_var = model.encoder(data.obs_t, data.obs_x)
    assert mean.shape == log_var.shape == (5, 3)
    assert model.decode(mean, data.extrap_t).shape == (5, 2, 2)
    assert model.negative_elbo(data.obs_t, data.obs_x, 0.1).shape == ()
    rnn = example.RNNBaseline(hidden=8)
    assert rnn.predict(data.obs_t, data.obs_x, data.held_t, data.extrap_t).shape == (5, 5, 2)
    assert example.linear_interpolation(data.obs_t, data.obs_x, data.held_t).shape == (5, 3, 2)


def test_linear_interpolation_is_exact_on_a_line(example):
    obs_t = torch.tensor([[0.0, 1.0, 3.0], [0.5, 2.0, 2.5]])
    def line(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([2 * t + 1, -t], -1)

    t = torch.tensor([[0.25, 2.0], [1.0, 2.25]])
    torch.testing.assert_close(example.linear_interpolation(obs_t, line(obs_t), t), line(t))


def test_short_training_lowers_loss_and_interpolation_error(example):
    # Over seeds 0-7 the last ten losses were 0.18-0.45 of the first ten, and the interpolation MSE
    # 0.39-0.69 of the untrained model's (seed 0: 0.25 and 0.59).
    metrics = example.main(["--iters", "100", "--seed", "0", *TINY])
    losses = metrics["losses"]
    assert len(losses) == 100 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])
    assert metrics["latent_ode_interp_mse"] < 0.85 * metrics["untrained_latent_ode_interp_mse"]
    assert metrics["nfe_forward"] > 0 and metrics["nfe_backward"] == 0  # backprop replays, no field calls


def to_double(data: object) -> object:
    return type(data)(*(getattr(data, name).double() for name in data.__dataclass_fields__))


def test_adjoint_gradients_are_finite_and_match_backprop(example):
    data = to_double(example.make_spirals(4, 6, 2, 2, 0.1, torch.Generator().manual_seed(2)))
    grads = {}
    for adjoint in (False, True):
        torch.manual_seed(3)  # same weights and the same sample of z0 both ways
        model = example.LatentODE(latent_dim=3, hidden=8, rtol=1e-10, atol=1e-12, adjoint=adjoint).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        step = example.train_step(model, optimizer, data, 0.1)
        assert math.isfinite(step["loss"]) and step["nfe_forward"] > 0
        assert (step["nfe_backward"] > 0) == adjoint
        grads[adjoint] = [p.grad for p in model.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads[adjoint])
    # Both converge to the exact gradient as the tolerances shrink, backprop through the interpolated
    # outputs the slower (at rtol 1e-9 its error was 17 times the adjoint's): hence a tolerance far above
    # the solver's (at solver rtol 1e-7 this comparison fails).
    for backprop, adjoint in zip(grads[False], grads[True]):
        torch.testing.assert_close(adjoint, backprop, rtol=1e-4, atol=1e-4 * float(backprop.abs().max()))


def test_main_runs_with_the_adjoint(example):
    metrics = example.main(["--iters", "2", "--adjoint", *TINY])
    assert metrics["nfe_backward"] > 0
    assert all(math.isfinite(metrics[key]) for key in metrics if key.endswith("_mse"))
