"""Schedulers as diffusers users drive them: configs passed between classes, loops that start part-way, tuples."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep import samplers

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
        "max_shift": 1.15}
MULTISTEP = ["ddim", "dpm-solver++", "unipc", "hb", "ghvb", "dc-solver"]


@pytest.mark.parametrize("config, key, value", [(FLOW, "shift", 3.0), (FLUX, "use_dynamic_shifting", True)])
@pytest.mark.parametrize("target", ["flowchef", "flow-euler", "unipc", "dpm-solver++", "ddim"])
def test_a_flowchef_config_keeps_its_flow_settings(config, key, value, target):
    """FlowChef's scheduler passed its parent's settings positionally, so its config marked them all as defaults
    and `from_config` of that config dropped them: swapping to another sampler gave a VP sampler on a flow model."""
    chef = samplers.get("flowchef").from_config(config)
    other = samplers.get(target).from_config(chef.config)
    assert other.config[key] == value and other.is_flow
    assert FlowMatchEulerDiscreteScheduler.from_config(chef.config).config[key] == value


def _toy(x, t):
    return 0.1 * x + 0.05 * torch.tanh(x) * (float(t) / 1000)


def _run(sched, x, start, begin=False):
    sched.set_timesteps(10)
    if begin:
        sched.set_begin_index(start)
    for t in sched.timesteps[start:]:
        x = sched.step(_toy(x, t), t, x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore:dc-solver has no ratios")
@pytest.mark.parametrize("name", MULTISTEP)
def test_a_loop_that_starts_part_way_begins_there(name):
    """Pipelines that iterate `timesteps[t_start:]` without `set_begin_index` (AnimateDiff video2video, Kandinsky
    img2img): the multistep samplers crashed (an empty buffer) or ran the wrong grid points."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cls = samplers.get(name)
    assert torch.equal(_run(cls(), x, 4), _run(cls(), x, 4, begin=True))


@pytest.mark.filterwarnings("ignore:dc-solver has no ratios")
def test_a_part_way_start_is_found_from_the_timesteps_view_without_reading_its_value():
    """On an accelerator the timestep's value is not read back (no sync); its place in `scheduler.timesteps` is
    metadata. Forcing the value lookup to fail shows the view alone finds the step."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sched = samplers.get("unipc")()
    sched.set_timesteps(10)
    sched._timestep_values = []  # no value lookup possible
    y = x
    for t in sched.timesteps[3:]:
        y = sched.step(_toy(y, t), t, y).prev_sample
    assert torch.equal(y, _run(samplers.get("unipc")(), x, 3, begin=True))


def test_part_way_start_matches_diffusers_own_part_way_loop():
    from diffusers import DPMSolverMultistepScheduler

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _run(DPMSolverMultistepScheduler(), x, 4)
    assert torch.allclose(_run(samplers.get("dpm-solver++")(), x, 4), ref, atol=2e-5)


@pytest.mark.parametrize("name", ["hb", "ghvb"])
def test_momentum_on_flow_grids_keeps_float32_precision(name):
    """The flow grid's first point has alpha = 1e-6: the momentum update summed two ~1e6 terms that cancel (0.5%
    off in float32); written as a correction of the base step it is as precise as the other samplers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g, dtype=torch.float64) / 3
    noise = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)

    def run(dtype):
        s = samplers.get(name).from_config(FLOW)
        s.set_timesteps(8)
        x = noise.to(dtype)
        for t in s.timesteps:
            x = s.step((0.3 * torch.tanh(x @ w.to(dtype)) + 0.8 * x * float(t) / 1000).to(dtype), t, x).prev_sample
        return x.double()

    ref = run(torch.float64)
    assert float((run(torch.float32) - ref).abs().max() / ref.abs().max()) < 5e-6


def test_ddim_tuple_output_is_diffusers_ddim_tuple():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours, theirs = samplers.get("ddim")(), DDIMScheduler()
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    t = ours.timesteps[0]
    prev, x0 = ours.step(0.1 * x, t, x, return_dict=False)
    ref_prev, ref_x0 = theirs.step(0.1 * x, t, x, return_dict=False)
    assert torch.allclose(prev, ref_prev, atol=1e-5) and torch.allclose(x0, ref_x0, atol=1e-5)
    other = samplers.get("unipc")()
    other.set_timesteps(5)
    assert len(other.step(0.1 * x, other.timesteps[0], x, return_dict=False)) == 1  # as UniPCMultistepScheduler


