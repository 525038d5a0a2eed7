"""ODE-Net vs ResNet on scikit-learn's 8x8 handwritten digits (Chen et al., 2018, section 3).

Both models share the shape of the paper's MNIST network, scaled to 8x8 images: a stem convolution to
C channels and down to 4x4, one block, then GroupNorm, ReLU and a linear classifier. They
differ only in the block:

  * ResNet: one residual block h + f(0, h);
  * ODE-Net: a `flashode.nn.ODEBlock`, h(1) from dh/dt = f(t, h) with h(0) = h, solved by dopri5 at
    rtol = atol = --tol.

f is the same small conv net in both (torchdiffeq's odenet_mnist field: GroupNorm, ReLU, a 3x3 conv
that sees the time t as one extra constant input channel, twice, and a last GroupNorm), so the two
models have the same parameters: the residual block is a single Euler step of size 1 of the ODE
block's equation, and the comparison isolates a fixed one-step depth against an adaptive solver.
(In the residual block t = 0, so the weights of the time channel are inert there.)

Both are trained with Adam (cosine learning-rate decay) on a stratified 80/20 split of the 1797
digits, from the same initial weights and in the same batch order (fixed seed), and evaluated on the
held-out 20%; both reach about 97-98%. The ODE-Net's cost is its number of field evaluations (NFE):
the table reports the forward NFE per training batch, averaged per epoch (and, with --adjoint, the NFE
of the adjoint's backward solve), and `--out nfe.png` plots it batch by batch. The paper saw the NFE
grow during training; on this easy task it settles within the first epochs (about 14 at the default
--tol 1e-3, 26 at --tol 1e-5), and the ODE-Net trains several times slower than the ResNet, whose block
costs one evaluation.

    PYTHONPATH=python python examples/odenet_digits.py [--epochs N] [--channels C] [--adjoint] [--out nfe.png]

Needs scikit-learn (for the data set; `pip install scikit-learn`) and, for --out, matplotlib.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch
from flashode.nn import ODEBlock
from torch import Tensor, nn

NUM_CLASSES = 10
NORM_GROUPS = 4

# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(seed: int, train_size: int | None) -> Split:
    """The digits as (N, 1, 8, 8) images in [0, 1]; 80/20 stratified split, so that every class is in
    both parts. `train_size` subsamples the training part (the test part stays whole)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy()
    )
    idx_train = idx_train[:train_size]
    return Split(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


# ----------------------------------------------------------------------------- models


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm as in odenet_mnist, but with NORM_GROUPS groups (or fewer, to divide `channels`)
    instead of its min(32, channels): with the few channels here, groups of one or two channels trained
    markedly worse."""
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


class ConcatConv2d(nn.Module):
    """A 3x3 convolution whose input gets t as an extra constant channel, so that the field can change
    along the depth of the ODE block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        time_channel = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([time_channel, x], 1))


class ConvField(nn.Module):
    """f(t, h) of odenet_mnist's ODEfunc: norm, ReLU, t-conv, norm, ReLU, t-conv, norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = norm(channels), norm(channels), norm(channels)
        self.conv1, self.conv2 = ConcatConv2d(channels), ConcatConv2d(channels)

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        out = self.conv1(t, torch.relu(self.norm1(h)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ResidualBlock(nn.Module):
    """h + f(0, h): one Euler step of size 1 of the ODE block's dh/dt = f(t, h)."""

    def __init__(self, vector_field: nn.Module) -> None:
        super().__init__()
        self.vector_field = vector_field

    def forward(self, h: Tensor) -> Tensor:
        return h + self.vector_field(h.new_zeros(()), h)


def classifier(block: nn.Module, channels: int) -> nn.Sequential:
    """odenet_mnist's network at 8x8: a downsampling stem (conv to C channels, norm, ReLU, a strided
    conv to 4x4), `block`, norm and ReLU, then a linear layer on the flattened 4x4 map. (odenet_mnist
    average-pools the map first; at 4x4 that throws away where the strokes are, and training sat at
    chance level for the first epochs.)"""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 4, stride=2, padding=1),
        block,
        norm(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 4 * 4, NUM_CLASSES),
    )


def build_model(name: str, channels: int, tol: float, adjoint: bool) -> tuple[nn.Module, ODEBlock | None]:
    """"ResNet" or "ODE-Net", with its ODE block (None for the ResNet) to read the NFE from."""
    field = ConvField(channels)
    if name == "ResNet":
        return classifier(ResidualBlock(field), channels), None
    block = ODEBlock(field, rtol=tol, atol=tol, gradient="adjoint" if adjoint else "autograd")
    return classifier(block, channels), block


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- training


