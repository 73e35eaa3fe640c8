"""Defects found by randomised invariant testing of the solvers (session 16): repeated Karras timesteps in img2img,
zero-length final steps, DC-Solver's interpolation variable, APG state at an implicit corrector's second call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from fewstep import guidance, samplers
from fewstep.guidance import StepState, cfgpp_equivalent_scales, scheduler_rhos, step_state
from fewstep.solvers.dc import interpolation_values

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _karras(n=50):
    s = samplers.get("dpm-solver++")(**SD, use_karras_sigmas=True)
    s.set_timesteps(n)
    ts = s.timesteps.tolist()
    assert ts[-3] == ts[-2]  # rounded low levels repeat (..., 2, 1, 1, 0)
    return s


def test_img2img_noise_at_a_repeated_karras_timestep_is_the_begin_index_level():
    """``add_noise(x0, noise, timesteps[b])`` after ``set_begin_index(b)`` at a timestep listed twice took the first
    occurrence's level (1.0424 vs 1.0350 for alpha + sigma); diffusers takes ``sigmas[begin_index]``."""
    s = _karras()
    d = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    d.set_timesteps(50)
    x0, noise = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    for begin in (47, 48):  # the two places of t = 1
        for sched in (s, d):
            sched.set_begin_index(begin)
        t = s.timesteps[begin:begin + 1]
        ours, theirs = s.add_noise(x0, noise, t), d.add_noise(x0, noise, d.timesteps[begin:begin + 1])
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        g = s.plan.grid
        i = s.plan.calls[begin][0]
        torch.testing.assert_close(ours, float(g.alphas[i]) * x0 + float(g.sigmas[i]) * noise)
    assert not torch.allclose(s.add_noise(x0, noise, torch.tensor([1])),
                              samplers.get("dpm-solver++")(**SD, use_karras_sigmas=True).add_noise(
                                  x0, noise, torch.tensor([1])))  # no begin index: the grid-free level


def test_loop_begun_at_a_repeated_timestep_value_runs_every_remaining_step():
    """A loop over ``timesteps[48:].tolist()`` (numbers, no ``set_begin_index``) started at the first place of the
    repeated value and ended one step short, returning a noisy sample; diffusers starts at its second place."""
    begun = _karras()
    x = torch.randn(2, 2, dtype=torch.float64)
    out = x
    for t in begun.timesteps[48:].tolist():
        out = begun.step(-0.3 * out, t, out).prev_sample
    assert begun.step_index == 50 and begun.begin_index == 48
    ref = _karras()
    ref.set_begin_index(48)
    expected = x
    for t in ref.timesteps[48:]:
        expected = ref.step(-0.3 * expected, t, expected).prev_sample
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_final_step_of_rounding_length_is_exactly_zero():
    """A Karras grid ending at ``sigma_min`` put its target 1e-18 away from the last point (either side): CFG++'s
    equivalent CFG scale became 4.6e15 instead of an error, and momentum divided by the 1e-18 length."""
    s = samplers.get("dpm-solver++")(solver_order=1, final_sigmas_type="sigma_min", use_karras_sigmas=True)
    s.set_timesteps(3)
    rhos = scheduler_rhos(s)
    assert rhos[-1] == rhos[-2]
    with pytest.raises(ValueError, match=r"`rhos` ends with a step of zero length .*CFG\+\+ still moves the sample "
                                         r"there and CFG cannot"):
        cfgpp_equivalent_scales(0.8, rhos)
    for name in ("hb", "ghvb"):  # a zero-length step runs plain (it stands still), no longer refused
        for config, steps in (({"use_karras_sigmas": True}, 6), ({}, None)):
            m = samplers.get(name)(**SD, final_sigmas_type="sigma_min", **config)
            if steps is None:
                m.set_timesteps(timesteps=[999, 500, 0])  # custom timesteps ending at t = 0 and sigma_min there
            else:
                m.set_timesteps(steps)
            x = torch.randn(2, 3, dtype=torch.float64)
            for t in m.timesteps:
                before = x
                x = m.step(0.2 * x, t, x).prev_sample
            torch.testing.assert_close(x, before, rtol=0, atol=0)  # the last step: zero length
            assert m.plan.momentum[-1] is None and torch.isfinite(x).all()


def test_dc_solver_suggests_lambda_only_where_t_repeats():
    s = _karras()
    with pytest.raises(ValueError, match=r"use dc_variable='lambda', which stays distinct$"):
        interpolation_values(s.plan.grid, "t")


def test_apg_keeps_its_momentum_at_an_implicit_correctors_second_call():
    """An s3 schedule with an analytical first step whose first model step is implicitly corrected calls the model
    twice at grid point 0; APG reset its momentum at the second call too."""
    schedule = {"timesteps": [999.0, 700.0, 400.0, 100.0], "final": "zero", "afs": "zero_x0",
                "decisions": [{"prediction": "data", "order": 1, "corrector": "implicit"},
                              {"prediction": "data", "order": 1, "corrector": "implicit"},
                              {"prediction": "data", "order": 2}, {"prediction": "data", "order": 1}]}
    s = samplers.get("s3")(s3_schedule=schedule)
    s.set_timesteps(5)
    first, second = step_state(s, 0), step_state(s, 1)
    assert (first.index, first.repeat, second.index, second.repeat) == (0, False, 0, True)
    gen = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randn(2, 3, 4, 4, generator=gen) for _ in range(2)) for _ in range(4)]
    rule = guidance.APG(guidance_scale=5.0, momentum=-0.5, norm_threshold=None)
    rule(pairs[0], pairs[1], first)
    carried = rule(pairs[2], pairs[3], second)
    fresh = guidance.APG(guidance_scale=5.0, momentum=-0.5, norm_threshold=None)(pairs[2], pairs[3], first)
    assert not torch.allclose(carried[0], fresh[0])
    with pytest.raises(ValueError, match=r"`repeat` must be True or False, got 1"):
        StepState(0, 3, 1.0, 1.0, repeat=1)
    assert np.isclose(first.sigma, second.sigma)


def test_loop_begun_by_value_at_an_implicit_correctors_timestep_runs_both_calls():
    """Found in review: an s3 implicit corrector lists one timestep twice for one grid point; a loop over
    ``timesteps[2:].tolist()`` began at the second call (the Karras rule) and ran out of steps."""
    schedule = {"timesteps": [999.0, 700.0, 400.0, 100.0], "final": "zero",
                "decisions": [{"prediction": "data", "order": 1},
                              {"prediction": "data", "order": 1, "corrector": "implicit"},
                              {"prediction": "data", "order": 2}, {"prediction": "data", "order": 1}]}

    def make():
        s = samplers.get("s3")(s3_schedule=schedule)
        s.set_timesteps(5)
        return s

    begun = make()
    ts = begun.timesteps.tolist()
    assert ts[2] == ts[3] and begun.plan.calls[2][0] == begun.plan.calls[3][0]
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = x
    for t in ts[2:]:
        out = begun.step(-0.3 * out, t, out).prev_sample
    ref = make()
    ref.set_begin_index(2)
    expected = x
    for t in ref.timesteps[2:]:
        expected = ref.step(-0.3 * expected, t, expected).prev_sample
    assert begun.step_index == 5
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
