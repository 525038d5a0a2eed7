"""A continuous normalizing flow on a 2-D toy density: FFJORD (Grathwohl et al., 2019).

A sample x of the data is carried to the base distribution N(0, I) by the ODE dz/dt = f(t, z) from
z(0) = x to z(1); along the way the log-density changes by d log p(z(t))/dt = -tr(df/dz) (the
instantaneous change of variables, Chen et al. 2018), so that

    log p(x) = log N(z(1); 0, I) - delta_logp,    delta_logp = -integral_0^1 tr(df/dz) dt.

Both are integrated together as one state (z, delta_logp) by a `flashode.nn.NeuralODE` layer, and
training maximises log p(x) on batches drawn from the toy density. The trace is estimated, as FFJORD
does, with Hutchinson's estimator tr(J) = E[eps^T J eps]: one vector-Jacobian product per field
evaluation instead of one per dimension, with Rademacher noise eps drawn once per batch and fixed
for the whole solve (so the estimate of the integral is unbiased; `--exact-trace` computes it
exactly instead). The field is an MLP of FFJORD's "concatsquash" layers (each linear layer's output
gated and shifted by functions of t), with tanh activations.

Evaluation uses the exact trace: the negative log-likelihood of held-out samples (next to a Gaussian
fitted to the data and the data's own density, the lower bound), and the learned density on a grid,
whose total mass should be 1. `--out` plots the data, the learned density and samples of the model
(base samples integrated backwards, t = 1 -> 0).

    PYTHONPATH=python python examples/cnf_2d.py [--data moons] [--iters N] [--adjoint] [--out cnf.png]
"""

from __future__ import annotations

import argparse
import math
import time

import flashode
import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)
BOUND = 4.0  # the density grid and the plots cover [-BOUND, BOUND]^2, where both toy densities live


# ----------------------------------------------------------------------------- data


class ToyDensity:
    """An equal-weight mixture of isotropic Gaussians N(c_k, sigma^2 I): sampled, and its exact
    log-density known (the reference NLL a perfect model would reach)."""

    def __init__(self, centers: Tensor, sigma: float) -> None:
        self.centers = centers
        self.sigma = sigma

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.randint(len(self.centers), (n,), generator=generator)
        return self.centers[k] + self.sigma * torch.randn(n, 2, generator=generator)

    def log_prob(self, x: Tensor) -> Tensor:
        sq = (x[:, None, :] - self.centers[None]).square().sum(-1) / self.sigma**2
        log_normal = -0.5 * sq - LOG_2PI - 2 * math.log(self.sigma)
        return torch.logsumexp(log_normal, 1) - math.log(len(self.centers))


def eight_gaussians() -> ToyDensity:
    """FFJORD's "8gaussians": eight modes on a circle of radius 4/sqrt(2), std 0.5/sqrt(2)."""
    angle = torch.arange(8) * (math.pi / 4)
    return ToyDensity(torch.stack([angle.cos(), angle.sin()], 1) * (4 / math.sqrt(2)), 0.5 / math.sqrt(2))


def two_moons(points_per_arc: int = 256) -> ToyDensity:
    """FFJORD's "moons" (sklearn's make_moons with noise 0.1, scaled by 2 and shifted): Gaussian noise
    around two interleaved half circles, each a mixture over evenly spaced points on the arc, which
    is how make_moons places its points."""
    theta = torch.linspace(0, math.pi, points_per_arc)
    outer = torch.stack([theta.cos(), theta.sin()], 1)
    inner = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], 1)
    return ToyDensity(torch.cat([outer, inner]) * 2 + torch.tensor([-1.0, -0.2]), 0.2)


DATASETS = {"8gaussians": eight_gaussians, "moons": two_moons}


# ----------------------------------------------------------------------------- model


