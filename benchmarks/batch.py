"""Per-sample adaptive solving: flashode.solve_ivp vs torchode vs torchdiffeq, side by side.

Every sample of a batch is its own initial value problem. flashode.solve_ivp and torchode step each
sample with its own step size; torchdiffeq's odeint steps the whole batch with one step size (its
error norm is the RMS over the whole batch), so it is here as the joint-stepping baseline.

Problems (all under torch.no_grad(), 1 intra-op thread by default):

  vdp   van der Pol x'' = mu (1 - x^2) x' - x, B = 1024, mu ~ U[0.5, 5] per sample (seed 0),
        y0 = (2, 0) for every sample, 50 shared output times on [0, 10], float64,
        dopri5 and tsit5 (torchdiffeq 0.2.5 has no tsit5), rtol 1e-6, atol 1e-8.
  mlp   the 2 -> 64 -> 64 -> 2 tanh MLP field of benchmarks/overhead.py (same seed and y0; it
        ignores t), B in {256, 4096}, float32, dopri5, rtol 1e-6, atol 1e-8, per-sample output
        times: sample b has linspace(0, t1_b, 10) with t1_b ~ U[0.5, 1.5] (seed 1). torchdiffeq
        cannot take per-sample times, so it runs twice: on the sorted union of all the samples'
        times (then each sample's outputs are gathered; its dopri5 interpolates output times,
        so the union adds no steps, only per-output work), and on the exact reformulation
        s = t / t1_b (dy/ds = t1_b f(y), shared times linspace(0, 1, 10)).

For each library the table gives the median wall time of interleaved repeats (the order rotates
each repeat), time / flashode, and these counts:

  func calls     calls of func, i.e. evaluations of the whole batch (counted by the field);
  sample-evals   evaluations of one sample that its solver needed: flashode, the sum over samples
                 of stats["n_f_evals"] (counted while the sample runs); torchode, the sum over
                 samples of 2 + 6 * n_steps (its own stats["n_f_evals"] counts batch calls, the
                 same number for every sample; 2 = the initial-step heuristic, 6 = the FSAL
                 stages per step attempt); torchdiffeq (joint stepping), func calls * B.
                 Every library passes the full batch to func on every call, so the rows func
                 actually evaluates are func calls * B for all three;
  steps          step attempts (accepted + rejected), summed over samples and the per-sample max;
                 torchdiffeq's joint steps, (func calls - 2) / 6, count once per sample;
  rejected       rejected attempts summed over samples (torchdiffeq: not reported);
  ok             every sample's status is success (torchdiffeq has no status: finite outputs);
  max|err|       max abs difference from a reference solution over all outputs, and at the last
                 output time; the reference is flashode.solve_ivp with dopri8, rtol 1e-12,
                 atol 1e-14 in float64 on the CPU (the MLP in a float64 copy), itself checked
                 against scipy's DOP853 (rtol 1e-13) on a few samples (printed in a note).

Notes below the table compare flashode's per-sample step attempts with torchode's, stock and with
flashode's step-size rule (no shrinking after an accepted step).

--check-every times flashode.solve_ivp alone for check_every in {1, 2, 4, 8, 16, 32} on vdp
(dopri5) and, as well, on the mlp problem at the largest B (a problem of few steps, where the
steps run after the last sample finished matter most), to choose the default.

On CUDA the tables add "host syncs": synchronising calls counted in one extra, untimed solve with
torch.cuda.set_sync_debug_mode("warn") (it flags item()/bool()/nonzero()/blocking copies) plus
explicit torch.cuda.Event.synchronize calls (torchode waits on one every step). Stream or device
synchronisations made some other way are not counted.

--grad times forward + backward instead, on the mlp problem at B in {256, 4096} (--quick: 64),
float32, dopri5, rtol 1e-6, atol 1e-8 forward and backward, loss = sum of squares of the outputs of
the samples that succeeded, gradients with respect to y0 and the MLP's parameters:

  flashode backprop        solve_ivp (autograd through the solve, its default);
  flashode adjoint         solve_ivp(..., adjoint=True): each sample's adjoint solved backwards with
                           its own steps, the parameters' adjoint a seminorm (not error-controlled);
  torchode AutoDiffAdjoint backprop through torchode's loop (it also differentiates the step sizes:
                           backprop_through_step_size_control=True, its default);
  torchode BacksolveAdjoint  per-sample backward solves of [t, y, a, per-sample dL/dθ] (a vmap of
                           torch.func.vjp per sample), every channel error-controlled;
  torchdiffeq odeint / odeint_adjoint  on the '(t/t1 rescaled)' formulation (joint steps), the
                           adjoint with torchdiffeq's default norm (parameters included).

For each: the median fwd+bwd wall time of interleaved repeats (a method whose one counted run takes
longer than --single-run-above seconds is timed from that run alone, marked with *), time / flashode
backprop, calls of the field in the forward and in the backward (backprop replays the recorded
graph, calling no field: 0), and the relative errors of dL/dθ (all parameters concatenated) and of
dL/dy0: max |g - g_ref| / max |g_ref|, g_ref from flashode backprop in float64 at rtol 1e-10,
atol 1e-12 (dopri5, the MLP in a float64 copy), itself cross-checked on a few samples against
torchdiffeq odeint (dopri8, rtol 1e-12, float64, rescaled) backprop (printed in a note).

Usage:  PYTHONPATH=python python benchmarks/batch.py [--quick] [--device cuda] [--check-every | --grad]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# overhead.py (beside this file) gives the MLP field, its y0 and the machine header line.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashode
import torchdiffeq
from overhead import machine_description, make_problem

try:
    import torchode
except Exception as exc:  # noqa: BLE001  (optional: the comparison runs without it)
    torchode = None
    TORCHODE_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    TORCHODE_IMPORT_ERROR = ""

try:
    import scipy.integrate as scipy_integrate
except Exception:  # noqa: BLE001  (only for the reference's cross-check)
    scipy_integrate = None

RTOL, ATOL = 1e-6, 1e-8
REF = {"method": "dopri8", "rtol": 1e-12, "atol": 1e-14}
STAGE_EVALS = {"dopri5": 6, "tsit5": 6}  # new evaluations per step attempt (both FSAL, 7 stages)
CHECK_EVERY = [1, 2, 4, 8, 16, 32]


# ----------------------------------------------------------------------------- problems


class VanDerPol(nn.Module):
    """dy/dt for y = (x, x') with a per-sample mu; counts its calls in `nfe`."""

    def __init__(self, mu: Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.nfe = 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        x, v = y[..., 0], y[..., 1]
        return torch.stack((v, self.mu * (1 - x * x) * v - x), dim=-1)


@dataclass
class Problem:
    name: str
    func: nn.Module  # counts its calls in .nfe
    y0: Tensor  # (B, F)
    t_eval: Tensor  # (B, T) per-sample output times
    shared_t: Tensor | None  # (T,) when every sample has the same times
    ref_func: Callable[[], tuple[nn.Module, Tensor, Tensor]]  # float64 CPU copies (func, y0, t_eval)
    scipy_rhs: Callable[[int], Callable[[float, Any], Any]]  # sample b's right-hand side, numpy

    @property
    def batch(self) -> int:
        return self.y0.shape[0]


def vdp_problem(batch: int, device: torch.device) -> Problem:
    gen = torch.Generator().manual_seed(0)
    mu = 0.5 + 4.5 * torch.rand(batch, generator=gen, dtype=torch.float64)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64).repeat(batch, 1)
    t = torch.linspace(0.0, 10.0, 50, dtype=torch.float64)

    def rhs(b: int) -> Callable[[float, Any], Any]:
        m = float(mu[b])
        return lambda _t, y: [y[1], m * (1 - y[0] ** 2) * y[1] - y[0]]

    return Problem(
        f"vdp B={batch}", VanDerPol(mu.to(device)), y0.to(device), t.repeat(batch, 1).to(device), t.to(device),
        lambda: (VanDerPol(mu.clone()), y0.clone(), t.repeat(batch, 1)), rhs,
    )


def mlp_problem(batch: int, device: torch.device) -> Problem:
    base = make_problem(batch, device, torch.float32)  # overhead.py's MLP and y0 (seed 0)
    gen = torch.Generator().manual_seed(1)
    t1 = 0.5 + torch.rand(batch, generator=gen, dtype=torch.float64)
    t_eval = (t1[:, None] * torch.linspace(0.0, 1.0, 10, dtype=torch.float64)).float()
    func64 = copy.deepcopy(base.func).to(device="cpu", dtype=torch.float64)

    def rhs(b: int) -> Callable[[float, Any], Any]:
        def f(_t: float, y: Any) -> Any:
            with torch.no_grad():
                return func64.net(torch.as_tensor(y, dtype=torch.float64)[None])[0].numpy()
        return f

    return Problem(
        f"mlp B={batch}", base.func, base.y0, t_eval.to(device), None,
        lambda: (copy.deepcopy(func64), base.y0.detach().cpu().double(), t_eval.double()), rhs,
    )


def reference(p: Problem) -> Tensor:
    """(B, T, F) float64 CPU: flashode dopri8 at rtol 1e-12."""
    func, y0, t_eval = p.ref_func()
    with torch.no_grad():
        sol = flashode.solve_ivp(func, y0, t_eval, **REF)
    sol.raise_for_status()
    return sol.ys


def scipy_check(p: Problem, ref: Tensor, samples: int = 6) -> str:
    """Max |reference - scipy DOP853| over a few samples' outputs."""
    if scipy_integrate is None:
        return "reference not cross-checked (scipy not importable)"
    t_eval = p.t_eval.detach().cpu().double()
    y0 = p.y0.detach().cpu().double()
    worst = 0.0
    picks = sorted(set(torch.linspace(0, p.batch - 1, samples).round().long().tolist()))
    for b in picks:
        ts = t_eval[b].numpy()
        out = scipy_integrate.solve_ivp(p.scipy_rhs(b), (ts[0], ts[-1]), y0[b].numpy(), method="DOP853",
                                        t_eval=ts, rtol=1e-13, atol=1e-15)
        worst = max(worst, float((torch.from_numpy(out.y.T) - ref[b]).abs().max()))
    return (
        f"{p.name}: reference (flashode dopri8, rtol 1e-12) vs scipy DOP853 (rtol 1e-13) on {len(picks)} samples: "
        f"max |diff| {worst:.1e}"
    )


# ----------------------------------------------------------------------------- libraries


@dataclass
class Outcome:
    ys: Tensor  # (B, T, F)
    ok: bool
    steps: Tensor  # (B,) step attempts per sample
    rejected: int | None
    sample_evals: int
    loop_reads: int | None = None


@dataclass
class Runner:
    name: str
    solve: Callable[[], Any]
    summarise: Callable[[Any, int], Outcome]  # (raw result, func calls) -> Outcome


def flashode_runner(p: Problem, method: str, check_every: int | None = None, name: str = "flashode") -> Runner:
    t = p.shared_t if p.shared_t is not None else p.t_eval

    def solve() -> Any:
        return flashode.solve_ivp(p.func, p.y0, t, method=method, rtol=RTOL, atol=ATOL, check_every=check_every)

    def summarise(sol: Any, calls: int) -> Outcome:
        ok = bool(sol.success.all()) and bool(torch.isfinite(sol.ys).all())
        return Outcome(sol.ys, ok, sol.stats["n_steps"], int(sol.stats["n_rejected"].sum()),
                       int(sol.stats["n_f_evals"].sum()), getattr(sol, "loop_reads", None))

    return Runner(name, solve, summarise)


def torchode_runner(p: Problem, method: str, controller: type | None = None, name: str = "torchode") -> Runner:
    """torchode's documented setup: ODETerm, Dopri5/Tsit5, IntegralController, AutoDiffAdjoint."""
    term = torchode.ODETerm(p.func)  # f(t, y) with t of shape (B,)
    step = {"dopri5": torchode.Dopri5, "tsit5": torchode.Tsit5}[method](term=term)
    ctrl = (controller or torchode.IntegralController)(atol=ATOL, rtol=RTOL, term=term)
    adjoint = torchode.AutoDiffAdjoint(step, ctrl).to(p.y0.device)
    t_eval = p.t_eval.contiguous()

    def solve() -> Any:
        return adjoint.solve(torchode.InitialValueProblem(y0=p.y0, t_eval=t_eval))

    def summarise(sol: Any, calls: int) -> Outcome:
        n_steps = sol.stats["n_steps"].cpu()
        ok = bool((sol.status == 0).all()) and bool(torch.isfinite(sol.ys).all())
        if int(sol.stats["n_f_evals"].max()) != calls:
            print(f"  warning: torchode counted {int(sol.stats['n_f_evals'].max())} func calls, the field {calls}")
        return Outcome(sol.ys, ok, n_steps, int((n_steps - sol.stats["n_accepted"].cpu()).sum()),
                       int((2 + STAGE_EVALS[method] * n_steps).sum()))

    return Runner(name, solve, summarise)


def torchdiffeq_summary(batch: int, method: str) -> Callable[[Tensor, int], Outcome]:
    def summarise(ys: Tensor, calls: int) -> Outcome:
        joint = (calls - 2) // STAGE_EVALS[method]
        return Outcome(ys, bool(torch.isfinite(ys).all()), torch.full((batch,), joint), None, calls * batch)

    return summarise


def torchdiffeq_runner(p: Problem, method: str) -> Runner:
    """Shared times: odeint as is, with per-sample mu inside func."""
    def solve() -> Tensor:
        return torchdiffeq.odeint(p.func, p.y0, p.shared_t, method=method, rtol=RTOL, atol=ATOL).transpose(0, 1)

    return Runner("torchdiffeq", solve, torchdiffeq_summary(p.batch, method))


def torchdiffeq_union_runner(p: Problem, method: str) -> Runner:
    """Per-sample times: odeint on the sorted union of every sample's times, then a gather."""
    union = torch.unique(p.t_eval.flatten())  # sorted
    index = torch.searchsorted(union, p.t_eval)  # (B, T)
    rows = torch.arange(p.batch, device=p.y0.device)[:, None]

    def solve() -> Tensor:
        out = torchdiffeq.odeint(p.func, p.y0, union, method=method, rtol=RTOL, atol=ATOL)  # (U, B, F)
        return out[index, rows]

    return Runner(f"torchdiffeq (union, {union.numel()} times)", solve, torchdiffeq_summary(p.batch, method))


class Rescaled(nn.Module):
    """dy/ds = t1_b f(t1_b s, y): sample b's [0, t1_b] mapped onto [0, 1]."""

    def __init__(self, func: nn.Module, t1: Tensor) -> None:
        super().__init__()
        self.func, self.t1 = func, t1

    def forward(self, s: Tensor, y: Tensor) -> Tensor:
        return self.t1[:, None] * self.func(s * self.t1, y)


def torchdiffeq_rescaled_runner(p: Problem, method: str) -> Runner:
    t1 = p.t_eval[:, -1].clone()
    func = Rescaled(p.func, t1)
    s = p.t_eval[0] / p.t_eval[0, -1]  # linspace(0, 1, T): every sample's times are linspace(0, t1_b, T)
    assert torch.allclose(p.t_eval / t1[:, None], s.expand_as(p.t_eval), atol=1e-6)

    def solve() -> Tensor:
        return torchdiffeq.odeint(func, p.y0, s, method=method, rtol=RTOL, atol=ATOL).transpose(0, 1)

    return Runner("torchdiffeq (t/t1 rescaled)", solve, torchdiffeq_summary(p.batch, method))


def runners_for(p: Problem, method: str, notes: list[str]) -> list[Runner]:
    runners = [flashode_runner(p, method)]
    if torchode is None:
        notes.append(f"torchode skipped: not importable ({TORCHODE_IMPORT_ERROR})")
    else:
        runners.append(torchode_runner(p, method))
    if method not in ("dopri5",):  # torchdiffeq 0.2.5: dopri5, dopri8, bosh3, ... but no tsit5
        notes.append(f"torchdiffeq {getattr(torchdiffeq, '__version__', '')} has no {method}: no torchdiffeq row")
    elif p.shared_t is not None:
        runners.append(torchdiffeq_runner(p, method))
    else:
        runners += [torchdiffeq_union_runner(p, method), torchdiffeq_rescaled_runner(p, method)]
    return runners


# ----------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_host_syncs(fn: Callable[[], Any]) -> int | None:
    """CUDA: synchronising calls during fn() that torch's sync debug mode flags, plus explicit
    torch.cuda.Event.synchronize calls; None if counting failed."""
    try:
        original = torch.cuda.Event.synchronize
        events = 0

        def counted(self: Any) -> Any:
            nonlocal events
            events += 1
            return original(self)

        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.Event.synchronize = counted  # type: ignore[method-assign]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
        finally:
            torch.cuda.Event.synchronize = original  # type: ignore[method-assign]
        return events + sum("synchronizing" in str(w.message) for w in caught)
    except Exception:  # noqa: BLE001
        return None


@dataclass
class Row:
    problem: str
    method: str
    library: str
    seconds: float
    calls: int
    outcome: Outcome
    err_all: float
    err_last: float
    syncs: int | None = None


def measure(p: Problem, method: str, runners: list[Runner], ref: Tensor, repeats: int, notes: list[str]) -> list[Row]:
    """One counted solve per runner (func calls, outcome), then `repeats` interleaved timed ones."""
    device = p.y0.device
    calls: dict[str, int] = {}
    outcomes: dict[str, Outcome] = {}
    live: list[Runner] = []
    with torch.no_grad():
        for r in runners:
            p.func.nfe = 0
            try:
                raw = r.solve()
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{p.name} {method}: {r.name} failed on {device.type}: {type(exc).__name__}: {exc}")
                continue
            synchronize(device)
            calls[r.name] = p.func.nfe
            outcomes[r.name] = r.summarise(raw, p.func.nfe)
            live.append(r)
        times: dict[str, list[float]] = {r.name: [] for r in live}
        for rep in range(repeats):
            k = rep % len(live)
            for r in live[k:] + live[:k]:
                synchronize(device)
                start = time.perf_counter()
                r.solve()
                synchronize(device)
                times[r.name].append(time.perf_counter() - start)
        syncs = {r.name: count_host_syncs(r.solve) if device.type == "cuda" else None for r in live}
    rows = []
    for r in live:
        o = outcomes[r.name]
        diff = (o.ys.detach().to("cpu", torch.float64) - ref).abs()
        rows.append(Row(p.name, method, r.name, statistics.median(times[r.name]), calls[r.name], o,
                        float(diff.max()), float(diff[:, -1].max()), syncs[r.name]))
    return rows


def step_agreement(p: Problem, method: str) -> str:
    """Per-sample step attempts of flashode vs stock torchode and vs torchode with flashode's (and
    torchdiffeq's) step-size rule: after an accepted step the step never shrinks."""

    class NoShrinkAfterAccept(torchode.IntegralController):
        def dt_factor(self, state: Any, error_ratio: Tensor) -> Tensor:
            factor = self.safety * error_ratio ** (-1.0 / state.method_order)
            lower = torch.where(error_ratio < 1.0, 1.0, self.factor_min)
            return torch.clamp(torch.maximum(factor, lower), max=self.factor_max)

    with torch.no_grad():
        sol = flashode_runner(p, method).solve()
        ours = sol.stats["n_steps"].cpu()
        parts = []
        for label, ctrl in (("stock torchode", None), ("torchode with flashode's rule", NoShrinkAfterAccept)):
            steps = torchode_runner(p, method, ctrl).solve().stats["n_steps"].cpu()
            d = (ours - steps).double()
            parts.append(f"vs {label}: sum {int(ours.sum())} vs {int(steps.sum())}, "
                         f"per-sample diff mean {d.mean():+.2f}, max |diff| {int(d.abs().max())}")
    return f"{p.name} {method} step attempts, flashode " + "; ".join(parts)


# ----------------------------------------------------------------------------- reporting


def fmt_ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}" if seconds >= 0.01 else f"{1e3 * seconds:.2f}"


