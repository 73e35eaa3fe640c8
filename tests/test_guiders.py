"""fewstep's guidance as diffusers guiders: parity with diffusers' APG, CFG++ guider vs the pair rule."""

from __future__ import annotations

import pytest
import torch
from _helpers import TinyDenoiser
from diffusers import EulerDiscreteScheduler
from diffusers.guiders import AdaptiveProjectedGuidance, BaseGuidance

from fewstep import guidance, samplers
from fewstep.guidance.guiders import APGGuider, CFGPlusPlusGuider

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}
SHAPE = (2, 4, 8, 8)


def _run_guider(guider: BaseGuidance, preds: list[tuple[torch.Tensor, torch.Tensor]], generations: int = 1):
    """Drive a guider the way a modular pipeline's denoise loop does; returns the guided predictions."""
    out = []
    for _ in range(generations):
        for step, (cond, uncond) in enumerate(preds):
            guider.set_state(step=step, num_inference_steps=len(preds), timestep=torch.tensor(999 - 100 * step))
            batches = guider.prepare_inputs({"latents": (torch.zeros(1), torch.zeros(1))})
            assert len(batches) == guider.num_conditions == 2
            for batch, pred in zip(batches, (cond, uncond)):
                guider.prepare_models(None)
                batch.noise_pred = pred
            out.append(guider(batches).pred)
    return out


def _preds(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(SHAPE, generator=g) * 2, torch.randn(SHAPE, generator=g)) for _ in range(n)]


@pytest.mark.parametrize(
    "w,eta,r,beta",
    [(5.0, 0.0, 15.0, -0.5), (8.0, 0.0, 4.0, -0.75), (3.0, 0.3, 6.0, None), (4.0, 1.0, None, -0.5)],
)
def test_apg_guider_matches_diffusers_apg_with_original_formulation(w, eta, r, beta):
    preds = _preds()
    ours = APGGuider(guidance_scale=w, eta=eta, norm_threshold=r, momentum=0.0 if beta is None else beta)
    theirs = AdaptiveProjectedGuidance(
        guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta,
        adaptive_projected_guidance_rescale=0.0 if r is None else r, eta=eta, use_original_formulation=True,
    )  # fmt: skip
    a, b = _run_guider(ours, preds, generations=2), _run_guider(theirs, preds, generations=2)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-5)
    assert torch.equal(a[0], a[len(preds)])  # momentum reset at step 0 of the second generation


def test_apg_guider_differs_from_diffusers_default_formulation():
    preds = _preds(2)
    ours = _run_guider(APGGuider(guidance_scale=5.0, eta=0.0, norm_threshold=4.0, momentum=0.0), preds)
    default = _run_guider(AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_rescale=4.0), preds)
    assert (ours[0] - default[0]).abs().max() > 0.1


def test_apg_guider_equals_the_eps_space_pair_rule():
    """The guider on raw eps == fewstep's APG(space='eps') rule's eps (same algebra, one code path)."""
    preds = _preds(3)
    guided = _run_guider(APGGuider(guidance_scale=6.0, norm_threshold=5.0), preds)
    rule = guidance.APG(guidance_scale=6.0, norm_threshold=5.0, space="eps")
    for i, ((c, u), g) in enumerate(zip(preds, guided)):
        state = guidance.StepState(i, 3, 0.7, 0.7)
        x0c, x0u = torch.zeros_like(c), torch.zeros_like(u)
        assert torch.allclose(rule((x0c, c), (x0u, u), state)[1], g, atol=1e-6)


def _cfgpp_guider_loop(scheduler, guider, model_c, model_u, x):
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=len(scheduler.timesteps), timestep=t)
        xin = scheduler.scale_model_input(x, t)
        batches = guider.prepare_inputs({"x": (xin, xin)})
        for batch, model in zip(batches, (model_c, model_u)):
            batch.noise_pred = model(batch.x, t)
        x = scheduler.step(guider(batches).pred, t, x).prev_sample
    return x


