"""Bad input to the schedulers fails early with a message naming the argument, value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from fewstep import samplers

NAMES = samplers.names("diffusion")


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
        ("unipc", {"disable_corrector": ["first"]}, r"`disable_corrector` must hold step indices"),
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


def test_flow_models_need_mu_with_dynamic_shifting():
    sched = samplers.get("unipc").from_config({"shift": 3.0, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="`mu` must be passed"):
        sched.set_timesteps(8)
    sched.set_timesteps(8, mu=0.9)
    assert sched.is_flow and sched.config.prediction_type == "flow"


def test_unknown_sampler_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; available: ddim, dpm-solver\+\+, unipc"):
        samplers.get("euler")
