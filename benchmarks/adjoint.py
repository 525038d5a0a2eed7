"""odeint_adjoint end to end: flashode vs torchdiffeq, forward + backward, same options.

The vector field is the 2 -> 64 -> 64 -> 2 tanh MLP of overhead.py, y0 = randn(B, 2), 10 output
times on [0, 1], dopri5 with rtol 1e-6 / atol 1e-8 forward and backward, loss = sum of squares of
every output, gradients with respect to y0 and the MLP's parameters, with the default adjoint norm
and with `adjoint_options=dict(norm="seminorm")`. For each batch size, norm and library:

* fwd / bwd NFE   evaluations of the MLP in the forward solve and in the backward (adjoint) solve,
* fwd+bwd         median wall time of forward + backward,
* bwd             median wall time of the backward alone,
* t_f+vjp         median time of one augmented evaluation done by hand on the same batch: the MLP
                  under grad plus one torch.autograd.grad for (y, parameters),
* ovh/aug-eval    (bwd - bwd NFE * t_f+vjp) / bwd NFE: what the adjoint solve spends per
                  evaluation beyond f and its vector-Jacobian product,
* speed-up        torchdiffeq / flashode fwd+bwd time,
* rel err         largest relative error of the library's gradients against a reference computed
                  by backprop through flashode.odeint in float64 at rtol 1e-10 / atol 1e-12 (both
                  libraries' errors come from the same solve tolerance, so compare these two).

Libraries are timed in one process, one intra-op thread, interleaved repeat by repeat.
`--vjp` also times the two ways of taking the augmented evaluation's vector-Jacobian product,
torch.autograd.grad (what flashode uses) and torch.func.vjp.

Usage:  PYTHONPATH=python python benchmarks/adjoint.py [--quick] [--vjp] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import flashode
import torch
import torchdiffeq
from overhead import MLP, machine_description, synchronize

RTOL, ATOL = 1e-6, 1e-8
N_TIMES = 10
LIBRARIES = {"flashode": flashode.odeint_adjoint, "torchdiffeq": torchdiffeq.odeint_adjoint}


@dataclass
class Run:
    fwd_nfe: int = 0
    bwd_nfe: int = 0
    totals: list[float] = field(default_factory=list)
    backwards: list[float] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)

    @property
    def total(self) -> float:
        return statistics.median(self.totals)

    @property
    def backward(self) -> float:
        return statistics.median(self.backwards)


def make_inputs(batch: int, device: torch.device, dtype: torch.dtype) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    func = MLP().to(device=device, dtype=dtype)
    y0 = torch.randn(batch, 2, device=device, dtype=dtype)
    t = torch.linspace(0.0, 1.0, N_TIMES, device=device, dtype=dtype)
    return func, y0, t


def fwd_bwd(solve: Callable, func: MLP, y0: torch.Tensor, t: torch.Tensor, seminorm: bool, run: Run) -> None:
    """One forward + backward; records NFE, times and gradients into run."""
    device = y0.device
    y0 = y0.clone().requires_grad_()
    kwargs = dict(rtol=RTOL, atol=ATOL, method="dopri5")
    if seminorm:
        kwargs["adjoint_options"] = dict(norm="seminorm")
    synchronize(device)
    start = time.perf_counter()
    func.nfe = 0
    out = solve(func, y0, t, **kwargs)
    fwd_nfe = func.nfe
    mid = time.perf_counter()
    grads = torch.autograd.grad(out.pow(2).sum(), [y0, *func.parameters()])
    synchronize(device)
    end = time.perf_counter()
    run.fwd_nfe, run.bwd_nfe = fwd_nfe, func.nfe - fwd_nfe
    run.totals.append(end - start)
    run.backwards.append(end - mid)
    run.grads = [g.detach() for g in grads]


def reference_gradients(func: MLP, y0: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the same loss by backprop through a float64 solve at rtol 1e-10."""
    ref_func = copy.deepcopy(func).double()
    y = y0.double().clone().requires_grad_()
    out = flashode.odeint(ref_func, y, t.double(), rtol=1e-10, atol=1e-12, method="dopri5")
    grads = torch.autograd.grad(out.pow(2).sum(), [y, *ref_func.parameters()])
    return [g.to(y0.dtype) for g in grads]