def print_table(rows: list[Row], cuda: bool) -> None:
    head = ("| problem | method | library | time (ms) | time / flashode | func calls | sample-evals | "
            "steps total | steps max | rejected | ok | max abs err (all) | max abs err (last) |")
    align = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    if cuda:
        head += " host syncs |"
        align += "---:|"
    print(head)
    print(align)
    base: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.library == "flashode":
            base[(row.problem, row.method)] = row.seconds
    for row in rows:
        o = row.outcome
        ratio = row.seconds / base[(row.problem, row.method)] if (row.problem, row.method) in base else float("nan")
        line = (f"| {row.problem} | {row.method} | {row.library} | {fmt_ms(row.seconds)} | {ratio:.2f}× | "
                f"{row.calls} | {o.sample_evals} | {int(o.steps.sum())} | {int(o.steps.max())} | "
                f"{'n/a' if o.rejected is None else o.rejected} | {'yes' if o.ok else 'NO'} | "
                f"{row.err_all:.1e} | {row.err_last:.1e} |")
        if cuda:
            line += f" {'n/a' if row.syncs is None else row.syncs} |"
        print(line)


# ----------------------------------------------------------------------------- modes


def run_comparison(args: argparse.Namespace, device: torch.device, repeats: int) -> list[str]:
    notes: list[str] = []
    agreement: list[str] = []
    rows: list[Row] = []
    problems = [(vdp_problem(args.vdp_batch, device), ["dopri5", "tsit5"])]
    problems += [(mlp_problem(b, device), ["dopri5"]) for b in args.mlp_batches]
    for p, methods in problems:
        start = time.perf_counter()
        ref = reference(p)
        notes.append(scipy_check(p, ref))
        for method in methods:
            rows += measure(p, method, runners_for(p, method, notes), ref, repeats, notes)
            if torchode is not None and method == "dopri5":
                agreement.append(step_agreement(p, method))
        print(f"  {p.name}: {time.perf_counter() - start:.1f} s", flush=True)
    print()
    print_table(rows, device.type == "cuda")
    for line in agreement:
        print(f"\nNote: {line}")
    check_every = flashode.batch.DEFAULT_CHECK_EVERY.get(device.type, 16)
    notes += [
        "vdp in float64, mlp in float32; rtol 1e-6 and atol 1e-8 for every library and problem.",
        ("flashode and torchode step every sample with its own step size; torchdiffeq takes one step size "
         "for the whole batch, its error the RMS over all samples' elements (so samples are not held to "
         "rtol/atol one by one)."),
        ("torchode runs eagerly (no torch.jit.script / torch.compile), as its documented API; its "
         "IntegralController clamps every step-size factor to [0.2, 10], so it also shrinks the step "
         "after an accepted step whose error ratio is above 0.9^5, where flashode and torchdiffeq keep "
         "it (factor >= 1 after an accepted step): hence torchode's fewer rejected steps on vdp."),
        ("flashode (clip_to_end=True, its default) and torchode shorten the last step to land on t_end; "
         "torchdiffeq steps past the last output time and interpolates."),
        (f"flashode runs with its default check_every ({check_every} on {device.type}): after the last "
         "sample finishes, up to check_every - 1 more steps of func calls on the whole batch run "
         "(see --check-every)."),
        ("mlp: torchdiffeq cannot take per-sample output times: '(union, U times)' solves on the sorted "
         "union of every sample's times and gathers each sample's own; '(t/t1 rescaled)' solves the exact "
         "reformulation dy/ds = t1_b f(t1_b s, y) on shared s = linspace(0, 1, 10)."),
        "mlp errors are those of float32 arithmetic against a float64 reference of the same field.",
    ]
    return notes


