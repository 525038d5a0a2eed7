"""Event handling: odeint(event_fn=...) and odeint_event, against analytic event times and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from torch import nn

import flashode
from flashode.errors import SolverError

F64 = torch.float64
GRAVITY = 9.81
ADAPTIVE = ["dopri5", "dopri8", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"]


class Fall(nn.Module):
    """Free fall: state (height, velocity), gravity a parameter."""

    def __init__(self, gravity: float = GRAVITY) -> None:
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor(gravity, dtype=F64))

    def forward(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return torch.stack([state[1], -self.gravity * torch.ones_like(state[1])])


def hit_ground(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return state[0]


def landing_time(h0: torch.Tensor, v0: torch.Tensor, gravity: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
    return t0 + (v0 + torch.sqrt(v0**2 + 2 * gravity * h0)) / gravity


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h0 = torch.tensor(10.0, dtype=F64, requires_grad=True)
    v0 = torch.tensor(2.0, dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.5, dtype=F64, requires_grad=True)
    return h0, v0, t0


@pytest.mark.parametrize("method", ADAPTIVE)
def test_event_time_and_state_of_a_falling_ball(method: str) -> None:
    h0, v0, t0 = _inputs()
    fall = Fall()
    event_t, solution = flashode.odeint_event(
        fall, torch.stack([h0, v0]), t0, event_fn=hit_ground, method=method, rtol=1e-9, atol=1e-10
    )
    exact = landing_time(h0, v0, fall.gravity, t0)
    assert solution.shape == (2, 2)
    assert torch.equal(solution[0].detach(), torch.tensor([10.0, 2.0], dtype=F64))
    assert abs(event_t.item() - exact.item()) < 1e-7
    assert abs(solution[1, 0].item()) < 1e-7  # on the ground
    assert abs(solution[1, 1].item() - (2.0 - GRAVITY * (exact.item() - 0.5))) < 1e-6


@pytest.mark.parametrize("interp", ["linear", "cubic"])
@pytest.mark.parametrize("method", ["euler", "rk4", "midpoint"])
def test_fixed_grid_events(method: str, interp: str) -> None:
    h0, v0, t0 = _inputs()
    step = 1e-3 if method == "euler" else 1e-2
    event_t, _ = flashode.odeint_event(
        Fall(), torch.stack([h0, v0]), t0, event_fn=hit_ground, method=method,
        options=dict(step_size=step, interp=interp), atol=1e-9,
    )
    exact = float(landing_time(h0, v0, torch.tensor(GRAVITY, dtype=F64), t0))
    # Euler's global error is O(step); the others integrate a quadratic exactly, leaving the
    # interpolation error (linear: O(step^2), cubic Hermite: exact for a quadratic).
    tol = {"euler": 2e-2, "linear": 2e-4, "cubic": 1e-8}[method if method == "euler" else interp]
    assert abs(event_t.item() - exact) < tol


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_event_time_gradients_match_the_analytic_ones(interface: str, method: str) -> None:
    h0, v0, t0 = _inputs()
    fall = Fall()
    options = dict(step_size=0.01, interp="cubic") if method == "rk4" else None
    event_t, solution = flashode.odeint_event(
        fall, torch.stack([h0, v0]), t0, event_fn=hit_ground, method=method, options=options,
        rtol=1e-10, atol=1e-10, odeint_interface=getattr(flashode, interface),
    )
    exact = landing_time(h0, v0, fall.gravity, t0)
    inputs = (h0, v0, t0, fall.gravity)
    got = torch.autograd.grad(event_t, inputs)
    want = torch.autograd.grad(exact, inputs)
    for g, w in zip(got, want):
        assert abs(float(g) - float(w)) < 1e-6 * max(1.0, abs(float(w)))

    # The landing velocity moves with the event time: v(T) = v0 - g (T - t0).
    exact = landing_time(h0, v0, fall.gravity, t0)
    v_exact = v0 - fall.gravity * (exact - t0)
    event_t, solution = flashode.odeint_event(
        fall, torch.stack([h0, v0]), t0, event_fn=hit_ground, method=method, options=options,
        rtol=1e-10, atol=1e-10, odeint_interface=getattr(flashode, interface),
    )
    got = torch.autograd.grad(solution[1, 1], inputs)
    want = torch.autograd.grad(v_exact, inputs)
    for g, w in zip(got, want):
        assert abs(float(g) - float(w)) < 1e-6 * max(1.0, abs(float(w)))


def _bounce_times(h0: torch.Tensor, bounces: int, restitution: float, interface: str) -> list[torch.Tensor]:
    """The torchdiffeq paper's bouncing ball: after each impact the velocity flips and shrinks."""
    fall = Fall()
    state = torch.stack([h0, torch.zeros((), dtype=F64)])
    t0 = torch.tensor(0.0, dtype=F64)
    times = []
    for _ in range(bounces):
        t0, solution = flashode.odeint_event(
            fall, state, t0, event_fn=falling_onto_the_ground, rtol=1e-10, atol=1e-11,
            odeint_interface=getattr(flashode, interface),
        )
        times.append(t0)
        state = torch.stack([solution[-1, 0], -restitution * solution[-1, 1]])
    return times


