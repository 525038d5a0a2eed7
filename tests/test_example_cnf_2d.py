"""Smoke tests of examples/cnf_2d.py (FFJORD on a 2-D toy density) at tiny sizes: training lowers the
NLL, Hutchinson's estimate is unbiased for the exact log-likelihood, the learned density integrates
to 1, and the adjoint's gradients match backpropagation through the solver."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cnf_2d.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cnf_2d", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cnf_2d = load_example()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    # As in the example's main: ops on these tiny tensors only lose from intra-op threads, and on a
    # busy CPU lose a hundredfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


def tiny_model(seed: int, dtype: torch.dtype, *, rtol: float, adjoint: bool = False) -> cnf_2d.CNF:
    torch.manual_seed(seed)
    return cnf_2d.CNF(2, 16, rtol=rtol, atol=rtol, adjoint=adjoint).to(dtype)


@pytest.fixture(scope="module")
def trained() -> cnf_2d.CNF:
    """A tiny model trained briefly on 8 Gaussians: its flow already contracts volume a lot, so the
    log-determinant term matters for the checks below."""
    model = tiny_model(0, torch.float32, rtol=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    toy = cnf_2d.eight_gaussians()
    generator = torch.Generator().manual_seed(0)
    with single_thread():
        for _ in range(30):
            cnf_2d.train_step(model, optimizer, toy.sample(128, generator), exact_trace=False)
    # Evaluated in float64 with tight tolerances, the solver's error is far below the checks' margins.
    model.flow.rtol = model.flow.atol = 1e-8
    return model.double()


def test_training_lowers_the_test_nll(tmp_path: Path) -> None:
    out = tmp_path / "cnf.png"
    metrics = cnf_2d.main([
        "--iters", "30", "--batch-size", "128", "--hidden", "16", "--n-test", "500", "--grid", "30", "--quiet",
        "--out", str(out),
    ])
    # Seeds 0-5 all gain 1.1-1.6 nats over the untrained flow (about 6.0) in these 30 steps.
    assert metrics["test_nll"] < metrics["init_test_nll"] - 0.75
    assert metrics["test_nll"] > metrics["data_nll"]  # the true density is the lower bound
    assert all(math.isfinite(loss) for loss in metrics["losses"]) and len(metrics["losses"]) == 30
    assert metrics["nfe_forward"] > 0 and metrics["nfe_backward"] == 0
    assert abs(metrics["grid_mass"] - 1) < 0.03
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.stat().st_size > 0


def test_adjoint_run_counts_backward_evaluations() -> None:
    metrics = cnf_2d.main([
        "--iters", "2", "--batch-size", "32", "--hidden", "8", "--n-test", "100", "--grid", "10", "--quiet",
        "--adjoint", "--exact-trace",
    ])
    assert metrics["nfe_backward"] > 0


def test_hutchinson_estimate_is_unbiased(trained: cnf_2d.CNF) -> None:
    torch.manual_seed(1)
    x = cnf_2d.eight_gaussians().sample(32).double()
    draws = 256
    with torch.no_grad():
        exact = trained.log_prob(x)
        # Every row gets its own eps: `draws` independent estimates for each point in one solve.
        repeated = x.repeat(draws, 1)
        estimates = trained.log_prob(repeated, cnf_2d.rademacher(repeated)).view(draws, len(x))
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(draws)
    assert stderr.median() > 1e-3, "the estimator has (almost) no variance here: the check would be vacuous"
    z = (mean - exact) / stderr
    assert z.abs().max() < 4.5, z
    # The average over all points, a sharper test of a small common bias.
    overall = (estimates - exact).mean() / ((estimates - exact).mean(1).std() / math.sqrt(draws))
    assert abs(overall) < 4


def test_learned_density_integrates_to_one(trained: cnf_2d.CNF) -> None:
    bound, resolution = 6.0, 150
    density, mass = cnf_2d.density_on_grid(trained, bound, resolution)
    assert density.shape == (resolution, resolution)
    assert abs(mass - 1) < 0.005  # 2e-6 here
    # Without the log-determinant the mass is far from 1, so the check above does test it.
    points, area = cnf_2d.grid(bound, resolution)
    with torch.no_grad():
        z = trained.flow(torch.cat([points, torch.zeros(len(points), 1)], 1).double())[:, :2]
    assert abs(cnf_2d.standard_normal_log_prob(z).exp().sum().item() * area - 1) > 0.3


@pytest.mark.parametrize("exact_trace", [False, True])
def test_adjoint_gradients_match_autograd(exact_trace: bool) -> None:
    torch.manual_seed(2)
    x = cnf_2d.eight_gaussians().sample(32).double()
    noise = None if exact_trace else cnf_2d.rademacher(x)
    grads = []
    for adjoint in (False, True):
        # At 1e-10 the two differ by 2e-9 (at 1e-8 by 1e-7): solver error, shrinking with the tolerance.
        model = tiny_model(3, torch.float64, rtol=1e-10, adjoint=adjoint)
        (-model.log_prob(x, noise).mean()).backward()
        grads.append([p.grad for p in model.parameters()])
    for autograd_grad, adjoint_grad in zip(*grads):
        torch.testing.assert_close(adjoint_grad, autograd_grad, rtol=1e-6, atol=1e-8)
