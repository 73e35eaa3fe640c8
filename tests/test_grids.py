"""Timestep grids: diffusers' timesteps and noise levels, the continuous grids, custom points, bad input."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from fewstep.solvers import grids
from fewstep.solvers.grids import TimeGrid
from fewstep.solvers.schedules import FlowSchedule, FlowShift, VPSchedule

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
BETAS = {"linear": {}, "sd": SD}
STEPS = [1, 5, 10, 25, 50]
F32 = {"rtol": 1e-6, "atol": 0.0}  # diffusers keeps sigmas in float32


@functools.cache
def _vp(name: str = "sd") -> VPSchedule:
    return VPSchedule.from_config(DDPMScheduler(**BETAS[name]).config)


def _diffusers(cls, n, mu=None, **kw):
    scheduler = cls(**kw)
    if mu is None:
        scheduler.set_timesteps(n)
    else:
        scheduler.set_timesteps(n, mu=mu)
    sigmas = getattr(scheduler, "sigmas", None)  # DDIM has none
    return scheduler.timesteps.double().numpy(), None if sigmas is None else sigmas.double().numpy()


def _check_invariants(grid: TimeGrid, n: int, vp: bool = True, strict_times: bool = True) -> None:
    assert grid.num_steps == n
    assert grid.timesteps.shape == (n,) and grid.alphas.shape == (n + 1,) and grid.sigmas.shape == (n + 1,)
    assert grid.lambdas.shape == (n + 1,)
    assert np.all(np.isfinite(grid.timesteps)) and np.all(np.isfinite(grid.alphas)) and np.all(grid.sigmas[:-1] > 0)
    gaps = np.diff(grid.lambdas)
    assert np.all(gaps[:-1] > 0) and (gaps.size == 0 or gaps[-1] >= 0)
    # rounded Karras times may repeat (as in diffusers); everything else strictly decreases
    assert np.all(np.diff(grid.timesteps) < 0) if strict_times else np.all(np.diff(grid.timesteps) <= 0)
    if vp:
        np.testing.assert_allclose(grid.alphas**2 + grid.sigmas**2, 1.0, rtol=0, atol=1e-12)
    else:
        np.testing.assert_allclose(grid.alphas + grid.sigmas, 1.0, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# diffusers' integer spacings
# --------------------------------------------------------------------------------------------------

SPACING_KW = [
    ("leading", 0),
    ("leading", 1),
    ("linspace", 0),
    ("trailing", 0),
]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing,offset", SPACING_KW)
def test_multistep_spacing_matches_dpmsolver_and_unipc(spacing, offset, n):
    ours = grids.spacing_timesteps(1000, n, spacing, steps_offset=offset, style="multistep")
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        timesteps, _ = _diffusers(cls, n, timestep_spacing=spacing, steps_offset=offset)
        np.testing.assert_array_equal(ours, timesteps)
    assert ours.dtype == np.float64 and ours.shape == (n,)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing,offset", SPACING_KW)
def test_ddim_spacing_matches_ddim(spacing, offset, n):
    ours = grids.spacing_timesteps(1000, n, spacing, steps_offset=offset, style="ddim")
    timesteps, _ = _diffusers(DDIMScheduler, n, timestep_spacing=spacing, steps_offset=offset)
    np.testing.assert_array_equal(ours, timesteps)


@pytest.mark.parametrize("n", [1, 3, 7, 13])
def test_spacing_with_fewer_training_steps(n):
    for spacing in ("leading", "linspace", "trailing"):
        for style, cls in (("multistep", DPMSolverMultistepScheduler), ("ddim", DDIMScheduler)):
            timesteps, _ = _diffusers(cls, n, num_train_timesteps=40, timestep_spacing=spacing)
            np.testing.assert_array_equal(grids.spacing_timesteps(40, n, spacing, style=style), timesteps)


@pytest.mark.parametrize("n", [61, 103, 121, 201])
@pytest.mark.parametrize("style", ["multistep", "ddim"])
def test_trailing_gives_exactly_n_in_range_steps(n, style):
    """A float arange over 1000 with step 1000/n returns n + 1 points for these n; diffusers then ends at t = -1.
    fewstep keeps diffusers' first n timesteps and drops the out-of-range one."""
    ours = grids.spacing_timesteps(1000, n, "trailing", style=style)
    assert ours.shape == (n,) and ours.min() >= 0 and ours[0] == 999
    timesteps, _ = _diffusers(DPMSolverMultistepScheduler, n, timestep_spacing="trailing")
    np.testing.assert_array_equal(ours, timesteps[:n])
    grid = grids.spacing_grid(_vp(), n, "trailing", style=style)
    _check_invariants(grid, n)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing,offset", SPACING_KW)
