"""Pipeline plumbing shared by fewstep's pipelines: module sharing without casts, and the pixel-space outputs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..datasets import to_unit_range

__all__ = ["share_modules", "stable_diffusion_scheduler_fixes", "pixel_outputs", "PIXEL_OUTPUT_TYPES"]

logger = logging.getLogger(__name__)

PIXEL_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def share_modules(pipe: Any, **modules: Any) -> Any:
    """A second pipeline object over ``pipe``'s modules, with ``modules`` registered in place of its own; ``pipe``
    is left unchanged (its config, attributes and modules).

    Not diffusers' ``from_pipe``: that casts the new pipeline, and so every module it shares, to one dtype (float32
    unless told another), which would silently run a fp16 UNet in float32, mix dtypes in a half-precision SD3, or
    cast a float32 VAE kept beside a fp16 UNet.
    """
    shared = copy.copy(pipe)  # register_modules gives the copy its own config dict; the modules are shared
    shared.register_modules(**modules)
    return shared


#: the diffusers text-to-image pipeline of each hosted family: their image-to-image and inpainting siblings (same
#: modules) are hosted as these
_TEXT_TO_IMAGE = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                  "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}  # fmt: skip


def text_to_image_base(pipe: Any, family: str) -> Any:
    """``pipe`` itself, or, for an image-to-image or inpainting pipeline of a hosted family (diffusers'
    ``...Img2Img...`` and ``...Inpaint...`` classes), the family's text-to-image pipeline over the same modules, as
    diffusers' ``AutoPipelineForText2Image.from_pipe`` builds it (without casting anything). Their own
    ``check_inputs`` and ``prepare_latents`` take an image and a ``strength`` the text-to-image loop does not have.

    An SDXL refiner (``requires_aesthetics_score=True``) is refused: its UNet's added time embedding holds an aesthetic
    score where the text-to-image one holds the target size."""
    name = type(pipe).__name__
    target = _TEXT_TO_IMAGE.get(family)
    if target is None or not ("Img2Img" in name or "Inpaint" in name):
        return pipe
    if pipe.config.get("requires_aesthetics_score", False):
        raise ValueError(f"FewstepPipeline hosts text-to-image loops; this {name} has requires_aesthetics_score=True "
                         "(an SDXL refiner: its UNet is conditioned on an aesthetic score, not on a target size); use "
                         "it with a fewstep scheduler as it is (pipe.scheduler = fewstep.samplers.get(name)."
                         "from_config(pipe.scheduler.config))")  # fmt: skip
    import diffusers

    cls = getattr(diffusers, target)
    modules, optional = cls._get_signature_keys(cls)
    components = pipe.components
    kwargs = {key: components.get(key) for key in modules}
    for key in optional:
        if key in components:
            kwargs[key] = components[key]
        elif key in pipe.config and not (isinstance(pipe.config[key], (list, tuple)) and len(pipe.config[key]) == 2):
            kwargs[key] = pipe.config[key]  # a setting (requires_safety_checker, ...); [library, class] is a module
    if "add_watermarker" in optional:  # SDXL: an __init__ argument it does not register; keep the pipeline's choice
        kwargs["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    base = cls(**kwargs)
    base.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return base


def stable_diffusion_scheduler_fixes(pipe: Any, scheduler: Any) -> None:
    """Give ``scheduler`` the config fixes ``pipe``'s own ``__init__`` gives every scheduler it is built with, when
    ``pipe`` is diffusers' ``StableDiffusionPipeline`` (or a subclass): ``steps_offset = 1`` and ``clip_sample = False``
    (outdated SD 1.x configs; a DDIM built from a PNDM config that has no ``clip_sample`` key clips ``x0`` to
    ``[-1, 1]``, by its default, which ruins SD latents). ``share_modules`` bypasses that ``__init__``, so without this
    a scheduler hosted by ``FewstepPipeline`` ran other steps than ``StableDiffusionPipeline.from_pipe(pipe,
    scheduler=...)`` does with the same scheduler. Changed in place with a warning, as diffusers does."""
    from diffusers import StableDiffusionPipeline

    if not isinstance(pipe, StableDiffusionPipeline):
        return
    fixes = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if getattr(scheduler.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    if fixes:
        logger.warning("%s's config set to %s, as StableDiffusionPipeline sets it for every scheduler (an outdated "
                       "SD config)", type(scheduler).__name__, fixes)
        scheduler.register_to_config(**fixes)  # (fewstep's override also takes them off `_use_default_values`)


def pixel_outputs(x: torch.Tensor, output_type: str, to_pil: Callable[[Any], Any] | None = None) -> Any:
    """The outputs of a pipeline whose model works in pixel space on ``[-1, 1]`` (the digits pipelines): ``x``
    itself (``"latent"``), NCHW in ``[0, 1]`` (``"pt"``), NHWC numpy in ``[0, 1]`` (``"np"``) or PIL images
    (``"pil"``, through ``to_pil``, e.g. a pipeline's ``numpy_to_pil``)."""
    allowed = PIXEL_OUTPUT_TYPES if to_pil is not None else tuple(t for t in PIXEL_OUTPUT_TYPES if t != "pil")
    if output_type not in allowed:
        raise ValueError(f"`output_type` must be one of {list(allowed)}, got {output_type!r}")
    if output_type == "latent":
        return x
    images = to_unit_range(x.float())
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    return to_pil(array) if output_type == "pil" else array
