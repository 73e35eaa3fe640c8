"""Mutation-testing gaps of the scheduler adapters (fewstep/samplers/): each test checks the adapter layer against an
independent reference -- diffusers' own schedulers run on the same config and the same deterministic fake model, or
a closed form -- never against fewstep's own earlier output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import SD15_PNDM
from diffusers import DPMSolverMultistepScheduler

from fewstep import samplers


def _model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, time-dependent stand-in for a model's epsilon output."""
    return torch.sin(0.7 * x + 0.003 * float(t)) * 0.9


def _x(shape=(1, 2, 3, 3), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loop(sched, x, timesteps):
    for t in timesteps:
        x = sched.step(_model(x, t), t, x).prev_sample
    return x


def test_set_begin_index_after_a_partial_run_restarts_there_as_a_fresh_diffusers_img2img_run():
    """A scheduler reused for img2img (``set_begin_index`` after some steps of an earlier loop) starts at the begin
    index again, as a fresh diffusers DPM-Solver++ begun there does. Tolerance: float32 rounding of 4 steps."""
    ref = DPMSolverMultistepScheduler.from_config(SD15_PNDM)
    ref.set_timesteps(6)
    ref.set_begin_index(2)
    want = _loop(ref, _x(), ref.timesteps[2:])
    ours = samplers.get("dpm-solver++").from_config(SD15_PNDM)
    ours.set_timesteps(6)
    _loop(ours, _x(), ours.timesteps[:3])  # an interrupted earlier loop
    ours.set_begin_index(2)
    torch.testing.assert_close(_loop(ours, _x(), ours.timesteps[2:]), want, rtol=1e-5, atol=1e-5)


def test_half_precision_state_is_released_after_the_last_step():
    """The float32 copy kept between half-precision steps is dropped at the last step (documented in
    ``_keep_precision``: otherwise the scheduler holds a latent-sized tensor until the next run)."""
    sched = samplers.get("ddim")()
    sched.set_timesteps(3)
    x = _x().half()
    for k, t in enumerate(sched.timesteps):
        x = sched.step(_model(x.float(), t).half(), t, x).prev_sample
        assert (getattr(sched, "_kept_sample", None) is None) == (k == 2)


def test_set_begin_index_back_to_zero_runs_the_full_warm_up_as_diffusers():
    """``set_begin_index(2)`` then ``set_begin_index(0)`` (a pipeline that changed its mind): the run from the first
    step must warm up at step 0 only, as a plain diffusers run; a plan still warming up at step 2 takes a first-order
    step there. Tolerance: float32 rounding of 6 steps."""
    ref = DPMSolverMultistepScheduler.from_config(SD15_PNDM)
    ref.set_timesteps(6)
    want = _loop(ref, _x(), ref.timesteps)
    ours = samplers.get("dpm-solver++").from_config(SD15_PNDM)
    ours.set_timesteps(6)
    ours.set_begin_index(2)
    ours.set_begin_index(0)
    torch.testing.assert_close(_loop(ours, _x(), ours.timesteps), want, rtol=1e-5, atol=1e-5)


def test_custom_flow_sigmas_ending_in_zero_sample_as_flow_match_euler():
    """A custom flow sigma list with a trailing 0 (the clean target) and no ``shift_terminal``: the 0 marks the end
    (as in diffusers' FlowMatchEulerDiscreteScheduler, whose extra step from 0 to 0 does not move the sample); the
    sigmas are shifted as diffusers shifts them. Tolerance: float32 rounding; the model timesteps differ by
    1e-3 at the first point (fewstep keeps s < 1), times the 1e-3 weight of t below."""
    from _helpers import SD3_FLOW
    from diffusers import FlowMatchEulerDiscreteScheduler

    def velocity(x, t):
        return torch.sin(0.7 * x) * 0.9 + 1e-3 * float(t) / 1000

    given = [1.0, 0.6, 0.3, 0.0]
    ref = FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW)
    ref.set_timesteps(sigmas=given)
    want = _x()
    for t in ref.timesteps:
        want = ref.step(velocity(want, t), t, want).prev_sample
    for name in ("flow-euler", "ddim"):
        ours = samplers.get(name).from_config(SD3_FLOW)
        ours.set_timesteps(sigmas=given)
        np.testing.assert_allclose(ours.sigmas.numpy(), ref.sigmas.numpy()[:4], rtol=1e-5, atol=1e-6)
        x = _x()
        for t in ours.timesteps:
            x = ours.step(velocity(x, t), t, x).prev_sample
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def test_ddim_eta_on_a_reused_scheduler_follows_the_new_grid_as_diffusers():
    """Stochastic DDIM (``eta`` > 0) after ``set_timesteps`` with another step count, same ``eta``: the noise weights
    must be those of the new grid (diffusers' DDIMScheduler with the same ``variance_noise``); a cached plan of the
    first grid would step the wrong levels. SD1.5's leading spacing: both step to the next listed timestep.
    Tolerance: float32 rounding of 6 steps."""
    from diffusers import DDIMScheduler

    ours = samplers.get("ddim").from_config(SD15_PNDM)
    ours.set_timesteps(4)
    x = _x()
    for t in ours.timesteps:
        x = ours.step(_model(x, t), t, x, eta=0.5, variance_noise=torch.ones_like(x)).prev_sample
    ref = DDIMScheduler.from_config(SD15_PNDM)
    ref.set_timesteps(6)
    ours.set_timesteps(6)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    a = b = _x()
    for k, t in enumerate(ref.timesteps):
        noise = _x(seed=10 + k)
        a = ours.step(_model(a, t), t, a, eta=0.5, variance_noise=noise).prev_sample
        b = ref.step(_model(b, t), t, b, eta=0.5, variance_noise=noise).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, order", [("dpm-solver++", 2), ("unipc", 3)])
