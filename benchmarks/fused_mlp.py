"""Whole-solve MLP fusion against the generic path and the other libraries, one process each.

Problem (benchmarks/overhead.py's): dy/dt = MLP(y), 2 -> 64 -> 64 -> 2 tanh, y0 = randn(B, 2), outputs
at t = linspace(0, 1, 10), dopri5 with rtol 1e-6 / atol 1e-8, float32, B in {16, 256, 4096}. Every
library solves the same weights and y0 and runs in its own process, one after the other, pinned to
one core with one thread; each reports the median of its repeats after a warm-up (JAX's compile
time is reported separately). Two modes: forward (no gradients), and forward + backward of
loss = sum of squares of all outputs with respect to y0 and the weights.

Libraries: flashode fused (`solve_ivp` on an `MLPField`, fused=True), flashode odeint (the drop-in
`odeint` call, which runs the same op), flashode generic (`solve_ivp` with fused=False: the MLP as
a Python func; all three step every sample on its own), torchode (per-sample steps), torchdiffeq
(one step size for the batch), and diffrax (JAX jit, the solve vmapped over samples so each keeps
its own steps; CPU only). The error column is the largest deviation of the outputs from a float64
generic flashode solve at rtol 1e-10.

`--device cuda` runs the torch libraries on the GPU (one process each, synchronised timings), for
B up to 1e6 with `--batch`.

Usage:  python benchmarks/fused_mlp.py [--batch 16 256 4096] [--repeats 11] [--rounds 1] [--libraries ...]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RTOL, ATOL, N_TIMES, HIDDEN = 1e-6, 1e-8, 10, 64
LIBRARIES = ("flashode-fused", "flashode-odeint", "flashode-generic", "torchode", "torchdiffeq", "diffrax")


def problem(batch: int) -> dict[str, Any]:
    """Weights, y0 and times as nested lists (shared by the torch and JAX children)."""
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Linear(2, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Linear(HIDDEN, 2)]
    return {
        "weights": [(lin.weight.tolist(), lin.bias.tolist()) for lin in layers],
        "y0": torch.randn(batch, 2, generator=torch.Generator().manual_seed(batch)).tolist(),
        "t": torch.linspace(0, 1, N_TIMES).tolist(),
    }


def median_ms(run: Callable[[], Any], repeats: int, sync: Callable[[], Any] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- torch children


def torch_mlp(spec: dict[str, Any], dtype: Any) -> Any:
    import torch

    from flashode.fused_mlp import MLPField

    field = MLPField(2, HIDDEN, 2, activation="tanh").to(dtype)
    linears = [m for m in field.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(linears, spec["weights"], strict=True):
            lin.weight.copy_(torch.tensor(w, dtype=dtype))
            lin.bias.copy_(torch.tensor(b, dtype=dtype))
    return field


def reference_outputs(spec: dict[str, Any]) -> Any:
    import torch

    import flashode

    field = torch_mlp(spec, torch.float64)
    y0 = torch.tensor(spec["y0"], dtype=torch.float64)
    with torch.no_grad():
        t = torch.tensor(spec["t"], dtype=torch.float64)
        return flashode.solve_ivp(field, y0, t, rtol=1e-10, atol=1e-12, fused=False).ys


def torch_solver(library: str, field: Any, t: Any) -> Callable[[Any], Any]:
    """y0 (B, 2) -> outputs (B, T, 2) for a torch library."""
    import torch

    import flashode

    if library == "flashode-fused":
        return lambda y0: flashode.solve_ivp(field, y0, t, rtol=RTOL, atol=ATOL, fused=True).ys
    if library == "flashode-odeint":  # the drop-in call: odeint on an MLPField runs fused too
        return lambda y0: flashode.odeint(field, y0, t, rtol=RTOL, atol=ATOL, options=dict(fused=True)).transpose(0, 1)
    if library == "flashode-generic":
        return lambda y0: flashode.solve_ivp(field, y0, t, rtol=RTOL, atol=ATOL, fused=False).ys
    if library == "torchdiffeq":
        import torchdiffeq

        return lambda y0: torchdiffeq.odeint(field, y0, t, rtol=RTOL, atol=ATOL, method="dopri5").transpose(0, 1)
    import torchode

    term = torchode.ODETerm(field)
    step = torchode.Dopri5(term=term)
    control = torchode.IntegralController(atol=ATOL, rtol=RTOL, term=term)
    solver = torchode.AutoDiffAdjoint(step, control)

    def solve(y0: Any) -> Any:
        return solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t.expand(y0.shape[0], -1))).ys

    del torch
    return solve


def run_torch(library: str, spec: dict[str, Any], repeats: int, device: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    field = torch_mlp(spec, torch.float32).to(device)
    t = torch.tensor(spec["t"], device=device)
    y0 = torch.tensor(spec["y0"], device=device)
    solve = torch_solver(library, field, t)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward() -> Any:
        with torch.no_grad():
            return solve(y0)

    def forward_backward() -> None:
        y = y0.clone().requires_grad_()
        field.zero_grad()
        solve(y).square().sum().backward()

    out = forward()
    forward_backward()
    err = (out.double().cpu() - reference_outputs(spec)).abs().max().item()
    return {"forward_ms": median_ms(forward, repeats, sync), "grad_ms": median_ms(forward_backward, repeats, sync),
            "err": err}


# ----------------------------------------------------------------------------- JAX child


def run_diffrax(spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    import diffrax
    import jax
    import jax.numpy as jnp

    params = [(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)) for w, b in spec["weights"]]
    y0 = jnp.asarray(spec["y0"], jnp.float32)
    ts = jnp.asarray(spec["t"], jnp.float32)

    def field(t: Any, y: Any, args: Any) -> Any:
        for i, (w, b) in enumerate(args):
            y = w @ y + b
            if i < len(args) - 1:
                y = jnp.tanh(y)
        return y

    def one(p: Any, y: Any) -> Any:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Dopri5(), t0=ts[0], t1=ts[-1], dt0=None, y0=y, args=p,
            saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=10_000,
        )
        return sol.ys

    batched = jax.jit(jax.vmap(one, in_axes=(None, 0)))
    loss_grad = jax.jit(jax.grad(lambda p, y: jnp.sum(jax.vmap(one, in_axes=(None, 0))(p, y) ** 2), argnums=(0, 1)))

    start = time.perf_counter()
    out = batched(params, y0).block_until_ready()
    compile_fwd = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(loss_grad(params, y0))
    compile_grad = time.perf_counter() - start

    import numpy as np
    import torch

    err = (torch.from_numpy(np.asarray(out)).double() - reference_outputs(spec)).abs().max().item()
    return {
        "forward_ms": median_ms(lambda: batched(params, y0).block_until_ready(), repeats),
        "grad_ms": median_ms(lambda: jax.block_until_ready(loss_grad(params, y0)), repeats),
        "err": err,
        "compile_s": compile_fwd + compile_grad,
    }


# ----------------------------------------------------------------------------- driver


def child(library: str, batch: int, repeats: int, device: str) -> None:
    spec = problem(batch)
    result = run_diffrax(spec, repeats) if library == "diffrax" else run_torch(library, spec, repeats, device)
    print("RESULT " + json.dumps(result))


def launch(library: str, batch: int, repeats: int, device: str) -> dict[str, Any] | str:
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "python"),
                                                                             os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, __file__, "--child", library, "--batch", str(batch), "--repeats", str(repeats),
               "--device", device]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]  # one core for every library alike
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return (run.stderr.strip().splitlines() or ["no output"])[-1][:100]


def combine_rounds(results: list[dict[str, Any] | str]) -> dict[str, Any] | str:
    """The median over rounds of each timing (a failure in any round is reported instead)."""
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        return failed[0]
    done = [r for r in results if isinstance(r, dict)]
    combined = dict(done[0])
    for key in ("forward_ms", "grad_ms"):
        combined[key] = statistics.median(r[key] for r in done)
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=1,
                        help="launch every library this many times in turn and report the median of their medians "
                             "(a shared machine's load drifts between processes)")
    parser.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch[0], args.repeats, args.device)
        return
    libraries = [name for name in args.libraries if not (args.device == "cuda" and name == "diffrax")]
    where = "one core" if args.device == "cpu" else "CUDA (diffrax skipped: JAX runs on the CPU here)"
    print(f"MLP 2-{HIDDEN}-{HIDDEN}-2 tanh, dopri5 rtol {RTOL:g} atol {ATOL:g}, {N_TIMES} output times on [0, 1], "
          f"float32, {where}, median of {args.repeats} repeats, median over {args.rounds} round(s)\n")
    print("| B | library | forward ms | fwd vs fused | fwd+bwd ms | fwd+bwd vs fused | max err | JAX compile s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        base: dict[str, Any] | None = None
        rounds: dict[str, list[dict[str, Any] | str]] = {library: [] for library in libraries}
        for _ in range(args.rounds):
            for library in libraries:
                rounds[library].append(launch(library, batch, args.repeats, args.device))
        for library in libraries:
            result = combine_rounds(rounds[library])
            if isinstance(result, str):
                print(f"| {batch} | {library} | failed: {result} | | | | | |")
                continue
            base = base or result
            compile_s = f"{result['compile_s']:.1f}" if "compile_s" in result else ""
            fwd, grad = result["forward_ms"], result["grad_ms"]
            print(f"| {batch} | {library} | {fwd:.3f} | {fwd / base['forward_ms']:.2f}× "
                  f"| {grad:.3f} | {grad / base['grad_ms']:.2f}× | {result['err']:.1e} | {compile_s} |", flush=True)


if __name__ == "__main__":
    main()
