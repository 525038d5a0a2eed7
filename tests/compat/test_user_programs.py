"""Compatibility evidence: torchdiffeq-style user programs, run unchanged against both packages.

Each program takes the package as `lib` (the `import flashode as torchdiffeq` swap) and returns
what its user would look at: outputs, losses, gradients and the number of function evaluations
(NFE). The tests require outputs and gradients equal within tolerance and the same NFE (±20%)
for the same method and tolerances. Where flashode is deliberately different, a test says so and
checks the difference is the intended one.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import flashode

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64


class Counted(nn.Module):
    """Wraps a vector field and counts its evaluations (the NFE users log)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: Any) -> Any:
        self.nfe += 1
        return self.inner(t, y)


class SpiralField(nn.Module):
    """The network of torchdiffeq's examples/ode_demo.py: an MLP on y**3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2)).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


def spiral_training(lib: ModuleType, adjoint: bool, method: str = "dopri5") -> dict[str, Any]:
    """ode_demo.py in miniature: fit an MLP field to a spiral for a few iterations."""
    true_a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    t = torch.linspace(0.0, 5.0, 100, dtype=F64)
    with torch.no_grad():
        true_y = lib.odeint(lambda t, y: torch.mm(y**3, true_a), torch.tensor([[2.0, 0.0]], dtype=F64), t)
    func = Counted(SpiralField())
    solve = lib.odeint_adjoint if adjoint else lib.odeint
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(4):
        starts = torch.randperm(90, generator=generator)[:16]
        batch_y0 = true_y[starts]  # (16, 1, 2)
        batch_t = t[:10]
        batch_y = torch.stack([true_y[starts + i] for i in range(10)], dim=0)
        optimizer.zero_grad()
        pred_y = solve(func, batch_y0, batch_t, rtol=1e-7, atol=1e-9, method=method)
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {
        "losses": torch.tensor(losses),
        "params": torch.cat([p.detach().reshape(-1) for p in func.parameters()]),
        "nfe": func.nfe,
    }


class PlanarFlow(nn.Module):
    """A continuous normalising flow's dynamics: the state and its log-density change (exact trace)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.weight = nn.Parameter(0.5 * torch.randn(2, 2, dtype=F64))
        self.bias = nn.Parameter(0.1 * torch.randn(2, dtype=F64))

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = state
        with torch.enable_grad():
            z = z.requires_grad_(True) if not z.requires_grad else z
            dz = torch.tanh(z @ self.weight.T + self.bias + t)
            trace = sum(
                torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[1])
            )
        return dz, -trace.unsqueeze(1)


def cnf_log_likelihood(lib: ModuleType, adjoint: bool) -> dict[str, Any]:
    """A CNF-style tuple state (z, logp) solved with odeint or odeint_adjoint, gradients of a loss."""
    func = Counted(PlanarFlow())
    z0 = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(6, 2)
    logp0 = torch.zeros(6, 1, dtype=F64)
    solve = lib.odeint_adjoint if adjoint else lib.odeint
    z_t, logp_t = solve(func, (z0, logp0), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-6, atol=1e-8)
    loss = (0.5 * z_t[-1].pow(2).sum(1, keepdim=True) - logp_t[-1]).mean()
    grads = torch.autograd.grad(loss, list(func.parameters()))
    return {"z": z_t.detach(), "logp": logp_t.detach(), "grads": torch.cat([g.reshape(-1) for g in grads]),
            "nfe": func.nfe}


class ODEBlock(nn.Module):
    """The ODE-Net classifier block of torchdiffeq's odenet_mnist.py (on a small feature map)."""

    def __init__(self, lib: ModuleType, method: str, options: dict[str, Any] | None) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.field = Counted(ConvField())
        self.lib, self.method, self.options = lib, method, options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, 1.0], dtype=x.dtype)
        return self.lib.odeint(self.field, x, t, rtol=1e-3, atol=1e-3, method=self.method, options=self.options)[1]


class ConvField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.norm(x)))


def odenet_block(lib: ModuleType, method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    block = ODEBlock(lib, method, options)
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    out = block(x)
    grads = torch.autograd.grad(out.square().mean(), list(block.parameters()))
    return {"out": out.detach(), "grads": torch.cat([g.reshape(-1) for g in grads]), "nfe": block.field.nfe}


class Ball(nn.Module):
    """torchdiffeq's examples/bouncing_ball.py physics: height and velocity under gravity."""

    def __init__(self) -> None:
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor(9.8, dtype=F64))

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pos, vel = state
        return vel, -self.gravity * torch.ones_like(vel)


