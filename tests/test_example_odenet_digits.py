"""Smoke tests of examples/odenet_digits.py (ODE-Net vs ResNet on scikit-learn's digits) at tiny sizes:
both models learn well above chance on a few hundred digits, they have the same parameters, the
ODE-Net's NFE is recorded every epoch (backward NFE only with the adjoint), and --out writes the plot
or says how to get it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "odenet_digits.py"
# 300 training digits, 4 epochs, 8 channels: about 2 s, and 86-93% test accuracy over seeds 0-4.
TINY = ["--train-size", "300", "--epochs", "4", "--channels", "8", "--batch-size", "32", "--quiet"]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("odenet_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the class is made
    spec.loader.exec_module(module)
    return module


odenet_digits = load_example()


def test_both_models_learn_and_the_ode_net_counts_its_evaluations(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "nfe.png"
    results = odenet_digits.main([*TINY, "--out", str(out)])
    resnet, odenet = results["ResNet"], results["ODE-Net"]
    for metrics in (resnet, odenet):
        assert metrics["test_accuracy"] > 0.6  # chance is 0.1
        assert metrics["epoch_loss"][-1] < 0.5 * metrics["epoch_loss"][0]
        assert metrics["train_seconds"] > 0
    # The residual block is one Euler step of the ODE block's field: the same parameters.
    assert resnet["params"] == odenet["params"] > 0
    assert len(odenet["nfe_forward"]) == 4 and all(nfe >= 6 for nfe in odenet["nfe_forward"])  # >= 1 dopri5 step
    assert odenet["nfe_backward"] == [0, 0, 0, 0]  # backpropagation through the solver calls no field
    assert resnet["nfe_forward"] == []
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adjoint_counts_backward_evaluations(capsys: pytest.CaptureFixture[str]) -> None:
    results = odenet_digits.main(["--train-size", "100", "--epochs", "1", "--channels", "4", "--adjoint", "--quiet"])
    odenet = results["ODE-Net"]
    assert len(odenet["nfe_backward"]) == 1 and odenet["nfe_backward"][0] > 0
    assert all(nfe > 0 for nfe in odenet["nfe_backward_per_batch"])
    assert "NFE backward (adjoint)" in capsys.readouterr().out


def test_without_matplotlib_says_how_to_get_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / "none.png"
    odenet_digits.main(["--train-size", "50", "--epochs", "1", "--channels", "4", "--quiet", "--out", str(out)])
    assert not out.exists()
    assert "pip install matplotlib" in capsys.readouterr().out
