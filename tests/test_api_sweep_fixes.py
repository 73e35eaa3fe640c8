"""Found by a bad-input sweep over the public API: a guided step at the wrong model call, a dc-solver solver_type
replaced silently, FewstepPipeline's constructor taking any guidance/scale, flow schedules coercing
num_train_timesteps, from_pair without coefficient checks, MRS add_noise blaming mu for the sample's shape."""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import DDPMScheduler
from test_guided_pipeline import _pipe, _unet

from fewstep import guidance, samplers
from fewstep.pipelines import FewstepPipeline
from fewstep.solvers import from_pair, to_pair

DDPM = DDPMScheduler(beta_schedule="scaled_linear").config


def _outputs(x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.3 * x + 0.01 * float(t) / 1000, 0.2 * x


def _guided_run(index_of=None, begin: int = 0, steps: int = 5) -> torch.Tensor:
    sched = samplers.get("dpm-solver++").from_config(DDPM)
    sched.set_timesteps(steps)
    sched.set_begin_index(begin)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i, t in enumerate(sched.timesteps[begin:]):
        c, u = _outputs(x, t)
        idx = None if index_of is None else index_of(i)
        x = guidance.guided_step(sched, guidance.CFG(3.0), c, u, t, x, idx)
    return x


def test_guided_step_index_is_the_schedulers_call_or_left_out():
    assert _guided_run(lambda i: i).equal(_guided_run(None))
    assert _guided_run(lambda i: 2 + i, begin=2).equal(_guided_run(None, begin=2))


@pytest.mark.parametrize("begin, index_of", [(0, lambda i: i + 1), (2, lambda i: i), (0, lambda i: -1 if i == 0 else i),
                                             (0, lambda i: torch.tensor(i + 1))])
def test_guided_step_refuses_another_model_call(begin, index_of):
    """The outputs were converted at grid point ``index`` and stepped from the scheduler's own: a wrong step (604
    off after a one-step shift, 2.4e6 off in img2img counting from 0), which ran silently."""
    with pytest.raises(ValueError, match=r"`index` .* is not the scheduler's next model call \d"):
        _guided_run(index_of, begin=begin)


def test_guided_step_names_a_bad_rule_or_output():
    sched = samplers.get("ddim").from_config(DDPM)
    sched.set_timesteps(3)
    x = torch.zeros(1, 1, 4, 4)
    t = sched.timesteps[0]
    with pytest.raises(TypeError, match="`rule` must be a GuidanceRule"):
        guidance.guided_step(sched, None, x, x, t, x)
    with pytest.raises(TypeError, match="`out_uncond` must be a tensor, got list"):
        guidance.guided_step(sched, guidance.CFG(2.0), x, [0.0], t, x)
    with pytest.raises(ValueError, match="only plain CFG can run on raw outputs, got guidance None"):
        guidance.raw_cfg(None, x, x, 0, 3)


@pytest.mark.parametrize("base, given, read_as", [("unipc", "midpoint", "bh2"), ("unipc", "logrho", "bh2"),
                                                  ("dpm-solver++", "bh2", "midpoint"), ("unipc", "bh1", "bh1")])
def test_dc_solver_maps_other_schedulers_solver_types(base, given, read_as):
    sched = samplers.get("dc-solver").from_config(DDPM, dc_base=base, solver_type=given)
    assert sched.config.solver_type == read_as


@pytest.mark.parametrize("base, given", [("unipc", "bh3"), ("unipc", None), ("dpm-solver++", "bh-1"),
                                         ("dpm-solver++", 1)])
def test_dc_solver_refuses_unknown_solver_types(base, given):
    expected = rf"`solver_type` for dc_base='{re.escape(base)}' must be one of .* got {given!r}"
    with pytest.raises(ValueError, match=expected):
        samplers.get("dc-solver").from_config(DDPM, dc_base=base, solver_type=given)


@pytest.fixture(scope="module")
def class_pipe():
    return _pipe(_unet(), "ddim")


@pytest.mark.parametrize("value", [float("nan"), math.inf, -1.0, True, "1.0"])
def test_fewstep_pipeline_checks_embedded_guidance_scale(class_pipe, value):
    with pytest.raises(ValueError, match=r"`embedded_guidance_scale` must be a finite number >= 0"):
        FewstepPipeline(class_pipe, guidance.CFG(3.0), embedded_guidance_scale=value)


@pytest.mark.parametrize("value", ["cfg", 1, guidance.CFG])
def test_fewstep_pipeline_checks_guidance(class_pipe, value):
    with pytest.raises(TypeError, match=r"`guidance` must be a GuidanceRule or None .*from_pipe also takes a name"):
        FewstepPipeline(class_pipe, value)


@pytest.mark.parametrize("name", ["flow-euler", "flowchef"])
@pytest.mark.parametrize("value", [2.5, "5", True, None, float("nan")])
def test_flow_schedules_check_num_train_timesteps(name, value):
    with pytest.raises(ValueError, match=r"`num_train_timesteps` must be an integer >= 1, got"):
        samplers.get(name)(num_train_timesteps=value)


@pytest.mark.parametrize("alpha, sigma, bad", [(float("nan"), 0.5, "alpha"), (0.5, -1.0, "sigma"),
                                               (True, 0.5, "alpha"), (0.5, "0.5", "sigma")])
def test_from_pair_checks_its_coefficients(alpha, sigma, bad):
    x = torch.ones(2)
    with pytest.raises(ValueError, match=rf"`{bad}` must be a finite number >= 0 .* to form a 'v_prediction' output"):
        from_pair(x, x, alpha, sigma, "v_prediction")


def test_from_pair_takes_the_clean_end_and_tensors():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    assert from_pair(x0, eps, 1.0, 0.0, "v_prediction").equal(eps)  # sigma = 0: the clean end
    out = from_pair(x0, eps, torch.tensor(0.8), torch.tensor(0.6), "v_prediction")
    back = to_pair(out, 0.8 * x0 + 0.6 * eps, 0.8, 0.6, "v_prediction")
    assert torch.allclose(back[0], x0, atol=1e-6) and torch.allclose(back[1], eps, atol=1e-6)
    with pytest.raises(ValueError, match="`alpha` must be a finite number > 0 .* to convert"):
        to_pair(x0, x0, True, 0.5, "epsilon")


def test_mrs_add_noise_names_the_sample_not_mu():
    sched = samplers.get("mrs")(stationary_std=0.5)
    sched.set_timesteps(4)
    x, mu = torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="`noise`|`original_samples`"):
        sched.add_noise(x, torch.zeros(1, 4, 8, 8), sched.timesteps[:1], mu=mu)
