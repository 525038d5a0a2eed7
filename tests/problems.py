"""Test problems with analytic or high-accuracy reference solutions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

ADAPTIVE = ("dopri5", "dopri8", "tsit5", "bosh3", "fehlberg2", "adaptive_heun")
FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4")
FIXED_ORDER = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}


@dataclass
class Problem:
    name: str
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    y0: np.ndarray
    t: np.ndarray
    reference: np.ndarray  # (len(t), *y0.shape)


def _linear() -> Problem:
    # y' = A y with a rotation-plus-decay matrix: y(t) = expm(A t) y0.
    a = np.array([[-0.1, 2.0], [-2.0, -0.1]])
    y0 = np.array([1.0, 0.5])
    t = np.linspace(0.0, 3.0, 7)
    w, v = np.linalg.eig(a)
    ref = np.stack([(v @ np.diag(np.exp(w * ti)) @ np.linalg.solve(v, y0)).real for ti in t])
    at = torch.tensor(a)
    return Problem("linear", lambda t, y: y @ at.to(y.dtype).T, y0, t, ref)


def _logistic() -> Problem:
    # y' = y (1 - y), y(t) = 1 / (1 + (1/y0 - 1) e^{-t}), elementwise over a 2x3 state.
    y0 = np.array([[0.1, 0.5, 0.9], [1.5, 0.01, 0.3]])
    t = np.linspace(0.0, 4.0, 5)
    ref = np.stack([1.0 / (1.0 + (1.0 / y0 - 1.0) * np.exp(-ti)) for ti in t])
    return Problem("logistic", lambda t, y: y * (1 - y), y0, t, ref)


def _forced_pendulum() -> Problem:
    # Non-autonomous, nonlinear: reference from scipy DOP853 at 1e-13.
    def rhs(t, y):
        return [y[1], -np.sin(y[0]) - 0.2 * y[1] + 0.5 * np.cos(1.3 * t)]

    y0 = np.array([1.0, 0.0])
    t = np.linspace(0.0, 5.0, 6)
    sol = solve_ivp(rhs, (t[0], t[-1]), y0, method="DOP853", t_eval=t, rtol=1e-13, atol=1e-13)

    def func(t, y):
        return torch.stack([y[1], -torch.sin(y[0]) - 0.2 * y[1] + 0.5 * torch.cos(1.3 * t)])

    return Problem("forced_pendulum", func, y0, t, sol.y.T)


PROBLEMS = {p.name: p for p in (_linear(), _logistic(), _forced_pendulum())}
