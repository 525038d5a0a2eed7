"""torchdiffeq's other entry points, timed side by side: events, Adams, fixed grid, dense output.

Each workload is a torchdiffeq-style call run unchanged on both packages (the `import flashode as
torchdiffeq` swap), interleaved repeat by repeat in this one process; the table gives median wall
times and torchdiffeq / flashode. The vector field is the overhead benchmark's 2 -> 64 -> 64 -> 2
tanh MLP on a batch of B states (float32), except for the bouncing ball (scalar physics, float64).

  event      odeint_event + backward: a falling ball's landing time and d(time)/d(height), dopri5
  adams      odeint(method="implicit_adams", step_size=0.02) on [0, 1], forward + backward
  rk4        odeint(method="rk4", step_size=0.05) on [0, 1], forward + backward (an ODE-Net block)
  dense      odeint_dense (dopri5, rtol 1e-6) on [0, 1], then the solution at 1000 times

Usage:  PYTHONPATH=python python benchmarks/parity.py [--quick] [--device cuda] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import ModuleType
from typing import Callable

import torch
from torch import nn

import flashode
import torchdiffeq


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class Ball(nn.Module):
    def forward(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return torch.stack([state[1], torch.full_like(state[1], -9.81)])


def event_workload(lib: ModuleType, device: torch.device) -> Callable[[], None]:
    ball = Ball()
    height = torch.tensor(10.0, dtype=torch.float64, device=device, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=torch.float64, device=device)

    def run() -> None:
        y0 = torch.stack([height, torch.zeros_like(height)])
        event_t, _ = lib.odeint_event(ball, y0, t0, event_fn=lambda t, s: s[0], rtol=1e-7, atol=1e-9)
        event_t.backward()

    return run


def mlp_workload(lib: ModuleType, device: torch.device, batch: int, method: str, step: float) -> Callable[[], None]:
    torch.manual_seed(0)
    func = MLP().to(device)
    y0 = torch.randn(batch, 2, device=device)
    t = torch.linspace(0, 1, 2, device=device)

    def run() -> None:
        out = lib.odeint(func, y0, t, method=method, options=dict(step_size=step))
        out[-1].square().sum().backward()

    return run


def dense_workload(lib: ModuleType, device: torch.device, batch: int) -> Callable[[], None]:
    torch.manual_seed(0)
    func = MLP().to(device)
    y0 = torch.randn(batch, 2, device=device)
    times = torch.linspace(0, 1, 1000, device=device)

    def run() -> None:
        with torch.no_grad():
            solution = lib.odeint_dense(
                func, y0, torch.tensor(0.0, device=device), torch.tensor(1.0, device=device), rtol=1e-6, atol=1e-8
            )
            _ = [solution(t) for t in times] if lib is torchdiffeq else solution(times)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 11")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the other benchmarks: the solvers' overhead, not BLAS threading
    workloads = {
        "event (fwd+bwd)": lambda lib: event_workload(lib, device),
        "implicit_adams (fwd+bwd)": lambda lib: mlp_workload(lib, device, args.batch, "implicit_adams", 0.02),
        "rk4 (fwd+bwd)": lambda lib: mlp_workload(lib, device, args.batch, "rk4", 0.05),
        "dense, 1000 evals": lambda lib: dense_workload(lib, device, args.batch),
    }
    repeats = 3 if args.quick else 11
    print(f"device {device}, batch {args.batch}, torch {torch.__version__}, median of {repeats} interleaved repeats")
    print("| workload | flashode (ms) | torchdiffeq (ms) | torchdiffeq / flashode |")
    print("|---|---:|---:|---:|")
    for name, make in workloads.items():
        runs = {lib: make(lib) for lib in (flashode, torchdiffeq)}
        times: dict[ModuleType, list[float]] = {lib: [] for lib in runs}
        for lib, run in runs.items():
            run()  # warm-up (allocator, kernels, caches)
        for repeat in range(repeats):
            for lib in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                runs[lib]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[lib].append(time.perf_counter() - start)
        ours, theirs = (statistics.median(times[lib]) * 1e3 for lib in (flashode, torchdiffeq))
        print(f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}× |")


if __name__ == "__main__":
    main()
