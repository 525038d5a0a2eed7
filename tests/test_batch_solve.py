"""flashode.solve_ivp: per-sample adaptive solving (python/flashode/batch.py, batch_adjoint.py)."""

from __future__ import annotations

import math

import pytest
import torch

import flashode
from flashode import Status, solve_ivp
from flashode import _ops
from flashode.batch import BatchSolver, make_controller, prepare_batch_problem
from flashode.tableaus import ADAPTIVE

F64 = torch.float64


def van_der_pol(mu: torch.Tensor):
    def f(t, y):
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, mu * (1 - x**2) * v - x], 1)

    return f


def single_vdp(mu: float):
    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    return f


class CountingField:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.f(t, y)


# ----------------------------------------------------------------------------- same as odeint


@pytest.mark.parametrize("method", sorted(ADAPTIVE))
def test_each_sample_takes_odeints_steps(method):
    mus = [0.5, 1.5, 3.0, 5.0]
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [-0.5, 1.0], [2.0, -1.0]], dtype=F64)
    t = torch.linspace(0, 4, 9, dtype=F64)
    rtol, atol = 1e-6, 1e-8
    with torch.no_grad():
        sol = solve_ivp(
            van_der_pol(torch.tensor(mus, dtype=F64)), y0, t, method=method, rtol=rtol, atol=atol, clip_to_end=False
        )
    assert (sol.status == Status.SUCCESS).all()
    for b, mu in enumerate(mus):
        counted = CountingField(single_vdp(mu))
        with torch.no_grad():
            ref = flashode.odeint(counted, y0[b], t, method=method, rtol=rtol, atol=atol)
        torch.testing.assert_close(sol.ys[b], ref, rtol=1e-12, atol=1e-12)
        assert int(sol.stats["n_f_evals"][b]) == counted.calls  # same steps, accepted and rejected
    assert torch.equal(sol.stats["n_steps"], sol.stats["n_accepted"] + sol.stats["n_rejected"])
    assert torch.equal(sol.ts, t.expand(4, -1))


