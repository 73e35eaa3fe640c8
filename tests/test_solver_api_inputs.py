"""Bad input to the plain-function API of `fewstep.solvers` (grids, engine, decision builders, phi, EMS)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from fewstep.solvers import grids
from fewstep.solvers.ems import EMS, derivative_matrix
from fewstep.solvers.engine import StepDecision, compile_plan, sample_loop
from fewstep.solvers.mean_reverting import from_z, to_z
from fewstep.solvers.methods import (
    ddim_decisions,
    dpm_solver_decisions,
    dpm_solver_v3_decisions,
    euler_maruyama_decisions,
    unipc_decisions,
)
from fewstep.solvers.parameterization import to_pair
from fewstep.solvers.phi import phi, phi_array
from fewstep.solvers.s3 import SolverSchedule
from fewstep.solvers.schedules import FlowSchedule, FlowShift, VPSchedule, mean_reverting_alphas_cumprod

VP = VPSchedule.from_config({})
FLOW = FlowSchedule(1000)


def _pair(x, i):
    return 0.5 * x, 0.8 * x


# ---- grids -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [grids.uniform_time_grid, grids.time_quadratic_grid, grids.uniform_lambda_grid])
def test_flow_grids_with_default_range_start_below_pure_noise(builder):
    """t = T on a flow schedule is pure noise (alpha = 0, lambda = -inf): the defaults start at T - 1."""
    grid = builder(FLOW, 4)
    assert grid.timesteps[0] == pytest.approx(999.0) and np.all(np.isfinite(grid.lambdas[:-1]))
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_loop(_pair, x, compile_plan(grid, ddim_decisions(4, "noise")))
    assert torch.isfinite(out).all()


def test_flow_time_grid_still_reaches_clean_data_by_default():
    assert grids.uniform_time_grid(FLOW, 4).sigmas[-1] == 0.0


def test_grid_through_pure_noise_is_refused_by_name():
    with pytest.raises(ValueError, match=r"alpha > 0.*point 0 \(t = 1000\)"):
        grids.custom_timesteps_grid(FLOW, [1000.0, 500.0])
    with pytest.raises(ValueError, match="alpha > 0"):
        grids.TimeGrid([2.0, 1.0], [-0.5, 0.5, 1.0], [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="sigma >= 0"):
        grids.TimeGrid([2.0], [0.5, 1.0], [0.8, -0.1])


@pytest.mark.parametrize("kwargs", [{"t_start": 2000.0}, {"t_end": -100.0}, {"t_start": float("nan")}])
def test_time_range_outside_the_schedule_is_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number in \\[0, 1000\\]"):
        grids.uniform_time_grid(FLOW, 4, **kwargs)


def test_lambda_grid_to_clean_data_names_the_infinite_end():
    with pytest.raises(ValueError, match="finite lambda at both ends; t_start=999, t_end=0"):
        grids.uniform_lambda_grid(FLOW, 4, t_end=0.0)


def test_grid_without_evaluation_points_is_refused():
    with pytest.raises(ValueError, match="at least one evaluation point"):
        grids.karras_grid(VP, 1, final_sigmas_type=None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps_offset": 500}, "steps_offset=500 puts the first of 4 'leading' timesteps at 1300"),
        ({"steps_offset": 1.5}, "`steps_offset` must be an integer >= 0"),
        ({"steps_offset": -5}, "`steps_offset` must be an integer >= 0"),
    ],
)
def test_spacing_offsets_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grids.spacing_timesteps(1000, 4, "leading", **kwargs)


@pytest.mark.parametrize("T", [1000.5, "1000", 0])
def test_spacing_train_timesteps_are_checked(T):
    with pytest.raises(ValueError, match="`num_train_timesteps` must be an integer >= 1"):
        grids.spacing_timesteps(T, 4, "leading")


def test_flow_grid_takes_a_plain_shift_and_checks_it():
    assert np.array_equal(grids.flow_grid(FLOW, 5, 3.0).sigmas, grids.flow_grid(FLOW, 5, FlowShift(3.0)).sigmas)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`shift` must be a finite number > 0"):
            grids.flow_grid(FLOW, 5, bad)
        with pytest.raises(ValueError, match="`shift` must be a finite number > 0"):
            FlowShift(bad)


def test_flow_grid_shift_terminal_zero_is_refused_not_ignored():
    with pytest.raises(ValueError, match="`shift_terminal` must lie in"):
        grids.flow_grid(FLOW, 5, shift_terminal=0.0)


def test_flow_custom_sigmas_check_the_final_type():
    with pytest.raises(ValueError, match="flow `final_sigmas_type` must be 'zero' or None, got 'bogus'"):
        grids.custom_sigmas_grid(FLOW, [1.0, 0.5], final_sigmas_type="bogus")


@pytest.mark.parametrize("exponent", [float("nan"), "7", 0.0])
def test_karras_exponent_is_checked(exponent):
    with pytest.raises(ValueError, match="`exponent` must be a finite number > 0"):
        grids.karras_grid(VP, 5, exponent=exponent)


@pytest.mark.parametrize("offset", [float("nan"), -1.0])
def test_mean_reverting_offset_is_checked(offset):
    with pytest.raises(ValueError, match="`offset` must be a finite number >= 0"):
        mean_reverting_alphas_cumprod(10, offset=offset)


# ---- engine ------------------------------------------------------------------------------------------------------
def _plan(n=3):
    return compile_plan(grids.uniform_time_grid(VP, n), ddim_decisions(n))


@pytest.mark.parametrize(
    "pair_fn, match",
    [
        (lambda x, i: x, "must return a pair of tensors"),
        (lambda x, i: (x[:1], x[:1]), r"returned x0 of shape \(1, 3\) at grid point 0; the sample has shape \(4, 3\)"),
        (lambda x, i: (x, x[:, :1]), r"returned eps of shape \(4, 1\)"),
    ],
)
def test_sample_loop_checks_what_pair_fn_returns(pair_fn, match):
    with pytest.raises((TypeError, ValueError), match=match):
        sample_loop(pair_fn, torch.randn(4, 3), _plan())


@pytest.mark.parametrize("extra", [-5, 1.5, "1"])
def test_extra_buffer_is_checked(extra):
    grid = grids.uniform_time_grid(VP, 3)
    with pytest.raises(ValueError, match="`extra_buffer` must be an integer >= 0"):
        compile_plan(grid, ddim_decisions(3), extra_buffer=extra)


@pytest.mark.parametrize("builder", [ddim_decisions, dpm_solver_decisions, unipc_decisions, euler_maruyama_decisions,
                                     dpm_solver_v3_decisions])
@pytest.mark.parametrize("n", [0, -2, 2.5, "3", None])
def test_decision_builders_check_the_step_count(builder, n):
    with pytest.raises(ValueError, match="`num_steps` must be an integer >= 1"):
        builder(n)


def test_decision_builders_take_numpy_step_counts():
    assert dpm_solver_v3_decisions(np.int64(3)) == dpm_solver_v3_decisions(3)
    assert unipc_decisions(np.int64(4)) == unipc_decisions(4)


def test_unipc_disable_corrector_indices_are_checked():
    with pytest.raises(ValueError, match="`disable_corrector` \\(step indices\\) must be an integer >= 0, got -1"):
        unipc_decisions(4, disable_corrector=[-1])
    # past the last step: ignored, as diffusers does (one config serves every step count)
    assert unipc_decisions(4, disable_corrector=[99]) == unipc_decisions(4)


@pytest.mark.parametrize("flags", ["yes", [1, 0, 1]])
def test_v3_corrector_flags_must_be_bools(flags):
    with pytest.raises(ValueError, match="`corrector_at` must hold one bool per step"):
        dpm_solver_v3_decisions(3, corrector_at=flags)


@pytest.mark.parametrize("bad", ["0.1", None, float("nan")])
def test_step_relaxation_is_named(bad):
    with pytest.raises(ValueError, match="`relaxation` must be a finite number"):
        StepDecision(relaxation=bad)


def test_numpy_integers_where_python_ints_are_needed_say_so():
    with pytest.raises(ValueError, match=r"`solver_order` must be a Python int in \[1, 3\], got the numpy integer"):
        dpm_solver_decisions(3, np.int64(2))


# ---- phi ---------------------------------------------------------------------------------------------------------
def _phi_ref(k: int, z: float) -> float:
    mpmath.mp.dps = 40
    z = mpmath.mpf(z)
    return float(mpmath.quad(lambda u: mpmath.e ** ((1 - u) * z) * u ** (k - 1), [0, 1]) / mpmath.factorial(k - 1))


@pytest.mark.parametrize("k, z", [(16, 0.5), (20, 1.0), (25, 1.0), (20, -3.0), (10, -30.0), (12, 8.0), (3, 0.3)])
def test_phi_is_accurate_for_high_orders(k, z):
    ref = _phi_ref(k, z)
    assert phi(k, z) == pytest.approx(ref, rel=1e-13)
    assert phi_array(k, np.array([z, 0.1]))[0] == pytest.approx(ref, rel=1e-13)


@pytest.mark.parametrize("k", [1.5, -1, True, "2"])
def test_phi_order_is_checked(k):
    with pytest.raises(ValueError, match="`k` must be an integer >= 0"):
        phi(k, 0.3)


def test_phi_overflow_is_named():
    with pytest.raises(ValueError, match="overflows float64"):
        phi(2, 800.0)
    with pytest.raises(ValueError, match="overflows float64"):
        phi_array(2, np.array([1.0, 800.0]))


# ---- EMS, conversions, artifacts ---------------------------------------------------------------------------------
def test_ems_snap_refuses_nan():
    lambdas = np.linspace(-5.0, 5.0, 11)
    ems = EMS(lambdas=lambdas, l=np.zeros((11, 1)), s=np.zeros((11, 1)), b=np.zeros((11, 1)))
    with pytest.raises(ValueError, match="must not be NaN"):
        ems.snap(np.array([0.0, math.nan]))
    with pytest.raises(ValueError, match="must be finite"):
        derivative_matrix([math.nan, 1.0])


@pytest.mark.parametrize("kind, name", [("epsilon", "alpha"), ("sample", "sigma")])
def test_to_pair_refuses_a_zero_level_given_as_a_number(kind, name):
    x = torch.randn(2, 3)
    args = {"alpha": 0.0, "sigma": 0.5} if name == "alpha" else {"alpha": 0.5, "sigma": 0.0}
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number > 0"):
        to_pair(x, x, args["alpha"], args["sigma"], kind)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan")])
def test_mean_reverting_state_maps_check_lam(lam):
    x = torch.randn(2, 3)
    for fn in (to_z, from_z):
        with pytest.raises(ValueError, match="`lam` must be a finite number > 0"):
            fn(x, torch.zeros_like(x), lam)


def test_schedule_metadata_that_is_not_json_is_refused_before_writing(tmp_path):
    schedule = SolverSchedule([999.0, 500.0], ddim_decisions(2), metadata={"score": math.nan})
    with pytest.raises(ValueError, match="metadata cannot be written as JSON"):
        schedule.save(tmp_path / "s.json")
    assert not any(tmp_path.iterdir())