SD15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False}


def test_a_failed_set_timesteps_leaves_the_old_run_intact():
    """Found by probing: an unusable device failed after the new plan was installed but before the timesteps were
    replaced: a loop over the old timesteps then ran 5 of 10 planned steps without an error."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (an unusable device)")
    sched = samplers.get("dpm-solver++").from_config(SD15)
    sched.set_timesteps(5)
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        sched.set_timesteps(10, device="cuda")
    assert sched.plan.nfe == 5 and len(sched.timesteps) == 5 and sched.num_inference_steps == 5


def test_flowchef_plan_refused_after_install_leaves_no_unsteered_run():
    chef = samplers.get("flowchef").from_config(FLOW, flowchef_steered_steps=3)
    chef.set_cost(lambda x0: x0.pow(2).flatten(1).sum(1))
    with pytest.raises(ValueError):
        chef.set_timesteps(2)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="call `set_timesteps` before `step`"):
        chef.step(x, 500, x)


@pytest.mark.parametrize("kwargs", [
    {"num_inference_steps": 3, "timesteps": [900, 700, 500, 300]},
    {"num_inference_steps": 4, "sigmas": [5.0, 2.0, 1.0, 0.0]},
])
def test_a_step_count_that_contradicts_the_given_points_is_refused(kwargs):
    with pytest.raises(ValueError, match="`num_inference_steps`=\\d does not match the"):
        samplers.get("unipc").from_config(SD15).set_timesteps(**kwargs)


@pytest.mark.parametrize("mu", ["abc", float("nan"), [1, 2]])
def test_mu_is_checked_on_every_config(mu):
    for config in (SD15, FLOW):
        with pytest.raises(ValueError, match="`mu` \\(the log of the dynamic shift\\) must be a finite number"):
            samplers.get("unipc").from_config(config).set_timesteps(5, mu=mu)


def test_flow_timestep_errors_show_the_values_given():
    sched = samplers.get("flow-euler").from_config(FLOW)
    with pytest.raises(ValueError, match=r"`timesteps` must be strictly decreasing, got \[100.0, 500.0, 900.0\]"):
        sched.set_timesteps(timesteps=[100, 500, 900])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1000\] .*got \[900.0, -5.0\]"):
        sched.set_timesteps(timesteps=[900, -5])


def test_dc_solver_on_a_karras_grid_names_the_interpolation_variable():
    sdxl_karras = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "beta_end": 0.012, "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no ratios: plain UniPC, said by a warning
        with pytest.raises(ValueError, match="use dc_variable='lambda'"):
            samplers.get("dc-solver").from_config(sdxl_karras).set_timesteps(50)
        samplers.get("dc-solver").from_config(sdxl_karras, dc_variable="lambda").set_timesteps(50)


def test_a_saved_scheduler_never_reads_an_artifact_from_the_working_directory(tmp_path, monkeypatch):
    """Found by probing: a saved folder that had lost its EMS copy loaded a file of that name from the working
    directory (other tables, no error); a scheduler naming a file that no longer exists saved without it."""
    from fewstep.samplers.dpm_solver_v3 import shipped_ems

    v3 = samplers.get("dpm-solver-v3")
    ems = tmp_path / "ems.safetensors"
    ems.write_bytes(shipped_ems("digits-eps").read_bytes())
    saved = tmp_path / "saved"
    v3(ems_file=str(ems)).save_pretrained(saved)
    copy = saved / "ems_file.safetensors"
    assert copy.is_file()
    other = tmp_path / "cwd"
    other.mkdir()
    (other / "ems_file.safetensors").write_bytes(copy.read_bytes())
    copy.unlink()
    monkeypatch.chdir(other)
    with pytest.raises(ValueError, match="names the ems_file file 'ems_file.safetensors', which is missing"):
        v3.from_pretrained(saved)
    gone = v3(ems_file=str(ems))
    ems.unlink()
    with pytest.raises(ValueError, match="`ems_file`=.* names no file"):
        gone.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()
