"""fewstep's diffusers guiders inside a real modular pipeline: the denoise step of diffusers'
``StableDiffusionXLAutoBlocks`` on a tiny SDXL-shaped UNet (prompt embeddings given, no text encoders)."""

from __future__ import annotations

import pytest
import torch
from _helpers import SDXL_EULER
from diffusers import EulerDiscreteScheduler
from diffusers.guiders import AdaptiveProjectedGuidance
from diffusers.modular_pipelines import SequentialPipelineBlocks, StableDiffusionXLAutoBlocks
from test_fewstep_pipeline import _sdxl_embeds, sdxl  # noqa: F401 - the tiny SDXL-shaped pipeline fixture

from fewstep import samplers
from fewstep.guidance.guiders import APGGuider, CFGPlusPlusGuider
from fewstep.pipelines import FewstepPipeline


@pytest.fixture(scope="module")
def modular():
    blocks = SequentialPipelineBlocks.from_blocks_dict({"denoise": StableDiffusionXLAutoBlocks().sub_blocks["denoise"]})
    pipe = blocks.init_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, sdxl, guider, scheduler):  # noqa: F811
    pipe.update_components(unet=sdxl.unet, vae=sdxl.vae, scheduler=scheduler, guider=guider)
    generator = torch.Generator().manual_seed(0)
    return pipe(**_sdxl_embeds(), height=16, width=16, num_inference_steps=4, generator=generator, output="latents")


def test_apg_guider_in_a_modular_pipeline_equals_diffusers_apg(modular, sdxl):  # noqa: F811
    theirs = AdaptiveProjectedGuidance(guidance_scale=4.0, use_original_formulation=True, eta=0.0,
                                       adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=15.0)  # fmt: skip
    ours = APGGuider(guidance_scale=5.0, eta=0.0, momentum=-0.5, norm_threshold=15.0)  # paper w = diffusers' + 1
    a = _latents(modular, sdxl, theirs, samplers.get("unipc").from_config(SDXL_EULER))
    b = _latents(modular, sdxl, ours, samplers.get("unipc").from_config(SDXL_EULER))
    assert a.shape == (1, 4, 16, 16)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_cfgpp_guider_in_a_modular_pipeline_equals_fewstep_pipeline_cfgpp(modular, sdxl):  # noqa: F811
    """With a first-order scheduler the guider's per-step CFG scales are exact CFG++: the modular pipeline gives
    FewstepPipeline's CFG++ latents. The guider reads the grid from the scheduler it is given."""
    scheduler = samplers.get("ddim").from_config(SDXL_EULER)
    guider = CFGPlusPlusGuider(guidance_scale=0.6)
    with pytest.raises(ValueError, match="CFGPlusPlusGuider needs the scheduler"):
        _latents(modular, sdxl, guider, scheduler)
    guider.set_scheduler(scheduler)
    ours = _latents(modular, sdxl, guider, scheduler)
    fp = FewstepPipeline.from_pipe(sdxl, scheduler="ddim", guidance="cfg++", guidance_scale=0.6)
    ref = fp(**_sdxl_embeds(), height=16, width=16, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
             output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # a guider wired to the pipeline's own Euler scheduler reads its grid after the pipeline's set_timesteps (one
    # wired to another instance, which never got set_timesteps, read the 1000 training levels: now an error)
    euler_scheduler = EulerDiscreteScheduler.from_config(SDXL_EULER)
    euler = _latents(modular, sdxl, guider.__class__(guidance_scale=0.6, scheduler=euler_scheduler), euler_scheduler)
    assert torch.isfinite(euler).all()
    with pytest.raises(ValueError, match="EulerDiscreteScheduler has no sampling grid yet"):
        _latents(modular, sdxl, guider.__class__(guidance_scale=0.6, scheduler=EulerDiscreteScheduler.from_config(
            SDXL_EULER)), EulerDiscreteScheduler.from_config(SDXL_EULER))  # fmt: skip