def test_per_sample_spans_directions_and_output_times():
    """Sample 0 forward with outputs on its own grid, sample 1 backward in time, sample 2 starting
    before its first output and ending after its last: each equals odeint on its own times."""
    mus = torch.tensor([1.0, 2.0, 0.7], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -0.5]], dtype=F64)
    t_eval = torch.stack([
        torch.linspace(0.0, 3.0, 5, dtype=F64),
        torch.linspace(0.0, -2.5, 5, dtype=F64),
        torch.linspace(0.5, 2.0, 5, dtype=F64),
    ])
    t_start = torch.tensor([0.0, 0.0, 0.0], dtype=F64)
    t_end = torch.tensor([3.0, -2.5, 2.5], dtype=F64)
    seen = []

    def field(t, y):
        seen.append(t.clone())
        return van_der_pol(mus)(t, y)

    kw = dict(t_start=t_start, t_end=t_end, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        stepping_past = solve_ivp(van_der_pol(mus), y0, t_eval, clip_to_end=False, **kw)
        sol = solve_ivp(field, y0, t_eval, **kw)
    for result in (stepping_past, sol):
        assert (result.status == Status.SUCCESS).all()
    assert stepping_past.t_final[2] >= 2.5 and stepping_past.t_final[1] <= -2.5  # the last step passed t_end
    # by default the last step lands on t_end exactly, and func never sees a time beyond it
    assert torch.equal(sol.t_final, t_end)
    seen = torch.stack(seen)
    assert ((seen.double() - t_end) * torch.tensor([1.0, -1.0, 1.0], dtype=F64) <= 0).all()
    assert ((seen.double() - t_start) * torch.tensor([1.0, -1.0, 1.0], dtype=F64) >= 0).all()
    for b in range(3):
        times = t_eval[b] if b < 2 else torch.cat([t_start[2:], t_eval[2]])
        with torch.no_grad():
            ref = flashode.odeint(single_vdp(float(mus[b])), y0[b], times, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(stepping_past.ys[b], ref[-5:], rtol=1e-12, atol=1e-12)  # odeint's steps
        torch.testing.assert_close(sol.ys[b], ref[-5:], rtol=1e-6, atol=1e-7)


def test_trailing_shape_and_float32():
    a = torch.tensor([[[-0.5, 1.0], [-1.0, -0.5]]], dtype=F64)

    def f(t, y):  # y: (B, 3, 2), a rotation-decay per row
        return y @ a[0].T

    y0 = torch.randn(5, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 2, 7, dtype=F64)
    with torch.no_grad():
        sol64 = solve_ivp(f, y0, t, rtol=1e-9, atol=1e-11)
        sol32 = solve_ivp(lambda t, y: y @ a[0].T.float(), y0.float(), t, rtol=1e-5, atol=1e-7)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(a[0] * s).T for s in t], 1)
    assert sol64.ys.shape == (5, 7, 3, 2) and sol32.ys.dtype == torch.float32
    torch.testing.assert_close(sol64.ys, exact, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(sol32.ys.double(), exact, rtol=1e-3, atol=1e-4)


def test_check_every_and_reference_path_give_the_same_solution():
    mus = torch.linspace(0.5, 5, 6, dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64).repeat(6, 1)
    t = torch.linspace(0, 5, 11, dtype=F64)
    with torch.no_grad():
        base = solve_ivp(van_der_pol(mus), y0, t, rtol=1e-6, atol=1e-8, check_every=1)
        other = solve_ivp(van_der_pol(mus), y0, t, rtol=1e-6, atol=1e-8, check_every=7)
        with _ops.reference_path():
            ref = solve_ivp(van_der_pol(mus), y0, t, rtol=1e-6, atol=1e-8)
    assert torch.equal(base.ys, other.ys) and torch.equal(base.stats["n_steps"], other.stats["n_steps"])
    # the loop reads the device once before starting and once per chunk of check_every steps
    longest = int(base.stats["n_steps"].max())
    assert base.loop_reads == 1 + longest and other.loop_reads == 1 + math.ceil(longest / 7)
    torch.testing.assert_close(ref.ys, base.ys, rtol=1e-9, atol=1e-10)
    assert torch.equal(ref.stats["n_steps"], base.stats["n_steps"])


# ----------------------------------------------------------------------------- per-sample work


def test_van_der_pol_stiff_samples_take_more_steps_and_fewer_evaluations_than_joint_stepping():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    batch = 64
    mu = torch.linspace(0.5, 5.0, batch, dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64).repeat(batch, 1)
    t = torch.linspace(0, 10, 50, dtype=F64)
    with torch.no_grad():
        sol = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-6, atol=1e-8)
        joint = CountingField(lambda t, y: van_der_pol(mu)(t, y))
        ref = torchdiffeq.odeint(joint, y0, t, rtol=1e-6, atol=1e-8)
    assert (sol.status == Status.SUCCESS).all()
    steps = sol.stats["n_steps"].double()
    assert steps[-8:].mean() > 1.5 * steps[:8].mean()  # stiffer samples need more steps
    assert torch.corrcoef(torch.stack([steps, mu]))[0, 1] > 0.6
    # torchdiffeq evaluates every sample at every one of its joint steps
    assert int(sol.stats["n_f_evals"].sum()) < 0.7 * joint.calls * batch
    torch.testing.assert_close(sol.ys, ref.transpose(0, 1), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- failures stay per sample


def _mixed_field(t, y):
    """Sample 0: decay. Sample 1: y' = y^2 (blows up at t = 1 from y = 1). Sample 2: NaN after t = 0.5.
    Sample 3: decay again."""
    out = -y.clone()
    out[1] = y[1] ** 2
    out[2] = torch.where(t[2] > 0.5, torch.full_like(y[2], math.nan), -y[2])
    return out


def test_failing_samples_get_a_status_and_do_not_spoil_the_others():
    y0 = torch.ones(4, 1, dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    with torch.no_grad():
        sol = solve_ivp(_mixed_field, y0, t, rtol=1e-7, atol=1e-9)
    status = [Status(int(s)) for s in sol.status]
    assert status[0] == status[3] == Status.SUCCESS
    assert status[1] in (Status.DT_UNDERFLOW, Status.NON_FINITE) and 0.99 < float(sol.t_final[1]) <= 1.001
    assert status[2] == Status.NON_FINITE and float(sol.t_final[2]) <= 0.5
    exact = torch.exp(-t)
    for b in (0, 3):
        torch.testing.assert_close(sol.ys[b, :, 0], exact, rtol=1e-6, atol=1e-8)
    assert torch.isnan(sol.ys[1, 3:]).all() and torch.isnan(sol.ys[2, 2:]).all()  # never reached
    assert torch.isfinite(sol.ys[2, :2]).all()
    expected = r"2 of 4 samples failed: sample 1: \w+ at t=(0\.99|1\.0).*sample 2: NON_FINITE at t=0\.[0-5]"
    with pytest.raises(flashode.SolverError, match=expected):
        sol.raise_for_status()


def test_dt_min_max_steps_and_a_non_finite_start():
    mu = torch.tensor([0.5, 5.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=F64)
    t = torch.linspace(0, 10, 3, dtype=F64)
    with torch.no_grad():
        free = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-6, atol=1e-8)
        easy, stiff = free.stats["n_steps"].tolist()
        assert easy < stiff
        cap = (easy + stiff) // 2
        capped = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-6, atol=1e-8, max_steps=cap)
        floor = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-6, atol=1e-8, dt_min=0.05)
        y0_bad = y0.clone()
        y0_bad[0, 1] = math.nan
        bad_start = solve_ivp(van_der_pol(mu), y0_bad, t, rtol=1e-6, atol=1e-8)
        alone = solve_ivp(van_der_pol(mu[1:]), y0[1:], t, rtol=1e-6, atol=1e-8)
    assert capped.status.tolist() == [Status.SUCCESS, Status.MAX_STEPS_REACHED]
    assert int(capped.stats["n_steps"][1]) == cap and torch.equal(capped.ys[0], free.ys[0])
    assert floor.status[1] == Status.DT_UNDERFLOW
    assert bad_start.status.tolist() == [Status.NON_FINITE, Status.SUCCESS]
    assert float(bad_start.t_final[0]) == 0.0 and int(bad_start.stats["n_steps"][0]) == 0
    assert torch.equal(bad_start.ys[1], alone.ys[0])


