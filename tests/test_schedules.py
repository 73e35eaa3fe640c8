"""Noise schedules: diffusers' alphas at the training steps, continuity in between, exact inverses."""

from __future__ import annotations

import functools
import math
import re
import warnings

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from fewstep.solvers.schedules import (
    BETA_SCHEDULES,
    FlowSchedule,
    FlowShift,
    VPSchedule,
    is_flow_config,
    make_betas,
    schedule_from_config,
)

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# An explicit, deliberately irregular beta sequence of its own length (500, not the default 1000).
_u = np.linspace(0.0, 1.0, 500)
TRAINED_BETAS = (1e-4 + 0.03 * _u**2 + 2e-4 * np.sin(40 * _u) ** 2).tolist()

VP_CASES = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": SD,
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": TRAINED_BETAS, "num_train_timesteps": len(TRAINED_BETAS)},
    "zero_snr": {**SD, "rescale_betas_zero_snr": True},
    "short_linear": {"num_train_timesteps": 40, "beta_start": 0.001, "beta_end": 0.2},
}


@functools.cache
def _case(name: str) -> tuple[VPSchedule, np.ndarray]:
    """fewstep's schedule built from diffusers' DDPM config, and DDPM's float32 alphas_cumprod as float64."""
    reference = DDPMScheduler(**VP_CASES[name])
    return VPSchedule.from_config(reference.config), reference.alphas_cumprod.double().numpy()


# --------------------------------------------------------------------------------------------------
# alphas at the integer training steps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VP_CASES))
def test_alpha_squared_at_training_steps_is_diffusers_alphas_cumprod(name):
    schedule, reference = _case(name)
    assert schedule.num_train_timesteps == reference.size
    t = np.arange(reference.size, dtype=np.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    if name == "zero_snr":
        # DDPM keeps alpha_bar = 0 at T-1; like DPM-Solver/UniPC/Euler, fewstep stores 2**-24 there
        # so that lambda stays finite.
        assert reference[-1] == 0.0 and schedule.alphas_cumprod[-1] == 2.0**-24
        np.testing.assert_allclose(alpha[:-1] ** 2, reference[:-1], rtol=0, atol=1e-12)
        dpm = DPMSolverMultistepScheduler(**VP_CASES[name]).alphas_cumprod.double().numpy()
        np.testing.assert_allclose(alpha**2, dpm, rtol=0, atol=1e-12)
        assert np.array_equal(schedule.alphas_cumprod, dpm)
    else:
        np.testing.assert_allclose(alpha**2, reference, rtol=0, atol=1e-12)
        # Bit-for-bit: the model was trained on exactly these float32 values.
        assert np.array_equal(schedule.alphas_cumprod, reference)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "zero_snr"])
def test_make_betas_is_bitwise_diffusers(name):
    kw = VP_CASES[name]
    assert np.array_equal(make_betas(**kw), DDPMScheduler(**kw).betas.numpy())


