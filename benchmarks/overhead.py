"""Solver overhead per f-evaluation: flashode vs torchdiffeq vs torchode on a small neural ODE.

The vector field is a 2 -> 64 -> 64 -> 2 tanh MLP (it ignores t), y0 = randn(B, 2), 10 output times
on [0, 1], dopri5 with rtol 1e-6 / atol 1e-8, solved under torch.no_grad(). For each batch size B
and library the script reports

* NFE          evaluations of f on the whole batch (counted by the MLP itself),
* total        median wall time of one full solve,
* t_f          median time of one f call on the same batch,
* overhead     (total - NFE * t_f) / NFE: what the solver spends per f-evaluation beyond f itself,
* ovh (in)     the same with f timed inside the solve instead of in isolation: median of
               (total - time spent in f during that solve) / NFE. It is robust to f running at a
               different speed inside the solver (caches, allocator state); CPU only, since CUDA f
               calls return before their kernels finish,
* speed-up     torchdiffeq / flashode and torchode / flashode total time.

All libraries are timed in this one process, interleaved repeat by repeat (the order rotates each
repeat), so machine noise hits them alike; every figure is a median. torchode steps every sample
with its own step size, so its NFE may differ from the other two, which take identical steps.

Usage:  PYTHONPATH=python python benchmarks/overhead.py [--quick] [--device cuda] [--grad]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import flashode
import torchdiffeq

try:
    import torchode
except Exception as exc:  # torchode is optional: the comparison runs without it
    torchode = None
    TORCHODE_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    TORCHODE_IMPORT_ERROR = ""

RTOL, ATOL = 1e-6, 1e-8
N_TIMES = 10


# ----------------------------------------------------------------------------- problem


class MLP(nn.Module):
    """dy/dt = MLP(y): 2 -> 64 -> 64 -> 2 with tanh; counts its calls in `nfe` and adds the wall time
    spent inside it to `seconds` (two perf_counter reads per call, in every library alike)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2)
        )
        self.nfe = 0
        self.seconds = 0.0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self.nfe += 1
        out = self.net(y)
        self.seconds += time.perf_counter() - start
        return out


@dataclass
class Problem:
    func: MLP
    y0: torch.Tensor
    t: torch.Tensor