@pytest.mark.parametrize("betas", list(BETAS))
def test_spacing_grid_noise_levels_match_dpmsolver(betas, spacing, offset, n, final):
    timesteps, sigmas = _diffusers(
        DPMSolverMultistepScheduler, n, timestep_spacing=spacing, steps_offset=offset, final_sigmas_type=final,
        **BETAS[betas],
    )
    grid = grids.spacing_grid(_vp(betas), n, spacing, steps_offset=offset, final_sigmas_type=final)
    _check_invariants(grid, n)
    np.testing.assert_array_equal(grid.timesteps, timesteps)
    np.testing.assert_allclose(grid.rhos[:-1], sigmas[:-1], **F32)
    if final == "zero":
        assert grid.sigmas[-1] == 0.0 and grid.alphas[-1] == 1.0 and sigmas[-1] == 0.0
    else:
        np.testing.assert_allclose(grid.rhos[-1], sigmas[-1], **F32)
        np.testing.assert_allclose(grid.rhos[-1], _vp(betas).discrete_rho()[0], rtol=1e-12)


def test_ddim_style_grid_uses_ddim_timesteps():
    grid = grids.spacing_grid(_vp(), 10, "leading", steps_offset=1, style="ddim")
    timesteps, _ = _diffusers(DDIMScheduler, 10, timestep_spacing="leading", steps_offset=1)
    np.testing.assert_array_equal(grid.timesteps, timesteps)
    alpha, sigma = _vp().alpha_sigma(timesteps)
    np.testing.assert_allclose(grid.alphas[:-1], alpha, rtol=1e-15)
    np.testing.assert_allclose(grid.sigmas[:-1], sigma, rtol=1e-15)


# --------------------------------------------------------------------------------------------------
# Karras
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("n", [*STEPS, 15, 28, 44])
@pytest.mark.parametrize("betas", list(BETAS))
def test_karras_grid_matches_dpmsolver(betas, n, final):
    """Noise levels are the exact Karras ones; model timesteps are diffusers' rounded `_sigma_to_t` (linear in
    log sigma between training steps), which rounds differently from log-alpha interpolation near t ~ 1..10
    (linear: n = 15, 28; SD: n = 44, 50)."""
    timesteps, sigmas = _diffusers(
        DPMSolverMultistepScheduler, n, use_karras_sigmas=True, final_sigmas_type=final, **BETAS[betas]
    )
    grid = grids.karras_grid(_vp(betas), n, final_sigmas_type=final)
    _check_invariants(grid, n, strict_times=False)
    np.testing.assert_allclose(grid.rhos, sigmas, **F32)
    np.testing.assert_array_equal(grid.timesteps, timesteps)
    assert grid.timesteps[0] == 999 and (n == 1 or grid.timesteps[-1] == 0)


@pytest.mark.parametrize("n", [5, 25, 50])
def test_karras_grid_matches_unipc(n):
    timesteps, sigmas = _diffusers(UniPCMultistepScheduler, n, use_karras_sigmas=True, **SD)
    grid = grids.karras_grid(_vp(), n)
    np.testing.assert_allclose(grid.rhos, sigmas, **F32)
    np.testing.assert_array_equal(grid.timesteps, timesteps)


