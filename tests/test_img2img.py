"""fewstep schedulers in diffusers' img2img pipelines, which start part-way down the grid (``set_begin_index``).

A multistep solver that begins at step k has an empty buffer there: its warm-up (lower orders) must restart at k,
as diffusers' schedulers do (``lower_order_nums`` counts the steps taken). Parity with diffusers' own schedulers in
StableDiffusionImg2ImgPipeline (VP) and StableDiffusion3Img2ImgPipeline (flow: ``scale_noise``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import FLUX_FLOW, SD3_FLOW, SD15_PNDM, SDXL_EULER
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UniPCMultistepScheduler,
)
from test_fewstep_pipeline import _sdxl_embeds, sd, sd_path, sdxl  # noqa: F401 - tiny SD1.5/SDXL pipeline fixtures
from test_fewstep_pipeline_flow import SIZE, _embeds, _flux_transformer, _vae, sd3  # noqa: F401 - tiny SD3 fixture

from fewstep import samplers
from fewstep.solvers.engine import StepDecision, restart_decisions

PARITY = [
    ("ddim", DDIMScheduler, {}),
    ("dpm-solver++", DPMSolverMultistepScheduler, {}),
    ("dpm-solver++", DPMSolverMultistepScheduler, {"solver_order": 3}),
    ("unipc", UniPCMultistepScheduler, {}),
    ("unipc", UniPCMultistepScheduler, {"solver_order": 3}),
]  # not bh1: diffusers' UniPC bh1 returns NaN on SD1.5's config (final sigma 0), from a full run too


@pytest.fixture(scope="module")
def i2i(sd):  # noqa: F811
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image() -> torch.Tensor:
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _run(pipe, scheduler, strength=0.6, steps=10) -> np.ndarray:
    pipe.scheduler = scheduler
    return pipe("a", image=_image(), strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip


@pytest.mark.parametrize(("name", "cls", "extra"), PARITY, ids=[f"{n}-{e}" for n, _, e in PARITY])
def test_img2img_matches_diffusers(i2i, name, cls, extra):
    """Before the warm-up moved with ``begin_index``, every multistep solver failed here (an order-2 step at
    the first step taken found no previous evaluation in its buffer)."""
    theirs = _run(i2i, cls.from_config(SD15_PNDM, **extra))
    ours = _run(i2i, samplers.get(name).from_config(SD15_PNDM, **extra))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # the scheduler began at call 4 of 10 (strength 0.6) and warmed up there
    assert i2i.scheduler.begin_index == 4 and i2i.scheduler.plan.decisions[4].order == 1


@pytest.mark.parametrize("name", samplers.names("diffusion", standalone=True))
def test_every_standalone_sampler_runs_img2img(i2i, name):
    out = _run(i2i, samplers.get(name).from_config(SD15_PNDM), strength=0.5, steps=8)
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    full = _run(i2i, samplers.get(name).from_config(SD15_PNDM), strength=1.0, steps=8)  # begin_index 0
    assert not np.allclose(out, full)


class _DiffusersFlowUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC on flow sigmas, with what SD3's img2img pipeline needs of a flow scheduler that diffusers'
    UniPC lacks: ``scale_noise`` (``FlowMatchEulerDiscreteScheduler``'s, at the begin index) and model timesteps
    ``T * sigma`` as FlowMatchEuler's (diffusers' UniPC rounds them to integers). The solver itself reads only
    ``sigmas``."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps

    def scale_noise(self, sample, timestep, noise):
        sigma = self.sigmas[self.begin_index]
        return sigma * noise + (1.0 - sigma) * sample


def test_sd3_img2img_matches_diffusers(sd3):  # noqa: F811
    pipe = StableDiffusion3Img2ImgPipeline(**sd3.components)
    pipe.set_progress_bar_config(disable=True)
    kw = _embeds()
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    outs = []
    for scheduler in (FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW),
                      samplers.get("flow-euler").from_config(SD3_FLOW)):  # fmt: skip
        pipe.scheduler = scheduler
        outs.append(pipe(**kw, image=image, strength=0.7, num_inference_steps=6, guidance_scale=4.0,
                         output_type="np", generator=torch.Generator().manual_seed(1)).images)  # fmt: skip
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    # a multistep solver on the flow model runs from part-way too, as diffusers' UniPC on flow sigmas does
    outs = []
    for scheduler in (_DiffusersFlowUniPC.from_config(SD3_FLOW, use_flow_sigmas=True, flow_shift=3.0,
                                                      prediction_type="flow_prediction"),
                      samplers.get("unipc").from_config(SD3_FLOW)):  # fmt: skip
        pipe.scheduler = scheduler
        outs.append(pipe(**kw, image=image, strength=0.7, num_inference_steps=6, guidance_scale=4.0,
                         output_type="np", generator=torch.Generator().manual_seed(1)).images)  # fmt: skip
    # measured 7e-7; a run from pure noise (strength 1) is 0.15 off, one from another input image 0.03
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    # the scheduler began at call int(6 - 0.7 * 6) = 1 of 6 and warmed up there
    assert pipe.scheduler.begin_index == 1 and pipe.scheduler.plan.decisions[1].order == 1


def test_flux_img2img_matches_diffusers():
    """Flux img2img: dynamic shift (``mu``), the pipeline's own sigmas, ``scale_noise`` and the begin index."""
    torch.manual_seed(0)
    pipe = FluxImg2ImgPipeline(
        transformer=_flux_transformer(True), scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW),
        vae=_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    kw = {"prompt_embeds": torch.randn(1, 6, 16, generator=g), "pooled_prompt_embeds": torch.randn(1, 8, generator=g)}
    image = torch.rand(1, 3, SIZE, SIZE, generator=g)
    outs = []
    for scheduler in (FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW),
                      samplers.get("flow-euler").from_config(FLUX_FLOW)):  # fmt: skip
        pipe.scheduler = scheduler
        outs.append(pipe(**kw, image=image, strength=0.6, num_inference_steps=8, height=SIZE, width=SIZE,
                         output_type="np", generator=torch.Generator().manual_seed(1)).images)  # fmt: skip
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_scale_noise_is_the_flow_forward_process():
    sched = samplers.get("flow-euler").from_config(SD3_FLOW)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(sched.scale_noise(x0, torch.tensor([250.0]), eps), 0.75 * x0 + 0.25 * eps)
    with pytest.raises(ValueError, match="`noise` must be a tensor"):
        sched.scale_noise(x0, torch.tensor([250.0]))
    with pytest.raises(ValueError, match="`scale_noise` is the forward process of flow-matching models"):
        samplers.get("ddim").from_config(SD15_PNDM).scale_noise(x0, torch.tensor([250]), eps)


