"""API conformance of the samplers with diffusers (found by an API probe): DDIM's `eta`, dpm-solver-v3's model times
for user `timesteps` on flow configs, and `trained_betas` that disagree with `num_train_timesteps`."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from _helpers import SD3_FLOW, SD15_PNDM, SD21_DDIM_V, TinyDenoiser
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from fewstep import samplers
from fewstep.solvers.schedules import FlowShift, VPSchedule, make_betas


# ------------------------------------------------------------------------------------------------- DDIM's eta
def _ddim_pair(config: dict, steps: int = 10):
    ours = samplers.get("ddim").from_config(config)
    ref = DDIMScheduler.from_config(config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()  # leading spacing: both step to the next listed point
    return ours, ref


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize(
    "config, clipped",
    [(SD15_PNDM, False), (SD21_DDIM_V, False), ({**SD15_PNDM, "clip_sample": True, "clip_sample_range": 0.5}, False),
     ({**SD15_PNDM, "clip_sample": True, "clip_sample_range": 0.5}, True)],
    ids=["sd15", "sd21-v", "clip", "clip-use-clipped-output"],
)
def test_ddim_eta_matches_diffusers_ddim_with_the_same_noise(config, clipped, eta):
    """Found by a probe: fewstep's ddim `step` had no `eta`, so diffusers pipelines (which pass `eta` only to a step
    that accepts it) silently ran eta = 0. DDIM's eq. 12/16 now runs on the engine: the same `variance_noise`, or
    the same seeded `generator`, gives diffusers' DDIMScheduler trajectory to float32 rounding."""
    model = TinyDenoiser(16, seed=3)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for source in ("variance_noise", "generator"):
        ours, ref = _ddim_pair(config)
        a = b = x_T
        g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        noises = torch.randn(len(ref.timesteps), *x_T.shape, generator=torch.Generator().manual_seed(1))
        for k, t in enumerate(ref.timesteps):
            kw_ours = {"eta": eta, "use_clipped_model_output": clipped}
            kw_ref = dict(kw_ours)
            if source == "variance_noise":
                kw_ours["variance_noise"] = kw_ref["variance_noise"] = noises[k]
            else:
                kw_ours["generator"], kw_ref["generator"] = g_ours, g_ref
            out_a = ours.step(model(a, t), t, a, **kw_ours)
            out_b = ref.step(model(b, t), t, b, **kw_ref)
            torch.testing.assert_close(out_a.pred_original_sample, out_b.pred_original_sample, rtol=1e-5, atol=1e-5)
            a, b = out_a.prev_sample, out_b.prev_sample
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        deterministic, _ = _ddim_pair(config)
        c = x_T
        for t in deterministic.timesteps:
            c = deterministic.step(model(c, t), t, c).prev_sample
        assert (a - c).abs().max() > 1e-2  # the noise was used


