"""`python -m flashode demo` at tiny sizes: it trains, compares the paths and writes its plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashode import __main__ as cli
from flashode import demo


def test_demo_trains_compares_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo.png"
    result = demo.main(["--iters", "60", "--compare-iters", "4", "--out", str(out)])
    assert result["loss_after"] < 0.5 * result["loss_before"]
    assert result["nfe_per_iteration"][0] > 0 and result["nfe_per_iteration"][1] == 0
    paths = list(result["ms_per_iteration"])
    assert paths[:2] == ["flashode (fused kernels)", "flashode (reference path)"]
    assert all(ms > 0 for ms in result["ms_per_iteration"].values())
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "whole-trajectory mean |error|" in printed and "x flashode" in printed


def test_demo_with_adjoint_counts_backward_evaluations(tmp_path: Path) -> None:
    result = demo.main(["--iters", "5", "--compare-iters", "0", "--adjoint", "--out", str(tmp_path / "a.png")])
    assert result["nfe_per_iteration"][1] > 0 and result["ms_per_iteration"] == {}


def test_demo_without_matplotlib_says_how_to_get_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / "none.png"
    demo.main(["--iters", "2", "--compare-iters", "0", "--out", str(out)])
    assert "pip install matplotlib" in capsys.readouterr().out and not out.exists()


def test_cli_config_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["config"])
    assert "stable ABI target" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--adjoint" in capsys.readouterr().out


def test_module_entry_point_runs(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "flashode", "demo", "--iters", "3", "--compare-iters", "2", "--out",
         str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(demo.__file__).parents[1])},
    )
    assert run.returncode == 0, run.stderr
    assert "ms/it" in run.stdout