def test_restart_decisions_caps_orders_and_points():
    d = [StepDecision(order=1), StepDecision(order=2), StepDecision(order=3, corrector="unic"),
         StepDecision(order=3, points=(1, 3)), StepDecision(order=3, corrector="unic", corrector_order=4)]
    out = restart_decisions(d, 2)
    assert out[:2] == d[:2]  # steps before the start are never run
    assert [s.order for s in out[2:]] == [1, 2, 3]
    assert out[3].points == (1,)  # offset 3 does not exist one step after the start
    assert out[4] == d[4]  # two evaluations back exist: unchanged
    assert out[2].corrector == "unic"
    capped = restart_decisions(d, 4)[4]
    assert capped.order == 1 and capped.corrector_order == 2
    assert restart_decisions(d, 0) == d
    with pytest.raises(ValueError, match=r"`start` must be an integer in \[0, 4\], got 5"):
        restart_decisions(d, 5)


def test_restarted_plan_equals_a_run_over_the_remaining_timesteps():
    """Beginning at call k runs the solver that set_timesteps would build for the remaining grid points."""
    full = samplers.get("unipc").from_config(SD15_PNDM, solver_order=3)
    full.set_timesteps(12)
    part = samplers.get("unipc").from_config(SD15_PNDM, solver_order=3)
    part.set_timesteps(timesteps=full.timesteps[5:].tolist())
    full.set_begin_index(5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = x.clone(), x.clone()
    for t in full.timesteps[5:]:
        out = torch.tanh(a) * 0.5  # any deterministic model
        a = full.step(out, t, a).prev_sample
        b = part.step(torch.tanh(b) * 0.5, t, b).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if x.dtype == torch.float64 else 1e-6)


def test_begin_index_bad_input():
    sched = samplers.get("dpm-solver++").from_config(SD15_PNDM)
    sched.set_timesteps(6)
    with pytest.raises(ValueError, match=r"`begin_index` must be below the number of timesteps \(6\), got 6"):
        sched.set_begin_index(6)
    with pytest.raises(ValueError, match="`begin_index` must be an integer >= 0"):
        sched.set_begin_index(-1)