# ----------------------------------------------------------------------------- controllers


def test_pid_controller():
    mu = torch.linspace(0.5, 5, 8, dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64).repeat(8, 1)
    t = torch.linspace(0, 6, 13, dtype=F64)
    kw = dict(rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        tight = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-11, atol=1e-13)
        integral = solve_ivp(van_der_pol(mu), y0, t, **kw)
        as_integral = solve_ivp(van_der_pol(mu), y0, t, controller="pid", pcoeff=0.0, icoeff=1.0, dcoeff=0.0, **kw)
        pid = solve_ivp(van_der_pol(mu), y0, t, controller="pid", **kw)
    # pcoeff = dcoeff = 0, icoeff = 1 is the integral controller, up to the last bit of pow()
    assert (as_integral.stats["n_steps"] - integral.stats["n_steps"]).abs().max() <= 1
    assert (pid.status == Status.SUCCESS).all()
    assert not torch.equal(pid.stats["n_steps"], integral.stats["n_steps"])
    assert (pid.ys - tight.ys).abs().max() < 1e-4
    assert (pid.stats["n_rejected"].sum() < integral.stats["n_rejected"].sum())  # PI control smooths the steps


# ----------------------------------------------------------------------------- gradients


class _Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()

    def forward(self, t, y):
        return self.net(y) * (1 + 0.1 * t[:, None])


def _gradients(adjoint: bool, field: _Field, y0: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, **kw):
    field.zero_grad()
    y0 = y0.detach().requires_grad_()
    sol = solve_ivp(field, y0, t, adjoint=adjoint, **kw)
    loss = (torch.nan_to_num(sol.ys) * weights)[sol.success].sum()
    loss.backward()
    return sol, y0.grad, [p.grad.clone() for p in field.parameters()]