def run_check_every(args: argparse.Namespace, device: torch.device, repeats: int) -> list[str]:
    problems = [(vdp_problem(args.vdp_batch, device), "dopri5"), (mlp_problem(max(args.mlp_batches), device), "dopri5")]
    cuda = device.type == "cuda"
    head = ("| problem | check_every | time (ms) | time / check_every=1 | func calls | wasted func calls | "
            "steps max | loop reads | ys identical to check_every=1 |")
    align = "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    if cuda:
        head, align = head + " host syncs |", align + "---:|"
    lines = []
    for p, method in problems:
        runners = [flashode_runner(p, method, c, name=str(c)) for c in CHECK_EVERY]
        calls, outcomes = {}, {}
        with torch.no_grad():
            for r in runners:
                p.func.nfe = 0
                outcomes[r.name] = r.summarise(r.solve(), 0)
                calls[r.name] = p.func.nfe
            times: dict[str, list[float]] = {r.name: [] for r in runners}
            for rep in range(repeats):
                k = rep % len(runners)
                for r in runners[k:] + runners[:k]:
                    synchronize(device)
                    start = time.perf_counter()
                    r.solve()
                    synchronize(device)
                    times[r.name].append(time.perf_counter() - start)
            syncs = {r.name: count_host_syncs(r.solve) if cuda else None for r in runners}
        base = statistics.median(times["1"])
        for r in runners:
            o, med = outcomes[r.name], statistics.median(times[r.name])
            needed = 2 + STAGE_EVALS[method] * int(o.steps.max())  # func calls had the loop stopped at once
            line = (f"| {p.name} {method} | {r.name} | {fmt_ms(med)} | {med / base:.2f}× | {calls[r.name]} | "
                    f"{calls[r.name] - needed} | {int(o.steps.max())} | "
                    f"{'n/a' if o.loop_reads is None else o.loop_reads} | "
                    f"{'yes' if torch.equal(o.ys, outcomes['1'].ys) else 'NO'} |")
            if cuda:
                line += f" {'n/a' if syncs[r.name] is None else syncs[r.name]} |"
            lines.append(line)
        print(f"  {p.name}: done", flush=True)
    print()
    print(head)
    print(align)
    print("\n".join(lines))
    return [("wasted func calls = func calls - (2 + 6 * the per-sample max of step attempts): the "
             "whole-batch steps run after every sample had finished, before the loop's next check."),
            f"default check_every now: {flashode.batch.DEFAULT_CHECK_EVERY}"]