def time_f_vjp(func: MLP, y0: torch.Tensor, t: torch.Tensor, calls: int = 20) -> float:
    """Seconds of one augmented evaluation done by hand (f under grad + one VJP), from one block of
    back-to-back calls."""
    params = tuple(func.parameters())
    a = torch.randn_like(y0)

    def once() -> None:
        with torch.enable_grad():
            y = y0.detach().requires_grad_()
            f = func(t[0], y)
            torch.autograd.grad(f, (y, *params), -a, allow_unused=True)

    synchronize(y0.device)
    start = time.perf_counter()
    for _ in range(calls):
        once()
    synchronize(y0.device)
    return (time.perf_counter() - start) / calls


def compare_vjp(func: MLP, y0: torch.Tensor, t: torch.Tensor, calls: int = 200) -> dict[str, float]:
    """Seconds per augmented evaluation with torch.autograd.grad vs torch.func.vjp."""
    params = dict(func.named_parameters())
    names = list(params)
    a = torch.randn_like(y0)

    def with_autograd() -> None:
        with torch.enable_grad():
            y = y0.detach().requires_grad_()
            f = func(t[0], y)
            torch.autograd.grad(f, (y, *params.values()), -a, allow_unused=True)

    def call(y, *ps):
        return torch.func.functional_call(func, dict(zip(names, ps)), (t[0], y))

    def with_func_vjp() -> None:
        f, vjp_fn = torch.func.vjp(call, y0, *params.values())
        vjp_fn(-a)

    result = {}
    for name, fn in (("torch.autograd.grad", with_autograd), ("torch.func.vjp", with_func_vjp)) * 2:
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(y0.device)
        result[name] = (time.perf_counter() - start) / calls  # the second round of each counts
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="B=16 only, 5 repeats")
    parser.add_argument("--vjp", action="store_true", help="also time autograd.grad against torch.func.vjp")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = [16] if args.quick else args.batches
    repeats = args.repeats or (5 if args.quick else 11)

    desc = machine_description(device)
    print(f"odeint_adjoint benchmark: dopri5 fwd+bwd, rtol={RTOL:g}, atol={ATOL:g}, {N_TIMES} output times, "
          f"{args.dtype}, device {device}, median of {repeats} interleaved repeats")
    print(desc)
    lines = [
        f"odeint_adjoint, MLP 2-64-64-2 tanh, dopri5, rtol={RTOL:g}, atol={ATOL:g}, {N_TIMES} output times, "
        f"{args.dtype}, device {device}, 1 thread. Machine: {desc}. Median of {repeats} interleaved repeats.",
        "",
        "| B | adjoint norm | library | fwd NFE | bwd NFE | fwd+bwd (ms) | bwd (ms) | t_f+vjp (µs) | "
        "bwd overhead / aug-eval (µs) | torchdiffeq / flashode | rel err of gradients |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in batches:
        func, y0, t = make_inputs(batch, device, dtype)
        for seminorm in (False, True):
            runs = {name: Run() for name in LIBRARIES}
            f_vjp_times = []
            for r in range(repeats + 1):  # the first round warms up
                names = list(LIBRARIES) if r % 2 == 0 else list(reversed(LIBRARIES))
                for name in names:
                    fwd_bwd(LIBRARIES[name], func, y0, t, seminorm, runs[name])
                    if r == 0:
                        runs[name].totals.clear()
                        runs[name].backwards.clear()
                    else:  # timed right next to each solve, so it sees the same machine state
                        f_vjp_times.append(time_f_vjp(func, y0, t))
            t_fvjp = statistics.median(f_vjp_times)
            base = runs["flashode"].total
            ref = reference_gradients(func, y0, t)
            for name, run in runs.items():
                diff = max(float((g - e).abs().max() / e.abs().max()) for g, e in zip(run.grads, ref))
                overhead = (run.backward - run.bwd_nfe * t_fvjp) / max(run.bwd_nfe, 1)
                norm = "seminorm" if seminorm else "default"
                lines.append(
                    f"| {batch} | {norm} | {name} | {run.fwd_nfe} | {run.bwd_nfe} | {1e3 * run.total:.1f} | "
                    f"{1e3 * run.backward:.1f} | {1e6 * t_fvjp:.0f} | {1e6 * overhead:.1f} | "
                    f"{run.total / base:.2f}× | {diff:.1e} |"
                )
            print("\n".join("  " + line for line in lines[-2:]), flush=True)  # progress, not the table
    print("\n" + "\n".join(lines))
    if args.vjp:
        func, y0, t = make_inputs(16, device, dtype)
        times = compare_vjp(func, y0, t)
        print("\nAugmented evaluation (f + one VJP for y and parameters), B=16:")
        for name, seconds in times.items():
            print(f"  {name:<20} {1e6 * seconds:.1f} µs")


if __name__ == "__main__":
    main()