def test_backprop_and_adjoint_gradients_agree_with_finite_differences():
    field = _Field()
    gen = torch.Generator().manual_seed(3)
    y0 = torch.randn(4, 3, dtype=F64, generator=gen)
    t = torch.stack([torch.linspace(0, 1 + 0.25 * b, 6, dtype=F64) for b in range(4)])
    t[1] = -t[1]  # one sample backwards in time
    weights = torch.randn(4, 6, 3, dtype=F64, generator=gen)
    kw = dict(rtol=1e-10, atol=1e-12)
    sol_bp, g_bp, p_bp = _gradients(False, field, y0, t, weights, **kw)
    sol_adj, g_adj, p_adj = _gradients(True, field, y0, t, weights, **kw)
    assert torch.equal(sol_bp.ys, sol_adj.ys)
    torch.testing.assert_close(g_adj, g_bp, rtol=1e-6, atol=1e-8)
    for a, b in zip(p_adj, p_bp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)

    def loss_at(y0_, bias_shift=0.0):
        with torch.no_grad():
            field.net[2].bias += bias_shift
            ys = solve_ivp(field, y0_, t, rtol=1e-12, atol=1e-14).ys
            field.net[2].bias -= bias_shift
        return float((ys * weights).sum())

    eps = 1e-6
    e = torch.zeros_like(y0)
    e[1, 2] = eps
    fd_y0 = (loss_at(y0 + e) - loss_at(y0 - e)) / (2 * eps)
    assert fd_y0 == pytest.approx(float(g_bp[1, 2]), rel=1e-6)
    shift = torch.zeros(3, dtype=F64)
    shift[0] = eps
    fd_bias = (loss_at(y0, shift) - loss_at(y0, -shift)) / (2 * eps)
    assert fd_bias == pytest.approx(float(p_bp[-1][0]), rel=1e-6)


def test_gradients_ignore_failed_samples():
    """Samples that stop early (max_steps, a non-finite start) leave the other samples' gradients
    as if solved alone, in both gradient modes."""

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.tensor([0.5, 8.0, 0.5, 1.0], dtype=F64))

        def forward(self, t, y):
            return van_der_pol(self.mu)(t, y)

    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0], [math.nan, 0.0], [1.0, 1.0]], dtype=F64)
    t = torch.linspace(0, 3, 4, dtype=F64)
    results = []
    for adjoint in (False, True):
        field = Field()
        y0_ = y0.clone().requires_grad_()
        sol = solve_ivp(field, y0_, t, rtol=1e-9, atol=1e-11, adjoint=adjoint, max_steps=150)
        assert sol.status.tolist() == [Status.SUCCESS, Status.MAX_STEPS_REACHED, Status.NON_FINITE, Status.SUCCESS]
        sol.ys[sol.success].sum().backward()
        assert torch.isfinite(y0_.grad).all() and torch.isfinite(field.mu.grad).all()
        assert (y0_.grad[1:3] == 0).all() and (field.mu.grad[1:3] == 0).all()
        results.append((y0_.grad[[0, 3]], field.mu.grad[[0, 3]]))
    good = Field()
    y0_good = y0[[0, 3]].clone().requires_grad_()
    solve_ivp(lambda t, y: van_der_pol(good.mu[[0, 3]])(t, y), y0_good, t, rtol=1e-9, atol=1e-11).ys.sum().backward()
    for g_y0, g_mu in results:
        torch.testing.assert_close(g_y0, y0_good.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g_mu, good.mu.grad[[0, 3]], rtol=1e-6, atol=1e-9)