# ----------------------------------------------------------------------------- gradients (--grad)


GRAD_REF = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-12}  # flashode backprop in float64
GRAD_CHECK = {"method": "dopri8", "rtol": 1e-12, "atol": 1e-14}  # torchdiffeq's, on a few samples
GRAD_REF_CHUNK = 1024  # samples per reference solve (bounds the recorded graph's memory)


@dataclass
class GradRunner:
    """forward(y0) -> (ys (B, T, F), ok (B,)); the loss is taken over the ok samples."""

    name: str
    forward: Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class GradResult:
    y0: Tensor  # dL/dy0, (B, F)
    params: Tensor  # dL/dθ, every parameter flattened and concatenated
    failed: int  # samples left out of the loss


@dataclass
class GradRow:
    problem: str
    library: str
    seconds: float
    single_run: bool
    fwd_calls: int
    bwd_calls: int
    failed: int
    err_params: float
    err_y0: float


def fwd_bwd(func: nn.Module, y0: Tensor, forward: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[GradResult, int]:
    """One forward + backward of loss = sum of squares of the ok samples' outputs; the gradients and
    the field's calls in the forward (func.nfe counts on through the backward)."""
    func.zero_grad(set_to_none=True)
    y0 = y0.detach().clone().requires_grad_()
    ys, ok = forward(y0)
    fwd_calls = func.nfe
    ys[ok].pow(2).sum().backward()
    params = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten() for q in func.parameters()])
    return GradResult(y0.grad, params, int((~ok).sum())), fwd_calls


