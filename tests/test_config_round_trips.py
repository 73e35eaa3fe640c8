"""A scheduler rebuilt from its own config (``from_config(sched.config)``, ``save_pretrained``) is the same scheduler:
a constructor-built DDIM keeps its ``final_sigmas_type``; artifact files named by a relative path are the files read
at construction, from any working directory; EMS tables compare by value."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import fewstep
from fewstep import samplers
from fewstep.samplers.dc_solver import shipped_artifact
from fewstep.samplers.dpm_solver_v3 import shipped_ems
from fewstep.samplers.s3 import shipped_schedule_path
from fewstep.solvers.ems import load_ems, save_ems

DIGITS = json.loads((Path(fewstep.__file__).parent / "assets" / "digits-eps" / "scheduler" /
                     "scheduler_config.json").read_text())


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("options", [{"set_alpha_to_one": False, "final_sigmas_type": "zero"},
                                     {"final_sigmas_type": "sigma_min"}, {"set_alpha_to_one": False}, {}])
def test_a_constructor_built_ddim_keeps_its_final_sigmas_type_through_from_config(options):
    """``from_config`` drops a *foreign* config's final_sigmas_type (DDIM's last step follows set_alpha_to_one), and
    took a constructor-built fewstep DDIM's config (no ``_class_name``) for a foreign one: an explicit
    final_sigmas_type came back flipped, with another last step."""
    ddim = samplers.get("ddim")
    sched = ddim(**options)
    again = ddim.from_config(sched.config)
    assert again.config.final_sigmas_type == sched.config.final_sigmas_type
    assert dict(again.config) == dict(sched.config)
    for s in (sched, again):
        s.set_timesteps(6)
    np.testing.assert_array_equal(again.plan.grid.alphas, sched.plan.grid.alphas)
    # a foreign config's final_sigmas_type is still not taken over (SDXL's Euler config: set_alpha_to_one=False)
    from _helpers import SDXL_EULER
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config({**SDXL_EULER, "final_sigmas_type": "zero"})
    for foreign in (euler.config, _public(euler.config)):  # with and without its _class_name
        assert ddim.from_config(foreign).config.final_sigmas_type == "sigma_min"


def _artifact_cases() -> dict:
    ems = shipped_ems("digits-eps")
    return {
        "dpm-solver-v3": {"ems_file": ("ems.safetensors", ems)},
        "s3": {"s3_schedule": ("my schedule.json", shipped_schedule_path("digits-eps", 6)),
               "ems_file": ("ems.safetensors", ems)},
        "dc-solver cpr": {"dc_cpr": ("fit.cpr.safetensors", shipped_artifact("digits-eps", "cpr")),
                          "dc_model": "digits-eps", "dc_guidance_scale": 3.0},
        "dc-solver ratios": {"dc_ratios_file": ("r.safetensors", shipped_artifact("digits-eps", "ratios")),
                             "dc_model": "digits-eps", "dc_guidance_scale": 3.0},
    }


@pytest.mark.parametrize("case", list(_artifact_cases()))
def test_a_relative_artifact_path_is_the_file_read_at_construction(tmp_path, monkeypatch, case):
    """A relative artifact path stayed relative in the config: after a chdir, ``from_config(sched.config)`` and
    ``save_pretrained`` (and dc-solver's ratio table, read in set_timesteps) read the new working directory's file of
    that name -- another table, silently -- or failed where there was none. The config now holds the absolute path
    of the file read; saved and moved, the folder still loads with its own copies."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    options, files = {}, {}
    for key, value in _artifact_cases()[case].items():
        if isinstance(value, tuple):
            shutil.copyfile(value[1], work / value[0])
            options[key], files[key] = value[0], value[1]
        else:
            options[key] = value
    name = case.split(" ")[0]
    monkeypatch.chdir(work)
    sched = samplers.from_config(name, DIGITS, **options)
    for key in files:
        assert sched.config[key] == str((work / options[key]).resolve())
    sched.set_timesteps(6)
    monkeypatch.chdir(elsewhere)
    if "ems_file" in files:  # other, valid tables of the same name where the process now runs
        decoy = load_ems(shipped_ems("digits-eps")).degenerated()
        save_ems(elsewhere / "ems.safetensors", decoy)
    rebuilt = type(sched).from_config(sched.config)
    rebuilt.set_timesteps(6)
    assert dict(rebuilt.config) == dict(sched.config)
    np.testing.assert_array_equal(rebuilt.plan.grid.alphas, sched.plan.grid.alphas)
    if "ems_file" in files:
        assert rebuilt.ems == sched.ems and rebuilt.ems != decoy
    if "dc_ratios_file" in files:
        assert rebuilt.dc_ratios_used == sched.dc_ratios_used != [1.0] * 6
    saved, moved = tmp_path / "saved", tmp_path / "moved"
    sched.save_pretrained(saved)
    shutil.move(saved, moved)
    shutil.rmtree(work)
    stored = json.loads((moved / "scheduler_config.json").read_text())
    for key, source in files.items():
        assert stored[key] == key + "".join(Path(options[key]).suffixes)
        assert (moved / stored[key]).read_bytes() == Path(source).read_bytes()
    loaded = type(sched).from_pretrained(moved)
    loaded.set_timesteps(6)
    np.testing.assert_array_equal(loaded.plan.grid.alphas, sched.plan.grid.alphas)
    if "ems_file" in files:
        assert loaded.ems == sched.ems


def test_shipped_names_and_absolute_paths_stay_as_given():
    ems = str(shipped_ems("digits-eps"))
    v3 = samplers.from_config("dpm-solver-v3", DIGITS, ems_file=ems)
    assert v3.config.ems_file == ems
    s3 = samplers.from_config("s3", DIGITS, s3_schedule="digits-eps", ems_file="digits-eps")
    assert (s3.config.s3_schedule, s3.config.ems_file) == ("digits-eps", "digits-eps")
    dc = samplers.from_config("dc-solver", DIGITS, dc_cpr="digits-eps", dc_model="digits-eps", dc_guidance_scale=3.0)
    assert dc.config.dc_cpr == "digits-eps"


def test_saving_a_scheduler_whose_file_is_gone_names_the_file(tmp_path):
    """The tables are in memory, but they are not written back: the error names the key and the absolute path
    (the working directory says nothing about it)."""
    ems = tmp_path / "ems.safetensors"
    shutil.copyfile(shipped_ems("digits-eps"), ems)
    sched = samplers.from_config("dpm-solver-v3", DIGITS, ems_file=str(ems))
    ems.unlink()
    sched.set_timesteps(5)  # still samples with the tables it read
    with pytest.raises(ValueError, match=r"`ems_file`='.*ems\.safetensors' names no file and no shipped name "
                                         r"\(digits-eps, digits-flow\).*restore the file"):
        sched.save_pretrained(tmp_path / "saved")


def test_ems_tables_compare_by_value():
    """The dataclass ``==`` compared numpy arrays with ``==`` and raised "truth value ... is ambiguous"."""
    ems = load_ems(shipped_ems("digits-eps"))
    assert ems == copy.deepcopy(ems) and not (ems != copy.deepcopy(ems))
    assert ems != ems.degenerated()
    other_meta = copy.deepcopy(ems)
    other_meta.meta["model"] = "another"
    assert ems != other_meta
    assert ems != "digits-eps"
    with pytest.raises(TypeError, match="unhashable type: 'EMS'"):
        hash(ems)