def test_karras_grid_formula_and_unrounded_times():
    schedule = _vp()
    grid = grids.karras_grid(schedule, 12, rho_min=0.1, rho_max=10.0, exponent=3.0, round_timesteps=False)
    np.testing.assert_allclose(grid.rhos[:-1] ** (1 / 3), np.linspace(10.0 ** (1 / 3), 0.1 ** (1 / 3), 12), rtol=1e-12)
    # Unrounded model times sit exactly at the schedule's noise levels.
    np.testing.assert_allclose(schedule.rho(grid.timesteps), grid.rhos[:-1], rtol=1e-9)
    assert not np.all(grid.timesteps == np.round(grid.timesteps))


# --------------------------------------------------------------------------------------------------
# flow matching
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", STEPS)
def test_flowmatch_grid_matches_flow_match_euler(n):
    timesteps, sigmas = _diffusers(FlowMatchEulerDiscreteScheduler, n, shift=3.0)
    grid = grids.flow_grid(FlowSchedule(1000), n, FlowShift(3.0), style="flowmatch")
    _check_invariants(grid, n, vp=False)
    # s = 1 is nudged to 1 - 1e-6 so that alpha > 0 (relative 1e-6 on the first point)
    np.testing.assert_allclose(grid.sigmas, sigmas, rtol=1.5e-6, atol=0)
    np.testing.assert_allclose(grid.timesteps, timesteps, rtol=1.5e-6, atol=0)
    assert grid.sigmas[-1] == 0.0 and grid.alphas[-1] == 1.0


@pytest.mark.parametrize("n", STEPS)
def test_flowmatch_grid_with_dynamic_shift_matches(n):
    timesteps, sigmas = _diffusers(
        FlowMatchEulerDiscreteScheduler, n, mu=0.8, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    grid = grids.flow_grid(FlowSchedule(1000), n, FlowShift.from_mu(0.8), style="flowmatch", dynamic=True)
    _check_invariants(grid, n, vp=False)
    np.testing.assert_allclose(grid.sigmas, sigmas, rtol=1.5e-6, atol=0)
    np.testing.assert_allclose(grid.timesteps, timesteps, rtol=1.5e-6, atol=0)


def test_flowmatch_grid_with_shift_terminal_matches():
    timesteps, sigmas = _diffusers(FlowMatchEulerDiscreteScheduler, 20, shift=3.0, shift_terminal=0.1)
    grid = grids.flow_grid(FlowSchedule(1000), 20, FlowShift(3.0), shift_terminal=0.1)
    np.testing.assert_allclose(grid.sigmas, sigmas, rtol=1.5e-6, atol=0)
    np.testing.assert_allclose(grid.sigmas[-2], 0.1, rtol=1e-12)


@pytest.mark.parametrize("style", ["flowmatch", "multistep", "dpmsolver"])
def test_shift_terminal_needs_two_steps(style):
    """Found by a parity probe: with one step the stretch (1 - s) / (1 - s_N) is 0/0 at s = 1 (flowmatch and
    multistep grids: 'grid timesteps must be finite, got [nan]') or moves pure noise to s = shift_terminal
    (dpmsolver grid: dpm-solver++ returned ~0.9 * noise). One step is refused, naming both settings."""
    with pytest.raises(ValueError, match=r"`shift_terminal`=0.1 needs at least 2 steps .*got num_inference_steps=1"):
        grids.flow_grid(FlowSchedule(1000), 1, FlowShift(3.0), style=style, shift_terminal=0.1)
    grid = grids.flow_grid(FlowSchedule(1000), 2, FlowShift(3.0), style=style, shift_terminal=0.1)
    np.testing.assert_allclose(grid.sigmas[-2], 0.1, rtol=1e-12)  # the last point sits at shift_terminal
    assert np.all(np.isfinite(grid.timesteps))


@pytest.mark.parametrize("name", ["flow-euler", "ddim", "unipc", "dpm-solver++"])
def test_samplers_refuse_one_step_with_shift_terminal(name):
    from fewstep import samplers

    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1).config  # an LTX-Video-style config
    sched = samplers.get(name).from_config(cfg)
    with pytest.raises(ValueError, match=r"`shift_terminal`=0.1 needs at least 2 steps .*num_inference_steps=1"):
        sched.set_timesteps(1)
    if name in ("flow-euler", "ddim"):  # custom sigmas go through the same stretch
        with pytest.raises(ValueError, match=r"`shift_terminal`=0.1 needs at least 2 steps .*got 1 flow sigma"):
            sched.set_timesteps(sigmas=[1.0])
    sched.set_timesteps(2)
    np.testing.assert_allclose(float(sched.sigmas[-2]), 0.1, rtol=1e-6)