def _tiny_sd(scheduler):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_pipeline_passes_eta_to_fewstep_ddim():
    """The probe's reproducer: `StableDiffusionPipeline(..., eta=1.0)` with fewstep's ddim gave the eta = 0 image.
    diffusers passes `eta` (and the pipeline's generator) to a scheduler whose `step` accepts them; the run now
    matches the pipeline with diffusers' DDIMScheduler for the same seed."""
    assert {"eta", "generator", "variance_noise", "use_clipped_model_output"} <= set(
        inspect.signature(samplers.get("ddim").step).parameters)
    pipe = _tiny_sd(DDIMScheduler.from_config(SD15_PNDM))
    g = torch.Generator().manual_seed(1)
    embeds = {"prompt_embeds": torch.randn(1, 4, 16, generator=g), "negative_prompt_embeds": torch.randn(1, 4, 16,
                                                                                                        generator=g)}
    out = {}
    for name, scheduler in (("diffusers", DDIMScheduler.from_config(SD15_PNDM)),
                            ("fewstep", samplers.get("ddim").from_config(SD15_PNDM))):
        pipe.scheduler = scheduler
        for eta in (0.0, 1.0):
            out[name, eta] = pipe(height=16, width=16, num_inference_steps=6, eta=eta, output_type="latent",
                                  generator=torch.Generator().manual_seed(0), **embeds).images
    scale = out["diffusers", 1.0].abs().max()
    assert (out["fewstep", 1.0] - out["fewstep", 0.0]).abs().max() > 0.05 * scale
    torch.testing.assert_close(out["fewstep", 1.0], out["diffusers", 1.0], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(out["fewstep", 0.0], out["diffusers", 0.0], rtol=0, atol=1e-5 * scale)


def test_ddim_eta_one_is_first_order_sde_dpm_solver_pp_on_flow_too():
    """eta = 1 is the reverse SDE's exact step with frozen x0 (first-order SDE-DPM-Solver++), written in log-SNR, so
    it means the same on a flow schedule (where diffusers' DDIM formula, written for VP, does not apply)."""
    for config in (SD15_PNDM, SD3_FLOW):
        ddim = samplers.get("ddim").from_config(config, final_sigmas_type="zero")
        sde = samplers.get("dpm-solver++").from_config(config, algorithm_type="sde-dpmsolver++", solver_order=1,
                                                       final_sigmas_type="zero")
        for sched in (ddim, sde):
            sched.set_timesteps(timesteps=[999, 800, 600, 400, 200, 50])
        model = TinyDenoiser(16, seed=2)
        a = b = torch.randn(1, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in ddim.timesteps:
            seed = int(t)
            # dpm-solver++ draws its SDE noise in float32
            noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed)).double()
            a = ddim.step(model(a, t), t, a, eta=1.0, variance_noise=noise).prev_sample
            b = sde.step(model(b, t), t, b, generator=torch.Generator().manual_seed(seed)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ddim_eta_arguments_are_checked():
    ddim = samplers.get("ddim").from_config(SD15_PNDM)
    ddim.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4)
    t = ddim.timesteps[0]
    for bad in (-0.1, 1.5, math.nan, True, "1", torch.tensor(0.5)):
        with pytest.raises(ValueError, match=r"`eta` \(DDIM's noise weight.*\) must be a finite number in \[0, 1\]"):
            ddim.step(x, t, x, eta=bad)
    with pytest.raises(ValueError, match="either `generator` or `variance_noise`"):
        ddim.step(x, t, x, eta=0.5, generator=torch.Generator(), variance_noise=torch.randn_like(x))
    with pytest.raises(ValueError, match=r"`variance_noise` must have the sample's shape \(1, 2, 4, 4\), got \(2, 4\)"):
        ddim.step(x, t, x, eta=0.5, variance_noise=torch.randn(2, 4))
    with pytest.raises(ValueError, match="`use_clipped_model_output` must be True, False or None, got 'yes'"):
        ddim.step(x, t, x, use_clipped_model_output="yes")
    assert ddim.step_index is None  # nothing ran
    # eta = 0 ignores the generator (diffusers draws nothing then) and is the plain deterministic step
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = ddim.step(x, t, x, eta=0.0, generator=g).prev_sample
    assert torch.equal(g.get_state(), state)
    fresh = samplers.get("ddim").from_config(SD15_PNDM)
    fresh.set_timesteps(4)
    assert torch.equal(a, fresh.step(x, t, x).prev_sample)


def test_ddim_eta_step_runs_on_the_meta_device():
    """No host sync: the eta coefficients are host floats from set_timesteps, the noise is drawn on the device."""
    ddim = samplers.get("ddim")()
    ddim.set_timesteps(5, device="meta")
    x = torch.empty(2, 3, 4, 4, device="meta")
    for t in ddim.timesteps:
        x = ddim.step(torch.empty_like(x), t, x, eta=0.5).prev_sample
    assert x.device.type == "meta" and ddim.step_index == 5


