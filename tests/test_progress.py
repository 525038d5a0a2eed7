"""options['progress']: a bar over the integration interval, for every method, off by default."""

from __future__ import annotations

import io
import re
import sys
import warnings
from typing import Any

import pytest
import torch
import tqdm
from torch import Tensor, nn

import flashode
from flashode import progress

F64 = torch.float64
T = torch.linspace(0.0, 1.0, 4, dtype=F64)
Y0 = torch.tensor([1.0, -0.5], dtype=F64)


class Decay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return -self.rate * y


METHODS = {
    "dopri5": {},
    "rk4": dict(step_size=0.05),
    "implicit_adams": dict(step_size=0.05),
    "radauIIA3": dict(step_size=0.1),
    "scipy_solver": dict(solver="RK45"),
}


def final_line(err: str) -> str:
    """The bar as last drawn (tqdm redraws in place with carriage returns)."""
    return re.split(r"[\r\n]+", err.strip())[-1]


@pytest.fixture(autouse=True)
def no_bar_left_open():
    yield
    assert not tqdm.tqdm._instances, "a progress bar was left open"


@pytest.mark.parametrize("method", list(METHODS))
def test_bar_on_stderr_reaches_the_end_time_and_results_are_unchanged(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = flashode.odeint(Decay(), Y0, T, method=method, options=METHODS[method])
    assert capsys.readouterr() == ("", "")  # off by default: no output at all
    shown = flashode.odeint(Decay(), Y0, T, method=method, options=dict(METHODS[method], progress=True))
    assert torch.equal(shown, plain)
    out, err = capsys.readouterr()
    assert out == ""
    last = final_line(err)
    assert last.startswith(f"{method}: 100%|") and "t=1, " in last and "nfe=" in last, err


def test_decreasing_time_counts_down_to_the_last_time(capsys: pytest.CaptureFixture[str]) -> None:
    flashode.odeint(Decay(), Y0, -T, method="rk4", options=dict(step_size=0.1, progress=True))
    last = final_line(capsys.readouterr().err)
    assert last.startswith("rk4: 100%|") and "t=-1, dt=0.1, steps=10, nfe=40" in last


def test_adjoint_backward_solve_has_one_bar_over_all_intervals(capsys: pytest.CaptureFixture[str]) -> None:
    func = Decay()
    y0 = Y0.clone().requires_grad_()
    flashode.odeint_adjoint(func, y0, T).sum().backward()
    plain = (y0.grad.clone(), func.rate.grad.clone())
    assert capsys.readouterr() == ("", "")
    y0.grad = func.rate.grad = None
    flashode.odeint_adjoint(func, y0, T, options=dict(progress=True)).sum().backward()
    torch.testing.assert_close((y0.grad, func.rate.grad), plain, rtol=0, atol=0)
    bars = [final_line(part) for part in capsys.readouterr().err.split("\n") if part.strip()]
    assert len(bars) == 2, bars  # the forward solve's and the backward solve's
    assert bars[0].startswith("dopri5: 100%|") and "t=1, " in bars[0]
    assert bars[1].startswith("dopri5 (adjoint): 100%|") and "t=0, " in bars[1]


def test_adjoint_options_choose_the_backward_bar(capsys: pytest.CaptureFixture[str]) -> None:
    y0 = Y0.clone().requires_grad_()
    flashode.odeint_adjoint(
        Decay(), y0, T, options=dict(progress=True), adjoint_options=dict(progress=False)
    ).sum().backward()
    err = capsys.readouterr().err
    assert "dopri5: 100%|" in err and "adjoint" not in err


def test_tqdm_keyword_arguments_pass_through() -> None:
    buffer = io.StringIO()
    flashode.odeint(Decay(), Y0, T, options=dict(progress=dict(file=buffer, desc="decay", leave=True)))
    assert final_line(buffer.getvalue()).startswith("decay: 100%|")


@pytest.mark.parametrize(("method", "options"), [("dopri5", {}), ("rk4", dict(step_size=0.1))])
def test_event_search_bar_shows_the_time_reached(
    method: str, options: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # The search has no end time to count towards: the bar shows how far it got.
    t = torch.tensor([0.0, 5.0], dtype=F64)
    event_t, _ = flashode.odeint(
        Decay(), Y0, t, method=method, event_fn=lambda t, y: y[0] - 0.5, options=dict(options, progress=True)
    )
    reached = re.fullmatch(rf"{method}: \[\d\d:\d\d, t=([0-9.]+), dt=.*\]", final_line(capsys.readouterr().err))
    assert reached is not None and float(reached[1]) >= float(event_t) > 0.69


def test_a_failed_solve_closes_its_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(flashode.SolverError, match="max_num_steps"):
        flashode.odeint(Decay(), Y0, T, options=dict(progress=True, max_num_steps=3), rtol=1e-12, atol=1e-12)
    assert "dopri5:" in capsys.readouterr().err  # and no_bar_left_open checks it was closed


def test_without_tqdm_lines_go_to_stderr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    flashode.odeint(Decay(), Y0, T, method="rk4", options=dict(step_size=0.25, progress=True))
    err = capsys.readouterr().err
    # A solve shorter than the interval prints only its last line.
    assert err.splitlines() == [err.strip()] and err.startswith("rk4: 100% t=1, dt=0.25, steps=4, nfe=16 [")
    assert err.rstrip().endswith(", done]")
    flashode.odeint(Decay(), Y0, T, method="rk4", options=dict(step_size=0.25, progress=dict(mininterval=0)))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" t=")[0] for line in lines] == ["rk4:  25%", "rk4:  50%", "rk4:  75%", "rk4: 100%", "rk4: 100%"]


def test_progress_is_a_known_option_and_unknown_options_still_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method, options in METHODS.items():
            flashode.odeint(Decay(), Y0, T, method=method, options=dict(options, progress=False))
    with pytest.warns(UserWarning, match=r"AdaptiveRKSolver: Unexpected arguments \{'progres': True\}"):
        flashode.odeint(Decay(), Y0, T, options=dict(progres=True))
    with pytest.warns(UserWarning, match=r"FixedGridRKSolver: Unexpected arguments \{'bar': 1\}"):
        flashode.odeint(Decay(), Y0, T, method="euler", options=dict(progress=False, bar=1))


@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_progress_must_be_a_bool_or_tqdm_arguments(value: Any) -> None:
    with pytest.raises(TypeError, match="options\\['progress'\\] must be True, False or a dict of tqdm keyword"):
        flashode.odeint(Decay(), Y0, T, options=dict(progress=value))


def test_off_opens_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("a bar was opened with progress off")

    monkeypatch.setattr(progress, "_bar", refuse)
    y0 = Y0.clone().requires_grad_()
    for method, options in METHODS.items():
        flashode.odeint(Decay(), y0, T, method=method, options=dict(options))
    flashode.odeint_adjoint(Decay(), y0, T, options=dict(progress=False)).sum().backward()
