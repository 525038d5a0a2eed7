"""Peak resident memory of odeint_adjoint's backward pass, run as a script by test_adjoint.py (and,
with the argument `batch`, of solve_ivp(adjoint=True)'s, by test_batch_solve.py).

It runs in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536, so glibc maps every tensor
buffer of 64 KiB or more on its own and unmaps it when freed: resident memory then follows the
live tensors instead of a heap holding on to earlier tests' freed blocks. Peaks come from the
kernel's VmHWM after resetting it through /proc/self/clear_refs (Linux). Prints one JSON object.
"""

from __future__ import annotations

import gc
import json
import sys

import flashode
import torch


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64))
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return y @ self.a.T


def read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_delta(run) -> int:
    """Peak resident memory reached inside run() above the resident memory before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = read_status("VmRSS:")
    run()
    return read_status("VmHWM:") - before


def main() -> None:
    torch.manual_seed(0)
    func = Linear()
    y0 = torch.randn(40_000, 2, dtype=torch.float64)  # 640 KB: the solver's buffers dominate
    adjoint = []
    # The first pass is a warm-up: one-time allocations must not count. The last takes > 10x the
    # steps of the second (longer span, tighter tolerance).
    for span, rtol in ((0.25, 1e-5), (0.25, 1e-5), (6.0, 1e-7)):
        y = y0.clone().requires_grad_()
        t = torch.tensor([0.0, span], dtype=torch.float64)
        loss = flashode.odeint_adjoint(func, y, t, rtol=rtol, atol=1e-7)[-1].pow(2).sum()
        func.nfe = 0
        delta = peak_delta(lambda loss=loss, y=y: torch.autograd.grad(loss, [y, func.a]))
        adjoint.append({"span": span, "rtol": rtol, "peak_bytes": delta, "backward_nfe": func.nfe})
    # The same measurement on backprop through odeint, which keeps every step's stages.
    backprop = []
    for span in (0.25, 6.0):
        y = y0[:4_000].clone().requires_grad_()
        t = torch.tensor([0.0, span], dtype=torch.float64)
        delta = peak_delta(
            lambda: torch.autograd.grad(flashode.odeint(func, y, t, rtol=1e-5, atol=1e-7)[-1].pow(2).sum(), [y])
        )
        backprop.append({"span": span, "peak_bytes": delta})
    print(json.dumps({"adjoint": adjoint[1:], "backprop": backprop, "state_numel": y0.numel()}))


def main_batch() -> None:
    """The same measurement for solve_ivp: adjoint=True against backprop through the batch solve."""
    torch.manual_seed(0)
    func = Linear()
    y0 = torch.randn(20_000, 2, dtype=torch.float64)
    adjoint = []
    for span, rtol in ((0.25, 1e-5), (0.25, 1e-5), (6.0, 1e-7)):  # a warm-up, then > 10x the steps
        y = y0.clone().requires_grad_()
        t = torch.tensor([0.0, span], dtype=torch.float64)
        loss = flashode.solve_ivp(func, y, t, rtol=rtol, atol=1e-7, adjoint=True).ys[:, -1].pow(2).sum()
        func.nfe = 0
        delta = peak_delta(lambda loss=loss, y=y: torch.autograd.grad(loss, [y, func.a]))
        adjoint.append({"span": span, "rtol": rtol, "peak_bytes": delta, "backward_nfe": func.nfe})
    backprop = []
    for span in (0.25, 6.0):
        y = y0[:2_000].clone().requires_grad_()
        t = torch.tensor([0.0, span], dtype=torch.float64)

        def backprop_through_solve(y=y, t=t):
            loss = flashode.solve_ivp(func, y, t, rtol=1e-5, atol=1e-7).ys[:, -1].pow(2).sum()
            torch.autograd.grad(loss, [y])

        backprop.append({"span": span, "peak_bytes": peak_delta(backprop_through_solve)})
    print(json.dumps({"adjoint": adjoint[1:], "backprop": backprop, "state_numel": y0.numel()}))


if __name__ == "__main__":
    main_batch() if sys.argv[1:] == ["batch"] else main()