class ConcatSquash(nn.Module):
    """FFJORD's ConcatSquashLinear: (W x + b) * sigmoid(a t + c) + d t. The gate and shift let the
    field change along the flow at the cost of a few parameters per unit."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.gate = nn.Linear(1, n_out)
        self.shift = nn.Linear(1, n_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.reshape(1, 1).to(x.dtype)
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.shift(t)


class TimeMLP(nn.Module):
    """f(t, z): `depth` hidden concatsquash layers of width `hidden` with tanh (smooth, as the
    solver's error control and the trace's second derivatives want), and a linear output layer."""

    def __init__(self, dim: int, hidden: int, depth: int = 3) -> None:
        super().__init__()
        widths = [dim, *[hidden] * depth, dim]
        self.layers = nn.ModuleList(ConcatSquash(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            z = torch.tanh(layer(t, z))
        return self.layers[-1](t, z)


def divergence(dz: Tensor, z: Tensor, noise: Tensor | None, create_graph: bool) -> Tensor:
    """tr(d dz / dz) per sample: Hutchinson's eps^T J eps with one vector-Jacobian product when
    `noise` (eps) is given, else exact with one product per dimension (each gives a row of J)."""
    if noise is not None:
        (vjp,) = torch.autograd.grad(dz, z, noise, create_graph=create_graph)
        return (vjp * noise).sum(1)
    diagonal = [
        torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True)[0][:, i]
        for i in range(z.shape[1])
    ]
    return sum(diagonal)


class CNFDynamics(nn.Module):
    """The flow's vector field on the state (z, delta_logp), shape (B, dim + 1):
    d/dt (z, delta_logp) = (f(t, z), -tr(df/dz)).

    `noise` is Hutchinson's eps (B, dim), set for a whole solve (and the adjoint's backward solve);
    None selects the exact trace."""

    def __init__(self, net: nn.Module, dim: int) -> None:
        super().__init__()
        self.net = net
        self.dim = dim
        self.noise: Tensor | None = None

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        # The trace needs df/dz even when the caller records no graph (evaluation, the adjoint's
        # forward solve); only when it does (training) must the trace itself be differentiable.
        build_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = state[:, : self.dim]
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            dz = self.net(t, z)
            trace = divergence(dz, z, self.noise, build_graph)
        out = torch.cat([dz, -trace[:, None]], 1)
        return out if build_graph else out.detach()


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.square().sum(1) - 0.5 * z.shape[1] * LOG_2PI


class CNF(nn.Module):
    """log p(x) by integrating (x, 0) from t = 0 to t = 1; samples by integrating N(0, I) back."""

    def __init__(self, dim: int, hidden: int, *, rtol: float, atol: float, adjoint: bool) -> None:
        super().__init__()
        self.flow = flashode.nn.NeuralODE(
            CNFDynamics(TimeMLP(dim, hidden), dim), (0.0, 1.0), rtol=rtol, atol=atol,
            gradient="adjoint" if adjoint else "autograd",
        )

    def log_prob(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """log p(x) per sample: Hutchinson's estimate with `noise` (eps, shaped like x), else exact."""
        self.flow.vector_field.noise = noise
        out = self.flow(torch.cat([x, x.new_zeros(len(x), 1)], 1))
        return standard_normal_log_prob(out[:, :-1]) - out[:, -1]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dynamics = self.flow.vector_field
        dynamics.noise = None  # the log-density channel rides along: its exact trace is cheap in 2-D
        z = torch.randn(n, dynamics.dim, generator=generator, dtype=self.flow.t.dtype)
        state = torch.cat([z, z.new_zeros(n, 1)], 1)
        backwards = self.flow.t.flip(0)
        return flashode.odeint(dynamics, state, backwards, rtol=self.flow.rtol, atol=self.flow.atol)[-1, :, :-1]


def rademacher(like: Tensor) -> Tensor:
    """Rademacher noise (+-1): the lowest-variance choice for Hutchinson's estimator."""
    return torch.randint(0, 2, like.shape, dtype=like.dtype) * 2 - 1


# ----------------------------------------------------------------------------- training and evaluation


def train_step(model: CNF, optimizer: torch.optim.Optimizer, x: Tensor, exact_trace: bool) -> dict[str, float]:
    optimizer.zero_grad()
    loss = -model.log_prob(x, None if exact_trace else rademacher(x)).mean()
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "nfe_forward": model.flow.nfe_forward, "nfe_backward": model.flow.nfe_backward}


@torch.no_grad()
def test_nll(model: CNF, x: Tensor) -> float:
    return -model.log_prob(x).mean().item()


def gaussian_fit_nll(train: Tensor, test: Tensor) -> float:
    """NLL of `test` under the Gaussian with `train`'s mean and covariance: what a linear flow reaches."""
    fit = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    return -fit.log_prob(test).mean().item()


def grid(bound: float, resolution: int) -> tuple[Tensor, float]:
    """The centres (resolution^2, 2) of a square grid of cells over [-bound, bound]^2, and a cell's area."""
    width = 2 * bound / resolution
    axis = -bound + width * (torch.arange(resolution) + 0.5)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1), width**2