@pytest.mark.parametrize(
    "cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler]
)
def test_every_vp_scheduler_config_gives_the_same_schedule(cls):
    reference = cls(**SD)
    schedule = schedule_from_config(reference.config)
    assert isinstance(schedule, VPSchedule)
    assert np.array_equal(schedule.alphas_cumprod, reference.alphas_cumprod.double().numpy())


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_rho_is_diffusers_initial_sigmas(name):
    schedule, _ = _case(name)
    reference = DPMSolverMultistepScheduler(**VP_CASES[name]).sigmas.double().numpy()
    np.testing.assert_allclose(schedule.discrete_rho(), reference, rtol=1e-6)
    steps = np.arange(schedule.num_train_timesteps)
    np.testing.assert_allclose(schedule.rho(steps), schedule.discrete_rho(), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# continuity between the integer steps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VP_CASES))
def test_log_alpha_is_linear_between_training_steps(name):
    schedule, _ = _case(name)
    T = schedule.num_train_timesteps
    rng = np.random.default_rng(0)
    k = np.concatenate([[0, 1, T - 2], rng.integers(0, T - 1, size=50)]).astype(np.float64)
    f = rng.uniform(0.0, 1.0, size=k.size)
    la = schedule.log_alphas
    expected = (1 - f) * la[k.astype(int)] + f * la[k.astype(int) + 1]
    np.testing.assert_allclose(schedule.log_alpha(k + f), expected, rtol=1e-12, atol=1e-14)
    alpha, _ = schedule.alpha_sigma(k + 0.5)  # geometric mean of the neighbours
    np.testing.assert_allclose(alpha, np.sqrt(np.exp(la[k.astype(int)] + la[k.astype(int) + 1])), rtol=1e-12)


@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2", "zero_snr"])
def test_alpha_sigma_lambda_are_continuous_at_integers(name):
    schedule, _ = _case(name)
    t = np.arange(1, schedule.num_train_timesteps - 1, dtype=np.float64)
    for fn in (lambda x: schedule.alpha_sigma(x)[0], lambda x: schedule.alpha_sigma(x)[1], schedule.lambda_):
        left, mid, right = fn(t - 1e-9), fn(t), fn(t + 1e-9)
        scale = np.abs(fn(t + 1.0) - fn(t - 1.0))  # size of a whole step around t
        assert np.all(np.abs(left - mid) <= 1e-6 * scale + 1e-15)
        assert np.all(np.abs(right - mid) <= 1e-6 * scale + 1e-15)


@pytest.mark.parametrize("name", list(VP_CASES))
def test_lambda_strictly_decreases_in_t(name):
    schedule, _ = _case(name)
    t = np.linspace(0.0, schedule.t_max, 5 * schedule.num_train_timesteps + 1)
    assert np.all(np.diff(schedule.lambda_(t)) < 0)
    assert schedule.t_min == 0.0 and schedule.t_max == schedule.num_train_timesteps - 1


# --------------------------------------------------------------------------------------------------
# inverses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VP_CASES))
def test_t_of_lambda_inverts_lambda_on_a_dense_grid(name):
    schedule, _ = _case(name)
    rng = np.random.default_rng(1)
    t = np.concatenate(
        [np.linspace(0.0, schedule.t_max, 20001), rng.uniform(0.0, schedule.t_max, 2000), np.arange(schedule.t_max + 1)]
    )
    np.testing.assert_allclose(schedule.t_of_lambda(schedule.lambda_(t)), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(VP_CASES))
def test_t_of_rho_inverts_rho(name):
    schedule, _ = _case(name)
    t = np.linspace(0.0, schedule.t_max, 4001)
    np.testing.assert_allclose(schedule.t_of_rho(schedule.rho(t)), t, rtol=0, atol=1e-9)
    # rho is sigma/alpha, so t_of_rho(rho) == t_of_lambda(-log rho)
    rho = schedule.rho(t)
    np.testing.assert_allclose(schedule.t_of_rho(rho), schedule.t_of_lambda(-np.log(rho)), rtol=0, atol=1e-12)


def test_t_of_lambda_accepts_scalars_and_keeps_shape():
    schedule, _ = _case("scaled_linear")
    lam = schedule.lambda_(123.25)
    assert np.ndim(lam) == 0
    assert abs(float(schedule.t_of_lambda(lam)) - 123.25) < 1e-9
    grid = np.linspace(10.0, 900.0, 12).reshape(3, 4)
    assert schedule.t_of_lambda(schedule.lambda_(grid)).shape == (3, 4)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_t_of_rho_rejects_non_positive_or_non_finite(bad):
    schedule, _ = _case("linear")
    with pytest.raises(ValueError, match="rho"):
        schedule.t_of_rho(np.array([1.0, bad]))


# --------------------------------------------------------------------------------------------------
# flow matching
# --------------------------------------------------------------------------------------------------


def test_flow_schedule_alpha_sigma_lambda():
    schedule = FlowSchedule(1000)
    t = np.linspace(0.0, 1000.0, 1001)
    s = t / 1000.0
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(alpha, 1.0 - s, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sigma, s, rtol=0, atol=1e-15)
    inner = t[1:-1]
    np.testing.assert_allclose(schedule.lambda_(inner), np.log((1 - inner / 1000) / (inner / 1000)), rtol=1e-12)
    np.testing.assert_allclose(schedule.rho(inner), (inner / 1000) / (1 - inner / 1000), rtol=1e-12)
    with np.errstate(divide="ignore"):
        assert schedule.lambda_(0.0) == math.inf and schedule.lambda_(1000.0) == -math.inf
    assert schedule.t_min == 0.0 and schedule.t_max == 1000.0 and schedule.kind == "flow"


@pytest.mark.parametrize("num_train_timesteps", [1000, 7])
def test_flow_t_of_lambda_and_t_of_rho_invert(num_train_timesteps):
    schedule = FlowSchedule(num_train_timesteps)
    t = np.linspace(0.0, num_train_timesteps, 20001)[1:-1]
    np.testing.assert_allclose(schedule.t_of_lambda(schedule.lambda_(t)), t, rtol=0, atol=1e-9)
    np.testing.assert_allclose(schedule.t_of_rho(schedule.rho(t)), t, rtol=0, atol=1e-9)
    # the limits, and no overflow for huge |lambda|
    assert schedule.t_of_lambda(math.inf) == 0.0
    assert schedule.t_of_lambda(-math.inf) == num_train_timesteps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # written stably: no overflow on the way
        extremes = schedule.t_of_lambda(np.array([800.0, -800.0]))
    assert np.all(np.isfinite(extremes)) and extremes[0] < 1e-300 and extremes[1] == num_train_timesteps


def test_flow_shift_matches_diffusers():
    s = np.linspace(1.0, 1e-3, 50)
    np.testing.assert_allclose(FlowShift(3.0).apply(s), 3.0 * s / (1 + 2.0 * s), rtol=1e-15)
    np.testing.assert_array_equal(FlowShift(1.0).apply(s), s)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    for mu in (-0.5, 0.0, 0.8, 1.15):
        np.testing.assert_allclose(FlowShift.from_mu(mu).apply(s), reference.time_shift(mu, 1.0, s), rtol=1e-12)
    with pytest.raises(ValueError, match="mu"):
        FlowShift.from_mu(math.nan)


# --------------------------------------------------------------------------------------------------
# dispatch from configs
# --------------------------------------------------------------------------------------------------


def test_schedule_from_config_dispatch():
    flow = schedule_from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert isinstance(flow, FlowSchedule) and flow.num_train_timesteps == 1000
    dynamic = schedule_from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    assert isinstance(dynamic, FlowSchedule)
    unipc_flow = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    assert isinstance(schedule_from_config(unipc_flow.config), FlowSchedule)
    assert isinstance(schedule_from_config({"prediction_type": "flow"}), FlowSchedule)

    ddim = DDIMScheduler(**SD)
    vp = schedule_from_config(ddim.config)
    assert isinstance(vp, VPSchedule)
    assert np.array_equal(vp.alphas_cumprod, ddim.alphas_cumprod.double().numpy())
    for cfg in (ddim.config, DDPMScheduler().config, DPMSolverMultistepScheduler().config, {}):
        assert not is_flow_config(cfg)
    assert isinstance(schedule_from_config({}), VPSchedule)  # diffusers' defaults: linear 1e-4..0.02


def test_flow_config_given_to_vp_schedule_is_refused():
    with pytest.raises(ValueError, match="flow"):
        VPSchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    with pytest.raises(ValueError, match="flow"):
        VPSchedule.from_config({"use_flow_sigmas": True})


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


def test_unknown_beta_schedule_names_value_and_lists_allowed():
    with pytest.raises(ValueError) as info:
        VPSchedule.from_config({"beta_schedule": "cosine"})
    message = str(info.value)
    assert "'cosine'" in message
    for allowed in BETA_SCHEDULES:
        assert allowed in message


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, "1000"])
def test_num_train_timesteps_must_be_an_integer_of_at_least_two(bad):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        VPSchedule.from_config({"num_train_timesteps": bad})


