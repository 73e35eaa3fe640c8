"""Gaps a mutation probe of the guidance rules, guiders, inversion, posterior samplers and FewstepPipeline's loop
found: result-changing edits that the rest of the suite let through. Every reference here is independent of fewstep's
own code paths (diffusers' helpers and guiders, the formulas of the papers, stock diffusers loops).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg
from test_fewstep_pipeline import sdxl as sdxl  # noqa: F401  (fixture)

from fewstep.guidance import CFG, StepState


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# CFG's guidance_rescale acts on the model's raw output for every prediction type (diffusers' rescale_noise_cfg)
def _raw(kind, x0, eps, alpha, sigma):
    """The raw model output of a consistent pair, from the parameterisations' definitions."""
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "flow": eps - x0}[kind]


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow"])
def test_guidance_rescale_rescales_the_raw_output_of_every_prediction_type(kind):
    alpha, sigma = (0.4, 0.6) if kind == "flow" else (0.8, 0.6)  # flow: alpha = 1 - sigma
    x = _randn(2, 3, 4, 4, seed=1)
    eps_c, eps_u = _randn(2, 3, 4, 4, seed=2), 1.7 * _randn(2, 3, 4, 4, seed=3)
    cond = ((x - sigma * eps_c) / alpha, eps_c)
    uncond = ((x - sigma * eps_u) / alpha, eps_u)
    w, phi = 4.0, 0.7
    x0, eps = CFG(w, guidance_rescale=phi)(cond, uncond, StepState(1, 4, alpha, sigma, kind))
    raw_c, raw_u = _raw(kind, *cond, alpha, sigma), _raw(kind, *uncond, alpha, sigma)
    expected = rescale_noise_cfg(raw_u + w * (raw_c - raw_u), raw_c, phi)
    torch.testing.assert_close(_raw(kind, x0, eps, alpha, sigma), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=0, atol=1e-10)  # x_t stays where it is


