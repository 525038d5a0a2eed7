"""Effective memory bandwidth of flashode's fused ops vs a plain tensor copy.

Every op is a single pass over memory, so its speed limit is the bandwidth of the machine: the
figure of merit is (bytes the op must read + write) / time, compared with `dst.copy_(src)` of the
same N (2N elements moved). Shapes are dopri5-like, k has S = 7 stage rows of N elements:

* rk_stage     5 nonzero coefficients (dopri5's a[5]):     reads 5 k rows + y,  writes 1 row
* rk_finalize  b with 6 nonzero, b_error with 7 nonzero,
               scalar tolerances, no error output:          reads 7 k rows + y,  writes y1
* rk_dense     dopri5's interpolant (6 nonzero stage rows)
               at 3 output times:                           reads 6 k rows + y,  writes 3 rows

Bytes are counted from the coefficients actually nonzero (the kernels skip zero rows). The ops are
called as the no-grad solver calls them, redispatched straight to the device kernel (`--path
public` goes through torch.ops.flashode.* and its autograd wrapper instead). The ops
allocate their outputs on every call (as the solver uses them); `dst.copy_(src)` writes into a
preallocated buffer, so a second baseline, `src.clone()` (copy into a fresh buffer), shows what
allocation and first-touch page faults cost at large N on the CPU.

CPU: wall-clock medians, torch's default thread count and, for N >= 1e6, one thread.
CUDA (--device cuda): torch.cuda.Event timing, device-to-device copy baseline.
A short latency table (N = 16) compares the public op, the autograd-free redispatch the solver
uses, and copy_, i.e. the fixed cost per call.

Usage:  PYTHONPATH=python python benchmarks/kernels.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

import flashode
from flashode import _ops
from flashode.tableaus import ADAPTIVE

STAGES = 7
DOPRI5 = ADAPTIVE["dopri5"]
STAGE_COEFFS = list(DOPRI5.a[5])  # 5 nonzero
# b (6 nonzero) and b_error (7 nonzero) as the brief's dopri5-like shape: every k row is read.
FINALIZE_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.05]
FINALIZE_E = [71 / 57600, -1e-3, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]
DENSE_POLY = [p for row in DOPRI5.dense for p in row]
DENSE_THETA = [0.25, 0.5, 0.75]
H = 0.01
PEAK_ROWS = 1 + STAGES + 1 + len(DENSE_THETA)  # y, k, the copy destination, rk_dense's output


# ----------------------------------------------------------------------------- op set-up


def rows_read(*coeff_lists: list[float]) -> int:
    """k rows with a nonzero coefficient in any of the lists (those the kernel reads)."""
    return sum(any(c[j] != 0.0 for c in coeff_lists if j < len(c)) for j in range(STAGES))


def dense_rows() -> int:
    degree = len(DOPRI5.dense[0])
    return sum(any(DENSE_POLY[j * degree + p] != 0.0 for p in range(degree)) for j in range(STAGES))


@dataclass
class Case:
    """One timed callable and the number of N-element rows it must move."""

    name: str
    fn: Callable[[], object]
    rows_moved: int


def op_table(device: torch.device, path: str):  # -> object with rk_stage / rk_finalize / rk_dense
    """The ops as the solver calls them without autograd ("solver": a redispatch straight to the
    device kernel) or as a user calls torch.ops.flashode.* ("public": through the autograd key,
    whose Python wrapper adds ~10 us per call even under no_grad)."""
    return _ops.NoGradOps(device) if path == "solver" else torch.ops.flashode


def make_cases(n: int, dtype: torch.dtype, device: torch.device, path: str) -> list[Case]:
    """copy_, clone and the three ops on fresh buffers of N elements (values in [-1, 1])."""
    y = torch.empty(n, dtype=dtype, device=device).uniform_(-1, 1)
    k = torch.empty(STAGES, n, dtype=dtype, device=device).uniform_(-1, 1)
    dst = torch.empty_like(y)
    rtol = torch.tensor(1e-6, dtype=dtype, device=device)
    atol = torch.tensor(1e-8, dtype=dtype, device=device)
    ops = op_table(device, path)
    return [
        Case("copy_", lambda: dst.copy_(y), 2),
        Case("clone", lambda: y.clone(), 2),
        Case("rk_stage", lambda: ops.rk_stage(y, k, STAGE_COEFFS, H), rows_read(STAGE_COEFFS) + 2),
        Case("rk_finalize",
             lambda: ops.rk_finalize(y, k, FINALIZE_B, FINALIZE_E, H, rtol, atol, [], False, False),
             rows_read(FINALIZE_B, FINALIZE_E) + 2),
        Case("rk_dense", lambda: ops.rk_dense(y, k, DENSE_POLY, DENSE_THETA, H),
             dense_rows() + 1 + len(DENSE_THETA)),
    ]


def capped_n(n: int, itemsize: int, mem_gb: float) -> int:
    """N, or the largest N (2 significant digits) whose peak footprint fits in mem_gb."""
    limit = int(mem_gb * 1e9 / (PEAK_ROWS * itemsize))
    if n <= limit:
        return n
    scale = 10 ** (len(str(limit)) - 2)
    return limit // scale * scale


# ----------------------------------------------------------------------------- timing


def estimate(fn: Callable[[], object], device: torch.device) -> float:
    """Rough seconds per call (after one warm-up call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_cpu(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def sample_cuda(fn: Callable[[], object], inner: int) -> float:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / inner


def time_cases(cases: list[Case], device: torch.device, budget_s: float, max_rounds: int
               ) -> dict[str, float]:
    """Median seconds per call of each case, timed in interleaved rounds (one sample of every case
    per round). Fast calls are batched so one sample lasts >= ~0.2 ms (CPU) or 1 ms (CUDA)."""
    min_sample = 1e-3 if device.type == "cuda" else 2e-4
    inner = {}
    per_round = 0.0
    for c in cases:
        est = max(estimate(c.fn, device), 1e-7)
        inner[c.name] = max(1, int(min_sample / est))
        per_round += est * inner[c.name]
    rounds = max(3, min(max_rounds, int(budget_s / per_round)))
    sample = sample_cuda if device.type == "cuda" else sample_cpu
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(rounds):
        for c in cases[r % len(cases):] + cases[: r % len(cases)]:
            sync(device)
            times[c.name].append(sample(c.fn, inner[c.name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------- measurements


@dataclass
class Row:
    dtype: str
    n: int
    threads: str
    op: str
    seconds: float
    gbps: float
    pct_copy: float


def bandwidth_rows(n: int, dtype: torch.dtype, device: torch.device, threads: str, path: str,
                   budget_s: float, max_rounds: int) -> list[Row]:
    cases = make_cases(n, dtype, device, path)
    itemsize = torch.empty((), dtype=dtype).element_size()
    with torch.no_grad():
        secs = time_cases(cases, device, budget_s, max_rounds)
    gbps = {c.name: c.rows_moved * n * itemsize / secs[c.name] / 1e9 for c in cases}
    name = str(dtype).removeprefix("torch.")
    return [Row(name, n, threads, c.name, secs[c.name], gbps[c.name], 100 * gbps[c.name] / gbps["copy_"])
            for c in cases]


def latency_table(device: torch.device, dtype: torch.dtype) -> list[tuple[str, float]]:
    """Microseconds per call at N = 16: the public op (dispatcher, autograd key, under no_grad),
    the solver's redispatch that skips the autograd wrapper, and copy_/torch.add for scale."""
    n = 16
    y = torch.randn(n, dtype=dtype, device=device)
    k = torch.randn(STAGES, n, dtype=dtype, device=device)
    dst = torch.empty_like(y)
    rtol = torch.tensor(1e-6, dtype=dtype, device=device)
    atol = torch.tensor(1e-8, dtype=dtype, device=device)
    pub = op_table(device, "public")
    solver = op_table(device, "solver")
    fin_args = (FINALIZE_B, FINALIZE_E, H, rtol, atol, [], False, False)
    cases = [
        Case("copy_", lambda: dst.copy_(y), 0),
        Case("torch.add(y, k[0], alpha=h)", lambda: torch.add(y, k[0], alpha=H), 0),
        Case("rk_stage (torch.ops)", lambda: pub.rk_stage(y, k, STAGE_COEFFS, H), 0),
        Case("rk_stage (solver path)", lambda: solver.rk_stage(y, k, STAGE_COEFFS, H), 0),
        Case("rk_finalize (torch.ops)", lambda: pub.rk_finalize(y, k, *fin_args), 0),
        Case("rk_finalize (solver path)", lambda: solver.rk_finalize(y, k, *fin_args), 0),
        Case("rk_dense (torch.ops)", lambda: pub.rk_dense(y, k, DENSE_POLY, DENSE_THETA, H), 0),
        Case("rk_dense (solver path)", lambda: solver.rk_dense(y, k, DENSE_POLY, DENSE_THETA, H), 0),
    ]
    with torch.no_grad():
        secs = time_cases(cases, device, budget_s=1.0, max_rounds=51)
    return [(c.name, 1e6 * secs[c.name]) for c in cases]


# ----------------------------------------------------------------------------- reporting


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except Exception:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if hasattr(os, "getloadavg"):  # other work on a shared machine skews multi-threaded timings
        desc += f", load average {os.getloadavg()[0]:.2f} at start"
    return desc


def fmt_n(n: int) -> str:
    exp = int(math.log10(n))
    return f"1e{exp}" if n == 10**exp else f"{n / 10**exp:g}e{exp}"


def print_block(rows: list[Row]) -> None:
    r0 = rows[0]
    print(f"\n{r0.dtype}  N={fmt_n(r0.n)}  threads={r0.threads}")
    for r in rows:
        print(f"  {r.op:<12} {1e3 * r.seconds:>10.4f} ms {r.gbps:>8.2f} GB/s {r.pct_copy:>6.0f}% of copy_")


def markdown(rows: list[Row], header: str) -> str:
    """One line per (dtype, N, threads): GB/s of every op and % of copy_ bandwidth."""
    ops = ["copy_", "clone", "rk_stage", "rk_finalize", "rk_dense"]
    lines = [header, "",
             "| dtype | N | threads | " + " | ".join(f"{op} GB/s" for op in ops) + " |",
             "|---|---:|---:|" + "---:|" * len(ops)]
    groups: dict[tuple[str, int, str], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.dtype, r.n, r.threads), {})[r.op] = r
    for (dtype, n, threads), by_op in groups.items():
        cells = [f"{by_op['copy_'].gbps:.1f}"] + [
            f"{by_op[op].gbps:.1f} ({by_op[op].pct_copy:.0f}%)" for op in ops[1:]]
        lines.append(f"| {dtype} | {fmt_n(n)} | {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="N up to 1e6 only, fewer repeats")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--mem-gb", type=float, default=8.0,
                        help="peak memory for the buffers; larger N are capped to fit (default 8)")
    parser.add_argument("--path", choices=["solver", "public"], default="solver",
                        help="call the ops as the no-grad solver does (default) or via torch.ops")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per (N, dtype, threads)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes if not args.quick or s <= 1e6]
    default_threads = torch.get_num_threads()
    desc = machine_description(device)
    print(f"flashode kernel bandwidth benchmark, device {device}: {desc}")
    flashode.show_config()
    if device.type not in _ops.kernel_devices:
        print(f"WARNING: no compiled flashode kernels for {device.type}; the ops below run the "
              "pure-PyTorch reference path, not the fused kernels")
    print(f"bytes moved per N-element row: copy_/clone 2, rk_stage {rows_read(STAGE_COEFFS) + 2}, "
          f"rk_finalize {rows_read(FINALIZE_B, FINALIZE_E) + 2}, rk_dense {dense_rows() + 1 + len(DENSE_THETA)} "
          f"(k has {STAGES} stages)")
    notes = []
    rows: list[Row] = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        for n_req in sizes:
            n = capped_n(n_req, itemsize, args.mem_gb)
            if n != n_req:
                notes.append(f"{dtype_name} N={fmt_n(n_req)} capped to N={fmt_n(n)}: y, k ({STAGES} rows), "
                             f"copy_ dst and rk_dense's {len(DENSE_THETA)} output rows must fit in "
                             f"{args.mem_gb:g} GB ({PEAK_ROWS} x N x {itemsize} B)")
            max_rounds = 7 if args.quick else 25
            thread_settings = [default_threads]
            if device.type == "cpu" and n >= 10**6 and default_threads > 1:
                thread_settings.append(1)
            for threads in thread_settings:
                torch.set_num_threads(threads)
                label = str(threads) if device.type == "cpu" else "-"
                block = bandwidth_rows(n, dtype, device, label, args.path, args.budget, max_rounds)
                print_block(block)
                rows.extend(block)
            torch.set_num_threads(default_threads)

    header = (f"Effective bandwidth (bytes the op must read + write / median time), % of `dst.copy_(src)` "
              f"in brackets; ops called via the {args.path} path. Device {device}; {desc}.")
    print("\n" + markdown(rows, header))
    print(f"\nPer-call latency at N=16 ({device}, float32, {torch.get_num_threads()} threads), µs:")
    print("\n| call | µs |\n|---|---:|")
    for name, us in latency_table(device, torch.float32):
        print(f"| {name} | {us:.1f} |")
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
