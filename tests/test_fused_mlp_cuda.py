"""Tests of the per-sample fused MLP solve (csrc/common/mlp_sample_solve.h), the code the CUDA kernels
run (csrc/cuda/mlp_solve_kernels.cu), and of those kernels where a GPU is present.

Host. FLASHODE_MLP_KERNEL=per_sample makes the CPU ops run the per-sample code one sample at a time,
with the CUDA forward's checkpoint scheme (slots of a first-guess capacity, kept small on the host
so that the overflow path runs too). The variable is read once per process, so those solves run in
subprocesses (this file's `_worker`). Both run the lane kernel's baseline vector level
(FLASHODE_MLP_SIMD=base, no FMA), and the per-sample code follows the lane kernel's operation order
(network sums, activation polynomials, stage sums, controller): where no accept/reject decision
hinges on rounding, the steps must be the same and the values equal to rounding (when both follow
one order exactly: bit for bit); parameter gradients are sums over the samples in another order.
Against the reference (pure PyTorch) and the lane kernel's default level (which may contract into
FMAs), results agree to rounding amplified by the solve.

CUDA. The kernels are compared with the CPU op: the same steps where the decisions do not hinge on
the last bit of CUDA's pow, outputs to rounding, gradients to rounding (atomic sums); and the
shared-memory fit rule of python/flashode/_mlp_cuda.py against the kernels' own.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flashode import _reference
from flashode._mlp_cuda import cuda_fit_reason, packed_size
from flashode.tableaus import ADAPTIVE, FIXED

F32, F64 = torch.float32, torch.float64
ACTIVATIONS = ("tanh", "softplus", "relu", "silu", "elu", "sigmoid")  # the op's activation codes, in order
SMOOTH = ("tanh", "softplus", "silu", "elu", "sigmoid")
NON_FINITE = 3  # batch.Status.NON_FINITE


def ops() -> tuple[Any, Any]:
    """The registered ops themselves: a comparison must never fall back to the reference silently."""
    return torch.ops.flashode.mlp_solve.default, torch.ops.flashode.mlp_solve_backward.default


@dataclass(frozen=True)
class Problem:
    """One mlp_solve call, built from flashode.tableaus (no dependency on fused_mlp's helpers)."""

    dtype: str  # "float32" / "float64" (JSON-friendly)
    batch: int
    dim: int
    hidden: int
    depth: int
    activation: str
    time_concat: bool
    bias: bool
    method: str
    controller: str = "integral"
    times: str = "shared"  # shared (T,), per_sample (B, T), no_start (t_eval[0] != t_start)
    direction: str = "up"  # up, down, mixed
    tol: str = "scalar"  # scalar, element, sample_element
    first_step: bool = False
    nan_sample: int = -1  # a sample whose y0 is NaN
    step_size: float = 0.05
    span: float = 1.0
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def fixed(self) -> bool:
        return self.method in FIXED

    def widths(self) -> list[int]:
        return [self.dim + self.time_concat] + [self.hidden] * self.depth + [self.dim]

    def params(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        widths, parts = self.widths(), []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            parts.append(torch.randn(n_out * n_in, generator=gen, dtype=F64) / math.sqrt(n_in))
            if self.bias:
                parts.append(torch.randn(n_out, generator=gen, dtype=F64) * 0.5)
        return torch.cat(parts).to(self.torch_dtype)

    def method_args(self) -> tuple:
        """(a, b, b_error, c, poly, order, controller) as the op takes them."""
        tab = FIXED[self.method] if self.fixed else ADAPTIVE[self.method]
        a = [x for row in tab.a[1:] for x in row]
        # A fixed grid interpolates linearly between its points (odeint's default): poly = b.
        poly = list(tab.b) if self.fixed else [p for row in tab.dense for p in row]
        b_error = [] if self.fixed else list(tab.b_error)
        q = float(tab.order)
        betas = [1 / q, 0.0, 0.0] if self.controller == "integral" else [0.7 / q, -0.3 / q, 0.0]  # P 0.3, I 0.4
        ctrl = [float(self.controller == "pid"), 0.9, 10.0, 0.2, *betas, 0.0, math.inf, 1.0, float(len(tab.c) - 1)]
        return a, list(tab.b), b_error, list(tab.c), poly, tab.order, ctrl

    def args(self, record: bool = True, max_steps: int = 4000, device: str = "cpu") -> tuple:
        gen = torch.Generator().manual_seed(self.seed + 1)
        b, d, dtype = self.batch, self.dim, self.torch_dtype
        y0 = torch.randn(b, d, generator=gen, dtype=F64).to(dtype)
        if 0 <= self.nan_sample < b:
            y0[self.nan_sample, 0] = math.nan
        t0 = torch.rand(b, generator=gen, dtype=F64) * 0.5
        span = (0.5 + torch.rand(b, generator=gen, dtype=F64)) * self.span
        if self.direction == "down":
            span = -span
        elif self.direction == "mixed":
            span = torch.where(torch.arange(b) % 2 == 0, span, -span)
        grid = torch.linspace(0, 1, 5, dtype=F64)
        if self.times == "shared":
            end = self.span if self.direction != "down" else -self.span
            t0, t1 = torch.zeros(b, dtype=F64), torch.full((b,), end, dtype=F64)
            t_eval = grid * end
        else:
            t1 = t0 + span
            t_eval = t0[:, None] + span[:, None] * grid
            if self.times == "no_start":
                t_eval = t_eval[:, 1:].contiguous()
        loose = 1e-5 if dtype == F32 else 1e-7
        size = {"scalar": (1,), "element": (d,), "sample_element": (b * d,)}[self.tol]
        rtol = torch.full(size, loose, dtype=dtype)
        atol = (torch.rand(size, generator=gen, dtype=F64) * 1e-7 + 1e-9).to(dtype)
        first = torch.full((b,), 0.01, dtype=F64) if self.first_step else torch.empty(0, dtype=F64)
        a, bw, b_error, c, poly, order, ctrl = self.method_args()
        tensors = [y0, self.params(), t_eval, t0, t1, rtol, atol, first]
        y0, params, t_eval, t0, t1, rtol, atol, first = [x.to(device) for x in tensors]
        return (y0, params, self.widths(), ACTIVATIONS.index(self.activation), self.time_concat, self.bias, t_eval,
                t0, t1, rtol, atol, first, a, bw, b_error, c, poly, order, ctrl, max_steps,
                self.step_size if self.fixed else 0.0, record)


def backward_args(args: tuple, out: tuple, grad_ys: torch.Tensor) -> tuple:
    a, b, _b_error, c, poly = args[12:17]
    return (grad_ys, args[1], *args[2:7], *out[4:8], a, b, c, poly, args[20])


def cotangent(problem: Problem, ys: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(problem.seed + 2)
    return torch.randn(ys.shape, generator=gen, dtype=F64).to(ys.dtype).to(ys.device)


def random_problems(count: int, seed: int, **fixed: Any) -> list[Problem]:
    rng = random.Random(seed)
    problems = []
    for i in range(count):
        method = rng.choice(["dopri5", "tsit5", "bosh3", "adaptive_heun", "rk4", "euler", "midpoint"])
        batch = rng.choice([1, 3, 9, 16, 17, 33])
        values = dict(
            dtype=rng.choice(["float32", "float64"]), batch=batch, dim=rng.choice([1, 2, 3, 5]),
            hidden=rng.randint(1, 24), depth=rng.randint(0, 3), activation=ACTIVATIONS[i % len(ACTIVATIONS)],
            time_concat=rng.random() < 0.5, bias=rng.random() < 0.75, method=method,
            controller=rng.choice(["integral", "pid"]), times=rng.choice(["shared", "per_sample", "no_start"]),
            direction=rng.choice(["up", "down", "mixed"]), tol=rng.choice(["scalar", "element", "sample_element"]),
            first_step=method in ADAPTIVE and rng.random() < 0.3,
            nan_sample=rng.randrange(batch) if batch > 1 and rng.random() < 0.25 else -1,
            step_size=rng.choice([0.05, 0.3, 0.013]), seed=seed * 1000 + i,
        )
        values.update(fixed)
        problems.append(Problem(**values))
    return problems


PROBLEMS = random_problems(40, 11) + [
    # long solves: many checkpoints per sample (past every slot capacity)
    Problem("float64", 5, 2, 8, 2, "tanh", True, True, "rk4", step_size=0.004, times="per_sample", seed=901),
    Problem("float32", 7, 3, 6, 1, "silu", False, True, "dopri5", span=20.0, seed=902),
    Problem("float64", 4, 2, 5, 2, "softplus", True, False, "tsit5", span=8.0, direction="down", seed=903),
]


def problem_id(p: Problem) -> str:
    return (f"{p.dtype}-B{p.batch}-D{p.dim}-{p.hidden}x{p.depth}-{p.activation}{'-t' if p.time_concat else ''}"
            f"{'' if p.bias else '-nobias'}-{p.method}-{p.controller}-{p.times}-{p.direction}-{p.tol}"
            f"{'-first' if p.first_step else ''}{f'-nan{p.nan_sample}' if p.nan_sample >= 0 else ''}-s{p.seed}")


def solve_and_differentiate(problem: Problem, device: str = "cpu") -> list[torch.Tensor]:
    """The op's 8 outputs, then (grad_y0, grad_params) of a fixed random cotangent of ys."""
    solve, backward = ops()
    args = problem.args(device=device)
    out = solve(*args)
    grads = backward(*backward_args(args, out, cotangent(problem, out[0])))
    return [x.cpu() for x in (*out, *grads)]


def _worker(jobs_path: str, out_path: str) -> None:
    """Run in a subprocess (see `run_in_subprocess`): every problem of the job file, solved and
    differentiated, plus the gradchecks, saved to out_path."""
    jobs = json.loads(Path(jobs_path).read_text())
    results = [solve_and_differentiate(Problem(**p)) for p in jobs["problems"]]
    without_nan = []
    for p in jobs["problems"]:  # the batch without its NaN sample, to show the sample spoils nothing
        p = Problem(**p)
        if p.nan_sample < 0:
            without_nan.append(None)
            continue
        solve, _ = ops()
        args = list(p.args())
        keep = [i for i in range(p.batch) if i != p.nan_sample]
        for i in (0, 7, 8):  # y0, t_start, t_end
            args[i] = args[i][keep]
        if args[6].dim() == 2:
            args[6] = args[6][keep]
        if p.first_step:
            args[11] = args[11][keep]
        for i in (9, 10):  # per-sample tolerances
            if args[i].numel() == p.batch * p.dim:
                args[i] = args[i].view(p.batch, p.dim)[keep].reshape(-1)
        without_nan.append(list(solve(*args)))
    torch.save({"results": results, "without_nan": without_nan, "gradcheck": gradchecks()}, out_path)


def gradchecks() -> list[bool]:
    """torch.autograd.gradcheck of the op's ys on tiny float64 problems whose steps do not depend on
    the inputs: a fixed grid, and an adaptive solve whose every proposal hits ifactor."""
    solve, _ = ops()
    checks = []
    for problem, rtol in ((Problem("float64", 2, 2, 3, 1, "tanh", True, True, "rk4", step_size=0.25, seed=5), None),
                          (Problem("float64", 3, 2, 3, 1, "elu", False, True, "dopri5", first_step=True,
                                   span=0.4, seed=6), 1e3)):
        args = list(problem.args())
        if rtol is not None:
            args[9] = torch.full_like(args[9], rtol)
            args[10] = torch.full_like(args[10], rtol)
        y0 = args[0].clone().requires_grad_()
        params = args[1].clone().requires_grad_()
        rest = tuple(args[2:])
        checks.append(torch.autograd.gradcheck(lambda y, p: solve(y, p, *rest)[0], (y0, params)))
    return checks


def run_in_subprocess(tmp: Path, name: str, env: dict[str, str], problems: list[Problem]) -> dict:
    jobs = tmp / f"{name}.json"
    out = tmp / f"{name}.pt"
    jobs.write_text(json.dumps({"problems": [asdict(p) for p in problems]}))
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {Path(__file__).stem} as t; " \
           f"t._worker({str(jobs)!r}, {str(out)!r})"
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def host_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("per_sample")
    return {
        "per_sample": run_in_subprocess(tmp, "per_sample", {"FLASHODE_MLP_KERNEL": "per_sample",
                                                            "FLASHODE_MLP_SIMD": "base"}, PROBLEMS),
        "lanes": run_in_subprocess(tmp, "lanes", {"FLASHODE_MLP_KERNEL": "lanes", "FLASHODE_MLP_SIMD": "base"},
                                   PROBLEMS),
    }


OUTPUT_NAMES = ("ys", "status", "t_final", "stats", "ckpt_y", "ckpt_t", "ckpt_offsets", "out_step", "grad_y0",
                "grad_params")


def exact(problem: Problem) -> bool:
    """Whether two solves take the same steps: float64, the integral controller, smooth activations
    and higher-order pairs, so that no accept/reject decision hinges on rounding (test_fused_mlp.py)."""
    return problem.dtype == "float64" and problem.controller == "integral" and problem.activation in SMOOTH and \
        problem.method in ("dopri5", "tsit5", "bosh3")


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.nan_to_num(), b.nan_to_num())


def close_to_magnitude(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Same shape, dtype and NaN pattern; elsewhere |actual - expected| <= rtol * (1 + |expected|)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN patterns differ"
    diff = (actual.double() - expected.double()).abs().nan_to_num(0.0)
    bound = rtol * (1 + expected.double().abs().nan_to_num(0.0))
    assert bool((diff <= bound).all()), f"{what}: max |diff| {diff.max().item():.3e} (bound {rtol:.0e} x magnitude)"


# ----------------------------------------------------------------------------- the host per-sample path


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=[problem_id(p) for p in PROBLEMS])
def test_per_sample_matches_lane_kernel(host_runs: dict, index: int) -> None:
    problem = PROBLEMS[index]
    mine = host_runs["per_sample"]["results"][index]
    lanes = host_runs["lanes"]["results"][index]
    assert torch.equal(mine[1], lanes[1]), "status"
    if not (exact(problem) or problem.fixed):  # a decision may hinge on rounding: agree to the solve's error
        close_to_magnitude(mine[0], lanes[0], 300 * (1e-5 if problem.dtype == "float32" else 1e-7), "ys")
        return
    for i in (3, 6, 7):  # stats, ckpt_offsets, out_step
        assert torch.equal(mine[i], lanes[i]), OUTPUT_NAMES[i]
    tol = 1e-5 if problem.dtype == "float32" else 1e-12
    for i in (0, 2, 4, 5, 8):  # ys, t_final, ckpt_y, ckpt_t, grad_y0: one sample's arithmetic
        close_to_magnitude(mine[i], lanes[i], tol, OUTPUT_NAMES[i])
    # The parameter gradients: the same terms, summed over the samples in another order.
    scale = max(1.0, float(lanes[9].abs().max()))
    close_to_magnitude(mine[9], lanes[9], (1e-4 if problem.dtype == "float32" else 1e-11) * scale, "grad_params")


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=[problem_id(p) for p in PROBLEMS])
def test_per_sample_matches_reference(host_runs: dict, index: int) -> None:
    problem = PROBLEMS[index]
    mine = host_runs["per_sample"]["results"][index]
    args = problem.args()
    ref = _reference.mlp_solve(*args)
    assert torch.equal(mine[1], ref[1]), "status"
    exact_steps = exact(problem)
    if exact_steps or problem.fixed:
        for i in (3, 6, 7):
            assert torch.equal(mine[i], ref[i]), OUTPUT_NAMES[i]
        close_to_magnitude(mine[0], ref[0], 1e-5 if problem.dtype == "float32" else 1e-9, "ys")
    else:  # steps may differ where a decision hinges on rounding: the two solves agree to their error
        close_to_magnitude(mine[0], ref[0], 300 * float(args[9].max()), "ys")
    if exact_steps or problem.fixed:
        gy, gp = _reference.mlp_solve_backward(*backward_args(args, ref, cotangent(problem, ref[0])))
        tol = 1e-3 if problem.dtype == "float32" else 1e-6
        close_to_magnitude(mine[8], gy, tol, "grad_y0")
        close_to_magnitude(mine[9], gp, tol * max(1.0, float(gp.abs().max())), "grad_params")


@pytest.mark.parametrize("index", [i for i, p in enumerate(PROBLEMS) if p.nan_sample >= 0],
                         ids=[problem_id(p) for p in PROBLEMS if p.nan_sample >= 0])
def test_per_sample_nan_sample_spoils_nothing(host_runs: dict, index: int) -> None:
    problem = PROBLEMS[index]
    run = host_runs["per_sample"]
    full, alone = run["results"][index], run["without_nan"][index]
    s = problem.nan_sample
    keep = [i for i in range(problem.batch) if i != s]
    assert int(full[1][s]) == NON_FINITE and int(full[3][s, 1]) == 0  # stopped before any step
    for i in (0, 1, 2, 3, 7):
        assert identical(full[i][keep], alone[i]), OUTPUT_NAMES[i]
    assert identical(full[4], alone[4]) and identical(full[5], alone[5])  # it has no checkpoints
    assert bool(full[8][keep].isfinite().all()) and bool(full[9].isfinite().all())


def test_per_sample_path_was_taken(host_runs: dict) -> None:
    # The two paths sum parameter gradients over the samples in different orders: bits identical
    # everywhere would mean FLASHODE_MLP_KERNEL was ignored and the lane kernel compared to itself.
    pairs = zip(host_runs["per_sample"]["results"], host_runs["lanes"]["results"])
    assert any(not torch.equal(mine[-1], lanes[-1]) for mine, lanes in pairs)


def test_per_sample_gradcheck(host_runs: dict) -> None:
    assert host_runs["per_sample"]["gradcheck"] == [True, True]


def test_per_sample_covers_both_checkpoint_paths(host_runs: dict) -> None:
    # The host's slots hold 8 steps (csrc/cpu/mlp_solve_per_sample.cpp: kHostSlotSteps).
    counts = torch.cat([r[3][:, 2] for r in host_runs["per_sample"]["results"]])
    assert bool((counts > 8).any()) and bool(((counts > 0) & (counts <= 8)).any())


def test_per_sample_matches_default_lane_level(host_runs: dict) -> None:
    """In this process the lane kernel runs at its default vector level (possibly with FMAs)."""
    for problem, mine in zip(PROBLEMS[:12], host_runs["per_sample"]["results"][:12]):
        lanes = solve_and_differentiate(problem)
        assert torch.equal(mine[1], lanes[1]), problem_id(problem)
        tol = 300 * (1e-5 if problem.dtype == "float32" else 1e-7)
        close_to_magnitude(mine[0], lanes[0], tol, f"ys {problem_id(problem)}")


# ----------------------------------------------------------------------------- the fit rule


def test_fit_reason_off_cuda() -> None:
    assert "CUDA" in cuda_fit_reason([3, 16, 2], F32, torch.device("cpu"))


def test_packed_size_matches_layout() -> None:
    problem = PROBLEMS[0]
    assert packed_size(problem.widths(), problem.bias) == problem.params().numel()


# ----------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_PROBLEMS = PROBLEMS[:24] + PROBLEMS[-3:] + [
    Problem("float32", 1000, 4, 32, 2, "tanh", True, True, "dopri5", times="per_sample", seed=950),
    Problem("float64", 300, 3, 64, 3, "silu", False, True, "tsit5", span=4.0, seed=951),
    Problem("float64", 70, 2, 16, 2, "elu", True, True, "rk4", step_size=0.01, seed=952),  # 100+ steps each
]