def test_adjoint_with_a_trailing_state_shape():
    w = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))
    y0 = torch.rand(3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(4)) + 0.1  # no blow-up for t <= 1
    t = torch.linspace(0, 1, 4, dtype=F64)
    grads = []
    for adjoint in (False, True):
        w.grad = None
        y = y0.clone().requires_grad_()
        params = [w] if adjoint else None
        sol = solve_ivp(lambda t, y: -w * y * y, y, t, adjoint=adjoint, adjoint_params=params, rtol=1e-10, atol=1e-12)
        (sol.ys * torch.arange(4, dtype=F64)[None, :, None, None]).sum().backward()
        assert y.grad.shape == y0.shape
        grads.append((y.grad, w.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=1e-9)


def test_adjoint_needs_named_parameters_for_a_plain_function():
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.warns(UserWarning, match="adjoint_params"):
        solve_ivp(lambda t, y: -w * y, y0.requires_grad_(), t, adjoint=True)
    sol = solve_ivp(lambda t, y: -w * y, y0, t, adjoint=True, adjoint_params=[w], rtol=1e-10, atol=1e-12)
    sol.ys[:, -1].sum().backward()
    assert float(w.grad) == pytest.approx(-2 * math.exp(-0.5), rel=1e-7)


# ----------------------------------------------------------------------------- no host reads in the loop


def test_step_body_compiles_with_fullgraph_and_matches_eager():
    mu = torch.linspace(0.5, 5, 8, dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64).repeat(8, 1)
    t = torch.linspace(0, 5, 20, dtype=F64)

    def make():
        problem = prepare_batch_problem(van_der_pol(mu), y0, t, None, None, 1e-6, 1e-8)
        tab = ADAPTIVE["tsit5"]
        ctrl = make_controller("integral", tab.order, 0.9, 10.0, 0.2, None, None, None, 0.0, math.inf)
        return BatchSolver(problem, tab, ctrl, None, 10_000)

    with torch.no_grad():
        eager, compiled = make(), make()
        step = torch.compile(compiled.step, fullgraph=True)  # a host read would break the graph
        for _ in range(25):
            eager.step()
            step()
    assert torch.equal(eager.t, compiled.t) and torch.equal(eager.stats, compiled.stats)
    torch.testing.assert_close(eager.ys, compiled.ys, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="rk4"), ValueError, "Invalid method"),
        (dict(t_eval=torch.tensor([0.0, 1.0, 0.5])), ValueError, "strictly monotone"),
        (dict(t_eval=torch.tensor([0.0, 1.0]), t_end=0.5), ValueError, "within"),
        (dict(t_eval=torch.zeros(3, 2)), ValueError, "shape"),
        (dict(t_eval=torch.tensor([0.0, math.inf])), ValueError, "finite"),
        (dict(t_eval=torch.tensor([0.0, 1.0], requires_grad=True)), ValueError, "t_eval"),
        (dict(y0=torch.ones(2, 2, dtype=torch.float16)), TypeError, "float32"),
        (dict(y0=torch.ones(0, 2)), ValueError, "B >= 1"),
        (dict(func=lambda t, y: y[:, :1]), ValueError, "shaped like y0"),
        (dict(controller="pi"), ValueError, "integral"),
        (dict(pcoeff=0.1), ValueError, "pid"),
        (dict(rtol=-1.0), ValueError, "non-negative"),
        (dict(atol=torch.ones(3)), ValueError, "broadcast"),
        (dict(check_every=0), ValueError, "check_every"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(first_step=-0.1), ValueError, "first_step"),
        (dict(t_start=torch.zeros(3)), ValueError, "t_start"),
        (dict(dt_min=1.0, dt_max=0.5), ValueError, "dt_min"),
        (dict(cuda_graph=True), ValueError, "CUDA"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = dict(func=lambda t, y: -y, y0=torch.ones(2, 2), t_eval=torch.tensor([0.0, 1.0]))
    args.update(kwargs)
    func, y0, t_eval = args.pop("func"), args.pop("y0"), args.pop("t_eval")
    with pytest.raises(error, match=match):
        solve_ivp(func, y0, t_eval, **args)


# ----------------------------------------------------------------------------- CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    mu = torch.linspace(0.5, 5, 256, dtype=dtype)
    y0 = torch.tensor([[2.0, 0.0]], dtype=dtype).repeat(256, 1)
    t = torch.linspace(0, 5, 11, dtype=F64)
    with torch.no_grad():
        cpu = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-6, atol=1e-8)
        gpu = solve_ivp(van_der_pol(mu.cuda()), y0.cuda(), t.cuda(), rtol=1e-6, atol=1e-8)
    assert (gpu.status.cpu() == Status.SUCCESS).all()
    tol = 1e-9 if dtype == F64 else 1e-4
    torch.testing.assert_close(gpu.ys.cpu(), cpu.ys, rtol=tol, atol=tol)
    assert (gpu.stats["n_steps"].cpu() - cpu.stats["n_steps"]).abs().max() <= (0 if dtype == F64 else 3)