# ------------------------------------------------------------------------- dpm-solver-v3: user timesteps on flow
@pytest.mark.parametrize("extra", [{"degenerated": True}, {"ems_file": "digits-flow", "ems_model": "digits-flow"}])
@pytest.mark.parametrize(
    "config, kw",
    [(SD3_FLOW, {}), ({**SD3_FLOW, "shift_terminal": 0.1}, {}),
     ({**SD3_FLOW, "use_dynamic_shifting": True}, {"mu": 0.8}), ({**SD3_FLOW, "shift": 1.0}, {})],
    ids=["sd3", "shift-terminal", "flux-mu", "shift-1"],
)
def test_v3_calls_the_model_at_user_timesteps_on_flow_configs(config, kw, extra):
    """Found by a probe: on SD3's config (shift 3) `set_timesteps(timesteps=[...])` made v3 call the model at the
    shifted `s * T` (850 -> 944.4), while unipc and diffusers' FlowMatchEuler call it at the user's timesteps (their
    noise levels shifted). v3 now calls it there too, up to its snap to the EMS grid: at the time that maps to the
    snapped noise level."""
    user = [950.0, 850.0, 700.0, 500.0, 300.0, 100.0]
    v3 = samplers.get("dpm-solver-v3").from_config(config, **extra)
    v3.set_timesteps(timesteps=user, **kw)
    ref = samplers.get("unipc").from_config(config)
    ref.set_timesteps(timesteps=user, **kw)
    assert ref.timesteps.tolist() == user
    degenerate = "degenerated" in extra
    # the snap moves a point by a fraction of a timestep on the degenerate 2001-point grid, by up to ~27 on
    # digits-flow's 65-point one (half its largest gap, 54 timesteps mid-range)
    np.testing.assert_allclose(v3.timesteps.numpy(), user, atol=1.0 if degenerate else 27.0)
    np.testing.assert_allclose(v3.sigmas.numpy(), ref.sigmas.numpy(), atol=1e-3 if degenerate else 0.03)
    # each model time is the one whose (shifted, stretched) noise level is the snapped point
    shift = FlowShift(math.exp(kw["mu"])) if "mu" in kw else FlowShift(config["shift"])
    s = shift.apply(v3.plan.grid.timesteps / 1000.0)
    if config.get("shift_terminal"):
        one_minus = 1.0 - shift.apply(np.array(user) / 1000.0)
        s = 1.0 - (1.0 - s) * (1.0 - config["shift_terminal"]) / one_minus[-1]
    np.testing.assert_allclose(s, v3.plan.grid.sigmas[:-1], rtol=1e-9)


def test_v3_flow_sigmas_and_own_grids_keep_their_model_times():
    """`sigmas` (the Flux pipeline's) and v3's own time grids are noise levels: the model is called at `s * T`."""
    v3 = samplers.get("dpm-solver-v3").from_config(SD3_FLOW, degenerated=True)
    for kw in ({"sigmas": [0.9, 0.7, 0.5, 0.3]}, {"num_inference_steps": 5}):
        v3.set_timesteps(**kw)
        np.testing.assert_allclose(v3.plan.grid.timesteps, 1000.0 * v3.plan.grid.sigmas[:-1], rtol=1e-12)


# ------------------------------------------------------------------------------------ trained_betas vs length
def test_trained_betas_must_match_num_train_timesteps():
    """Found by a probe: 500 `trained_betas` with `num_train_timesteps=1000` ran a 500-step schedule while the
    config (which pipelines read, e.g. SDXL's denoising_end) kept 1000. Now an error naming both."""
    betas = np.linspace(1e-4, 0.02, 500).tolist()
    message = r"`trained_betas` holds 500 values but `num_train_timesteps` is 1000: they must agree"
    with pytest.raises(ValueError, match=message):
        make_betas(num_train_timesteps=1000, trained_betas=betas)
    with pytest.raises(ValueError, match=message):
        VPSchedule.from_config({"trained_betas": betas, "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match=message):
        samplers.get("ddim").from_config({"trained_betas": betas, "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match=message):  # a diffusers config that carries the mismatch
        samplers.get("unipc").from_config(DDPMScheduler(trained_betas=betas).config)
    sched = samplers.get("ddim").from_config({"trained_betas": betas, "num_train_timesteps": 500})
    assert len(sched) == sched.config.num_train_timesteps == 500
    np.testing.assert_array_equal(make_betas(num_train_timesteps=500, trained_betas=betas),
                                  DDPMScheduler(num_train_timesteps=500, trained_betas=betas).betas.numpy())
