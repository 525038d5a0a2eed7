"""`python -m flashode [demo]`: a short solve-and-compare on this machine.

Solves the spiral ODE of torchdiffeq's classic demo (dy/dt = y^3 A) with dopri5, once on
flashode's compiled kernels and once on the pure-PyTorch reference path (and with torchdiffeq
when it is installed), checks the answers agree, and prints the timings side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import flashode
from flashode import _ops

TRUE_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


def spiral(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.mm(y**3, TRUE_A.to(y))


def _median_ms(run: Callable[[], torch.Tensor], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flashode", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="demo", choices=["demo"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    flashode.show_config()
    device = torch.device(args.device)
    y0 = torch.tensor([[2.0, 0.0]], device=device)
    t = torch.linspace(0.0, 25.0, 1000, device=device)
    kwargs = dict(method="dopri5", rtol=1e-7, atol=1e-9)

    with torch.no_grad():
        fused = flashode.odeint(spiral, y0, t, **kwargs)
        with _ops.reference_path():
            reference = flashode.odeint(spiral, y0, t, **kwargs)
        rows = [("flashode (fused kernels)", _median_ms(lambda: flashode.odeint(spiral, y0, t, **kwargs), args.repeats))]
        with _ops.reference_path():
            rows.append(("flashode (reference path)", _median_ms(lambda: flashode.odeint(spiral, y0, t, **kwargs), args.repeats)))
        try:
            import torchdiffeq
        except ImportError:
            torchdiffeq = None
        if torchdiffeq is not None:
            theirs = torchdiffeq.odeint(spiral, y0, t, **kwargs)
            rows.append(("torchdiffeq", _median_ms(lambda: torchdiffeq.odeint(spiral, y0, t, **kwargs), args.repeats)))

    print(f"\nspiral ODE, dopri5, rtol=1e-7, 1000 output times on {device}:")
    print(f"  max |fused - reference| = {(fused - reference).abs().max().item():.2e}")
    if torchdiffeq is not None:
        print(f"  max |fused - torchdiffeq| = {(fused - theirs).abs().max().item():.2e}")
    print(f"  y(25) = {fused[-1, 0].tolist()}")
    base = rows[0][1]
    for name, ms in rows:
        print(f"  {name:<28s} {ms:8.2f} ms  ({ms / base:4.1f}x flashode)")
    if torchdiffeq is None:
        print("  (pip install torchdiffeq to add it to the comparison)")


if __name__ == "__main__":
    main()