@needs_cuda
def test_cuda_kernels_are_loaded() -> None:
    torch.ops.flashode.mlp_solve.default(*PROBLEMS[0].args(device="cuda"))


@needs_cuda
@pytest.mark.parametrize("problem", CUDA_PROBLEMS, ids=problem_id)
def test_cuda_matches_cpu(problem: Problem) -> None:
    gpu = solve_and_differentiate(problem, "cuda")
    cpu = solve_and_differentiate(problem, "cpu")
    assert torch.equal(gpu[1], cpu[1]), "status"
    exact_steps = exact(problem)
    if exact_steps or problem.fixed:
        for i in (3, 6, 7):
            assert torch.equal(gpu[i], cpu[i]), OUTPUT_NAMES[i]
        value_tol = 1e-5 if problem.dtype == "float32" else 1e-9
        close_to_magnitude(gpu[0], cpu[0], value_tol, "ys")
        close_to_magnitude(gpu[4], cpu[4], 1e3 * value_tol, "ckpt_y")
        grad_tol = 1e-3 if problem.dtype == "float32" else 1e-6
        close_to_magnitude(gpu[8], cpu[8], grad_tol, "grad_y0")
        close_to_magnitude(gpu[9], cpu[9], grad_tol * max(1.0, float(cpu[9].abs().max())), "grad_params")
    else:
        close_to_magnitude(gpu[0], cpu[0], 300 * (1e-5 if problem.dtype == "float32" else 1e-7), "ys")
    assert int(gpu[6][-1]) == int(gpu[3][:, 2].sum()) == gpu[4].shape[0]  # a checkpoint per accepted step