@pytest.mark.parametrize("n", STEPS)
def test_multistep_flow_grid_matches_unipc_flow_sigmas(n):
    _, sigmas = _diffusers(
        UniPCMultistepScheduler, n, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
    grid = grids.flow_grid(FlowSchedule(1000), n, FlowShift(3.0), style="multistep")
    _check_invariants(grid, n, vp=False)
    np.testing.assert_allclose(grid.sigmas, sigmas, rtol=1e-6, atol=0)
    np.testing.assert_allclose(grid.timesteps, 1000 * grid.sigmas[:-1], rtol=1e-15)


@pytest.mark.parametrize("n", [5, 25])
def test_dpmsolver_flow_grid_matches_dpmsolver_flow_sigmas(n):
    _, sigmas = _diffusers(
        DPMSolverMultistepScheduler, n, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
    grid = grids.flow_grid(FlowSchedule(1000), n, FlowShift(3.0), style="dpmsolver")
    np.testing.assert_allclose(grid.sigmas, sigmas, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# continuous grids
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 17])
def test_uniform_lambda_grid_has_equal_lambda_gaps(n):
    schedule = _vp()
    grid = grids.uniform_lambda_grid(schedule, n)
    assert grid.timesteps[0] == schedule.t_max and grid.num_steps == n
    target = schedule.alpha_sigma(0.0)
    np.testing.assert_allclose([grid.alphas[-1], grid.sigmas[-1]], target, rtol=1e-15)
    gaps = np.diff(grid.lambdas)
    np.testing.assert_allclose(gaps, gaps.mean(), rtol=1e-9)
    _check_invariants(grid, n)

    sub = grids.uniform_lambda_grid(schedule, n, t_start=800.5, t_end=3.25, final_sigmas_type="zero")
    assert sub.timesteps[0] == 800.5 and sub.sigmas[-1] == 0.0
    gaps = np.diff(sub.lambdas[:-1])
    if gaps.size:
        np.testing.assert_allclose(gaps, gaps.mean(), rtol=1e-9)
        np.testing.assert_allclose(sub.lambdas[-2] + gaps.mean(), schedule.lambda_(3.25), rtol=1e-9)


def test_uniform_lambda_grid_on_a_flow_schedule():
    grid = grids.uniform_lambda_grid(FlowSchedule(1000), 9, t_start=990.0, t_end=5.0)
    gaps = np.diff(grid.lambdas)
    np.testing.assert_allclose(gaps, gaps.mean(), rtol=1e-9)
    _check_invariants(grid, 9, vp=False)


@pytest.mark.parametrize("schedule", [_vp(), FlowSchedule(1000)], ids=["vp", "flow"])
def test_uniform_time_grid_has_equal_time_gaps(schedule):
    grid = grids.uniform_time_grid(schedule, 8, t_start=900.0, t_end=20.0)
    np.testing.assert_allclose(np.diff(grid.timesteps), -110.0, rtol=1e-12)
    np.testing.assert_allclose(grid.alphas[-1], schedule.alpha_sigma(20.0)[0], rtol=1e-15)
    with_final = grids.uniform_time_grid(schedule, 8, t_start=900.0, t_end=20.0, final_sigmas_type="zero")
    np.testing.assert_array_equal(with_final.timesteps, grid.timesteps)
    assert with_final.sigmas[-1] == 0.0 and with_final.alphas[-1] == 1.0


def test_time_quadratic_grid_has_equal_sqrt_time_gaps():
    schedule = _vp()
    grid = grids.time_quadratic_grid(schedule, 10)
    times = np.append(grid.timesteps, schedule.t_of_lambda(grid.lambdas[-1]))
    np.testing.assert_allclose(times[-1], 0.0, atol=1e-9)
    gaps = np.diff(np.sqrt(times))
    np.testing.assert_allclose(gaps, gaps.mean(), rtol=1e-9)
    assert np.all(np.diff(np.diff(times)) > 0)  # denser near the data
    _check_invariants(grid, 10)


# --------------------------------------------------------------------------------------------------
# custom points
# --------------------------------------------------------------------------------------------------


def test_custom_timesteps_grid():
    schedule = _vp()
    ts = [999, 750.5, 400, 120, 7]
    grid = grids.custom_timesteps_grid(schedule, ts)
    np.testing.assert_array_equal(grid.timesteps, ts)
    alpha, sigma = schedule.alpha_sigma(np.array(ts, dtype=float))
    np.testing.assert_allclose(grid.alphas[:-1], alpha, rtol=1e-15)
    np.testing.assert_allclose(grid.sigmas[:-1], sigma, rtol=1e-15)
    assert grid.sigmas[-1] == 0.0 and grid.alphas[-1] == 1.0
    _check_invariants(grid, 5)
    # without a final target the last given timestep is the target
    open_end = grids.custom_timesteps_grid(schedule, ts, final_sigmas_type=None)
    np.testing.assert_array_equal(open_end.timesteps, ts[:-1])
    np.testing.assert_allclose(open_end.alphas[-1], alpha[-1], rtol=1e-15)
    minimum = grids.custom_timesteps_grid(schedule, ts, final_sigmas_type="sigma_min")
    np.testing.assert_allclose(minimum.rhos[-1], schedule.discrete_rho()[0], rtol=1e-12)


def test_custom_sigmas_grid_vp():
    schedule = _vp()
    steps = [900, 500, 100, 3]
    rhos = schedule.discrete_rho()[steps]
    for given in (np.append(rhos, 0.0), rhos):  # a trailing 0 marks the clean target (default target anyway)
        grid = grids.custom_sigmas_grid(schedule, given, final_sigmas_type="sigma_min" if given.size == 5 else "zero")
        np.testing.assert_array_equal(grid.timesteps, steps)
        np.testing.assert_allclose(grid.rhos[:-1], rhos, rtol=1e-12)
        assert grid.sigmas[-1] == 0.0 and grid.alphas[-1] == 1.0
    between = grids.custom_sigmas_grid(schedule, [10.0, 2.0, 0.3, 0.0])
    assert np.all(between.timesteps == np.round(between.timesteps))
    assert np.all((between.timesteps >= 0) & (between.timesteps <= 999))
    np.testing.assert_allclose(between.rhos[:-1], [10.0, 2.0, 0.3], rtol=1e-12)
    one_step = grids.custom_sigmas_grid(schedule, [5.0, 0.0], final_sigmas_type=None)  # the 0 wins
    assert one_step.num_steps == 1 and one_step.sigmas[-1] == 0.0


def test_custom_sigmas_grid_flow():
    schedule = FlowSchedule(1000)
    grid = grids.custom_sigmas_grid(schedule, [1.0, 0.7, 0.25, 0.0])
    np.testing.assert_allclose(grid.sigmas, [1.0 - 1e-6, 0.7, 0.25, 0.0], rtol=1e-15)
    np.testing.assert_allclose(grid.timesteps, [1000 * (1 - 1e-6), 700.0, 250.0], rtol=1e-12)
    _check_invariants(grid, 3, vp=False)
    open_end = grids.custom_sigmas_grid(schedule, [0.9, 0.5, 0.1], final_sigmas_type=None)
    np.testing.assert_allclose(open_end.timesteps, [900.0, 500.0], rtol=1e-12)
    np.testing.assert_allclose(open_end.sigmas, [0.9, 0.5, 0.1], rtol=1e-15)


# --------------------------------------------------------------------------------------------------
# TimeGrid itself
# --------------------------------------------------------------------------------------------------


def test_time_grid_allows_a_target_equal_to_the_last_point_only():
    a, s = np.array([0.5, 0.8, 0.8]), np.sqrt(1 - np.array([0.5, 0.8, 0.8]) ** 2)
    grid = TimeGrid([900.0, 10.0], a, s)  # DDIM with set_alpha_to_one=False: final == last point
    assert grid.num_steps == 2 and grid.lambdas[-1] == grid.lambdas[-2]
    with pytest.raises(ValueError, match="lambda"):
        TimeGrid([900.0, 500.0, 10.0], np.array([0.5, 0.5, 0.8, 0.9]), np.sqrt(1 - np.array([0.5, 0.5, 0.8, 0.9]) ** 2))
    with pytest.raises(ValueError, match="lambda"):
        TimeGrid([900.0, 10.0], np.array([0.5, 0.8, 0.7]), np.sqrt(1 - np.array([0.5, 0.8, 0.7]) ** 2))


@pytest.mark.parametrize(
    "timesteps,alphas,sigmas,match",
    [
        ([1.0, 0.0], [0.5, 0.9], [0.8, 0.4], "N\\+1"),
        ([1.0], [0.5, math.nan], [0.8, 0.1], "finite"),
        ([1.0, 0.5], [0.5, 0.9, 1.0], [0.8, 0.0, 0.0], "sigma > 0"),
    ],
)
def test_time_grid_rejects_malformed_points(timesteps, alphas, sigmas, match):
    with pytest.raises(ValueError, match=match):
        TimeGrid(timesteps, alphas, sigmas)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, 1001, "10", None])
