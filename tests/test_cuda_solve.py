"""CUDA solves: same answers as on the CPU, kernels in use, one host read per adaptive step."""

from __future__ import annotations

import warnings

import pytest
import torch

import flashode
from flashode import _ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def field(t, y):
    return torch.stack([y[..., 1], -torch.sin(y[..., 0]) - 0.1 * y[..., 1] + 0.2 * torch.cos(t)], dim=-1)


def test_cuda_kernels_are_loaded():
    assert "cuda" in _ops.kernel_devices, _ops.load_errors.get("cuda")


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3", "rk4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(method, dtype):
    y0 = torch.randn(64, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 3, 7, dtype=dtype)
    opts = dict(step_size=0.05) if method == "rk4" else None
    rtol, atol = (1e-8, 1e-10) if dtype == torch.float64 else (1e-4, 1e-6)
    cpu = flashode.odeint(field, y0, t, method=method, rtol=rtol, atol=atol, options=opts)
    gpu = flashode.odeint(field, y0.cuda(), t.cuda(), method=method, rtol=rtol, atol=atol, options=opts)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert torch.allclose(gpu.cpu(), cpu, rtol=tol, atol=tol)


def test_cuda_backprop_matches_cpu():
    y0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = []
    for device in ("cpu", "cuda"):
        y = y0.to(device).requires_grad_()
        flashode.odeint(field, y, t.to(device), rtol=1e-9, atol=1e-11)[-1].square().sum().backward()
        grads.append(y.grad.cpu())
    assert torch.allclose(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_at_most_one_host_read_per_adaptive_step():
    y0 = torch.randn(256, 2, device="cuda")
    t = torch.linspace(0, 5, 4, device="cuda")
    steps = []

    class Counted(torch.nn.Module):
        def forward(self, t, y):
            return field(t, y)

        def callback_step(self, t0, y0, dt):
            steps.append(1)

    with torch.no_grad():
        flashode.odeint(Counted(), y0, t)  # warm-up (lazy CUDA init syncs)
        steps.clear()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                flashode.odeint(Counted(), y0, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    # Per step: the error ratio. Per solve: reading t, checking y0 is finite, three norms of the
    # initial step selection.
    assert syncs <= len(steps) + 5, (syncs, len(steps))


@pytest.mark.parametrize(
    "method, options",
    [("explicit_adams", dict(step_size=0.05)), ("implicit_adams", dict(step_size=0.05)),
     ("radauIIA5", dict(step_size=0.1)), ("sdirk2", dict(step_size=0.05)), ("midpoint", dict(step_size=0.05))],
)
def test_cuda_multistep_and_implicit_methods_match_cpu(method, options):
    y0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    cpu = flashode.odeint(field, y0, t, method=method, options=options)
    gpu = flashode.odeint(field, y0.cuda(), t.cuda(), method=method, options=options)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_cuda_event_time_and_gradient_match_cpu(interface):
    class Fall(torch.nn.Module):
        def forward(self, t, s):
            return torch.stack([s[1], torch.full_like(s[1], -9.81)])

    results = []
    for device in ("cpu", "cuda"):
        height = torch.tensor(10.0, dtype=torch.float64, device=device, requires_grad=True)
        y0 = torch.stack([height, torch.zeros_like(height)])
        event_t, _ = flashode.odeint_event(
            Fall(), y0, torch.tensor(0.0, dtype=torch.float64, device=device), event_fn=lambda t, s: s[0],
            odeint_interface=getattr(flashode, interface), rtol=1e-9, atol=1e-10,
        )
        (grad,) = torch.autograd.grad(event_t, height)
        assert event_t.device.type == device
        results.append((event_t.item(), grad.item()))
    assert results[0] == pytest.approx(results[1], rel=1e-9)