@torch.no_grad()
def density_on_grid(model: CNF, bound: float, resolution: int) -> tuple[Tensor, float]:
    """The learned density (resolution, resolution) on the grid (rows: y) and its mass there."""
    points, area = grid(bound, resolution)
    density = model.log_prob(points.to(next(model.parameters()).dtype)).exp()
    return density.reshape(resolution, resolution), density.sum().item() * area


def plot(data: Tensor, density: Tensor, samples: Tensor, bound: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so {path} was not written: pip install matplotlib")
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    extent = (-bound, bound, -bound, bound)
    panels = {"data": data, "model samples (t = 1 -> 0)": samples}
    for ax, (title, points) in zip(axes[[0, 2]], panels.items()):
        ax.hist2d(*points.T.numpy(), bins=100, range=[extent[:2], extent[2:]], cmap="viridis")
        ax.set_title(title)
    axes[1].imshow(density.numpy(), origin="lower", extent=extent, cmap="viridis")
    axes[1].set_title("learned density (exact trace)")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATASETS), default="8gaussians")
    parser.add_argument("--iters", type=int, default=300, help="Adam steps, each on a fresh batch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64, help="width of the field's three hidden layers")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--adjoint", action="store_true", help="gradients by the adjoint (odeint_adjoint)")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--exact-trace", action="store_true", help="train with the exact trace, not Hutchinson's")
    parser.add_argument("--n-test", type=int, default=2000, help="held-out samples for the test NLL")
    parser.add_argument("--grid", type=int, default=100, help="resolution of the density grid over [-4, 4]^2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see `main`)")
    parser.add_argument("--out", default=None, help="write a PNG of data, density and samples (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains and evaluates; returns the metrics: test NLLs in nats (`init_test_nll` before training,
    `test_nll` after, `gaussian_nll` and `data_nll` for reference), `grid_mass`, the training
    `losses`, the last iteration's `nfe_forward`/`nfe_backward` and `train_seconds`."""
    args = parse_args(argv)
    # The tensors are tiny (batch x 64): splitting each op over threads costs more than it gains,
    # and on a busy CPU every op waits for its slowest thread (100x slower on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    toy = DATASETS[args.data]()
    test = toy.sample(args.n_test, generator)
    model = CNF(2, args.hidden, rtol=args.rtol, atol=args.atol, adjoint=args.adjoint)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    init_nll = test_nll(model, test)

    start, losses, step = time.perf_counter(), [], {}
    for it in range(args.iters):
        step = train_step(model, optimizer, toy.sample(args.batch_size, generator), args.exact_trace)
        losses.append(step["loss"])
        if not args.quiet and (it + 1) % max(1, args.iters // 10) == 0:
            print(f"iter {it + 1:5d}  NLL {step['loss']:7.3f}  NFE forward {step['nfe_forward']:4d}  "
                  f"backward {step['nfe_backward']:4d}  {time.perf_counter() - start:6.1f} s")
    train_seconds = time.perf_counter() - start

    density, mass = density_on_grid(model, BOUND, args.grid)
    metrics = {
        "init_test_nll": init_nll, "test_nll": test_nll(model, test),
        "gaussian_nll": gaussian_fit_nll(toy.sample(10_000, generator), test),
        "data_nll": -toy.log_prob(test).mean().item(), "grid_mass": mass,
    }
    trace = "exact trace" if args.exact_trace else "Hutchinson"
    print(f"\n{args.data}: {args.iters} iterations ({trace}, {'adjoint' if args.adjoint else 'autograd'}) "
          f"in {train_seconds:.1f} s")
    print(f"test NLL (nats, exact trace, {args.n_test} samples): untrained {init_nll:.3f}, "
          f"CNF {metrics['test_nll']:.3f}; Gaussian fit {metrics['gaussian_nll']:.3f}, "
          f"true density {metrics['data_nll']:.3f}")
    print(f"mass of the learned density on [-{BOUND:g}, {BOUND:g}]^2: {mass:.4f}")
    if args.out:
        plot(toy.sample(20_000, generator), density, model.sample(20_000, generator), BOUND, args.out)
    else:
        print("pass --out cnf.png for a plot of the data, the learned density and the model's samples")
    return {**metrics, "losses": losses, "nfe_forward": step.get("nfe_forward", 0),
            "nfe_backward": step.get("nfe_backward", 0), "train_seconds": train_seconds}


if __name__ == "__main__":
    main()
