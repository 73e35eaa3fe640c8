"""Keys of a foreign scheduler config that diffusers' ``from_config`` copies onto a fewstep config must not change
a sampler that does not declare them, and refusals must name what works for the sampler at hand."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import REAL_CONFIGS, TinyDenoiser
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fewstep import samplers

# samplers that declare diffusers' clip_sample / clip_sample_range (DDIM-style x0 clipping)
CLIPPING = {"ddim", "dc-solver", "flow-euler", "flowchef"}
# extra options some samplers need to be built at all
NEEDS = {"mrs": {"stationary_std": 0.4}}


def _loop(scheduler, steps=6):
    model = TinyDenoiser(2 * 4 * 4)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("name", samplers.names())
def test_only_samplers_declaring_clip_sample_clip(name):
    """A DDPM config's clip_sample=True reached every sampler's config through from_config and base.py clamped x0
    with it whatever the class; a config without clip_sample_range then crashed at the first step."""
    cls = samplers.get(name)
    assert ("clip_sample" in samplers.options(name)) == (name in CLIPPING)
    if name in ("s3", "dpm-solver-v3", "flowchef", "flow-euler", "mrs"):
        return  # need an artifact, a cost, a flow config or a mean-reverting schedule: checked on the others
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True}  # no clip_sample_range
    sched = cls.from_config(config, **NEEDS.get(name, {}))
    assert sched.config.get("clip_sample") is True
    if name in CLIPPING:
        assert sched.clip_range() == 1.0
    else:
        assert sched.clip_range() is None
        plain = cls.from_config({**config, "clip_sample": False}, **NEEDS.get(name, {}))
        assert torch.equal(_loop(sched), _loop(plain))


@pytest.mark.parametrize("name", ["dpm-solver++", "unipc", "hb", "ghvb"])
def test_thresholding_refusal_names_only_what_the_sampler_has(name):
    with pytest.raises(ValueError, match=r"`thresholding`=True: .* does not implement diffusers' dynamic "
                                         r"thresholding \(allowed: False\); set thresholding=False$"):
        samplers.from_config(name, {"thresholding": True})


@pytest.mark.filterwarnings("ignore:dc-solver has no ratios")
@pytest.mark.parametrize("name", ["ddim", "dc-solver"])
def test_thresholding_refusal_offers_clip_sample_where_it_exists(name):
    with pytest.raises(ValueError, match=r"set thresholding=False, or clip_sample=True \(with clip_sample_range\)"):
        samplers.from_config(name, {"thresholding": True})
    samplers.from_config(name, {}, clip_sample=True, clip_sample_range=2.0).set_timesteps(4)  # what it offers works


@pytest.mark.parametrize("name,diffusers_cls", [("unipc", UniPCMultistepScheduler),
                                                 ("dpm-solver++", DPMSolverMultistepScheduler)])
def test_epsilon_on_flow_sigmas_is_read_as_flow_also_from_a_saved_config(name, diffusers_cls, tmp_path):
    """diffusers writes the default prediction_type='epsilon' into every saved config, so a stated epsilon on a flow
    schedule cannot be told from a default: it is read as a velocity model, in memory and after save/reload (a
    refusal of explicit epsilon broke SD3 folders holding a swapped-in diffusers UniPC/DPM-Solver config)."""
    swapped = diffusers_cls.from_config(REAL_CONFIGS["sd3"])
    swapped.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "epsilon"
    for cfg in (swapped.config, saved):
        assert samplers.get(name).from_config(cfg).config.prediction_type == "flow_prediction"
    # a config that does not state the prediction type (the class default) is a velocity model, as before
    default = diffusers_cls(use_flow_sigmas=True, flow_shift=3.0).config
    assert samplers.get(name).from_config(default).config.prediction_type == "flow_prediction"
    assert samplers.get(name).from_config(REAL_CONFIGS["sd3"]).config.prediction_type == "flow_prediction"
    flow = diffusers_cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction").config
    assert samplers.get(name).from_config(flow).config.prediction_type == "flow_prediction"
    # other explicit types are honoured, as diffusers does
    sample = diffusers_cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="sample").config
    assert samplers.get(name).from_config(sample).prediction_type == "sample"