def test_cfgpp_guider_is_exact_cfgpp_on_first_order_schedulers():
    model_c, model_u = TinyDenoiser(3 * 8 * 8, seed=3), TinyDenoiser(3 * 8 * 8, seed=4)
    x_start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler = samplers.get("ddim").from_config(DDPM)
    scheduler.set_timesteps(7)
    got = _cfgpp_guider_loop(scheduler, CFGPlusPlusGuider(guidance_scale=0.7, scheduler=scheduler), model_c, model_u,
                             x_start)  # fmt: skip
    scheduler.set_timesteps(7)
    rule, x = guidance.CFGPlusPlus(0.7), x_start
    for i, t in enumerate(scheduler.timesteps):
        x = guidance.guided_step(scheduler, rule, model_c(x, t), model_u(x, t), t, x, i)
    assert torch.allclose(got, x, atol=1e-10)

    # diffusers' Euler (k-diffusion form x/alpha): CFG++ Euler is D_lam + rho' (x - D_u)/rho
    euler = EulerDiscreteScheduler.from_config(DDPM)
    euler.set_timesteps(5)
    got = _cfgpp_guider_loop(euler, CFGPlusPlusGuider(guidance_scale=0.5, scheduler=euler), model_c, model_u,
                             x_start * euler.init_noise_sigma)  # fmt: skip
    x, rhos = x_start * euler.init_noise_sigma, euler.sigmas.double()
    for i, t in enumerate(euler.timesteps):
        xin = x / (rhos[i] ** 2 + 1) ** 0.5
        e_c, e_u = model_c(xin, t), model_u(xin, t)
        d_u, d_c = x - rhos[i] * e_u, x - rhos[i] * e_c
        x = d_u + 0.5 * (d_c - d_u) + rhos[i + 1] * (x - d_u) / rhos[i]
    assert torch.allclose(got, x, atol=1e-5)


def test_guider_config_round_trip_and_bad_input(tmp_path):
    guider = APGGuider(guidance_scale=4.0, eta=0.2, norm_threshold=3.0, momentum=-0.25)
    guider.save_pretrained(tmp_path)
    loaded = APGGuider.from_pretrained(tmp_path)
    assert loaded.rule.config() == guider.rule.config()
    assert guider.new(eta=0.5).rule.guidance_scale == 4.0
    with pytest.raises(ValueError, match=r"`norm_threshold` must be a finite number in \(0, inf\].*got 0"):
        APGGuider(norm_threshold=0)
    with pytest.raises(ValueError, match=r"`guidance_scale` must be a finite number in \[0, 1\] for CFG\+\+.*got 3"):
        CFGPlusPlusGuider(guidance_scale=3)
    g = CFGPlusPlusGuider(guidance_scale=0.5)
    g.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    with pytest.raises(ValueError, match="needs the scheduler"):
        g(_fake_batches(g))
    with pytest.raises(ValueError, match=r"same shape \(batch included\)"):
        APGGuider().forward(torch.zeros(2, 4), torch.zeros(1, 4))


def _fake_batches(guider):
    batches = guider.prepare_inputs({"x": (torch.zeros(1), torch.zeros(1))})
    for b in batches:
        b.noise_pred = torch.ones(1, 4)
    return batches


def test_cfgpp_guider_in_a_run_that_begins_part_way_uses_the_scales_of_the_steps_that_run():
    """Found by a probe: diffusers' img2img loops call ``scheduler.set_begin_index(t_start)`` and count the guider's
    ``step`` from 0 over ``timesteps[t_start:]``; the guider applied the scales of the grid's first steps (0.13 off
    exact CFG++ after 4 of 8 DDIM steps). It is exact CFG++ again, as for a run from the start."""
    mc, mu = TinyDenoiser(3 * 8 * 8, seed=3), TinyDenoiser(3 * 8 * 8, seed=4)
    x_start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n, t_start, lam = 8, 4, 0.7
    sched = samplers.get("ddim").from_config(DDPM)
    sched.set_timesteps(n)
    sched.set_begin_index(t_start)
    timesteps = sched.timesteps[t_start:]
    guider = CFGPlusPlusGuider(guidance_scale=lam, scheduler=sched)
    x = x_start.clone()
    for i, t in enumerate(timesteps):  # as diffusers' modular denoise loop drives a guider
        guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=t)
        batches = guider.prepare_inputs({"x": (x, x)})
        for batch, model in zip(batches, (mc, mu)):
            batch.noise_pred = model(batch.x, t)
        x = sched.step(guider(batches).pred, t, x).prev_sample
    exact = samplers.get("ddim").from_config(DDPM)
    exact.set_timesteps(n)
    exact.set_begin_index(t_start)
    y = x_start.clone()
    for i, t in enumerate(timesteps):
        y = guidance.guided_step(exact, guidance.CFGPlusPlus(lam), mc(y, t), mu(y, t), t, y, t_start + i)
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
