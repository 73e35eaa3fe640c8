"""Real hub scheduler configs swapped into fewstep samplers (found by probing): Wan/SANA-style flow configs, Flux's
timestep preparation, outdated SD 1.x configs and clip_sample under guidance, source-default betas (Kandinsky's
UnCLIP prior, LCM) and DC-Solver artifacts on another model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from _helpers import FLUX_FLOW
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UnCLIPScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from test_fewstep_pipeline import _unet, _vae
from test_fewstep_pipeline_graph import sdxl  # noqa: F401 - fixture

from fewstep import guidance, samplers
from fewstep.guidance.stepping import guided_step
from fewstep.pipelines import FewstepPipeline

#: an SD 1.x config as outdated fine-tunes ship it: no `clip_sample` key (a DDIM built from it clips by default)
SD1_OUTDATED = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                "steps_offset": 1}  # fmt: skip


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(pooled: bool = False) -> dict:
    g = _gen(3)
    kw = {"prompt_embeds": torch.randn(1, 5, 16, generator=g),
          "negative_prompt_embeds": torch.randn(1, 5, 16, generator=g)}  # fmt: skip
    if pooled:
        kw.update(pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g))  # fmt: skip
    return kw


# ------------------------------------------------------------------------------------------- flow configs
@pytest.mark.parametrize("name", ["flow-euler", "flowchef"])
def test_flow_euler_samples_a_flow_shift_config_with_its_shift(name):
    """Wan 2.1 / SANA state their static shift as UniPC's ``flow_shift`` (``shift`` unset): flow-euler read only
    ``shift`` (default 1.0) and sampled them unshifted, while ddim/unipc honoured it."""
    wan = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    want = FlowMatchEulerDiscreteScheduler(shift=3.0)
    want.set_timesteps(4)
    for source in (wan.config, samplers.get("dpm-solver++").from_config(wan.config).config):
        sched = samplers.get(name).from_config(source)
        if name == "flowchef":
            sched.set_cost(lambda x0: x0.square().flatten(1).sum(1))
        sched.set_timesteps(4)
        assert sched.config.shift == 3.0
        np.testing.assert_allclose(sched.sigmas.numpy(), want.sigmas.numpy(), atol=1e-6)
    explicit = samplers.get(name).from_config(wan.config, shift=2.0)  # a keyword still wins
    assert explicit.config.shift == 2.0


def _as_flux_pipeline_prepares(sched, n: int, mu: float) -> np.ndarray:
    """FluxPipeline.__call__'s timestep preparation (diffusers 0.42): ``sigmas = linspace(1, 1/N, N)``, dropped for a
    scheduler whose config says ``use_flow_sigmas``."""
    sigmas = np.linspace(1.0, 1 / n, n)
    if getattr(sched.config, "use_flow_sigmas", False):
        sigmas = None
    timesteps, _ = retrieve_timesteps(sched, n, "cpu", sigmas=sigmas, mu=mu)
    return timesteps.numpy()


@pytest.mark.filterwarnings("ignore:dc-solver has no ratios")
@pytest.mark.parametrize("name,extra", [("ddim", {}), ("dc-solver", {"dc_base": "ddim"})])
def test_ddim_in_flux_pipeline_runs_flow_match_eulers_grid(name, extra):
    """fewstep's DDIM is FlowMatchEuler on flow configs, but it stated ``use_flow_sigmas=True`` (for diffusers'
    UniPC/DPM-Solver built back from its config), so FluxPipeline dropped its sigmas and DDIM ran its own grid (last
    call at s = 0.003 instead of 0.51 at 4 steps)."""
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    want = _as_flux_pipeline_prepares(FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW), 4, mu)
    sched = samplers.get(name).from_config(FLUX_FLOW, **extra)
    assert not sched.config.get("use_flow_sigmas", False)
    np.testing.assert_allclose(_as_flux_pipeline_prepares(sched, 4, mu), want, rtol=1e-5)


# ------------------------------------------------------------------------------------------- clip_sample
def test_guidance_clips_the_combined_x0_once_as_diffusers():
    """``clip_sample`` applies to the guided x0: diffusers clips the x0 of ``u + w (c - u)``; fewstep clipped each
    branch's x0, combined them (then up to ``w`` times past the range) and clipped again (O(1) off)."""
    sched = samplers.get("ddim").from_config(SD1_OUTDATED)
    assert sched.config.clip_sample
    g = _gen(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    out_c, out_u = 3 * torch.randn(1, 4, 8, 8, generator=g), 3 * torch.randn(1, 4, 8, 8, generator=g)
    ref, guided = sched, samplers.get("ddim").from_config(SD1_OUTDATED)
    ref.set_timesteps(3)
    guided.set_timesteps(3)
    a, b = x.clone(), x.clone()
    for i, t in enumerate(ref.timesteps):
        a = ref.step(out_u + 5.0 * (out_c - out_u), t, a).prev_sample
        b = guided_step(guided, guidance.CFG(5.0), out_c, out_u, t, b, i)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_clipping_ddim_in_fewstep_pipeline_equals_the_stock_sdxl_pipeline(sdxl):  # noqa: F811 - fixture
    """A clipping DDIM on SDXL (a config without ``clip_sample`` gives DDIM's default, True; the SDXL pipeline, unlike
    SD's, keeps it): FewstepPipeline's CFG, eager and the static step that CUDA graphs capture, must step as the stock
    pipeline does with the same scheduler."""
    kw = dict(**_embeds(pooled=True), num_inference_steps=3, guidance_scale=6.0, output_type="latent", height=8,
              width=8)
    ddim = samplers.get("ddim").from_config(sdxl.scheduler.config, clip_sample=True)
    stock = _quiet(StableDiffusionXLPipeline(**{**sdxl.components, "scheduler": ddim}))
    want = stock(**kw, generator=_gen(1)).images
    fp = FewstepPipeline.from_pipe(sdxl, scheduler=samplers.get("ddim").from_config(sdxl.scheduler.config,
                                                                                    clip_sample=True),
                                   guidance="cfg", guidance_scale=6.0)
    kw.pop("guidance_scale")
    for mode in ("eager", "static"):
        fp._loop_mode = mode
        torch.testing.assert_close(fp(**kw, generator=_gen(1)).images, want, rtol=1e-4, atol=1e-4, msg=mode)


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return _quiet(StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=_unet(), scheduler=PNDMScheduler.from_config(SD1_OUTDATED),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ))  # fmt: skip


