"""`python -m flashode demo`: fit a neural ODE to a 2-D spiral, the classic demo of Chen et al. and
torchdiffeq, and time the same training three ways.

The data is one trajectory of dy/dt = y^3 A (a spiral decaying into the origin) at 1000 times on
[0, 25]. A `flashode.nn.NeuralODE` with the field f(y) = MLP(y^3) (2 -> 50 -> 2, tanh) learns it
from random 10-point windows, 20 per batch, by RMSprop on the mean absolute error. Afterwards the
first `--compare-iters` iterations are rerun from the same initial weights and batches on
flashode's pure-PyTorch reference path and on torchdiffeq (when installed), and the median time
per iteration of each is printed next to flashode's. A PNG shows the fitted and true trajectories
and the learned vector field (needs matplotlib).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from . import _ops
from ._config import show_config
from .nn import NeuralODE
from .odeint import odeint

TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
DATA_SIZE, BATCH_TIME, BATCH_SIZE, T_END = 1000, 10, 20, 25.0


class Spiral(nn.Module):
    """The true dynamics, dy/dt = y^3 A."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("A", torch.tensor(TRUE_A))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return (y**3) @ self.A


class CubicMLP(nn.Module):
    """The learned field f(y) = MLP(y^3): the cube lets a small tanh network express the spiral."""

    def __init__(self, hidden: int = 50) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.1)
                nn.init.zeros_(layer.bias)

    def forward(self, y: Tensor) -> Tensor:
        return self.net(y**3)


class TimeIgnoring(nn.Module):
    """f(t, y) for solvers (torchdiffeq) that always pass t."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.field(y)


@dataclass
class SpiralData:
    t: Tensor  # (DATA_SIZE,)
    y: Tensor  # (DATA_SIZE, 1, 2)

    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """BATCH_SIZE random windows of BATCH_TIME points: starts (M, 1, 2), targets (T, M, 1, 2)."""
        starts = torch.randperm(DATA_SIZE - BATCH_TIME, generator=generator)[:BATCH_SIZE].to(self.y.device)
        targets = torch.stack([self.y[starts + i] for i in range(BATCH_TIME)])
        return self.y[starts], targets


def make_data(device: torch.device) -> SpiralData:
    t = torch.linspace(0.0, T_END, DATA_SIZE, device=device)
    y0 = torch.tensor([[2.0, 0.0]], device=device)
    with torch.no_grad():
        y = odeint(Spiral().to(device), y0, t, method="dopri5")
    return SpiralData(t, y)


# One training iteration's solve: (windows' starts, window times) -> trajectories (T, M, 1, 2).
Solve = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TrainResult:
    losses: list[float]
    seconds: list[float]  # per iteration


def train(
    model: nn.Module, solve: Solve, data: SpiralData, iters: int, seed: int,
    on_iteration: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """torchdiffeq's ode_demo training loop; batches are drawn from `seed`, so runs with the same
    seed and initial weights see the same data."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    window_t = data.t[:BATCH_TIME]
    result = TrainResult([], [])
    for itr in range(iters):
        start = time.perf_counter()
        y0, target = data.batch(generator)
        optimizer.zero_grad()
        loss = (solve(y0, window_t) - target).abs().mean()
        loss.backward()
        optimizer.step()
        value = loss.item()  # also synchronises a GPU before the clock is read
        result.seconds.append(time.perf_counter() - start)
        result.losses.append(value)
        if on_iteration is not None:
            on_iteration(itr, value)
    return result


def trajectory_loss(layer: NeuralODE, data: SpiralData) -> tuple[float, Tensor]:
    """Mean absolute error of the model's whole trajectory from y(0), and that trajectory."""
    whole = NeuralODE(layer.vector_field, data.t, method=layer.method, return_trajectory=True,
                      time_dependent=layer.time_dependent)
    with torch.no_grad():
        pred = whole(data.y[0])
    return (pred - data.y).abs().mean().item(), pred


def make_layer(seed: int, adjoint: bool, device: torch.device) -> NeuralODE:
    torch.manual_seed(seed)
    return NeuralODE(
        CubicMLP(), torch.linspace(0.0, T_END, DATA_SIZE)[:BATCH_TIME], return_trajectory=True,
        gradient="adjoint" if adjoint else "autograd",
    ).to(device)


def layer_solve(layer: NeuralODE) -> Solve:
    return lambda y0, window_t: layer(y0)


def torchdiffeq_solve(torchdiffeq: Any, field: nn.Module, adjoint: bool) -> Solve:
    integrate = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    wrapped = TimeIgnoring(field)
    return lambda y0, window_t: integrate(wrapped, y0, window_t, method="dopri5")


def progress_bar(iters: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=iters, desc="training", unit="it", dynamic_ncols=True)