@cuda
@pytest.mark.cuda
def test_cuda_graph_replay_matches_eager():
    mu = torch.linspace(0.5, 5, 128, dtype=F64, device="cuda")
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64, device="cuda").repeat(128, 1)
    t = torch.linspace(0, 5, 11, dtype=F64, device="cuda")
    with torch.no_grad():
        eager = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-6, atol=1e-8, check_every=8)
        graphed = solve_ivp(van_der_pol(mu), y0, t, rtol=1e-6, atol=1e-8, check_every=8, cuda_graph=True)
    assert torch.equal(eager.ys, graphed.ys) and torch.equal(eager.stats["n_steps"], graphed.stats["n_steps"])


@cuda
@pytest.mark.cuda
def test_cuda_adjoint_matches_backprop():
    field = _Field().cuda()
    y0 = torch.randn(8, 3, dtype=F64, device="cuda")
    t = torch.linspace(0, 1, 5, dtype=F64, device="cuda")
    weights = torch.randn(8, 5, 3, dtype=F64, device="cuda")
    _, g_bp, p_bp = _gradients(False, field, y0, t, weights, rtol=1e-10, atol=1e-12)
    _, g_adj, p_adj = _gradients(True, field, y0, t, weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_adj, g_bp, rtol=1e-6, atol=1e-8)
    for a, b in zip(p_adj, p_bp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_mixed_tolerance_shapes():
    """A scalar rtol with per-element atol (and per-sample rows) solves as the reference path does."""
    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0, 1, 4, dtype=F64)
    for atol in (torch.tensor([1e-8, 1e-10], dtype=F64), torch.full((3, 1), 1e-9, dtype=F64)):
        with torch.no_grad():
            sol = solve_ivp(lambda t, y: -y, y0, t, rtol=1e-6, atol=atol)
            with _ops.reference_path():
                ref = solve_ivp(lambda t, y: -y, y0, t, rtol=1e-6, atol=atol)
        torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sol.ys, y0[:, None] * torch.exp(-t)[None, :, None], rtol=1e-5, atol=1e-7)


def test_torch_compile_of_a_model_with_a_solve_gives_eagers_gradients():
    """solve_ivp is a graph break under torch.compile (it runs eagerly), so a compiled model that
    contains it backpropagates through the same steps."""
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)

    def loss(y):
        return solve_ivp(lambda t, y: -y * y, y, t, rtol=1e-9, atol=1e-11).ys.sum()

    grads = []
    for fn in (loss, torch.compile(loss)):
        y = y0.clone().requires_grad_()
        fn(y).backward()
        grads.append(y.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0)


def test_adjoint_backward_memory_does_not_grow_with_steps():
    """Peak resident memory of the backward pass in a fresh process (tests/adjoint_memory_probe.py
    batch): the adjoint's stays flat as the steps grow 10x and more; backprop's grows."""
    import json
    import os
    import subprocess
    import sys

    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")):
        pytest.skip("peak resident memory is read from Linux /proc")
    probe = os.path.join(os.path.dirname(__file__), "adjoint_memory_probe.py")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, probe, "batch"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    short, long = report["adjoint"]
    assert long["backward_nfe"] >= 10 * short["backward_nfe"]
    assert short["peak_bytes"] > 2 * 7 * 2 * 8 * report["state_numel"]  # it does measure the solve's buffers
    assert long["peak_bytes"] < 1.10 * short["peak_bytes"], report
    stored_short, stored_long = report["backprop"]
    assert stored_long["peak_bytes"] > 3 * stored_short["peak_bytes"], report  # the measurement can fail
