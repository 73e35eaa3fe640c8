"""A pipeline saved with a fewstep scheduler loads back with diffusers' ``from_pretrained``.

diffusers records a non-diffusers component's module as its library and, when loading, looks for the loadable
base classes (``SchedulerMixin``) in that module; every fewstep scheduler module must expose the name.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _artifact_cases():
    from fewstep.samplers.dc_solver import shipped_artifact
    from fewstep.samplers.dpm_solver_v3 import shipped_ems
    from fewstep.samplers.s3 import shipped_schedule_path

    ems = {"ems_file": ("ems.safetensors", shipped_ems("digits-eps")), "ems_model": "digits-eps"}
    return {
        "dpm-solver-v3": ems,
        "s3": {**ems, "s3_schedule": ("my schedule.json", shipped_schedule_path("digits-eps", 6))},
        "dc-solver": {"dc_cpr": ("fit.cpr.safetensors", shipped_artifact("digits-eps", "cpr")),
                      "dc_model": "digits-eps", "dc_guidance_scale": 3.0},
        "dc-solver (ratios)": {"dc_ratios_file": ("r.safetensors", shipped_artifact("digits-eps", "ratios")),
                               "dc_model": "digits-eps", "dc_guidance_scale": 3.0},
    }


@pytest.mark.parametrize("case", list(_artifact_cases()))
def test_saved_scheduler_carries_the_artifact_files_it_names(tmp_path, monkeypatch, case):
    """Artifact files given by a path relative to the working directory (EMS tables, solver schedules, DC ratio and
    CPR files) are copied into a saved pipeline's scheduler folder, so it loads from any directory and after the
    originals are gone; shipped names stay names."""
    import shutil

    from fewstep.pipelines import ClassConditionalPipeline, load_default

    work, saved = tmp_path / "work", tmp_path / "saved"
    work.mkdir()
    monkeypatch.chdir(work)
    options, files = {}, []
    for key, value in _artifact_cases()[case].items():
        if isinstance(value, tuple):
            shutil.copyfile(value[1], work / value[0])
            options[key] = value[0]
            files.append(key)
        else:
            options[key] = value
    name = case.split(" ")[0]
    pipe = load_default("digits-eps")
    pipe.scheduler = samplers.from_config(name, pipe.scheduler.config, **options)
    pipe.save_pretrained(saved)
    pipe.scheduler.set_timesteps(6)  # before the originals go (a ratio table is read here)
    shutil.rmtree(work)
    monkeypatch.chdir(tmp_path)
    stored = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    for key in files:
        assert stored[key] == key + "".join(Path(options[key]).suffixes)
        assert (saved / "scheduler" / stored[key]).read_bytes() == Path(_artifact_cases()[case][key][1]).read_bytes()
    assert stored.get("ems_model", "digits-eps") == "digits-eps"
    loaded = ClassConditionalPipeline.from_pretrained(saved)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    loaded.scheduler.set_timesteps(6)
    np.testing.assert_array_equal(loaded.scheduler.timesteps.numpy(), pipe.scheduler.timesteps.numpy())
    ours, theirs = pipe.scheduler.plan, loaded.scheduler.plan
    np.testing.assert_array_equal(ours.grid.alphas, theirs.grid.alphas)
    assert [d.__dict__ for d in ours.decisions] == [d.__dict__ for d in theirs.decisions]
    # saving the loaded pipeline again (its config now names the folder's copy) keeps it self-contained
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    shutil.rmtree(saved)
    assert type(ClassConditionalPipeline.from_pretrained(again).scheduler) is type(pipe.scheduler)


def test_shipped_artifact_names_are_not_copied(tmp_path):
    from fewstep.pipelines.defaults import default_sampler_options, load_default

    pipe = load_default("digits-eps", sampler="s3")
    assert pipe.scheduler.config.ems_file == "digits-eps" == default_sampler_options("digits-eps", "s3")["ems_file"]
    pipe.scheduler.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler_config.json"]
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["ems_file"] == "digits-eps"
