"""Mutation gaps in ``pipelines/swap.py`` (``swap_sampler``) and ``pipelines/sharing.py`` (module sharing, the
text-to-image sibling of an img2img pipeline, Stable Diffusion's scheduler config fixes), each checked against
diffusers' own behaviour or values read back explicitly."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from _helpers import SDXL_EULER
from diffusers import (
    AutoencoderKL,
    AutoPipelineForText2Image,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from fewstep import samplers
from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.sharing import stable_diffusion_scheduler_fixes
from fewstep.pipelines.swap import swap_sampler


def _listed(message: str) -> list[str]:
    return message.split("compatible samplers: ")[1].split(", ")


# ----------------------------------------------------------------------------------------------- swap_sampler
def test_swap_sampler_builds_from_the_pipelines_config_and_returns_the_pipe():
    """The new scheduler keeps the pipeline's training settings (read back), takes the caller's options on top,
    and the pipeline object itself is returned."""
    pipe = SimpleNamespace(scheduler=DDPMScheduler(num_train_timesteps=123, beta_end=0.03,
                                                   prediction_type="v_prediction"))
    assert swap_sampler(pipe, "unipc", solver_order=1) is pipe
    config = pipe.scheduler.config
    assert type(pipe.scheduler) is samplers.get("unipc")
    assert (config.num_train_timesteps, config.beta_end, config.prediction_type) == (123, 0.03, "v_prediction")
    assert config.solver_order == 1


def test_swap_sampler_mrs_gets_the_models_lambda_unless_given():
    from fewstep.pipelines import load_default

    pipe = load_default("digits-mr", sampler=None)
    assert swap_sampler(pipe, "mrs").scheduler.config.stationary_std == pytest.approx(float(pipe.config.stationary_std))
    assert swap_sampler(pipe, "mrs", stationary_std=0.3).scheduler.config.stationary_std == 0.3


@pytest.mark.parametrize("flow", [False, True])
def test_swap_sampler_refusal_lists_exactly_the_samplers_of_the_pipelines_process(flow):
    """A diffusion pipeline is offered every diffusion sampler and nothing else (no mean-reverting, no flow-only
    sampler); a flow-matching one (diffusers' FlowMatchEulerDiscreteScheduler) also the flow samplers."""
    pipe = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler() if flow else DDPMScheduler())
    with pytest.raises(ValueError, match="is for mean-reverting") as info:
        swap_sampler(pipe, "mrs")
    listed = _listed(str(info.value))
    processes = {samplers.process_of(name) for name in listed}
    assert processes == ({"diffusion", "flow"} if flow else {"diffusion"})
    assert "mrs" not in listed and {"ddim", "unipc", "dpm-solver++"} <= set(listed)
    assert ("flow-euler" in listed) is flow


# ---------------------------------------------------------------------- Stable Diffusion's scheduler fixes
def _sd_pipeline(scheduler, cls=StableDiffusionPipeline):
    """diffusers' own ``__init__`` over no modules: it applies (or, for SDXL, skips) its scheduler config fixes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is StableDiffusionPipeline:
            return cls(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=scheduler,
                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return cls(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=None,
                   scheduler=scheduler, add_watermarker=False)


SCHEDULERS = {
    "unipc-offset0": lambda: samplers.get("unipc")(steps_offset=0),  # no clip_sample key
    "unipc-ok": lambda: samplers.get("unipc")(steps_offset=1),
    "dpm-clip-missing": lambda: samplers.get("dpm-solver++")(steps_offset=1),
    "ddim-clip-offset2": lambda: samplers.get("ddim")(clip_sample=True, steps_offset=2),
    "ddim-ok": lambda: samplers.get("ddim")(clip_sample=False, steps_offset=1),
    "diffusers-ddim-default": lambda: DDIMScheduler(),  # clip_sample=True, steps_offset=0
    "diffusers-pndm-offset0": lambda: PNDMScheduler(steps_offset=0),
    "flow-no-keys": lambda: FlowMatchEulerDiscreteScheduler(),  # neither key
}


def _settings(scheduler) -> dict:
    """The config's settings (diffusers' own fix rebuilds the dict with ``_class_name`` and friends in it)."""
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}


@pytest.mark.parametrize("cls", [StableDiffusionPipeline, StableDiffusionXLPipeline])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_fixes_equal_what_the_diffusers_pipeline_init_does(name, cls, caplog):
    """The reference: the same scheduler handed to diffusers' ``cls.__init__`` (SD fixes ``steps_offset`` and
    ``clip_sample`` only when present and wrong; SDXL fixes nothing). The settings must come out equal, and the
    warning is logged exactly when something changed."""
    make = SCHEDULERS[name]
    reference, ours, untouched = make(), make(), make()
    _sd_pipeline(reference, cls)
    host = _sd_pipeline(make(), cls)
    with caplog.at_level(logging.WARNING, logger="fewstep.pipelines.sharing"):
        stable_diffusion_scheduler_fixes(host, ours)
    assert _settings(ours) == _settings(reference)
    changed = _settings(reference) != _settings(untouched)
    assert ("as StableDiffusionPipeline sets it" in caplog.text) is changed
    if changed:  # the warning names the fixes, as diffusers' config shows them
        fixes = {k: v for k, v in _settings(reference).items() if _settings(untouched).get(k) != v}
        assert fixes and all(f"{k!r}: {v!r}" in caplog.text for k, v in fixes.items())


# ------------------------------------------------------------------ an img2img sibling hosted as text-to-image
def _tiny_sdxl_img2img(**settings):
    from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=56,
    )  # fmt: skip
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER), feature_extractor=CLIPImageProcessor(),
        add_watermarker=False, **settings,
    )  # fmt: skip


def test_img2img_sibling_keeps_its_settings_components_and_progress_bar():
    """Reference: diffusers' ``AutoPipelineForText2Image.from_pipe`` on the same sibling: the registered setting
    ``force_zeros_for_empty_prompt=False`` is kept and every module (an optional ``feature_extractor`` included)
    is the same object. The sibling's progress-bar settings carry over too."""
    sibling = _tiny_sdxl_img2img(force_zeros_for_empty_prompt=False)
    sibling.set_progress_bar_config(disable=True, desc="sibling")
    reference = AutoPipelineForText2Image.from_pipe(sibling)
    hosted = FewstepPipeline.from_pipe(sibling, scheduler="ddim").pipe
    assert type(hosted) is type(reference) is StableDiffusionXLPipeline
    assert hosted.config.force_zeros_for_empty_prompt is reference.config.force_zeros_for_empty_prompt is False
    for key in ("unet", "vae", "feature_extractor"):
        assert getattr(hosted, key) is getattr(reference, key) is getattr(sibling, key)
    assert hosted.feature_extractor is not None
    assert hosted._progress_bar_config == {"disable": True, "desc": "sibling"}
    assert hosted.scheduler is not sibling.scheduler and sibling.config.force_zeros_for_empty_prompt is False