def test_num_inference_steps_validated(bad):
    with pytest.raises(ValueError, match="num_inference_steps") as info:
        grids.spacing_timesteps(1000, bad, "leading")
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    with pytest.raises(ValueError, match="num_inference_steps"):
        grids.spacing_grid(_vp(), bad)
    if bad != 1001:  # the continuous grids have no upper bound
        for build in (grids.karras_grid, grids.uniform_lambda_grid, grids.uniform_time_grid):
            with pytest.raises(ValueError, match="num_inference_steps"):
                build(_vp(), bad)
        with pytest.raises(ValueError, match="num_inference_steps"):
            grids.flow_grid(FlowSchedule(), bad)


def test_num_inference_steps_bounds_and_numpy_integers():
    assert grids.check_num_steps(np.int64(7), 1000) == 7
    assert grids.check_num_steps(1000, 1000) == 1000
    assert grids.spacing_timesteps(1000, 1000, "trailing").shape == (1000,)
    with pytest.raises(ValueError, match="1000"):
        grids.check_num_steps(1001, 1000)


def test_unknown_timestep_spacing_names_value_and_lists_allowed():
    with pytest.raises(ValueError) as info:
        grids.spacing_timesteps(1000, 10, "uniform")
    message = str(info.value)
    assert "timestep_spacing" in message and "'uniform'" in message
    for allowed in grids.SPACINGS:
        assert allowed in message
    with pytest.raises(ValueError, match="'uniform'"):
        grids.spacing_grid(_vp(), 10, "uniform")


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="'euler'"):
        grids.spacing_timesteps(1000, 10, "leading", style="euler")
    with pytest.raises(ValueError, match="'euler'"):
        grids.flow_grid(FlowSchedule(), 10, style="euler")