# ----------------------------------------------------------------------------------------------------------------
# CFGPlusPlusGuider on diffusers' flow Euler: exact CFG++ with the flow renoise fix (CFGpp #12 / ComfyUI PR #9008)
def test_cfgpp_guider_is_exact_cfgpp_on_flow_match_euler():
    """``x' = (1 - s') D_lam + s' eps_u`` with ``D = x - s v`` and ``eps_u = (x - (1 - s) D_u) / s`` (the paper's DDIM
    update on the rectified-flow path), written out here; the guider's per-step CFG scales must reproduce it, so its
    reading of the flow grid (``rho = s / (1 - s)``) is checked through the result."""
    from _helpers import TinyDenoiser
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.guidance.guiders import CFGPlusPlusGuider

    model_c, model_u = TinyDenoiser(3 * 8 * 8, seed=5), TinyDenoiser(3 * 8 * 8, seed=6)
    x_start = _randn(2, 3, 8, 8, seed=4)
    lam, steps = 0.6, 6
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    guider = CFGPlusPlusGuider(guidance_scale=lam, scheduler=sched)
    x = x_start.clone()
    for i, t in enumerate(sched.timesteps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        batches = guider.prepare_inputs({"x": (x, x)})
        for batch, model in zip(batches, (model_c, model_u)):
            batch.noise_pred = model(batch.x, t)
        x = sched.step(guider(batches).pred, t, x).prev_sample
    s = sched.sigmas.double()
    y = x_start.clone()
    for i, t in enumerate(sched.timesteps):
        v_c, v_u = model_c(y, t), model_u(y, t)
        d_c, d_u = y - s[i] * v_c, y - s[i] * v_u
        eps_u = (y - (1 - s[i]) * d_u) / s[i]
        y = (1 - s[i + 1]) * (d_u + lam * (d_c - d_u)) + s[i + 1] * eps_u
    torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the guiders' start/stop window and batch order, against diffusers' own guiders
def _drive(guider, preds, data=None):
    """A modular pipeline's denoise loop over ``preds`` (cond, uncond) per step: the batches' conditioning data (first
    field) and the guided predictions."""
    seen, out = [], []
    for step, (cond, uncond) in enumerate(preds):
        guider.set_state(step=step, num_inference_steps=len(preds), timestep=torch.tensor(999 - 100 * step))
        batches = guider.prepare_inputs({"latents": data or (torch.ones(1), -torch.ones(1))})
        seen.append([float(b.latents) for b in batches])
        for batch in batches:
            guider.prepare_models(None)
            batch.noise_pred = cond if batch.__guidance_identifier__ == "pred_cond" else uncond
        out.append(guider(batches).pred)
    return seen, out


@pytest.mark.parametrize("start,stop", [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0)])
def test_apg_guider_window_and_batches_match_diffusers_apg(start, stop):
    """Same steps guided, same (cond, uncond) batch order and identifiers, same predictions as diffusers'
    ``AdaptiveProjectedGuidance(guidance_scale=w - 1, use_original_formulation=True)`` over a window."""
    from diffusers.guiders import AdaptiveProjectedGuidance

    from fewstep.guidance.guiders import APGGuider

    g = torch.Generator().manual_seed(7)
    preds = [(2 * torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)) for _ in range(8)]
    ours = APGGuider(guidance_scale=4.0, eta=0.2, norm_threshold=3.0, momentum=0.0, start=start, stop=stop)
    theirs = AdaptiveProjectedGuidance(guidance_scale=3.0, adaptive_projected_guidance_rescale=3.0, eta=0.2,
                                       use_original_formulation=True, start=start, stop=stop)  # fmt: skip
    seen_a, out_a = _drive(ours, preds)
    seen_b, out_b = _drive(theirs, preds)
    assert seen_a == seen_b
    assert [len(s) for s in seen_a].count(2) == int(stop * 8) - int(start * 8)
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_cfgpp_guider_window_and_batches_match_diffusers_cfg():
    """Inside its window the CFG++ guider is CFG at ``w_i``, outside the conditional prediction, with diffusers'
    batch order: checked against ``ClassifierFreeGuidance`` driven with the same per-step scales."""
    from diffusers.guiders import ClassifierFreeGuidance

    from fewstep import guidance, samplers
    from fewstep.guidance.guiders import CFGPlusPlusGuider

    sched = samplers.get("ddim").from_config({"num_train_timesteps": 1000, "clip_sample": False})
    sched.set_timesteps(8)
    lam = 0.7
    scales = guidance.cfgpp_equivalent_scales(lam, guidance.scheduler_rhos(sched))
    g = torch.Generator().manual_seed(8)
    preds = [(2 * torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)) for _ in range(8)]
    ours = CFGPlusPlusGuider(guidance_scale=lam, scheduler=sched, start=0.25, stop=0.75)
    seen_a, out_a = _drive(ours, preds)
    for step, (cond, uncond) in enumerate(preds):
        ref = ClassifierFreeGuidance(guidance_scale=scales[step], start=0.25, stop=0.75)
        seen_b, out_b = _drive(ref, [(cond, uncond)] * 8)  # the same state at `step` (a new guider per scale)
        assert seen_a[step] == seen_b[step]
        torch.testing.assert_close(out_a[step], out_b[step], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# ddim_invert starts a generation: a rule's momentum from an earlier run is forgotten
def test_inversion_forgets_apg_momentum_of_an_earlier_run():
    from _helpers import TinyDenoiser

    from fewstep import guidance, samplers
    from fewstep.guidance import APG

    mc, mu = TinyDenoiser(2 * 4 * 4, seed=1), TinyDenoiser(2 * 4 * 4, seed=2)
    fn = lambda x, t: (mc(x, t), mu(x, t))  # noqa: E731
    config = {"num_train_timesteps": 1000, "clip_sample": False, "timestep_spacing": "trailing"}
    sched = samplers.get("ddim").from_config(config)
    sched.set_timesteps(5)
    images = _randn(2, 2, 4, 4, seed=9).clamp(-1, 1)
    used = APG(4.0, eta=0.5, norm_threshold=None, momentum=-0.5)
    x = _randn(2, 2, 4, 4, seed=10)
    for i, t in enumerate(sched.timesteps):  # a sampling run leaves momentum in the rule
        x = guidance.guided_step(sched, used, mc(x, t), mu(x, t), t, x, i)
    got = guidance.ddim_invert(fn, images, sched, used)
    fresh = guidance.ddim_invert(fn, images, sched, APG(**used.config()))
    torch.testing.assert_close(got, fresh, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# DPS / PSLD written out from the papers' update (DDIM step, then the measurement/gluing gradient step)
def _toy_eps(z):
    return torch.tanh(z) + 0.1 * z * z


A_GRID = [0.6, 0.8, 0.95, 1.0]
S_GRID = [0.8, 0.6, float(np.sqrt(1 - 0.95**2)), 0.0]


@pytest.mark.parametrize("loss", ["norm", "squared"])
@pytest.mark.parametrize("gluing", [0.0, 0.3])
def test_dps_and_psld_match_the_written_out_update(loss, gluing):
    """``z_{i+1} = alpha' z0_hat + sigma' eps - zeta c_i grad_z L(z_i)`` (deterministic DDIM, ``ddim_eta=0``) with
    ``L = sum ||y - A z0_hat||`` (+ gamma ``||A^T y + (I - A^T A) z0_hat - z0_hat||``, pixel space) and ``c_i = 1``, or
    with squared norms / 2 and ``c_i = alpha_i^2`` (the step on ``z0_hat``, as documented); the start is the noised
    back-projection ``alpha_0 A^+ y + sigma_0 n`` (``init="adjoint"``)."""
    from fewstep.guidance import DPS, InverseProblem
    from fewstep.guidance.operators import SuperResolution

    op = SuperResolution(2)
    truth = _randn(2, 1, 8, 8, seed=11).clamp(-1, 1)
    y = op(truth)
    noise = _randn(2, 1, 8, 8, seed=12)
    zeta = 0.3

    def model_fn(z, i):
        eps = _toy_eps(z)
        return (z - S_GRID[i] * eps) / A_GRID[i], eps

    method = DPS(step_size=zeta, gluing=gluing, ddim_eta=0.0, init="adjoint", loss=loss)
    got = method.sample(model_fn, InverseProblem(op, y), noise, A_GRID, S_GRID).sample

    p, half = (2, 0.5) if loss == "squared" else (1, 1.0)
    z = A_GRID[0] * op.backproject(y) + S_GRID[0] * noise
    for i in range(3):
        a, s, a_n, s_n = A_GRID[i], S_GRID[i], A_GRID[i + 1], S_GRID[i + 1]
        zg = z.detach().requires_grad_(True)
        eps = _toy_eps(zg)
        x0 = (zg - s * eps) / a
        objective = half * ((y - op(x0)).flatten(1).norm(dim=1) ** p).sum()
        glued = op.adjoint(y) + x0 - op.adjoint(op(x0))
        objective = objective + gluing * half * ((glued - x0).flatten(1).norm(dim=1) ** p).sum()
        (grad,) = torch.autograd.grad(objective, zg)
        c = a * a if loss == "squared" else 1.0
        z = (a_n * x0 + s_n * eps - zeta * c * grad).detach()
    torch.testing.assert_close(got, z, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# STSL written out from its surrogate (paper eq. 4 with the finite-difference Hutchinson trace of the score)
@pytest.mark.parametrize("weight", ["constant", "tweedie"])
@pytest.mark.parametrize("probe_batch", [None, 1])
def test_stsl_matches_the_written_out_surrogate(weight, probe_batch):
    """``K`` inner steps ``z <- z - zeta grad L(z)``, ``L = sum ||y - A z0_hat|| + (w / d) sum_n Tr_n`` with
    ``Tr = (1 / (delta P)) sum_p xi_p . (s(z + delta xi_p) - s(z))``, ``s = -eps / sigma``, ``delta = probe_scale
    sigma``, ``w = eta`` or ``eta sigma^4 / alpha^2``; then DDIM from the refined point with the last inner ``eps``.
    Several probes, split into groups or not, on a nonlinear denoiser."""
    from fewstep.guidance import STSL, InverseProblem
    from fewstep.guidance.operators import BoxInpainting

    op = BoxInpainting(4, box=2)
    y = op(_randn(2, 1, 4, 4, seed=13))
    z_start = _randn(2, 1, 4, 4, seed=14)
    grid_a, grid_s = A_GRID[:3], S_GRID[:3]
    eta, zeta, k, probes, scale = 0.8, 0.2, 2, 3, 0.1

    def model_fn(z, i):
        eps = _toy_eps(z)
        return (z - grid_s[i] * eps) / grid_a[i], eps

    method = STSL(eta=eta, step_size=zeta, inner_steps=k, num_probes=probes, probe_scale=scale,
                  probe_batch=probe_batch, trace_weight=weight, init="noise", ddim_eta=0.0)  # fmt: skip
    got = method.sample(model_fn, InverseProblem(op, y), z_start, grid_a, grid_s, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    d = z_start[0].numel()
    z = z_start.clone()
    for i in range(2):
        a, s, a_n, s_n = grid_a[i], grid_s[i], grid_a[i + 1], grid_s[i + 1]
        w = eta * (s**4 / a**2 if weight == "tweedie" else 1.0)
        delta = scale * s
        for _ in range(k):
            xis = [torch.randn(z.shape, generator=g, dtype=torch.float32).double() for _ in range(probes)]
            zg = z.detach().requires_grad_(True)
            eps = _toy_eps(zg)
            x0 = (zg - s * eps) / a
            objective = (y - op(x0)).flatten(1).norm(dim=1).sum()
            trace = sum((xi * (-_toy_eps(zg + delta * xi) / s + eps / s)).flatten(1).sum(1) for xi in xis)
            objective = objective + (w / d) * (trace / (delta * probes)).sum()
            (grad,) = torch.autograd.grad(objective, zg)
            z, last_eps = (z - zeta * grad).detach(), eps.detach()
        z = a_n * (z - s * last_eps) / a + s_n * last_eps
    torch.testing.assert_close(got.sample, z, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# FewstepPipeline's SDXL loop against the stock StableDiffusionXLPipeline: pooled embeddings and time ids per branch
def test_sdxl_cfg_matches_the_stock_pipeline_on_a_non_square_image(sdxl):  # noqa: F811
    """CFG through fewstep's loop equals ``StableDiffusionXLPipeline`` run with the same (fewstep) scheduler: the
    unconditional half of the batch gets the negative pooled embeddings, and the time ids carry (height, width) of a
    non-square image."""
    from diffusers import StableDiffusionXLPipeline
    from test_fewstep_pipeline import _sdxl_embeds

    from fewstep import samplers
    from fewstep.pipelines import FewstepPipeline

    base = sdxl
    embeds = _sdxl_embeds(2)
    latents = _randn(2, 4, 8, 16, seed=21).float()
    fp = FewstepPipeline.from_pipe(base, scheduler="ddim", guidance="cfg", guidance_scale=5.0)
    ours = fp(**embeds, height=8, width=16, num_inference_steps=4, latents=latents.clone(), output_type="latent").images
    stock = StableDiffusionXLPipeline(**{**base.components,
                                         "scheduler": samplers.get("ddim").from_config(base.scheduler.config)})
    stock.set_progress_bar_config(disable=True)
    theirs = stock(**embeds, height=8, width=16, num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
                   output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale,rescale", [(0.0, 0.0), (1.0, 0.0), (1.0, 0.7), (1.5, 0.7)])
def test_sd_runs_the_unconditional_branch_exactly_where_diffusers_does(scale, rescale):
    """diffusers' ``do_classifier_free_guidance`` is ``guidance_scale > 1``: at 1 (and below) the UNet sees the
    conditional batch alone, ``guidance_rescale`` or not. Same UNet batch sizes and latents as
    ``StableDiffusionPipeline`` with the same scheduler."""
    from diffusers import StableDiffusionPipeline
    from test_pipeline_interop import _sd

    from fewstep import samplers
    from fewstep.pipelines import FewstepPipeline

    base = _sd()
    g = torch.Generator().manual_seed(4)
    embeds = {"prompt_embeds": torch.randn(1, 5, 16, generator=g), "negative_prompt_embeds": torch.randn(1, 5, 16,
                                                                                                          generator=g)}
    latents = torch.randn(1, 4, 8, 8, generator=g)
    fp = FewstepPipeline.from_pipe(base, scheduler="ddim", guidance="cfg", guidance_scale=scale)
    stock = StableDiffusionPipeline(**{**base.components,
                                       "scheduler": samplers.get("ddim").from_config(fp.scheduler.config)})
    stock.set_progress_bar_config(disable=True)
    batches = []
    hook = base.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        ours = fp(**embeds, num_inference_steps=3, latents=latents.clone(), guidance_rescale=rescale,
                  output_type="latent").images
        seen_ours, batches[:] = list(batches), []
        theirs = stock(**embeds, num_inference_steps=3, guidance_scale=scale, guidance_rescale=rescale,
                       latents=latents.clone(), output_type="latent").images  # fmt: skip
    finally:
        hook.remove()
    assert seen_ours == batches == [2 if scale > 1 else 1] * 3
    assert fp.last_call_guided == (scale > 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