@dataclass
class History:
    """What one model's training recorded: the NFE of every batch and the mean loss of every epoch."""

    nfe_forward: list[int] = dataclass_field(default_factory=list)
    nfe_backward: list[int] = dataclass_field(default_factory=list)
    epoch_loss: list[float] = dataclass_field(default_factory=list)

    def per_epoch(self, values: list[int]) -> list[float]:
        """Mean of a per-batch record over each epoch (every epoch has the same number of batches)."""
        per = len(values) // len(self.epoch_loss)
        return [sum(values[i : i + per]) / per for i in range(0, len(values), per)]


def train_epoch(
    model: nn.Module, block: ODEBlock | None, schedule: torch.optim.lr_scheduler.LRScheduler, data: Split,
    batch_size: int, generator: torch.Generator, history: History,
) -> None:
    model.train()
    optimizer = schedule.optimizer
    order = torch.randperm(len(data.y_train), generator=generator)
    losses = []
    for batch in order.split(batch_size):
        loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if block is not None:
            history.nfe_forward.append(block.nfe_forward)
            history.nfe_backward.append(block.nfe_backward)
    history.epoch_loss.append(sum(losses) / len(losses))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def fit(name: str, model: nn.Module, block: ODEBlock | None, data: Split, args: argparse.Namespace) -> dict:
    """Trains `model` and returns its metrics (the NFE lists are per-epoch means, empty for the ResNet)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Cosine decay to 0 over the run: at the fixed learning rate the last epoch's accuracy jumped by
    # a few percent from seed to seed.
    steps = args.epochs * math.ceil(len(data.y_train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(args.seed)  # the same batch order for both models
    history = History()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        train_epoch(model, block, schedule, data, args.batch_size, generator, history)
        if not args.quiet:
            nfe = f"  NFE forward {history.per_epoch(history.nfe_forward)[-1]:5.1f}" if block is not None else ""
            print(f"{name:8s} epoch {epoch + 1:3d}  loss {history.epoch_loss[-1]:.4f}{nfe}")
    seconds = time.perf_counter() - start
    return {
        "params": count_parameters(model),
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "train_seconds": seconds,
        "epoch_loss": history.epoch_loss,
        "nfe_forward": history.per_epoch(history.nfe_forward) if block is not None else [],
        "nfe_backward": history.per_epoch(history.nfe_backward) if block is not None else [],
        "nfe_forward_per_batch": history.nfe_forward,
        "nfe_backward_per_batch": history.nfe_backward,
    }


# ----------------------------------------------------------------------------- report


def print_table(results: dict[str, dict], adjoint: bool) -> None:
    print(f"\n{'model':8s} {'params':>8s} {'test acc':>9s} {'train s':>8s}  NFE forward per batch, by epoch")
    for name, r in results.items():
        nfe = " ".join(f"{n:.1f}" for n in r["nfe_forward"]) or "-"
        print(f"{name:8s} {r['params']:8d} {r['test_accuracy']:9.2%} {r['train_seconds']:8.1f}  {nfe}")
    if adjoint:
        backward = " ".join(f"{n:.1f}" for n in results["ODE-Net"]["nfe_backward"])
        print(f"ODE-Net NFE backward (adjoint) per batch, by epoch: {backward}")


def plot_nfe(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so {path} was not written: pip install matplotlib")
        return
    batches = len(result["nfe_forward_per_batch"])
    epoch = [i * len(result["nfe_forward"]) / batches for i in range(batches)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epoch, result["nfe_forward_per_batch"], label="forward")
    if any(result["nfe_backward_per_batch"]):
        ax.plot(epoch, result["nfe_backward_per_batch"], label="backward (adjoint)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("field evaluations")
    ax.set_title("ODE-Net on digits: NFE over training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=32, help="channels C of the block")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the ODE block (the paper's 1e-3)")
    parser.add_argument("--adjoint", action="store_true", help="ODE-Net gradients by the adjoint method")
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training digits")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and batches")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads while training; the tensors are so small that more threads mostly add overhead",
    )
    parser.add_argument("--out", default=None, help="write a PNG of the ODE-Net's NFE per batch (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="print only the final table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains both models; returns {"ResNet": metrics, "ODE-Net": metrics} (see `fit`)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return compare(args)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the smoke test) keeps its own


def compare(args: argparse.Namespace) -> dict:
    data = load_digits_split(args.seed, args.train_size)
    results = {}
    for name in ("ResNet", "ODE-Net"):
        torch.manual_seed(args.seed)  # the same initial weights: the models differ only in the block
        model, block = build_model(name, args.channels, args.tol, args.adjoint)
        results[name] = fit(name, model, block, data, args)
    print_table(results, args.adjoint)
    if args.out:
        plot_nfe(results["ODE-Net"], args.out)
    elif not args.quiet:
        print("pass --out nfe.png for a plot of the ODE-Net's NFE over training")
    return results


if __name__ == "__main__":
    main()