def test_lower_order_final_false_matches_diffusers(name, order):
    """``lower_order_final=False`` with ``final_sigmas_type="sigma_min"`` keeps the solver order up to the last steps,
    as diffusers' DPM-Solver++ and UniPC (which lower it only with lower_order_final and < 15 steps, or a zero final
    sigma; diffusers' order-3 UniPC solve is singular at a zero final sigma). Tolerance: float32 rounding of 5 steps;
    the two settings differ by far more (checked)."""
    from diffusers import UniPCMultistepScheduler

    reference = {"dpm-solver++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}[name]
    config = {**SD15_PNDM, "final_sigmas_type": "sigma_min", "solver_order": order}
    results = {}
    for low in (False, True):
        ref = reference.from_config(config, lower_order_final=low)
        ref.set_timesteps(5)
        ours = samplers.get(name).from_config(config, lower_order_final=low)
        ours.set_timesteps(5)
        want = _loop(ref, _x(), ref.timesteps)
        torch.testing.assert_close(_loop(ours, _x(), ours.timesteps), want, rtol=1e-5, atol=1e-5)
        results[low] = want
    assert (results[False] - results[True]).abs().max() > 1e-3


def test_unipc_maps_other_schedulers_solver_type_to_bh2_as_diffusers():
    """A UniPC built from a DPM-Solver config (``solver_type="midpoint"``) runs bh2, as diffusers' UniPC maps
    midpoint/heun/logrho. Tolerance: float32 rounding of 5 steps."""
    from diffusers import UniPCMultistepScheduler

    config = {**SD15_PNDM, "solver_type": "midpoint"}
    ref = UniPCMultistepScheduler.from_config(config)
    ref.set_timesteps(5)
    ours = samplers.get("unipc").from_config(config)
    ours.set_timesteps(5)
    assert ref.config.solver_type == ours.config.solver_type == "bh2"
    torch.testing.assert_close(_loop(ours, _x(), ours.timesteps), _loop(ref, _x(), ref.timesteps), rtol=1e-5,
                               atol=1e-5)


def test_dc_solver_on_a_dpm_solver_base_uses_diffusers_dpm_solver_flow_sigmas():
    """dc-solver with ``dc_base="dpm-solver++"`` on a flow config lays out diffusers' DPM-Solver ``use_flow_sigmas``
    grid (not UniPC's). Tolerance: float32 storage of the sigmas."""
    from _helpers import SD3_FLOW

    ref = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    ref.set_timesteps(5)
    ours = samplers.get("dc-solver").from_config(SD3_FLOW, dc_base="dpm-solver++", dc_ratios=[1.0] * 5)
    ours.set_timesteps(5)
    np.testing.assert_allclose(ours.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
