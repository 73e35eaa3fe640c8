"""Half-precision models: the solver arithmetic stays in float32 wherever fewstep integrates (the functional
sample loop, DC-Solver calibration) and user latents of another dtype reach the model in its own (session-16 probe)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler as DiffusersDPM
from diffusers import StableDiffusionPipeline
from test_fewstep_pipeline_flow import _sd3_transformer, _vae
from test_real_pipeline import tiny_sd  # noqa: F401 - the tiny SD pipeline directory fixture

import fewstep
from fewstep import samplers
from fewstep.bench.analytic import default_mixture
from fewstep.calibrate import dc as dc_calibration
from fewstep.pipelines import FewstepPipeline
from fewstep.solvers import sample_loop

MIX = default_mixture(dim=16, seed=0)


def _pair_fn(grid, dtype):
    def fn(x, i):  # the exact denoiser, output rounded to `dtype` (a half-precision model)
        x0, eps = MIX.denoise(x.double(), float(grid.alphas[i]), float(grid.sigmas[i]))
        return x0.to(dtype), eps.to(dtype)
    return fn


def _scheduler_loop(sched, x, dtype, generator=None):
    for k, t in enumerate(sched.timesteps):
        x0, eps = _pair_fn(sched.plan.grid, dtype)(x, sched.plan.calls[k][0])
        x = sched.step_pair(x0, eps, t, x, generator=generator).prev_sample
    return x


def test_sample_loop_integrates_half_precision_in_float32_like_the_scheduler():
    """``sample_loop`` integrated a float16/bfloat16 ``x_start`` in half precision: 2-3x the scheduler's error."""
    sched = samplers.get("unipc")(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x_T = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        sched.set_timesteps(12)
        plan = sched.plan
        out = sample_loop(_pair_fn(plan.grid, dtype), x_T.to(dtype), plan)
        sched.set_timesteps(12)
        assert out.dtype == dtype
        torch.testing.assert_close(out, _scheduler_loop(sched, x_T.to(dtype), dtype), rtol=0, atol=0)


def test_sample_loop_draws_the_schedulers_noise():
    """An SDE plan's noise was drawn in the sample's dtype (float64: another stream than the scheduler's float32
    draws, 4.7 apart after 6 steps from one seed)."""
    sched = samplers.get("dpm-solver++").from_config(DiffusersDPM(algorithm_type="sde-dpmsolver++").config)
    x_T = torch.randn(2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sched.set_timesteps(6)
    plan = sched.plan
    out = sample_loop(_pair_fn(plan.grid, torch.float64), x_T, plan, generator=torch.Generator().manual_seed(7))
    sched.set_timesteps(6)
    expected = _scheduler_loop(sched, x_T, torch.float64, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dc_calibration_of_a_half_precision_unet_solves_in_float32(monkeypatch):
    """The reference solves and the ratio search ran in the UNet's float16/bfloat16 (4x the float32 error)."""
    pipe = fewstep.load_default("digits-eps", sampler=None, torch_dtype=torch.bfloat16)
    seen = {}

    def capture(config, unet, make_fn, noise, *args):
        seen["noise"] = noise.dtype
        seen["out"] = make_fn(3.0)(noise[:2], 500.0).dtype
        return [], {}

    monkeypatch.setattr(dc_calibration, "_calibrate_grid", capture)
    dc_calibration.calibrate_class_conditional(pipe, [5], [3.0], datapoints=2, progress=False)
    assert seen == {"noise": torch.float32, "out": torch.float32}


def test_float32_latents_run_on_a_half_precision_sd_pipeline(tiny_sd):  # noqa: F811
    """Float32 ``latents`` on a float16 SD pipeline failed inside the UNet ("mat1 and mat2 must have the same
    dtype"); they are cast to the dtype diffusers draws latents in, as the digits pipelines do."""
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd, dtype=torch.float16)
    sd.set_progress_bar_config(disable=True)
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc")
    emb = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0)).half()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = dict(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=2, output_type="latent")
    out = fp(latents=latents, **run).images
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, fp(latents=latents.half(), **run).images, rtol=0, atol=0)


def test_float32_latents_run_on_a_half_precision_sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    sd3 = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    ).to(dtype=torch.float16)  # fmt: skip
    sd3.set_progress_bar_config(disable=True)
    fp = FewstepPipeline.from_pipe(sd3, scheduler="flow-euler")
    g = torch.Generator().manual_seed(3)
    embeds = {"prompt_embeds": torch.randn(1, 6, 16, generator=g).half(),
              "negative_prompt_embeds": torch.randn(1, 6, 16, generator=g).half(),
              "pooled_prompt_embeds": torch.randn(1, 8, generator=g).half(),
              "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=g).half()}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    out = fp(latents=latents, height=16, width=16, num_inference_steps=2, output_type="latent", **embeds).images
    assert out.dtype == torch.float16 and torch.isfinite(out).all()




def test_ems_estimation_of_a_half_precision_unet_runs_in_float32(monkeypatch):
    """The EMS estimate of a bfloat16 digits UNet formed its noised samples, model times and lambdas in bfloat16:
    model times rounded to multiples of 4 and called at t = 1000, outside the 0..999 schedule."""
    from fewstep.calibrate import ems as ems_calibration

    pipe = fewstep.load_default("digits-eps", sampler=None, torch_dtype=torch.bfloat16)
    seen = {}

    def capture(eps_fn, data, schedule, **kwargs):
        seen["data"] = data.dtype
        x = data[:2]
        lam = float(schedule.lambda_(983.95))
        seen["eps"] = eps_fn(x, lam, torch.zeros((), dtype=x.dtype)).dtype
        raise KeyboardInterrupt  # enough: the estimate itself is tested elsewhere

    times = []
    pipe.unet.register_forward_pre_hook(lambda m, args: times.append(float(args[1].reshape(-1)[0])))
    monkeypatch.setattr(ems_calibration, "estimate_ems", capture)
    try:
        ems_calibration.class_conditional_ems(pipe, "digits-eps", num_samples=4, num_intervals=4, progress=False)
    except KeyboardInterrupt:
        pass
    assert seen == {"data": torch.float32, "eps": torch.float32}
    assert abs(times[0] - 983.95) < 1e-2  # bfloat16 model times: 984


def test_embedded_models_load_in_float16_on_the_cpu_without_diffusers_warning(monkeypatch):
    """`fewstep generate --dtype float16` printed diffusers' warning that float16 pipelines "cannot run" on the CPU
    ("running them will fail"), then ran fine: the embedded models do run there."""
    import logging

    warned = []
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    monkeypatch.setattr(logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    pipe = fewstep.load_default("digits-eps", torch_dtype=torch.float16, device="cpu")
    assert not [w for w in warned if "cannot run with `cpu` device" in w], warned
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all()
