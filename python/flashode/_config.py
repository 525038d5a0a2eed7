"""`flashode.show_config()`: what runs where."""

from __future__ import annotations

import torch

from . import _ops


def config_lines() -> list[str]:
    try:
        from . import _build_info as info

        built = f"torch {info.TORCH_BUILD_VERSION}" + (f" (CUDA {info.TORCH_BUILD_CUDA})" if info.TORCH_BUILD_CUDA else " (CPU)")
        target = info.TORCH_TARGET_VERSION
    except ImportError:
        built, target = "unknown (no compiled libraries in this install)", "n/a"
    lines = [
        f"flashode {__import__('flashode').__version__}",
        f"torch (runtime): {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"),
        f"extension built against: {built}",
        f"stable ABI target: {target} (torch 2.10)",
    ]
    for device in ("cpu", "cuda"):
        why = "" if device in _ops.kernel_devices else f"  [{_ops.load_errors.get(device, 'not loaded')}]"
        lines.append(f"{device}: " + ", ".join(f"{op}={_ops.path_for(device)}" for op in _ops.OP_NAMES) + why)
    for device in ("cpu", "cuda"):
        lines.append(f"{device}: fused MLP solve (odeint, odeint_adjoint, solve_ivp, NeuralODE on MLP fields; "
                     f"options fused=False for the generic path): {_ops.mlp_path_for(device)}")
    return lines


def show_config() -> None:
    """Print the torch versions, the ABI target and which path (kernel or reference) each op takes."""
    print("\n".join(config_lines()))
