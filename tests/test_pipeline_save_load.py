"""A pipeline saved with a fewstep scheduler loads back with diffusers' ``from_pretrained``.

diffusers records a non-diffusers component's module as its library and, when loading, looks for the loadable
base classes (``SchedulerMixin``) in that module; every fewstep scheduler module must expose the name.
"""

from __future__ import annotations

import json

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