def test_too_many_steps_for_a_spacing_repeat_timesteps():
    with pytest.raises(ValueError, match="repeated"):
        grids.spacing_timesteps(1000, 1000, "linspace")
    with pytest.raises(ValueError, match="repeated"):
        grids.spacing_timesteps(1000, 1000, "leading")


@pytest.mark.parametrize(
    "build",
    [
        lambda final: grids.spacing_grid(_vp(), 10, final_sigmas_type=final),
        lambda final: grids.karras_grid(_vp(), 10, final_sigmas_type=final),
        lambda final: grids.custom_timesteps_grid(_vp(), [900, 100], final_sigmas_type=final),
        lambda final: grids.uniform_lambda_grid(_vp(), 10, final_sigmas_type=final),
    ],
    ids=["spacing", "karras", "custom", "uniform_lambda"],
)
def test_unknown_final_sigmas_type_names_value(build):
    with pytest.raises(ValueError, match="final_sigmas_type") as info:
        build("last")
    assert "'last'" in str(info.value) and "zero" in str(info.value) and "sigma_min" in str(info.value)


def test_sigma_min_target_needs_a_vp_schedule():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        grids.uniform_time_grid(FlowSchedule(), 4, t_start=900.0, t_end=10.0, final_sigmas_type="sigma_min")


