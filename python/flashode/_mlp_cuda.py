"""When the CUDA kernels of the fused MLP solve can take a network (csrc/cuda/mlp_solve_kernels.cu).

A block of the kernels keeps the packed parameters in shared memory, with their gradients in the
backward, followed by the hidden activations of its threads (two of the widest layer per thread).
A block has 64 threads, or 32 when 64 do not fit; `cuda_fit_reason` applies the backward's rule
(the stricter one) at 32 threads, so that a solve it admits can always be differentiated too.
"""

from __future__ import annotations

import torch

# csrc/cuda/mlp_solve_kernels.cu: kMinBlockThreads
MIN_BLOCK_THREADS = 32


def packed_size(widths: list[int], bias: bool = True) -> int:
    """Values in the packed parameters (csrc/common/mlp_solve_args.h: MlpLayout)."""
    return sum(n_out * n_in + (n_out if bias else 0) for n_in, n_out in zip(widths[:-1], widths[1:]))


def shared_bytes(widths: list[int], dtype: torch.dtype, bias: bool = True, threads: int = MIN_BLOCK_THREADS) -> int:
    """Dynamic shared memory of a backward block: parameters, their gradients, hidden columns."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (2 * packed_size(widths, bias) + threads * 2 * max(widths)) * itemsize


def _shared_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    # The opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin); older torch only has the default one.
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def cuda_fit_reason(widths: list[int], dtype: torch.dtype, device: torch.device, bias: bool = True) -> str | None:
    """None when the CUDA kernels take this network on `device`; otherwise why not, in one line."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the fused MLP CUDA kernels run on CUDA devices, not {device.type}"
    if dtype not in (torch.float32, torch.float64):
        return f"the fused MLP CUDA kernels take float32 or float64 states, not {dtype}"
    need, limit = shared_bytes(list(widths), dtype, bias), _shared_limit(device)
    if need <= limit:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"MLP widths {list(widths)} need {need} bytes of shared memory per block in {name} "
            f"(parameters, their gradients and {MIN_BLOCK_THREADS} threads' hidden activations), "
            f"more than the GPU's {limit}")