def test_two_training_steps_is_enough():
    schedule = VPSchedule.from_config({"num_train_timesteps": 2, "beta_start": 0.1, "beta_end": 0.2})
    np.testing.assert_allclose(schedule.alphas_cumprod, [0.9, 0.9 * 0.8], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, 2.5, -1])
def test_flow_num_train_timesteps_validated(bad):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        FlowSchedule(bad)


@pytest.mark.parametrize("schedule", [_case("linear")[0], FlowSchedule()], ids=["vp", "flow"])
def test_nan_lambda_is_refused(schedule):
    with pytest.raises(ValueError, match="NaN"):
        schedule.t_of_lambda(np.array([0.0, math.nan]))
    with pytest.raises(ValueError, match="NaN"):
        schedule.t_of_lambda(math.nan)


@pytest.mark.parametrize("schedule", [_case("linear")[0], FlowSchedule()], ids=["vp", "flow"])
def test_non_finite_timesteps_are_refused(schedule):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            schedule.alpha_sigma(np.array([10.0, bad]))


@pytest.mark.parametrize(
    "kw",
    [
        {"trained_betas": [0.1, 1.0]},
        {"trained_betas": [0.1, -0.1]},
        {"trained_betas": [0.1, math.nan]},
        {"trained_betas": [0.1]},
        {"beta_start": 0.0},
        {"beta_end": 1.5},
    ],
)
def test_bad_betas_are_refused(kw):
    with pytest.raises(ValueError, match=re.escape(next(iter(kw)))):
        make_betas(**kw)


