"""Bad input: torchdiffeq's exception types and messages, plus flashode's own clear errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

import flashode

torchdiffeq = pytest.importorskip("torchdiffeq")


def f(t, y):
    return -y


Y0 = torch.ones(2, dtype=torch.float64)
T = torch.tensor([0.0, 1.0], dtype=torch.float64)

TORCHDIFFEQ_CASES = {
    "t_not_tensor": dict(t=[0.0, 1.0]),
    "t_not_floating": dict(t=torch.tensor([0, 1])),
    "t_not_1d": dict(t=torch.zeros(2, 2)),
    "t_not_monotonic": dict(t=torch.tensor([0.0, 1.0, 0.5])),
    "t_repeated": dict(t=torch.tensor([0.0, 1.0, 1.0])),
    "unknown_method": dict(method="rk45"),
    "y0_list": dict(y0=[torch.ones(1)]),
    "tuple_rtol_length": dict(y0=(torch.ones(1), torch.ones(2)), rtol=(1e-3,)),
    "rtol_requires_grad": dict(rtol=torch.tensor(1e-3, requires_grad=True)),
    "atol_requires_grad": dict(atol=torch.tensor(1e-3, requires_grad=True)),
    "event_fn_needs_two_times": dict(t=torch.tensor([0.0, 1.0, 2.0]), event_fn=lambda t, y: y[0]),
}


def _call(lib, **overrides):
    kwargs = dict(y0=Y0, t=T)
    kwargs.update(overrides)
    y0, t = kwargs.pop("y0"), kwargs.pop("t")
    func = kwargs.pop("func", f)
    return lib.odeint(func, y0, t, **kwargs)


@pytest.mark.parametrize("case", sorted(TORCHDIFFEQ_CASES))
def test_same_exception_type_and_message_as_torchdiffeq(case):
    overrides = TORCHDIFFEQ_CASES[case]
    with pytest.raises(Exception) as theirs:
        _call(torchdiffeq, **overrides)
    with pytest.raises(type(theirs.value)) as ours:
        _call(flashode, **overrides)
    if case == "unknown_method":  # flashode lists torchdiffeq master's methods, in master's order
        names = '"dopri8", "dopri5", "tsit5", "bosh3"'
        assert str(ours.value).startswith('Invalid method "rk45". Must be one of {' + names)
        assert str(ours.value).endswith('"trbdf2", "fixed_adams", "scipy_solver"}.')
    else:
        assert str(ours.value) == str(theirs.value)


def test_unexpected_options_warn():
    with pytest.warns(UserWarning, match=re.escape("Unexpected arguments {'bogus': 1}")):
        flashode.odeint(f, Y0, T, options=dict(bogus=1))
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        flashode.odeint(f, Y0, T, method="rk4", options=dict(step_size=0.1, bogus=1))


def test_integer_y0_is_a_clear_type_error():
    with pytest.raises(TypeError, match="floating point"):
        flashode.odeint(f, torch.ones(2, dtype=torch.int64), T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_y0_is_a_clear_type_error(dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        flashode.odeint(f, torch.ones(2, dtype=dtype), T)


def test_non_finite_y0_names_the_time():
    with pytest.raises(ValueError, match=r"non-finite values in the initial state y0 at t=0"):
        flashode.odeint(f, torch.tensor([1.0, math.nan], dtype=torch.float64), T)


def test_func_returning_nan_stops_with_time_reached():
    def blows_up(t, y):
        return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)

    with pytest.raises(flashode.SolverError, match=r"at t=0\.5\d*.*non-finite") as info:
        flashode.odeint(blows_up, Y0, T)
    assert isinstance(info.value, AssertionError)  # torchdiffeq-style `except AssertionError` still works


def test_fixed_grid_nan_names_the_time():
    def blows_up(t, y):
        return torch.where(t > 0.5, torch.full_like(y, math.inf), -y)

    with pytest.raises(flashode.SolverError, match=r"non-finite values in the state at t="):
        flashode.odeint(blows_up, Y0, T, method="euler", options=dict(step_size=0.1))


def test_max_num_steps_names_t_and_dt():
    with pytest.raises(flashode.SolverError, match=r"max_num_steps exceeded \(3>=3\) at t=[\d.e-]+ with dt="):
        flashode.odeint(f, Y0, torch.tensor([0.0, 100.0], dtype=torch.float64), options=dict(max_num_steps=3))


def test_dt_underflow_names_t_and_dt():
    # A finite-time blow-up: y' = y^2 from y(0) = 1 explodes at t = 1.
    with pytest.raises(flashode.SolverError, match=r"underflow in dt [\d.e+-]+ at t=(0\.99|1\.0).*blow up"):
        flashode.odeint(lambda t, y: y * y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_t_on_another_device_warns_and_is_moved():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.warns(UserWarning, match="t is not on the same device as y0"):
        flashode.odeint(f, Y0.cuda(), T)


def test_func_returning_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"func returned shape \(3,\) for the state, but y0 has shape \(2,\)"):
        flashode.odeint(lambda t, y: torch.ones(3, dtype=y.dtype), Y0, T)


def test_t_requiring_grad_is_refused_not_silently_dropped():
    t = T.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match=r"t.detach\(\)"):
        flashode.odeint(f, Y0, t)
    with torch.no_grad():  # no graph is recorded, so nothing is lost
        flashode.odeint(f, Y0, t)


def test_tuple_func_returning_wrong_part_shape_is_named():
    y0 = (torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"shape \(\) for part 0 of the state, but part 0 of y0 has shape \(3,\)"):
        flashode.odeint(lambda t, y: (torch.tensor(-1.0), -y[1]), y0, T.float())


def test_complex_y0_is_a_clear_type_error():
    with pytest.raises(TypeError, match="view_as_real"):
        flashode.odeint(f, torch.ones(2, dtype=torch.complex128), T)


@pytest.mark.parametrize("step_size", [0.0, math.inf, math.nan])
def test_bad_step_size_is_a_value_error(step_size):
    with pytest.raises(ValueError, match="step_size must be a finite, non-zero number"):
        flashode.odeint(f, Y0, T, method="euler", options=dict(step_size=step_size))


@pytest.mark.parametrize("options, match", [
    (dict(max_step=0.0), "max_step must be positive"),
    (dict(first_step=0.0), "first_step must be a finite positive number"),
])
def test_zero_step_options_are_value_errors(options, match):
    with pytest.raises(ValueError, match=match):
        flashode.odeint(f, Y0, T, options=options)


def test_zero_tolerances_are_a_value_error():
    with pytest.raises(ValueError, match="rtol and atol cannot both be zero"):
        flashode.odeint(f, Y0, T, rtol=0.0, atol=0.0)


def test_repeated_step_t_is_a_value_error_like_torchdiffeq():
    with pytest.raises(ValueError, match="must not have any repeated elements"):
        flashode.odeint(f, Y0, T, options=dict(jump_t=torch.tensor([0.5, 0.5])))


def test_min_step_never_accepts_a_non_finite_state():
    def nan_after_half(t, y):
        return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)

    with pytest.raises(flashode.SolverError, match=r"non-finite values in the state at t=0\.5"):
        flashode.odeint(nan_after_half, Y0, T, options=dict(min_step=0.01))


def test_func_non_finite_at_t0_is_named():
    with pytest.raises(flashode.SolverError, match="non-finite values at the initial time t=0"):
        flashode.odeint(lambda t, y: y * math.nan, Y0, T)


def test_single_time_output_is_not_a_view_of_y0():
    y0 = Y0.clone()
    out = flashode.odeint(f, y0, T[:1])
    out += 1
    assert torch.equal(y0, Y0)