def _rescaled(func: nn.Module, t_eval: Tensor) -> tuple[nn.Module, Tensor]:
    """torchdiffeq's form of per-sample times (see torchdiffeq_rescaled_runner): field and shared s."""
    t1 = t_eval[:, -1].clone()
    s = t_eval[0] / t_eval[0, -1]
    assert torch.allclose(t_eval / t1[:, None], s.expand_as(t_eval), atol=1e-6)
    return Rescaled(func, t1), s


def grad_runners(p: Problem, notes: list[str]) -> list[GradRunner]:
    func, t_eval = p.func, p.t_eval
    tol = {"rtol": RTOL, "atol": ATOL}

    def flashode_forward(adjoint: bool) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        def forward(y0: Tensor) -> tuple[Tensor, Tensor]:
            sol = flashode.solve_ivp(func, y0, t_eval, method="dopri5", adjoint=adjoint, **tol)
            return sol.ys, sol.success

        return forward

    runners = [GradRunner("flashode backprop", flashode_forward(False)),
               GradRunner("flashode adjoint", flashode_forward(True))]

    if torchode is None:
        notes.append(f"torchode skipped: not importable ({TORCHODE_IMPORT_ERROR})")
    else:
        term = torchode.ODETerm(func)  # BacksolveAdjoint calls term.f functionally, with its parameters
        step = torchode.Dopri5(term=term)
        ctrl = torchode.IntegralController(atol=ATOL, rtol=RTOL, term=term)
        t_eval_c = t_eval.contiguous()

        def torchode_forward(solver: Any) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
            def forward(y0: Tensor) -> tuple[Tensor, Tensor]:
                sol = solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval_c))
                return sol.ys, sol.status == 0

            return forward

        for name, solver in (("torchode AutoDiffAdjoint", torchode.AutoDiffAdjoint(step, ctrl)),
                             ("torchode BacksolveAdjoint", torchode.BacksolveAdjoint(term, step, ctrl))):
            runners.append(GradRunner(name, torchode_forward(solver.to(p.y0.device))))

    rescaled, s = _rescaled(func, t_eval)
    for name, odeint in (("torchdiffeq odeint", torchdiffeq.odeint),
                         ("torchdiffeq odeint_adjoint", torchdiffeq.odeint_adjoint)):
        def forward(y0: Tensor, odeint: Callable[..., Tensor] = odeint) -> tuple[Tensor, Tensor]:
            ys = odeint(rescaled, y0, s, method="dopri5", **tol).transpose(0, 1)
            return ys, torch.isfinite(ys).flatten(1).all(1)

        runners.append(GradRunner(f"{name} (t/t1 rescaled)", forward))
    return runners