@pytest.mark.parametrize(
    "timesteps,match",
    [
        ([900, 900, 100], "strictly decreasing"),
        ([100, 900], "strictly decreasing"),
        ([900, math.nan, 100], "finite"),
        ([900, 100, -1], r"\[0.0, 999.0\]"),
        ([1000, 100], r"\[0.0, 999.0\]"),
        ([], "at least one"),
    ],
)
def test_bad_custom_timesteps(timesteps, match):
    with pytest.raises(ValueError, match=match) as info:
        grids.custom_timesteps_grid(_vp(), timesteps)
    assert "timesteps" in str(info.value)


def test_custom_flow_timesteps_range():
    with pytest.raises(ValueError, match="timesteps"):
        grids.custom_timesteps_grid(FlowSchedule(), [1000.5, 10.0])


@pytest.mark.parametrize(
    "sigmas,match",
    [
        ([10.0, math.nan, 0.1], "finite"),
        ([10.0, math.inf], "finite"),
        ([10.0, -0.5], "> 0"),
        ([10.0, 0.0, 0.0], "> 0"),
        ([0.1, 10.0], "strictly decreasing"),
        ([0.0], "> 0"),
    ],
)
def test_bad_custom_sigmas(sigmas, match):
    with pytest.raises(ValueError, match=match) as info:
        grids.custom_sigmas_grid(_vp(), sigmas)
    assert "sigmas" in str(info.value)


def test_flow_custom_sigmas_must_not_exceed_one():
    with pytest.raises(ValueError, match=re.escape("(0, 1]")):
        grids.custom_sigmas_grid(FlowSchedule(), [1.5, 0.5, 0.0])


def test_schedule_kind_mismatches_are_refused():
    with pytest.raises(ValueError, match="flow"):
        grids.spacing_grid(FlowSchedule(1000), 10)
    with pytest.raises(ValueError, match="vp"):
        grids.flow_grid(_vp(), 10)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: grids.karras_grid(_vp(), 10, exponent=0.0), "exponent"),
        (lambda: grids.karras_grid(_vp(), 10, rho_min=5.0, rho_max=1.0), "rho_min"),
        (lambda: grids.karras_grid(_vp(), 10, rho_min=0.0), "rho_min"),
        (lambda: grids.uniform_time_grid(_vp(), 10, t_start=10.0, t_end=500.0), "t_start"),
        (lambda: grids.uniform_lambda_grid(_vp(), 10, t_start=math.nan), "t_start"),
        (lambda: grids.time_quadratic_grid(_vp(), 10, t_start=500.0, t_end=-1.0), "t_end"),
        (lambda: grids.flow_grid(FlowSchedule(), 10, FlowShift(3.0), shift_terminal=1.5), "shift_terminal"),
    ],
)
def test_other_bad_grid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("config,given,message", [
    ({"shift": 1e4}, {"num_inference_steps": 50}, r"the flow grid of 50 steps with shift 10000 \(mu = 9\.21034\): 6 of "
                                                  r"its 50 points lie within 1e-6 of s = 1"),
    ({"use_dynamic_shifting": True}, {"num_inference_steps": 2, "mu": 50.0}, r"shift 5\.18471e\+21 \(mu = 50\)"),
    ({"shift": 1.0}, {"sigmas": [1.0, 0.9999999, 0.5]}, r"flow `sigmas` \[1\.0, 0\.9999999, 0\.5\] after the shift: 2 "
                                                         r"of its 3 points .*use a smaller shift \(or mu\), or fewer"),
])
def test_flow_grids_whose_first_points_merge_at_pure_noise_name_the_settings(config, given, message):
    """Found by a probe: such grids failed with "grid noise levels must strictly decrease" and a list of lambdas,
    naming neither the shift, mu nor the sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep import samplers

    sched = samplers.get("flow-euler").from_config(FlowMatchEulerDiscreteScheduler(**config).config)
    with pytest.raises(ValueError, match=message):
        sched.set_timesteps(**given)