def falling_onto_the_ground(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    # Zero only on the ground moving down: a leg that starts on the ground moving up (height ~0,
    # of either sign after the bisection) does not end at once.
    return torch.maximum(state[0], state[1])


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_bouncing_ball_events_in_sequence(interface: str) -> None:
    h0 = torch.tensor(5.0, dtype=F64, requires_grad=True)
    restitution = 0.8
    times = _bounce_times(h0, 3, restitution, interface)
    first = math.sqrt(2 * 5.0 / GRAVITY)
    flight = 2 * restitution * GRAVITY * first / GRAVITY  # up and down at restitution * impact speed
    expected = [first, first + flight, first + flight * (1 + restitution)]
    for got, want in zip(times, expected):
        assert abs(got.item() - want) < 1e-6
    # d(third impact)/dh0 = (1 + 2e + 2e^2) dT1/dh0, dT1/dh0 = 1 / sqrt(2 g h0)
    (grad,) = torch.autograd.grad(times[-1], h0)
    want = (1 + 2 * restitution + 2 * restitution**2) / math.sqrt(2 * GRAVITY * 5.0)
    assert abs(grad.item() - want) < 1e-5 * want


def test_multivariate_event_stops_at_the_first_component_to_change_sign() -> None:
    y0 = torch.tensor([10.0, 0.0], dtype=F64)

    def two_events(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # The ball falls below 9 at t = sqrt(2/g) ~ 0.4515; the clock passes 0.3 earlier.
        return torch.stack([state[0] - 9.0, 0.3 - t])

    event_t, _ = flashode.odeint(Fall(), y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=two_events, atol=1e-10)
    assert abs(event_t.item() - 0.3) < 1e-9
    event_t, _ = flashode.odeint(
        Fall(), y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=lambda t, s: torch.stack([s[0] - 9.0, 0.9 - t]),
        atol=1e-10,
    )
    assert abs(event_t.item() - math.sqrt(2 / GRAVITY)) < 1e-9


def test_reverse_time_and_tuple_state() -> None:
    # Backwards from a ball on the ground at t0 = 2 moving down at 5 m/s: when was it at 1 m?
    def fall(t, state):
        height, velocity = state
        return velocity, -GRAVITY * torch.ones_like(velocity)

    state = (torch.zeros(1, dtype=F64), torch.full((1,), -5.0, dtype=F64))
    event_t, (height, velocity) = flashode.odeint_event(
        fall, state, torch.tensor(2.0, dtype=F64), event_fn=lambda t, s: s[0] - 1.0, reverse_time=True,
        rtol=1e-10, atol=1e-10,
    )
    # h = 5 s - g/2 s^2 = 1 with s = 2 - t > 0: the smaller root
    s = (5 - math.sqrt(25 - 2 * GRAVITY)) / GRAVITY
    assert abs(event_t.item() - (2 - s)) < 1e-8
    assert height.shape == (2, 1) and velocity.shape == (2, 1)
    assert abs(height[-1].item() - 1.0) < 1e-8


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3", "rk4"])
def test_same_results_as_torchdiffeq(method: str) -> None:
    y0 = torch.tensor([10.0, 2.0], dtype=F64)
    options = dict(step_size=0.05) if method == "rk4" else None
    kwargs = dict(event_fn=hit_ground, method=method, options=options, rtol=1e-8, atol=1e-10)
    expected = torchdiffeq.odeint_event(Fall(), y0, torch.tensor(0.0, dtype=F64), **kwargs)
    got = flashode.odeint_event(Fall(), y0, torch.tensor(0.0, dtype=F64), **kwargs)
    exact = landing_time(*(torch.tensor(x, dtype=F64) for x in (10.0, 2.0, GRAVITY, 0.0))).item()
    if method == "bosh3":
        # Different on purpose: torchdiffeq locates events on its quartic interpolant, whose bosh3
        # mid-point is of low order (here the ball lands 0.38 s early); flashode on an accurate one.
        assert abs(got[0].item() - exact) < 1e-8 < 1e-2 < abs(expected[0].item() - exact)
        return
    # Same steps, the event on interpolants that agree to within the tolerance.
    assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-9)
    assert torch.allclose(got[1], expected[1], rtol=0, atol=1e-8)


def test_odeint_event_mode_returns_a_detached_event_time_and_a_differentiable_state() -> None:
    h0 = torch.tensor(10.0, dtype=F64, requires_grad=True)
    y0 = torch.stack([h0, torch.zeros((), dtype=F64)])
    event_t, solution = flashode.odeint(Fall(), y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=hit_ground)
    assert not event_t.requires_grad and event_t.dtype == F64
    assert solution.requires_grad and solution.shape == (2, 2)


def test_event_errors() -> None:
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    with pytest.raises(ValueError, match=r"len\(t\) == 2"):
        flashode.odeint(Fall(), y0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), event_fn=hit_ground)
    with pytest.raises(AssertionError, match="requires `step_size`"):
        flashode.odeint_event(Fall(), y0, torch.tensor(0.0, dtype=F64), event_fn=hit_ground, method="rk4")
    with pytest.raises(SolverError, match="no event found"):
        flashode.odeint_event(
            lambda t, y: -y, y0 + 1, torch.tensor(0.0, dtype=F64), event_fn=hit_ground,
            options=dict(max_num_steps=200),
        )
    with pytest.raises(SolverError, match="maximum number of iterations"):
        flashode.odeint_event(
            lambda t, y: torch.zeros_like(y), y0, torch.tensor(0.0, dtype=F64), event_fn=hit_ground,
            method="euler", options=dict(step_size=1.0),
        )
    with pytest.raises(SolverError, match="event_fn returned NaN"):
        flashode.odeint_event(
            Fall(), y0, torch.tensor(0.0, dtype=F64), event_fn=lambda t, s: torch.where(t > 0.2, math.nan, 1.0),
        )
    with pytest.raises(ValueError, match="scipy_solver does not support event"):
        flashode.odeint_event(Fall(), y0, torch.tensor(0.0, dtype=F64), event_fn=hit_ground, method="scipy_solver")


def test_an_event_exactly_at_the_start_ends_the_solve_there() -> None:
    y0 = torch.tensor([0.0, 1.0], dtype=F64)
    event_t, solution = flashode.odeint_event(Fall(), y0, torch.tensor(0.25, dtype=F64), event_fn=hit_ground)
    assert event_t.item() == 0.25
    assert torch.equal(solution[1].detach(), y0)