def test_fewstep_pipeline_gives_a_new_scheduler_stable_diffusions_config_fixes(sd, caplog):
    """StableDiffusionPipeline sets ``clip_sample=False`` (and ``steps_offset=1``) on every scheduler it is built
    with; FewstepPipeline shares the pipeline's modules without its ``__init__``, so a DDIM from an outdated SD 1.x
    config clipped SD latents to [-1, 1] (11 off the stock pipeline at 3 steps). The base pipeline's own scheduler
    is left as it is."""
    kw = dict(**_embeds(), num_inference_steps=3, output_type="latent", height=8, width=8)
    ddim = samplers.get("ddim").from_config(sd.scheduler.config)
    stock = _quiet(StableDiffusionPipeline.from_pipe(sd, scheduler=ddim))
    assert stock.scheduler.config.clip_sample is False
    want = stock(**kw, guidance_scale=5.0, generator=_gen(0)).images
    with caplog.at_level(logging.WARNING, logger="fewstep.pipelines.sharing"):
        fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=5.0)
    assert "{'clip_sample': False}" in caplog.text
    assert fp.scheduler.config.clip_sample is False
    torch.testing.assert_close(fp(**kw, generator=_gen(0)).images, want, rtol=1e-4, atol=1e-4)
    offset = samplers.get("unipc").from_config(SD1_OUTDATED, steps_offset=0)
    FewstepPipeline.from_pipe(sd, scheduler=offset)
    assert offset.config.steps_offset == 1
    # the pipeline's own scheduler (an outdated DDIM assigned after __init__) is not touched
    sd_own = _quiet(StableDiffusionPipeline(**sd.components))
    sd_own.scheduler = samplers.get("ddim").from_config(SD1_OUTDATED)
    FewstepPipeline.from_pipe(sd_own)
    assert sd_own.scheduler.config.clip_sample is True