def grad_reference(p: Problem) -> GradResult:
    """flashode backprop in float64 at rtol 1e-10, in chunks of samples (the loss is a sum over
    samples, so dL/dθ is the sum of the chunks')."""
    func, y0, t_eval = p.ref_func()
    y0_grads, param_grads = [], []
    for start in range(0, p.batch, GRAD_REF_CHUNK):
        rows = slice(start, start + GRAD_REF_CHUNK)

        def forward(y: Tensor, rows: slice = rows) -> tuple[Tensor, Tensor]:
            sol = flashode.solve_ivp(func, y, t_eval[rows], **GRAD_REF)
            sol.raise_for_status()
            return sol.ys, sol.success

        result, _ = fwd_bwd(func, y0[rows], forward)
        y0_grads.append(result.y0)
        param_grads.append(result.params)
    return GradResult(torch.cat(y0_grads), torch.stack(param_grads).sum(0), 0)


def grad_reference_check(p: Problem, ref: GradResult, samples: int = 16) -> str:
    """The reference against torchdiffeq backprop (dopri8, rtol 1e-12, float64) on a few samples."""
    func, y0, t_eval = p.ref_func()
    picks = torch.linspace(0, p.batch - 1, samples).round().long().unique()
    rescaled, s = _rescaled(func, t_eval[picks])

    def forward(y: Tensor) -> tuple[Tensor, Tensor]:
        ys = torchdiffeq.odeint(rescaled, y, s, **GRAD_CHECK).transpose(0, 1)
        return ys, torch.ones(len(picks), dtype=torch.bool)

    def subset(y: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        sol = flashode.solve_ivp(func, y, t_eval[rows], **GRAD_REF)
        return sol.ys, sol.success

    check, _ = fwd_bwd(func, y0[picks], forward)
    ours, _ = fwd_bwd(func, y0[picks], lambda y: subset(y, picks))
    e_params, e_y0 = rel_err(ours.params, check.params), rel_err(ours.y0, check.y0)
    assert torch.allclose(ours.y0, ref.y0[picks]), "reference: a subset's dL/dy0 differs from the whole batch's"
    return (f"{p.name}: gradient reference (flashode backprop, dopri5, rtol 1e-10, float64) vs torchdiffeq odeint "
            f"backprop (dopri8, rtol 1e-12, float64) on {len(picks)} samples: relative difference of dL/dθ "
            f"{e_params:.1e}, of dL/dy0 {e_y0:.1e}")


def rel_err(g: Tensor, ref: Tensor) -> float:
    return float((g.detach().to("cpu", torch.float64) - ref).abs().max() / ref.abs().max())


def measure_grad(p: Problem, runners: list[GradRunner], ref: GradResult, repeats: int, single_run_above: float,
                 notes: list[str]) -> list[GradRow]:
    """One counted fwd+bwd per runner (calls, gradients), then `repeats` interleaved timed ones;
    a runner whose counted run took over `single_run_above` seconds keeps that run's time."""
    device = p.y0.device
    counted: dict[str, tuple[GradResult, int, int, float]] = {}
    live: list[GradRunner] = []
    for r in runners:
        p.func.nfe = 0
        synchronize(device)
        start = time.perf_counter()
        try:
            result, fwd_calls = fwd_bwd(p.func, p.y0, r.forward)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"{p.name}: {r.name} failed on {device.type}: {type(exc).__name__}: {exc}")
            continue
        synchronize(device)
        seconds = time.perf_counter() - start
        counted[r.name] = (result, fwd_calls, p.func.nfe - fwd_calls, seconds)
        if seconds <= single_run_above:
            live.append(r)
        print(f"    {r.name}: counted run {seconds:.2f} s", flush=True)
    times: dict[str, list[float]] = {r.name: [] for r in live}
    for rep in range(repeats if live else 0):
        k = rep % len(live)
        for r in live[k:] + live[:k]:
            synchronize(device)
            start = time.perf_counter()
            fwd_bwd(p.func, p.y0, r.forward)
            synchronize(device)
            times[r.name].append(time.perf_counter() - start)
    rows = []
    for name, (result, fwd_calls, bwd_calls, seconds) in counted.items():
        single = name not in times
        rows.append(GradRow(p.name, name, seconds if single else statistics.median(times[name]), single, fwd_calls,
                            bwd_calls, result.failed, rel_err(result.params, ref.params),
                            rel_err(result.y0, ref.y0)))
    return rows


