"""flashode: neural ODE solvers for PyTorch with fused C++/CUDA Runge–Kutta kernels.

A drop-in for torchdiffeq: `import flashode as torchdiffeq` and `odeint` / `odeint_adjoint` behave
the same.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import nn
from ._config import show_config
from .adjoint import odeint_adjoint
from .batch import Solution, Status, solve_ivp
from .dense import DenseSolution, odeint_dense
from .errors import SolverError
from .event_solve import odeint_event
from .odeint import odeint

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "DenseSolution", "solve_ivp", "Solution", "Status",
    "show_config", "SolverError", "nn",
    "__version__",
]