def test_dpm_solver_v3_runs_img2img(i2i):
    """A sampler with its own plan compilation (EMS tables) restarts part-way too (s3: tests/test_s3.py)."""
    v3 = samplers.get("dpm-solver-v3").from_config(SD15_PNDM, degenerated=True)
    out = _run(i2i, v3, strength=0.5, steps=8)
    assert np.isfinite(out).all() and v3.plan.decisions[v3.begin_index].order == 1
    ref = _run(i2i, samplers.get("dpm-solver++").from_config(SD15_PNDM, solver_type="taylor"), strength=0.5, steps=8)
    # degenerate v3 is DPM-Solver++ (on its own time grid): measured 0.0034 apart; v3 noising another input image
    # is 0.04 off, noising the input scaled by 0.8 is 0.023 off
    assert np.abs(out - ref).max() < 0.01


@pytest.mark.parametrize(("name", "cls"), [("dpm-solver++", DPMSolverMultistepScheduler),
                                           ("unipc", UniPCMultistepScheduler)])  # fmt: skip
def test_inpainting_matches_diffusers(sd, name, cls):  # noqa: F811
    """The inpainting pipeline begins part-way (strength) and re-noises the kept region with add_noise at every
    step."""
    pipe = StableDiffusionInpaintPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    outs = []
    for scheduler in (cls.from_config(SD15_PNDM), samplers.get(name).from_config(SD15_PNDM)):
        pipe.scheduler = scheduler
        outs.append(pipe("a", image=_image(), mask_image=mask, strength=0.7, num_inference_steps=10, height=16,
                         width=16, output_type="np", generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


@pytest.mark.parametrize(("name", "cls"), [("dpm-solver++", DPMSolverMultistepScheduler),
                                           ("unipc", UniPCMultistepScheduler)])  # fmt: skip
def test_sdxl_base_then_refiner_matches_diffusers(sdxl, name, cls):  # noqa: F811
    """SDXL's ensemble of experts: the base stops at ``denoising_end=0.7``, the img2img refiner begins there
    (``denoising_start``, which sets the begin index) on the base's latents."""
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=sdxl.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=sdxl.unet,
        scheduler=sdxl.scheduler, add_watermarker=False, requires_aesthetics_score=False,
    )  # fmt: skip
    refiner.set_progress_bar_config(disable=True)
    base_scheduler = sdxl.scheduler
    outs = []
    try:
        for make in (cls.from_config, samplers.get(name).from_config):
            sdxl.scheduler = make(SDXL_EULER)
            latents = sdxl(**_sdxl_embeds(), height=16, width=16, num_inference_steps=10, denoising_end=0.7,
                           output_type="latent", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
            refiner.scheduler = make(SDXL_EULER)
            image = refiner(**_sdxl_embeds(), image=latents, num_inference_steps=10, denoising_start=0.7,
                            output_type="np", generator=torch.Generator().manual_seed(1)).images  # fmt: skip
            outs.append((latents, image))
    finally:
        sdxl.scheduler = base_scheduler
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-4)  # latents of unit scale
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5)
    assert refiner.scheduler.begin_index == 7


@pytest.mark.parametrize(("name", "cls"), [("dpm-solver++", DPMSolverMultistepScheduler),
                                           ("unipc", UniPCMultistepScheduler)])  # fmt: skip
def test_add_noise_on_a_karras_grid_uses_the_exact_levels(name, cls):
    """Karras grids round the model timesteps; add_noise at a grid timestep must give the exact level the solver
    starts from (diffusers' self.sigmas[step_index]), not the schedule's level at the rounded timestep."""
    theirs = cls.from_config(SD15_PNDM, use_karras_sigmas=True)
    ours = samplers.get(name).from_config(SD15_PNDM, use_karras_sigmas=True)
    x0, eps = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    for sched in (theirs, ours):
        sched.set_timesteps(10)
        sched.set_begin_index(4)
    t = ours.timesteps[4:5]
    # diffusers keeps its sigmas in float32 (~3e-8); the schedule level at the rounded timestep was 2e-4 off
    torch.testing.assert_close(ours.add_noise(x0, eps, t), theirs.add_noise(x0, eps, t), rtol=1e-6, atol=1e-7)
    off_grid = torch.tensor([500])  # not a grid timestep: the schedule's own level
    alpha, sigma = ours.noise_schedule.alpha_sigma(500.0)
    torch.testing.assert_close(ours.add_noise(x0, eps, off_grid), float(alpha) * x0 + float(sigma) * eps)