def print_grad_table(rows: list[GradRow]) -> None:
    print("| problem | library | fwd+bwd (ms) | time / flashode backprop | fwd func calls | bwd func calls | "
          "failed samples | rel err dL/dθ | rel err dL/dy0 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {row.problem: row.seconds for row in rows if row.library == "flashode backprop"}
    for row in rows:
        ratio = row.seconds / base[row.problem] if row.problem in base else float("nan")
        star = "*" if row.single_run else ""
        print(f"| {row.problem} | {row.library} | {fmt_ms(row.seconds)}{star} | {ratio:.2f}×{star} | "
              f"{row.fwd_calls} | {row.bwd_calls} | {row.failed} | {row.err_params:.1e} | {row.err_y0:.1e} |")


def run_grad(args: argparse.Namespace, device: torch.device, repeats: int) -> list[str]:
    notes: list[str] = []
    rows: list[GradRow] = []
    for batch in args.mlp_batches:
        p = mlp_problem(batch, device)
        start = time.perf_counter()
        ref = grad_reference(p)
        notes.append(grad_reference_check(p, ref))
        print(f"  {p.name}: reference {time.perf_counter() - start:.1f} s", flush=True)
        rows += measure_grad(p, grad_runners(p, notes), ref, repeats, args.single_run_above, notes)
        print(f"  {p.name}: {time.perf_counter() - start:.1f} s", flush=True)
    print()
    print_grad_table(rows)
    if any(row.single_run for row in rows):
        notes.append(f"* timed from its one counted run (it took over {args.single_run_above:g} s): not a median, "
                     "and cold (first call), though at that length the warm-up is a small part.")
    notes += [
        ("mlp in float32, dopri5, rtol 1e-6 and atol 1e-8 for every library, forward and backward (the adjoint "
         "methods' backward tolerances default to the forward ones); loss = sum of squares of every output of "
         "the samples that succeeded (failed samples: their count in the table)."),
        ("func calls: calls of the MLP, each on the whole batch (torchode's BacksolveAdjoint: one vmapped call "
         "of the per-sample vjp). Backprop calls no field in the backward but replays the VJP of every recorded "
         "evaluation (fwd calls of them). flashode adjoint's backward: the augmented field (f and its VJP for y) "
         "at every stage, plus one more evaluation of f per step for the step's parameter VJP (its first stage, "
         "carried over from the previous step); an initial-step heuristic at the first interval."),
        ("adjoint error control: flashode adjoint holds each sample's [y, a] to rtol/atol and integrates dL/dθ "
         "with the same steps, uncontrolled (seminorm); torchode BacksolveAdjoint holds each sample's whole "
         "[t-adjoint, y, a, per-sample dL/dθ (4482 numbers)] to an RMS norm, so its B x 4486 augmented state "
         "and a per-sample parameter VJP at every call make its backward slow, and the RMS over 4486 channels "
         "dilutes the error of y and a; torchdiffeq odeint_adjoint steps the whole batch jointly with its "
         "default norm (an RMS over all samples' y, a and the shared dL/dθ)."),
        ("torchode AutoDiffAdjoint (backprop_through_step_size_control=True, its default) also differentiates "
         "the step sizes; flashode backprop does not (as odeint: step sizes and acceptance are constants)."),
        ("gradient errors include float32 arithmetic (about 1e-7 relative per operation) and the solve's own "
         "error; the reference differentiates the same field in float64."),
    ]
    return notes


def ops_path(device: torch.device) -> str:
    """Whether flashode's batch ops run as compiled kernels or as its pure-torch reference here."""
    try:
        from flashode import _ops

        return _ops.path_for(device.type)
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="small batches (64), 2 repeats: a smoke test")
    parser.add_argument("--check-every", action="store_true",
                        help="time flashode.solve_ivp for check_every in 1..32 instead of the comparison")
    parser.add_argument("--grad", action="store_true",
                        help="time forward + backward on the mlp problem (gradients) instead of the comparison")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed solves per library (default 11, --grad 5, quick 2)")
    parser.add_argument("--single-run-above", type=float, default=10.0,
                        help="--grad: a method whose counted fwd+bwd takes longer (s) is timed from that run alone")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--vdp-batch", type=int, default=None, help="van der Pol batch (default 1024, quick 64)")
    parser.add_argument("--mlp-batches", type=int, nargs="+", default=None, help="MLP batches (default 256 4096)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.grad and args.check_every:
        raise SystemExit("--grad and --check-every are separate modes: pick one")
    repeats = args.repeats or (2 if args.quick else 5 if args.grad else 11)
    args.vdp_batch = args.vdp_batch or (64 if args.quick else 1024)
    args.mlp_batches = args.mlp_batches or ([64] if args.quick else [256, 4096])
    mode = "check_every sweep" if args.check_every else "forward + backward" if args.grad else "comparison"
    grad = "fwd+bwd" if args.grad else "no_grad"
    print(f"flashode solve_ivp batch benchmark ({mode}): rtol={RTOL:g}, atol={ATOL:g}, {grad}, device {device}, "
          f"median of {repeats} interleaved repeats")
    print(f"Machine: {machine_description(device)}; torchode {getattr(torchode, '__version__', 'n/a')}, "
          f"torchdiffeq {getattr(torchdiffeq, '__version__', '?')}, flashode ops: {ops_path(device)}")
    mode_fn = run_check_every if args.check_every else run_grad if args.grad else run_comparison
    notes = mode_fn(args, device, repeats)
    for note in dict.fromkeys(notes):
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
