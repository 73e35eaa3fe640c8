"""Bad input to the schedulers fails early with a message naming the argument, value and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep import samplers

NAMES = samplers.names("diffusion", standalone=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta_schedule": "cosine"}, r"`beta_schedule` must be one of \['linear', 'scaled_linear', "
                                      r"'squaredcos_cap_v2'\].*'cosine'"),
        ({"prediction_type": "score"}, r"`prediction_type` must be one of .*'epsilon'.*'score'"),
        ({"timestep_spacing": "uniform"}, r"`timestep_spacing` must be one of \['leading', 'linspace', 'trailing'\]"),
        ({"final_sigmas_type": "one"}, r"`final_sigmas_type` must be one of \['zero', 'sigma_min'\]"),
        ({"time_grid": "cubic"}, r"`time_grid` must be one of .*'cubic'"),
        ({"thresholding": True}, r"thresholding"),
        ({"num_train_timesteps": 1}, r"`num_train_timesteps` must be an integer >= 2"),
    ],
)
def test_bad_config(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        samplers.get(name)(**kwargs)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("dpm-solver++", {"solver_order": 4}, r"`solver_order` must be an integer in \[1, 3\], got 4"),
        ("dpm-solver++", {"algorithm_type": "sde-dpmsolver+"}, r"`algorithm_type` must be one of"),
        ("dpm-solver++", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
         r"`solver_order` must be an integer in \[1, 2\], got 3"),
        ("dpm-solver++", {"solver_type": "rk"}, r"`solver_type` must be one of \['midpoint', 'heun', 'taylor'\]"),
        ("unipc", {"solver_type": "bh3"}, r"`solver_type` must be one of \['bh1', 'bh2'\]"),
        ("unipc", {"disable_corrector": ["first"]},
         r"`disable_corrector` \(step indices\) must be an integer >= 0, got .first."),
        ("unipc", {"disable_corrector": 3},
         r"`disable_corrector` must be a list of step indices \(integers >= 0\), got 3"),
        ("unipc", {"disable_corrector": "03"}, r"`disable_corrector` must be a list of step indices"),
        ("unipc", {"solver_order": 0}, r"`solver_order` must be an integer in \[1, 5\]"),
    ],
)
def test_bad_method_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        samplers.get(name)(**kwargs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_inference_steps": 0}, r"`num_inference_steps` must be >= 1, got 0"),
        ({"num_inference_steps": -3}, r"`num_inference_steps` must be >= 1, got -3"),
        ({"num_inference_steps": 1001}, r"`num_inference_steps` must be <= num_train_timesteps \(1000\), got 1001"),
        ({"num_inference_steps": 2.5}, r"`num_inference_steps` must be an integer >= 1, got 2.5"),
        ({}, r"pass one of `num_inference_steps`, `timesteps` or `sigmas`"),
        ({"timesteps": [999, 500, 700, 0]}, r"`timesteps` must be strictly decreasing"),
        ({"timesteps": "999,500"}, r"`timesteps` must be a list of numbers, got '999,500'"),  # was numpy's message
        ({"sigmas": [14.6, "a"]}, r"`sigmas` must be a list of numbers, got \[14.6, 'a'\]"),
        ({"timesteps": [1200, 500]}, r"`timesteps` must lie in \[0.0, 999.0\]"),
        ({"sigmas": [14.6, float("nan"), 1.0]}, r"`sigmas` must be finite"),
        ({"sigmas": [14.6, 3.0, -1.0]}, r"`sigmas` must be strictly decreasing|`sigmas` must be > 0"),
        ({"timesteps": [999, 500], "sigmas": [3.0, 1.0]}, r"at most one of `timesteps` and `sigmas`"),
    ],
)
def test_bad_set_timesteps(name, kwargs, match):
    sched = samplers.get(name)()
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(**kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_step_misuse(name):
    sched = samplers.get(name)()
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="call `set_timesteps` before `step`"):
        sched.step(x, 999, x)
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match=r"timestep 123.0 is not in this scheduler's timesteps"):
        sched.step(x, 123, x)
    for t in sched.timesteps:
        x = sched.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps have run"):
        sched.step(x, sched.timesteps[-1], x)


@pytest.mark.parametrize("name", ["ddim", "unipc", "dpm-solver++", "mrs"])
def test_step_refuses_non_floating_tensors(name):
    """An integer sample was stepped and the result truncated to integers; float8 failed inside torch."""
    kwargs = {"stationary_std": 0.5} if name == "mrs" else {}
    sched = samplers.get(name)(**kwargs)
    sched.set_timesteps(2)
    t = sched.timesteps[0]
    x = torch.zeros(1, 2, 4, 4)
    extra = {"mu": x} if name == "mrs" else {}
    for bad in (x.long(), x.bool(), x.to(torch.float8_e4m3fn), x.to(torch.complex64)):
        dtype = str(bad.dtype).replace("torch.", "")
        with pytest.raises(ValueError, match=rf"`sample` must be a floating tensor \(float16, bfloat16, float32 or "
                                             rf"float64\), got {dtype}"):
            sched.step(x, t, bad, **extra)
        with pytest.raises(ValueError, match=rf"`model_output` must be a floating tensor .*got {dtype}"):
            sched.step(bad, t, x, **extra)
    with pytest.raises(TypeError, match=r"`sample` must be a torch.Tensor, got ndarray"):
        sched.step(x, t, np.zeros((1, 2, 4, 4)), **extra)
    if name != "mrs":
        with pytest.raises(ValueError, match=r"`eps` must be a floating tensor .*got int64"):
            sched.step_pair(x, x.long(), t, x)
    assert sched.step(x.half(), t, x.half(), **extra).prev_sample.dtype == torch.float16


@pytest.mark.parametrize("name, key", [("unipc", "use_karras_sigmas"), ("unipc", "predict_x0"),
                                       ("ddim", "set_alpha_to_one"), ("dpm-solver++", "rescale_betas_zero_snr"),
                                       ("dpm-solver++", "lower_order_final"), ("ddim", "clip_sample"),
                                       ("hb", "use_karras_sigmas"), ("s3", "use_karras_sigmas")])
def test_string_booleans_are_refused_not_read_as_true(name, key):
    """``--sampler-option use_karras_sigmas=False`` reached the config as the string 'False', which is truthy: the
    Karras grid was used. Every bool option is checked."""
    with pytest.raises(ValueError, match=rf"`{key}` must be True or False, got 'False'"):
        samplers.from_config(name, {}, **{key: "False"})
    samplers.from_config(name, {}, **{key: None})  # a hub config's null: unset


def test_numbers_given_as_strings_are_named():
    with pytest.raises(ValueError, match=r"`beta_end` must be a finite number in \(0, 1\), got '0.02'"):
        samplers.from_config("unipc", {}, beta_end="0.02")
    with pytest.raises(ValueError, match=r"`shift` must be a finite number > 0, got '3'"):
        samplers.from_config("flow-euler", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, shift="3")


def test_flow_models_need_mu_with_dynamic_shifting():
    sched = samplers.get("unipc").from_config({"shift": 3.0, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="`mu` must be passed"):
        sched.set_timesteps(8)
    sched.set_timesteps(8, mu=0.9)
    assert sched.is_flow and sched.config.prediction_type == "flow_prediction" and sched.prediction_type == "flow"


def test_unknown_sampler_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; available: ddim, dpm-solver\+\+, unipc"):
        samplers.get("euler")


FOREIGN = [
    ("dpm-solver++", {"use_lu_lambdas": True}, r"does not implement diffusers' `use_lu_lambdas`=True .*uniform_lambda"),
    ("unipc", {"use_exponential_sigmas": True}, r"`use_exponential_sigmas`=True"),
    ("unipc", {"use_beta_sigmas": True}, r"`use_beta_sigmas`=True"),
    ("dpm-solver++", {"lambda_min_clipped": -5.1}, r"`lambda_min_clipped`=-5.1"),
    ("ddim", {"variance_type": "learned_range"}, r"`variance_type`='learned_range' .*first C output channels"),
    ("ddim", {"shift": 3.0, "invert_sigmas": True}, r"`invert_sigmas`=True"),
    ("ddim", {"shift": 3.0, "stochastic_sampling": True}, r"`stochastic_sampling`=True"),
    # found by probing: SVD's Euler config feeds 0.25 log(sigma) to its model (fewstep fed integer timesteps)
    ("unipc", {"timestep_type": "continuous"}, r"`timestep_type`='continuous' .*0.25 log\(sigma\)"),
    ("dpm-solver++", {"interpolation_type": "log_linear"}, r"`interpolation_type`='log_linear'"),
]


@pytest.mark.parametrize(("name", "extra", "match"), FOREIGN)
def test_options_fewstep_does_not_implement_are_refused_not_dropped(name, extra, match):
    """diffusers' from_config drops keys the target class does not take; these change the trajectory, so a
    config that sets them (as a pipeline's may) is an error naming the option, not a silently different sampler."""
    base = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000}
    with pytest.raises(ValueError, match=match):
        samplers.get(name).from_config({**base, **extra})
    neutral = {k: (False if isinstance(v, bool) else None) for k, v in extra.items() if k != "shift"}
    samplers.get(name).from_config({**base, **extra, **neutral})  # neutral values are fine