def make_problem(batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    func = MLP().to(device=device, dtype=dtype)
    y0 = torch.randn(batch, 2, device=device, dtype=dtype)
    t = torch.linspace(0.0, 1.0, N_TIMES, device=device, dtype=dtype)
    return Problem(func, y0, t)


# ----------------------------------------------------------------------------- solvers


def solve_flashode(p: Problem) -> torch.Tensor:
    return flashode.odeint(p.func, p.y0, p.t, rtol=RTOL, atol=ATOL, method="dopri5")


def solve_torchdiffeq(p: Problem) -> torch.Tensor:
    return torchdiffeq.odeint(p.func, p.y0, p.t, rtol=RTOL, atol=ATOL, method="dopri5")


def make_torchode_solver(p: Problem) -> Callable[[Problem], torch.Tensor]:
    """torchode's documented setup (AutoDiffAdjoint + Dopri5 + IntegralController); returns
    a solve function with output shaped like odeint's, (len(t), B, 2)."""
    func = p.func

    def f_wrapper(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # t has shape (B,)
        return func(t, y)

    term = torchode.ODETerm(f_wrapper)
    step_method = torchode.Dopri5(term=term)
    controller = torchode.IntegralController(atol=ATOL, rtol=RTOL, term=term)
    adjoint = torchode.AutoDiffAdjoint(step_method, controller).to(p.y0.device)
    t_eval = p.t.repeat(p.y0.shape[0], 1)

    def solve(q: Problem) -> torch.Tensor:
        sol = adjoint.solve(torchode.InitialValueProblem(y0=q.y0, t_eval=t_eval))
        solve.last_stats = sol.stats  # type: ignore[attr-defined]
        return sol.ys.transpose(0, 1)

    return solve


def available_solvers(p: Problem, notes: list[str]) -> dict[str, Callable[[Problem], torch.Tensor]]:
    """The libraries to compare; torchode is left out, with a note, if it cannot run here."""
    solvers: dict[str, Callable[[Problem], torch.Tensor]] = {
        "flashode": solve_flashode,
        "torchdiffeq": solve_torchdiffeq,
    }
    if torchode is None:
        notes.append(f"torchode skipped: not importable ({TORCHODE_IMPORT_ERROR})")
        return solvers
    try:
        solve = make_torchode_solver(p)
        with torch.no_grad():
            solve(p)
        solvers["torchode"] = solve
    except Exception as exc:
        notes.append(f"torchode skipped on {p.y0.device.type}: {type(exc).__name__}: {exc}")
    return solvers


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_solve(p: Problem, solve: Callable[[Problem], torch.Tensor]) -> tuple[float, float]:
    """(wall seconds of one solve, seconds of it spent inside f)."""
    p.func.seconds = 0.0
    total = timed(lambda: solve(p), p.y0.device)
    return total, p.func.seconds


def count_nfe(p: Problem, solve: Callable[[Problem], torch.Tensor]) -> int:
    p.func.nfe = 0
    solve(p)
    return p.func.nfe


def time_f_block(p: Problem, calls: int = 20) -> float:
    """Seconds per f call, from one block of `calls` back-to-back calls on the solve's batch."""
    t0 = p.t[0]
    start = time.perf_counter()
    for _ in range(calls):
        p.func(t0, p.y0)
    synchronize(p.y0.device)
    return (time.perf_counter() - start) / calls


@dataclass
class Measurement:
    nfe: int
    totals: list[float] = field(default_factory=list)
    f_times: list[float] = field(default_factory=list)
    outside_f: list[float] = field(default_factory=list)  # per solve: total - time inside f

    @property
    def total(self) -> float:
        return statistics.median(self.totals)

    @property
    def t_f(self) -> float:
        return statistics.median(self.f_times)

    @property
    def overhead_per_eval(self) -> float:
        return (self.total - self.nfe * self.t_f) / self.nfe

    @property
    def overhead_in_solve(self) -> float:
        return statistics.median(self.outside_f) / self.nfe


def measure_batch(p: Problem, solvers: dict[str, Callable[[Problem], torch.Tensor]], repeats: int,
                  warmup: int) -> dict[str, Measurement]:
    """Times every solver `repeats` times, interleaved (rotating order), plus f on its own."""
    names = list(solvers)
    with torch.no_grad():
        results = {name: Measurement(nfe=count_nfe(p, solvers[name])) for name in names}
        for _ in range(warmup):
            for name in names:
                solvers[name](p)
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                total, inside = timed_solve(p, solvers[name])
                results[name].totals.append(total)
                results[name].outside_f.append(total - inside)
                # t_f right next to each solve, so f's time sees the same machine state
                results[name].f_times.append(time_f_block(p))
    return results


def check_agreement(p: Problem, solvers: dict[str, Callable[[Problem], torch.Tensor]]) -> dict[str, float]:
    """Max |y_lib - y_torchdiffeq| over all outputs (torchode steps differently: looser)."""
    with torch.no_grad():
        ref = solve_torchdiffeq(p)
        return {name: float((solve(p) - ref).abs().max()) for name, solve in solvers.items()}


# ----------------------------------------------------------------------------- gradients


def measure_grad(device: torch.device, dtype: torch.dtype, batch: int, repeats: int, warmup: int
                 ) -> dict[str, tuple[int, float]]:
    """Median seconds of forward + backward through odeint (loss = sum of squares of all outputs);
    returns {library: (forward NFE, seconds)}."""
    p = make_problem(batch, device, dtype)
    solvers = {"flashode": solve_flashode, "torchdiffeq": solve_torchdiffeq}

    def step(solve: Callable[[Problem], torch.Tensor]) -> None:
        p.func.zero_grad(set_to_none=True)
        solve(p).pow(2).sum().backward()

    nfe = {name: count_nfe(p, solve) for name, solve in solvers.items()}
    times: dict[str, list[float]] = {name: [] for name in solvers}
    for _ in range(warmup):
        for solve in solvers.values():
            step(solve)
    for r in range(repeats):
        names = list(solvers) if r % 2 == 0 else list(reversed(solvers))
        for name in names:
            times[name].append(timed(lambda: step(solvers[name]), device))
    return {name: (nfe[name], statistics.median(ts)) for name, ts in times.items()}


# ----------------------------------------------------------------------------- reporting


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except Exception:
        pass
    desc = (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op thread(s)")
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if hasattr(os, "getloadavg"):  # other work on a shared machine skews multi-threaded timings
        desc += f", load average {os.getloadavg()[0]:.2f} at start"
    return desc


def in_solve_us(m: Measurement, device: torch.device) -> str:
    return f"{1e6 * m.overhead_in_solve:.1f}" if device.type == "cpu" else "n/a"


def print_batch(batch: int, results: dict[str, Measurement], diffs: dict[str, float],
                device: torch.device) -> None:
    base = results["flashode"].total
    print(f"\nB = {batch}")
    print(f"  {'library':<12} {'NFE':>5} {'total ms':>10} {'t_f us':>8} {'ovh/f-eval us':>14} "
          f"{'ovh (in) us':>12} {'time/flashode':>14} {'max|dy| vs tdq':>15}")
    for name, m in results.items():
        print(f"  {name:<12} {m.nfe:>5} {1e3 * m.total:>10.2f} {1e6 * m.t_f:>8.1f} "
              f"{1e6 * m.overhead_per_eval:>14.1f} {in_solve_us(m, device):>12} "
              f"{m.total / base:>14.2f} {diffs[name]:>15.2e}")


def markdown_table(all_results: dict[int, dict[str, Measurement]], header: str,
                   device: torch.device) -> str:
    lines = [header, "",
             "| B | library | NFE | solve (ms) | t_f (µs) | overhead / f-eval (µs) | "
             "overhead, f timed in solve (µs) | time vs flashode |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for batch, results in all_results.items():
        base = results["flashode"].total
        for name, m in results.items():
            lines.append(f"| {batch} | {name} | {m.nfe} | {1e3 * m.total:.2f} | {1e6 * m.t_f:.1f} | "
                         f"{1e6 * m.overhead_per_eval:.1f} | {in_solve_us(m, device)} | "
                         f"{m.total / base:.2f}× |")
    return "\n".join(lines)


def grad_table(grad: dict[str, tuple[int, float]], batch: int) -> str:
    base = grad["flashode"][1]
    lines = [f"Forward + backward through odeint, B = {batch} (autograd through the solve):", "",
             "| library | forward NFE | fwd+bwd (ms) | time vs flashode |", "|---|---:|---:|---:|"]
    for name, (nfe, seconds) in grad.items():
        lines.append(f"| {name} | {nfe} | {1e3 * seconds:.2f} | {seconds / base:.2f}× |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="B=16 only, fewer repeats")
    parser.add_argument("--grad", action="store_true", help="also time forward+backward at B=16")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--repeats", type=int, default=None, help="timed solves per library (default 21, quick 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    batches = [16] if args.quick else args.batches
    repeats = args.repeats or (7 if args.quick else 21)
    warmup = 2

    desc = machine_description(device)
    print(f"flashode overhead benchmark: dopri5, rtol={RTOL:g}, atol={ATOL:g}, {N_TIMES} output times, "
          f"{args.dtype}, device {device}, {repeats} interleaved repeats (median)")
    print(desc)
    notes: list[str] = []
    all_results: dict[int, dict[str, Measurement]] = {}
    for batch in batches:
        p = make_problem(batch, device, dtype)
        solvers = available_solvers(p, notes)
        results = measure_batch(p, solvers, repeats, warmup)
        if "torchode" in solvers:
            stats = solvers["torchode"].last_stats  # type: ignore[attr-defined]
            results["torchode"].nfe = int(stats["n_f_evals"].max())  # torchode's own count
        print_batch(batch, results, check_agreement(p, solvers), device)
        all_results[batch] = results

    header = (f"dopri5, rtol={RTOL:g}, atol={ATOL:g}, MLP 2-64-64-2 tanh, {N_TIMES} output times, "
              f"{args.dtype}, no_grad, device {device}. Machine: {desc}. "
              f"Median of {repeats} interleaved solves.")
    print("\n" + markdown_table(all_results, header, device))
    if args.grad:
        grad = measure_grad(device, dtype, 16, max(5, repeats // 2), warmup)
        print("\n" + grad_table(grad, 16))
    for note in dict.fromkeys(notes):
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
