"""Backpropagation through flashode.odeint (autograd through the fused ops and func)."""

from __future__ import annotations

import pytest
import torch

import flashode
from problems import ADAPTIVE, FIXED

torchdiffeq = pytest.importorskip("torchdiffeq")


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(2, 2, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(0.1 * torch.randn(2, generator=g, dtype=torch.float64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T + self.b) * (1 + 0.1 * t)


@pytest.mark.parametrize("method", ("dopri5", "tsit5", "bosh3") + FIXED)
def test_gradcheck_wrt_y0(method):
    field = Field()
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    opts = dict(step_size=0.1) if method in FIXED else None
    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64, requires_grad=True)

    def solve(y):
        return flashode.odeint(field, y, t, method=method, rtol=1e-10, atol=1e-12, options=opts)

    # Step sizes are control decisions (not differentiated, as in diffrax), so finite differences
    # see them move by O(tolerance): tight tolerances keep that far below gradcheck's tolerance.
    # Fixed-grid methods have no such term: their gradient is the exact discrete one.
    assert torch.autograd.gradcheck(solve, (y0,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_gradient_matches_exact_sensitivity(method):
    # y' = A y: dy(t)/dy0 = expm(A t), for every adaptive method (including those whose step-size
    # noise makes finite differences unreliable: dopri8, and the low-order interpolants).
    a = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=torch.float64)
    y0 = torch.tensor([0.4, -0.1], dtype=torch.float64, requires_grad=True)
    tol = 1e-6 if method in ("fehlberg2", "adaptive_heun") else 1e-10
    out = flashode.odeint(lambda t, y: a @ y, y0, t, method=method, rtol=tol, atol=tol)
    for i in (1, 2):
        jac = torch.stack([torch.autograd.grad(out[i, r], y0, retain_graph=True)[0] for r in range(2)])
        exact = torch.linalg.matrix_exp(a * t[i])
        assert torch.allclose(jac, exact, atol=300 * tol), (method, i, (jac - exact).abs().max())


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4"])
def test_gradcheck_tuple_state(method):
    t = torch.tensor([0.0, 0.7], dtype=torch.float64)
    opts = dict(step_size=0.05) if method == "rk4" else None
    x0 = torch.tensor([0.5, 0.1], dtype=torch.float64, requires_grad=True)
    v0 = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)

    def solve(x, v):
        xs, vs = flashode.odeint(lambda t, s: (s[1] * s[0], -s[0].sum().reshape(1)), (x, v), t,
                                 method=method, rtol=1e-10, atol=1e-12, options=opts)
        return xs[-1], vs[-1]

    assert torch.autograd.gradcheck(solve, (x0, v0), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4"])
def test_parameter_gradients_match_torchdiffeq(method):
    t = torch.linspace(0, 1.5, 4, dtype=torch.float64)
    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    opts = dict(step_size=0.05) if method == "rk4" else None
    grads = []
    for lib in (flashode, torchdiffeq):
        field = Field()
        y0_ = y0.clone().requires_grad_()
        out = lib.odeint(field, y0_, t, method=method, rtol=1e-9, atol=1e-11, options=opts)
        (out**2).sum().backward()
        grads.append([field.w.grad, field.b.grad, y0_.grad])
    for ours, theirs in zip(*grads):
        # torchdiffeq also differentiates through its step-size controller; flashode does not, so
        # the two agree to the solve's tolerance rather than to rounding.
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-8), (ours - theirs).abs().max()


def test_reversed_time_gradients():
    field = Field()
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    y0 = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y: flashode.odeint(field, y, t, rtol=1e-10, atol=1e-12), (y0,), eps=1e-6, atol=1e-6, rtol=1e-4
    )


def test_no_grad_solve_records_no_graph():
    field = Field()
    y0 = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        out = flashode.odeint(field, y0, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert not out.requires_grad
    with_grad = flashode.odeint(field, y0, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(out, with_grad.detach(), rtol=0, atol=1e-15)


def test_forward_mode_ad_tangents_are_not_dropped():
    import torch.autograd.forward_ad as fwAD

    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    tangent = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with torch.no_grad(), fwAD.dual_level():
        out = flashode.odeint(lambda t, y: -y * y, fwAD.make_dual(y0, tangent), t, method="rk4",
                              options=dict(step_size=0.01))
        jvp = fwAD.unpack_dual(out).tangent[-1]
    # y' = -y^2: y(t) = y0 / (1 + y0 t), dy(1)/dy0 = 1 / (1 + y0)^2 = 0.25 for the first component.
    assert torch.allclose(jvp, torch.tensor([0.25, 0.0], dtype=torch.float64), atol=1e-8)
