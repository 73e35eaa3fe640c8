"""Schedulers as diffusers users drive them: configs passed between classes, loops that start part-way, tuples."""

from __future__ import annotations

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