@pytest.mark.parametrize(
    "alphas_cumprod",
    [[0.9], [0.9, 0.95], [0.9, 0.9, 0.5], [1.0, 0.5], [0.9, 0.0], [0.9, math.nan]],
)
def test_vp_schedule_needs_strictly_decreasing_alphas_in_open_unit_interval(alphas_cumprod):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(alphas_cumprod)


@pytest.mark.parametrize(
    "config, expected",
    [
        # default betas 1e-4..0.02: alpha_bar[-2] = 8.0e-8 > 2^-24, so 2^-24 as diffusers (was alpha_bar[-2] / 2 = 4e-8)
        ({"beta_schedule": "scaled_linear"}, "2^-24"),
        (SD, "2^-24"),
        # linear betas: alpha_bar[-2] = 4.2e-9 < 2^-24, so half of it keeps the schedule strictly decreasing
        ({"beta_schedule": "linear"}, "half"),
    ],
)
def test_zero_snr_final_alpha_bar_is_diffusers_stand_in_unless_it_breaks_monotonicity(config, expected):
    """Found by a parity probe: the final alpha_bar was min(2^-24, alpha_bar[-2] / 2), i.e. halved also where
    2^-24 lies below alpha_bar[-2] (first sigma 5004 instead of diffusers' 4096)."""
    cfg = {**config, "rescale_betas_zero_snr": True}
    schedule = VPSchedule.from_config(cfg)
    dpm = DPMSolverMultistepScheduler(**cfg).alphas_cumprod.double().numpy()
    ac = schedule.alphas_cumprod
    np.testing.assert_array_equal(ac[:-1], dpm[:-1])
    if expected == "2^-24":
        assert dpm[-2] > 2.0**-24 and ac[-1] == 2.0**-24 == dpm[-1]
        assert np.array_equal(ac, dpm)
    else:
        assert dpm[-2] < 2.0**-24 and ac[-1] == ac[-2] / 2
    assert np.all(np.diff(ac) < 0)


@pytest.mark.parametrize("kwargs,message", [
    ({"beta_start": 1e-8}, r"\(beta_schedule='linear', beta_start=1e-08, beta_end=0\.02\) has alpha_bar = 1\.0 at "
                           r"training step 0: .*use a larger `beta_start`"),
    ({"beta_end": 0.2}, r"beta_end=0\.2\) has alpha_bar = 0 \(float32 underflow\) from training step 984 of 1000: "
                        r".*rescale_betas_zero_snr=True"),
    ({"trained_betas": [0.5] * 1000}, r"\(`trained_betas`\) has alpha_bar = 0 .*use smaller betas"),
    ({"beta_end": 0.5, "rescale_betas_zero_snr": True}, r"fewer `num_train_timesteps`$"),  # (it is on already)
])
def test_beta_schedules_outside_float32_range_name_their_settings(kwargs, message):
    """Found by a probe: these failed with "`alphas_cumprod` must hold at least 2 finite values in (0, 1)", naming
    no setting the user wrote."""
    from fewstep import samplers

    with pytest.raises(ValueError, match=message):
        samplers.get("unipc")(**kwargs)
