"""The stable-ABI claim: a wheel built in isolation against one torch runs on another.

Builds the wheel with build isolation (pip fetches the newest allowed torch into the build
environment), checks its tag and the symbols its libraries import from torch, installs it into a
fresh virtual environment with a *different* torch version, and runs a smoke solve there on the
compiled kernels. Slow (a full isolated build), but part of the default run and of CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Versions pip can install here; the runtime torch must differ from the one the build used.
CANDIDATE_RUNTIME_TORCH = ("2.13.0", "2.14.1")

SMOKE = r"""
import torch, flashode
from flashode import _ops, _reference
flashode.show_config()
assert "cpu" in _ops.kernel_devices, _ops.load_errors
y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
t = torch.linspace(0, 1, 5, dtype=torch.float64)
out = flashode.odeint(lambda t, y: -y, y0, t, rtol=1e-9, atol=1e-11)
assert torch.allclose(out[:, 0], torch.exp(-t), atol=1e-8), out
k = torch.randn(7, 3, 4, dtype=torch.float64)
y = torch.randn(3, 4, dtype=torch.float64)
assert torch.allclose(torch.ops.flashode.rk_stage(y, k, [0.1, 0.2], 0.5), _reference.rk_stage(y, k, [0.1, 0.2], 0.5))
print("SMOKE OK torch", torch.__version__)
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _torch_imports(lib: Path) -> list[str]:
    """Undefined dynamic symbols of a library that come from torch's C++ namespaces."""
    out = _run(["nm", "-D", "--undefined-only", str(lib)]).stdout
    symbols = [line.split()[-1] for line in out.splitlines() if line.strip()]
    cxx_torch = re.compile(r"^_Z.*(3c10|2at|5torch|5caffe2)")
    return [s for s in symbols if cxx_torch.match(s)]


@pytest.mark.slow
def test_isolated_wheel_runs_on_another_torch(tmp_path):
    if shutil.which("nm") is None:
        pytest.skip("binutils (nm) not available")
    wheel_dir = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(wheel_dir)], timeout=1800)
    (wheel,) = wheel_dir.glob("flashode-*.whl")
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name

    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    libs = sorted((unpacked / "flashode" / "_lib").glob("*.so"))
    assert any(p.name == "libflashode_cpu.so" for p in libs), libs
    for lib in libs:
        assert _torch_imports(lib) == [], f"{lib.name} imports torch C++ symbols (not the stable ABI)"
    build_info = (unpacked / "flashode" / "_build_info.py").read_text()
    build_torch = re.search(r'TORCH_BUILD_VERSION = "([^"]+)"', build_info).group(1)
    runtime_torch = next(v for v in CANDIDATE_RUNTIME_TORCH if v != build_torch)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([str(python), "-m", "pip", "install", "-q", f"torch=={runtime_torch}", "numpy"], env=env, timeout=1800)
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env=env, timeout=600)
    result = _run([str(python), "-c", SMOKE], cwd=tmp_path, env=env, timeout=600)
    assert "SMOKE OK torch " + runtime_torch in result.stdout, result.stdout
    assert f"extension built against: torch {build_torch}" in result.stdout, result.stdout
