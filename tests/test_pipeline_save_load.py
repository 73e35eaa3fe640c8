"""A pipeline saved with a fewstep scheduler loads back with diffusers' ``from_pretrained``.

diffusers records a non-diffusers component's module as its library and, when loading, looks for the loadable
base classes (``SchedulerMixin``) in that module; every fewstep scheduler module must expose the name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import SD3_FLOW, SD15_PNDM
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from test_fewstep_pipeline import sd, sd_path  # noqa: F401 - the tiny SD1.5-shaped pipeline fixtures

from fewstep import samplers

#: options a scheduler needs beyond a pipeline's config (a schedule, tables, a flow model's config)
EXTRA = {
    "dpm-solver-v3": {"degenerated": True},
    "mrs": {"beta_schedule": "mr_cosine", "stationary_std": 0.4},
    "s3": {"s3_schedule": {"timesteps": [999.0, 500.0],
                           "decisions": [{"prediction": "data", "order": 1}, {"prediction": "data", "order": 2}]}},
}
FLOW_ONLY = ("flow-euler", "flowchef")


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", samplers.names())
def test_saved_pipeline_loads_back_with_its_fewstep_scheduler(sd, tmp_path, name):  # noqa: F811
    base = SD3_FLOW if name in FLOW_ONLY else SD15_PNDM  # the SD pipeline does not check what it holds
    scheduler = samplers.from_config(name, base, **EXTRA.get(name, {}))
    pipe = StableDiffusionPipeline(**{**sd.components, "scheduler": scheduler})
    pipe.save_pretrained(tmp_path)
    library, cls = json.loads((tmp_path / "model_index.json").read_text())["scheduler"]
    assert library == type(scheduler).__module__ and cls == type(scheduler).__name__
    for loader in (StableDiffusionPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded.scheduler) is type(scheduler)
        assert _public(loaded.scheduler.config) == _public(scheduler.config)


def test_ddim_from_a_saved_config_is_the_ddim_from_the_same_config_in_memory(tmp_path):
    """diffusers drops another class's default-valued keys when converting a config in memory, but a saved config
    lists them explicitly (Euler's ``final_sigmas_type="zero"``). DDIM's last step follows ``set_alpha_to_one``
    (as diffusers' DDIMScheduler) either way, unless ``final_sigmas_type`` is passed explicitly."""
    from _helpers import SDXL_EULER
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(SDXL_EULER)
    euler.save_pretrained(tmp_path)
    reloaded = EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert reloaded.config.final_sigmas_type == "zero" and "final_sigmas_type" not in SDXL_EULER
    ddim = samplers.get("ddim")
    grids = []
    for config in (euler.config, reloaded.config):
        sched = ddim.from_config(config)
        assert sched.config.final_sigmas_type == "sigma_min"  # set_alpha_to_one=False in SDXL's config
        sched.set_timesteps(4)
        grids.append(sched.plan.grid.alphas)
    np.testing.assert_array_equal(grids[0], grids[1])
    theirs = DDIMScheduler.from_config(reloaded.config)
    assert grids[1][-1] == pytest.approx(float(theirs.final_alpha_cumprod) ** 0.5)
    assert ddim.from_config(reloaded.config, final_sigmas_type="zero").config.final_sigmas_type == "zero"
    own = ddim.from_config(reloaded.config, final_sigmas_type="zero")
    assert ddim.from_config(own.config).config.final_sigmas_type == "zero"  # a fewstep DDIM config keeps its own