def fit(args: argparse.Namespace, data: SpiralData, device: torch.device) -> tuple[NeuralODE, tuple[float, float]]:
    """Trains the demo's model with a progress bar; returns it and its mean NFE (forward,
    backward) per iteration."""
    layer = make_layer(args.seed, args.adjoint, device)
    bar = progress_bar(args.iters)
    nfe_total = [0, 0]

    def report(itr: int, loss: float) -> None:
        nfe_total[0] += layer.nfe_forward
        nfe_total[1] += layer.nfe_backward
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", nfe_fwd=layer.nfe_forward, nfe_bwd=layer.nfe_backward, refresh=False)
            bar.update()
        elif (itr + 1) % max(1, args.iters // 10) == 0:
            print(f"  iter {itr + 1:5d}  loss {loss:.4f}  NFE fwd {layer.nfe_forward} bwd {layer.nfe_backward}")

    train(layer, layer_solve(layer), data, args.iters, args.seed, report)
    if bar is not None:
        bar.close()
    forward, backward = (n / max(1, args.iters) for n in nfe_total)
    print(f"mean NFE per iteration: forward {forward:.1f}, backward {backward:.1f}")
    return layer, (forward, backward)


def compare(args: argparse.Namespace, data: SpiralData, device: torch.device) -> list[tuple[str, TrainResult]]:
    """The first --compare-iters iterations, from the same weights and batches, on each path."""
    runs: list[tuple[str, Solve | None, nn.Module, ContextManager[Any]]] = []
    kernels = make_layer(args.seed, args.adjoint, device)
    runs.append(("flashode (fused kernels)", layer_solve(kernels), kernels, nullcontext()))
    reference = make_layer(args.seed, args.adjoint, device)
    runs.append(("flashode (reference path)", layer_solve(reference), reference, _ops.reference_path()))
    try:
        import torchdiffeq
    except ImportError:
        torchdiffeq = None
    if torchdiffeq is not None:
        field = make_layer(args.seed, args.adjoint, device).vector_field
        runs.append((f"torchdiffeq {getattr(torchdiffeq, '__version__', '')}".strip(),
                     torchdiffeq_solve(torchdiffeq, field, args.adjoint), field, nullcontext()))
    results = []
    for name, solve, model, context in runs:
        with context:
            results.append((name, train(model, solve, data, args.compare_iters, args.seed)))
    if torchdiffeq is None:
        print("(pip install torchdiffeq to add it to the timing comparison)")
    return results


def plot(path: str, data: SpiralData, pred: Tensor, layer: NeuralODE) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: `pip install matplotlib` (or `pip install \"flashode[demo]\"`) "
              "to get the plot")
        return
    t, true_y, pred_y = data.t.cpu().numpy(), data.y[:, 0].cpu().numpy(), pred[:, 0].cpu().numpy()
    fig, (traj, phase, field) = plt.subplots(1, 3, figsize=(13, 4))
    traj.plot(t, true_y[:, 0], "g-", t, true_y[:, 1], "g-", label="true")
    traj.plot(t, pred_y[:, 0], "b--", t, pred_y[:, 1], "b--", label="fitted")
    traj.set(title="Trajectories", xlabel="t", ylabel="x, y", xlim=(0, T_END), ylim=(-2, 2))
    handles, labels = traj.get_legend_handles_labels()
    traj.legend(handles[::2], labels[::2])
    phase.plot(true_y[:, 0], true_y[:, 1], "g-", label="true")
    phase.plot(pred_y[:, 0], pred_y[:, 1], "b--", label="fitted")
    phase.set(title="Phase portrait", xlabel="x", ylabel="y", xlim=(-2, 2), ylim=(-2, 2))
    phase.legend()
    grid = torch.stack(torch.meshgrid(torch.linspace(-2, 2, 21), torch.linspace(-2, 2, 21), indexing="xy"), -1)
    with torch.no_grad():
        velocity = layer.vector_field(grid.reshape(-1, 2).to(data.y.device)).reshape(21, 21, 2).cpu()
    gx, gy = grid[..., 0].numpy(), grid[..., 1].numpy()
    field.streamplot(gx, gy, velocity[..., 0].numpy(), velocity[..., 1].numpy(), color="black", density=1.0)
    field.set(title="Learned vector field", xlabel="x", ylabel="y", xlim=(-2, 2), ylim=(-2, 2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")


def print_timings(results: list[tuple[str, TrainResult]], iters: int) -> dict[str, float]:
    """Prints the median time per iteration of each path; returns them in ms."""
    timings = {name: 1e3 * statistics.median(result.seconds) for name, result in results}
    base = timings[results[0][0]]
    print(f"\nsame training, first {iters} iterations, median time per iteration:")
    for name, result in results:
        drift = max(abs(a - b) for a, b in zip(result.losses, results[0][1].losses))
        print(f"  {name:<28s} {timings[name]:8.2f} ms/it  ({timings[name] / base:5.2f}x flashode)  "
              f"max |loss - flashode's| over the run {drift:.1e}")
    return timings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    parser.add_argument("--adjoint", action="store_true", help="train with the adjoint method (gradient='adjoint')")
    parser.add_argument("--iters", type=int, default=2000, help="training iterations (default 2000)")
    parser.add_argument("--compare-iters", type=int, default=60,
                        help="iterations timed on each path for the comparison (default 60; 0 skips it)")
    parser.add_argument("--out", default="flashode_demo.png", help="the plot's path (default flashode_demo.png)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo; returns the whole-trajectory loss before and after training, the mean NFE
    per iteration and the comparison's median ms per iteration by path."""
    show_config()
    device = torch.device(args.device)
    data = make_data(device)
    mode = "adjoint" if args.adjoint else "backprop through the solver"
    print(f"\nfitting dy/dt = MLP(y^3) to the spiral dy/dt = y^3 A on {device} (dopri5, {mode}), "
          f"{args.iters} iterations")
    loss_before, _ = trajectory_loss(make_layer(args.seed, args.adjoint, device), data)
    started = time.perf_counter()
    layer, nfe = fit(args, data, device)
    elapsed = time.perf_counter() - started
    loss_after, pred = trajectory_loss(layer, data)
    print(f"whole-trajectory mean |error|: {loss_before:.4f} before, {loss_after:.4f} after "
          f"({elapsed:.1f} s of training)")
    timings = print_timings(compare(args, data, device), args.compare_iters) if args.compare_iters > 0 else {}
    plot(args.out, data, pred, layer)
    return dict(loss_before=loss_before, loss_after=loss_after, nfe_per_iteration=nfe, ms_per_iteration=timings)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m flashode demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