# ------------------------------------------------------------------------------------------- source-default betas
def test_a_vp_sources_default_betas_are_kept():
    """diffusers' ``from_config`` drops the keys a source left at its own defaults (``_use_default_values``), so the
    new class's defaults replaced them: Kandinsky 2.2's prior (``UnCLIPScheduler``: cosine betas by default) and an
    LCM config sampled linear betas (``alphas_cumprod`` 0.45 / 0.23 off). A hub JSON that omits them takes them from
    the class its ``_class_name`` names."""
    prior_json = {"_class_name": "UnCLIPScheduler", "clip_sample": True, "clip_sample_range": 10.0,
                  "num_train_timesteps": 1000, "prediction_type": "sample", "variance_type": "fixed_small_log"}
    lcm_json = {"_class_name": "LCMScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    for source_cls, raw in ((UnCLIPScheduler, prior_json), (LCMScheduler, lcm_json)):
        source = source_cls.from_config(raw)
        want = source.alphas_cumprod.double().numpy()
        for name in ("unipc", "dpm-solver++", "ddim"):
            for config in (source.config, raw):
                ours = samplers.get(name).from_config(config)
                np.testing.assert_allclose(ours.noise_schedule.alphas_cumprod, want, atol=1e-6,
                                           err_msg=f"{source_cls.__name__} -> {name}")
    given = samplers.get("unipc").from_config(UnCLIPScheduler.from_config(prior_json).config, beta_schedule="linear")
    assert given.config.beta_schedule == "linear"  # a keyword still wins
    # a source whose defaults are fewstep's own passes nothing extra (and a saved fewstep config round-trips)
    ddim_default = samplers.get("unipc").from_config(DDIMScheduler().config)
    assert ddim_default.config.beta_schedule == "linear" and ddim_default.config.beta_start == 0.0001


# ------------------------------------------------------------------------------------------- DC-Solver artifacts
@pytest.mark.parametrize("field,change", [
    ("prediction_type", {"prediction_type": "v_prediction"}),
    ("trained_betas", {"trained_betas": np.linspace(1e-4, 0.05, 1000).tolist()}),
    ("flow", {"shift": 3.0}),
])  # fmt: skip
def test_dc_ratio_files_refuse_another_model_process(field, change):
    """The shipped digits-eps ratios were accepted on a v-prediction model, on ``trained_betas`` and on a flow
    model (digits-eps's config otherwise): the ratio table's key had no prediction type, betas or flow settings (EMS
    and S3 artifacts check them). digits-eps's own config still loads them."""
    from pathlib import Path

    import fewstep

    own = dict(DDIMScheduler.from_pretrained(Path(fewstep.__file__).parent / "assets/digits-eps/scheduler").config)
    kw = dict(dc_ratios_file="digits-eps", dc_model="digits-eps", dc_guidance_scale=3.0)
    samplers.get("dc-solver").from_config(own, **kw).set_timesteps(5)
    # (a table made for such a model before these entered the key is refused too: the message says why)
    with pytest.raises(ValueError, match=rf"other scheduler settings \({field}: file None vs scheduler.*\); the file "
                                         rf"records no [\w/]*{field}.*calibrate ratios for this model"):
        samplers.get("dc-solver").from_config({**own, **change}, **kw).set_timesteps(5)