@needs_cuda
def test_cuda_without_record_and_empty_batch() -> None:
    solve, backward = ops()
    problem = PROBLEMS[1]
    full = solve(*problem.args(device="cuda"))
    bare = solve(*problem.args(record=False, device="cuda"))
    assert bare[4].shape[0] == 0 and int(bare[6].abs().sum()) == 0
    for i in (0, 1, 2, 3, 7):
        assert identical(full[i].cpu(), bare[i].cpu())
    empty = Problem(**{**asdict(problem), "batch": 0, "times": "shared", "tol": "scalar", "nan_sample": -1,
                       "first_step": False})
    out = solve(*empty.args(device="cuda"))
    assert out[0].shape[0] == 0 and out[6].tolist() == [0]


@needs_cuda
def test_cuda_fit_rule_matches_the_kernels() -> None:
    solve, backward = ops()
    device = torch.device("cuda")
    for dtype in ("float32", "float64"):
        for depth in (1, 2, 3, 4):
            problem = Problem(dtype, 2, 2, 160, depth, "tanh", False, True, "rk4", seed=depth)
            reason = cuda_fit_reason(problem.widths(), problem.torch_dtype, device)
            args = problem.args(device="cuda")
            if reason is None:
                out = solve(*args)
                backward(*backward_args(args, out, torch.ones_like(out[0])))
            else:
                assert "shared memory" in reason
                with pytest.raises(RuntimeError, match="shared memory"):
                    out = solve(*args)
                    backward(*backward_args(args, out, torch.ones_like(out[0])))
    assert cuda_fit_reason([2, 1024, 1024, 1024, 2], F64, device) is not None
    assert cuda_fit_reason([3, 64, 64, 2], F32, device) is None