def test_edm_configs_are_refused():
    with pytest.raises(ValueError, match="EDMDPMSolverMultistepScheduler config: EDM schedulers"):
        samplers.get("unipc").from_config({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5})


def test_flow_schedules_refuse_karras_and_sigma_min_ends():
    sched = samplers.get("unipc").from_config({"use_flow_sigmas": True, "flow_shift": 3.0,
                                               "prediction_type": "flow_prediction", "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="`use_karras_sigmas=True` is not supported on a flow-matching schedule"):
        sched.set_timesteps(5)
    sched = samplers.get("dpm-solver++").from_config({"use_flow_sigmas": True, "flow_shift": 3.0,
                                                      "prediction_type": "flow_prediction",
                                                      "final_sigmas_type": "sigma_min"})  # fmt: skip
    with pytest.raises(ValueError, match="`final_sigmas_type`='sigma_min': flow-matching schedules end on clean"):
        sched.set_timesteps(5)
    ddim = samplers.get("ddim").from_config({"shift": 3.0, "set_alpha_to_one": False})  # a VP notion: ignored on flow
    assert ddim.is_flow and ddim.config.final_sigmas_type == "zero"


def test_scheduler_inputs_found_by_probing():
    """Each was accepted (NaN or extrapolated noise levels, a silent start at step 0, a negative clip range) or
    failed with a message naming none of the settings involved."""
    one, zero = torch.ones(4, 1), torch.zeros(4, 1)
    ddim = samplers.get("ddim")()
    with pytest.raises(ValueError, match=r"`timesteps` must lie in \[0, 999\] .*vp schedule\), got \[-5.0, -1.0\]"):
        ddim.add_noise(one, zero, torch.tensor([-5, -1, 0, 999]))
    with pytest.raises(ValueError, match=r"got \[2000.0\]"):
        ddim.add_noise(one[:1], zero[:1], torch.tensor([2000]))
    flow = samplers.get("flow-euler")()
    with pytest.raises(ValueError, match=r"`timesteps` must lie in \[0, 1000\] .*flow schedule\), got \[1500.0\]"):
        flow.add_noise(one[:2], zero[:2], torch.tensor([1000, 1500]))
    with pytest.raises(ValueError, match=r"the config's `sigma_min`=0.002 puts the last Karras point below the final "
                                         r"target \(final_sigmas_type='sigma_min'"):
        samplers.from_config("ddim", {"use_karras_sigmas": True, "sigma_min": 0.002, "set_alpha_to_one": False}
                             ).set_timesteps(5)
    unipc = samplers.get("unipc")()
    unipc.set_timesteps(10)
    unipc.set_begin_index(np.int64(2))
    assert unipc.begin_index == 2
    unipc.set_begin_index(torch.tensor(3))  # diffusers takes numpy and 0-d tensor integers
    assert unipc.begin_index == 3
    for bad, got in ((None, "None"), ("999", "'999'"), (unipc.timesteps[:2], r"a tensor of shape \(2,\)")):
        sched = samplers.get("unipc")()
        sched.set_timesteps(5)
        with pytest.raises(ValueError, match=rf"`timestep` must be one of this scheduler's timesteps .*got {got}"):
            sched.step(torch.zeros(1), bad, torch.zeros(1))
    with pytest.raises(ValueError, match=r"`steps_offset` must be an integer >= 0, got -1"):
        samplers.from_config("ddim", {}, steps_offset=-1)
    with pytest.raises(ValueError, match=r"`clip_sample_range` must be a finite number > 0, got -1.0"):
        samplers.from_config("ddim", {}, clip_sample=True, clip_sample_range=-1.0)
    for name in ("unipc", "ddim"):
        with pytest.raises(ValueError, match=r"`config` must be a scheduler config .* got list"):
            samplers.get(name).from_config([1, 2])
    with pytest.raises(ValueError, match=r"`flowchef` needs a flow-matching config"):
        samplers.from_config("flowchef", {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"})
    with pytest.raises(ValueError, match=r"`shift` \(the flow time shift\) must be a finite number > 0, got -1.0"):
        samplers.from_config("unipc", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, shift=-1.0).set_timesteps(5)
    from _helpers import FLUX_FLOW

    flux = samplers.from_config("unipc", FLUX_FLOW)
    with pytest.raises(ValueError, match=r"`mu` \(the log of the dynamic shift\) must be a finite number, got 'a'"):
        flux.set_timesteps(5, mu="a")
    # 1000 steps on a 1000-step schedule: the message names the repeated timestep, not all 1000
    with pytest.raises(ValueError, match=r"repeated timesteps \(\[500.0\] among the 1000 training steps\)") as info:
        samplers.get("dpm-solver++")().set_timesteps(1000)
    assert len(str(info.value)) < 200


def test_divergent_noise_form_settings_are_refused():
    """Found by a convergence probe: UniPC in noise form on a flow schedule reached |x| ~ 800 (its corrector weight
    over the first step from s = 1 is ~e^10; diffusers refuses it), and the noise-form SDE step to sigma = 0 blew up
    (diffusers refuses final_sigmas_type='zero' there)."""
    from _helpers import SD3_FLOW

    for name in ("unipc", "dc-solver"):
        with pytest.raises(ValueError, match=r"UniPC with predict_x0=False \(noise form\) on a flow-matching schedule"):
            samplers.from_config(name, SD3_FLOW, predict_x0=False)
        samplers.from_config(name, {}, predict_x0=False)  # VP: fine
    with pytest.raises(ValueError, match=r"`final_sigmas_type`='zero' is not supported with "
                                         r"algorithm_type='sde-dpmsolver'"):
        samplers.from_config("dpm-solver++", {}, algorithm_type="sde-dpmsolver")
    samplers.from_config("dpm-solver++", {}, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