def bouncing_ball(lib: ModuleType, adjoint: bool) -> dict[str, Any]:
    """Several bounces in sequence with odeint_event; gradients of the last impact time."""
    ball = Counted(Ball())
    height = torch.tensor([5.0], dtype=F64, requires_grad=True)
    state = (height, torch.zeros(1, dtype=F64))
    t0 = torch.tensor(0.0, dtype=F64)
    interface = lib.odeint_adjoint if adjoint else lib.odeint

    def event_fn(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pos, vel = state
        return torch.maximum(pos, vel)  # the ground, reached falling (not the leg's start)

    times = []
    for _ in range(3):
        t0, (pos, vel) = lib.odeint_event(ball, state, t0, event_fn=event_fn, odeint_interface=interface,
                                          rtol=1e-8, atol=1e-10)
        times.append(t0)
        state = (pos[-1], -0.7 * vel[-1])
    grads = torch.autograd.grad(times[-1], (height, ball.inner.gravity))
    return {"times": torch.stack(times).detach(), "grads": torch.stack([g.reshape(()) for g in grads]),
            "nfe": ball.nfe}


class LatentDynamics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ELU(), nn.Linear(32, 4)).double()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def latent_trajectories(lib: ModuleType, method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A latent-ODE decoder: a batch of latent states at irregular observation times."""
    func = Counted(LatentDynamics())
    generator = torch.Generator().manual_seed(6)
    z0 = torch.randn(8, 4, generator=generator, dtype=F64)
    t = torch.sort(torch.rand(20, generator=generator, dtype=F64) * 3).values
    t[0] = 0.0
    zs = lib.odeint(func, z0, t, rtol=1e-5, atol=1e-7, method=method, options=options)
    result = {"zs": zs.detach(), "nfe": func.nfe}
    if zs.requires_grad:  # scipy_solver gives no gradients, in either package
        grads = torch.autograd.grad(zs.pow(2).sum(), list(func.parameters()))
        result["grads"] = torch.cat([g.reshape(-1) for g in grads])
    return result


def _compare(ours: dict[str, Any], theirs: dict[str, Any], tol: float, nfe_band: float = 0.2) -> None:
    for key, value in theirs.items():
        if key == "nfe":
            assert abs(ours[key] - value) <= nfe_band * value, f"NFE {ours[key]} vs torchdiffeq's {value}"
        else:
            scale = max(1.0, float(value.abs().max()))
            diff = float((ours[key] - value).abs().max())
            assert diff <= tol * scale, f"{key}: max difference {diff:.3g}"


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
def test_spiral_training_backprop(method: str) -> None:
    _compare(spiral_training(flashode, False, method), spiral_training(torchdiffeq, False, method), 1e-6)


def test_spiral_training_adjoint() -> None:
    ours, theirs = spiral_training(flashode, True), spiral_training(torchdiffeq, True)
    # Different by design: flashode's backward solves carry the step size across output intervals
    # (default adjoint norm) instead of re-running the initial-step heuristic, so the adjoint takes
    # fewer evaluations; the gradients agree to the solve tolerance.
    assert ours["nfe"] <= theirs["nfe"]
    _compare({k: v for k, v in ours.items() if k != "nfe"}, {k: v for k, v in theirs.items() if k != "nfe"}, 1e-6)


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_cnf_tuple_state(adjoint: bool) -> None:
    ours, theirs = cnf_log_likelihood(flashode, adjoint), cnf_log_likelihood(torchdiffeq, adjoint)
    if adjoint:  # fewer backward evaluations by design (see test_spiral_training_adjoint)
        assert ours.pop("nfe") <= theirs.pop("nfe")
    _compare(ours, theirs, 1e-6)


@pytest.mark.parametrize(
    "method, options",
    [("dopri5", None), ("rk4", dict(step_size=0.25)), ("euler", dict(step_size=0.1)),
     ("implicit_adams", dict(step_size=0.2))],
    ids=["dopri5", "rk4", "euler", "implicit_adams"],
)
def test_odenet_classifier_block(method: str, options: dict[str, Any] | None) -> None:
    _compare(odenet_block(flashode, method, options), odenet_block(torchdiffeq, method, options), 1e-5)


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_bouncing_ball(adjoint: bool) -> None:
    ours, theirs = bouncing_ball(flashode, adjoint), bouncing_ball(torchdiffeq, adjoint)
    # The analytic impact times: sqrt(2 h / g), then flights of 2 * 0.7^k * v1 / g.
    first = math.sqrt(2 * 5.0 / 9.8)
    expected = torch.tensor([first, first + 1.4 * first, first + 1.4 * first * 1.7], dtype=F64)
    assert torch.allclose(ours["times"], expected, atol=1e-7)
    if adjoint:
        ours.pop("nfe"), theirs.pop("nfe")  # fewer backward evaluations by design
    _compare(ours, theirs, 1e-6)


@pytest.mark.parametrize(
    "method, options",
    [("dopri5", None), ("fehlberg2", None), ("dopri8", None), ("explicit_adams", dict(step_size=0.05)),
     ("fixed_adams", dict(step_size=0.05)), ("midpoint", dict(step_size=0.05, interp="cubic")),
     ("scipy_solver", dict(solver="RK45"))],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_latent_ode_decoder(method: str, options: dict[str, Any] | None) -> None:
    # dopri8's error estimate sits at rounding level on smooth problems; flashode's summation
    # order differs from torchdiffeq's, which can move an accept/reject decision (see the parity
    # tests), so it is compared at the solve tolerance.
    # Gradients differ slightly by design for adaptive methods: torchdiffeq's step sizes are tensors
    # computed from the error estimate, so its backprop also differentiates the step-size
    # controller (an artifact of the discretisation); flashode keeps control on the host.
    tol = 1e-5 if method == "dopri8" else 1e-6
    _compare(latent_trajectories(flashode, method, options), latent_trajectories(torchdiffeq, method, options), tol)


def test_documented_difference_bad_input_is_an_error_not_nan() -> None:
    """torchdiffeq integrates a NaN initial state into NaN outputs (or spins until underflow);
    flashode stops with an error naming the problem and the time."""
    y0 = torch.tensor([1.0, math.nan], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"non-finite values in the initial state y0 at t=0"):
        flashode.odeint(lambda t, y: -y, y0, t)
    with pytest.raises(TypeError, match="floating point"):
        flashode.odeint(lambda t, y: -y, torch.tensor([1, 2]), t)
