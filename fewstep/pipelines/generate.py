"""``fewstep generate``: load a model (embedded default, local diffusers pipeline or hub id), swap in a
fewstep sampler, generate, and tile the images into one PNG grid."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import samplers
from .defaults import DEFAULT_MODELS

__all__ = ["GenerationResult", "load_model", "generate", "image_grid", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: embedded models `fewstep generate` can sample from (digits-mr restores images, digits-classifier classifies)
GENERATORS = ("digits-eps", "digits-flow")


@dataclass
class GenerationResult:
    images: np.ndarray  # NHWC floats in [0, 1]
    nfe: int
    seconds: float


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"`device` {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r} requested but CUDA is not available here; use cpu")
    return dev


def load_model(model: str, sampler: str, device: str = "auto", dtype: str = "float32"):
    """A pipeline for ``model`` with ``sampler`` swapped in: an embedded name, a local pipeline directory,
    or a hub id (needs the weights cached or a connection)."""
    from .defaults import load_default

    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}")
    dev = _resolve_device(device)
    sampler_cls = samplers.get(sampler)
    torch_dtype = DTYPES[dtype]
    if model in DEFAULT_MODELS:
        if model not in GENERATORS:
            raise ValueError(f"`model` {model!r} is not an image generator; choose one of {', '.join(GENERATORS)}")
        return load_default(model, sampler=sampler, device=dev, torch_dtype=torch_dtype)
    from diffusers import DiffusionPipeline

    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        raise ValueError(
            f"`model` {model!r} is neither an embedded model ({', '.join(DEFAULT_MODELS)}) nor a diffusers "
            "pipeline directory (no model_index.json there) nor a hub id like 'org/name'"
        )
    try:
        # fewstep's own pipeline classes are registered in diffusers' namespace (fewstep.pipelines)
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load `model` {model!r}: {str(exc).splitlines()[0]} -- without a network connection "
            "a hub id only works when its weights are in the local Hugging Face cache"
        ) from None
    pipe.scheduler = sampler_cls.from_config(pipe.scheduler.config)
    return pipe.to(dev)


def generate(
    pipe,
    num_images: int = 10,
    steps: int = 10,
    seed: int = 0,
    classes: list[int] | None = None,
    prompt: str | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    guidance: str = "cfg",
) -> GenerationResult:
    """Run the pipeline once; class-conditional pipelines take ``classes``, text-to-image ones ``prompt``.

    ``guidance``: ``cfg``, ``cfg++`` or ``apg`` (``fewstep.guidance``) with ``guidance_scale`` (``None``: the
    rule's default; CFG 3). Text-to-image pipelines support ``cfg`` only for now.
    """
    from .. import guidance as guidance_rules
    from .class_conditional import ClassConditionalPipeline

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"`num_images` must be an integer >= 1, got {num_images!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}")
    pipe.set_progress_bar_config(disable=not progress, desc="sampling")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    if isinstance(pipe, ClassConditionalPipeline):
        if prompt is not None:
            raise ValueError("`prompt` given to a class-conditional model; use --class with digits 0-9 instead")
        pool = classes if classes else list(range(pipe.num_classes))
        labels = [pool[i % len(pool)] for i in range(num_images)]
        rule = guidance_rules.make(guidance, guidance_scale)
        images = pipe(labels, num_inference_steps=steps, guidance=rule, generator=generator, output_type="np").images
    else:
        if classes:
            raise ValueError("`classes` given to a text-to-image pipeline; use --prompt instead")
        if not prompt:
            raise ValueError("this pipeline is text-to-image: pass --prompt")
        from .fewstep_pipeline import FewstepPipeline

        if guidance_scale is None and guidance_rules.get(guidance) is guidance_rules.CFG:
            guidance_scale = 3.0
        if FewstepPipeline.supports(pipe):  # fewstep's loop: any guidance rule
            pipe = FewstepPipeline.from_pipe(pipe, guidance=guidance, guidance_scale=guidance_scale)
        elif guidance_rules.get(guidance) is not guidance_rules.CFG:
            raise ValueError(
                f"`guidance` {guidance!r} needs an SD 1.x/2.x or SDXL pipeline (FewstepPipeline) or an embedded "
                f"digits model; {type(pipe).__name__} supports cfg only"
            )
        images = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generator, num_images_per_prompt=num_images, output_type="np").images
    seconds = time.perf_counter() - start
    nfe = len(pipe.scheduler.timesteps)
    return GenerationResult(np.asarray(images, dtype=np.float32), nfe, seconds)


def image_grid(images: np.ndarray, columns: int | None = None, min_cell: int = 96) -> Image.Image:
    """Tile NHWC images in [0, 1] into one picture, upscaled (nearest) so each cell is >= ``min_cell`` px."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"`images` must be a non-empty NHWC array, got shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or min(n, 10)
    rows = math.ceil(n / columns)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    pad = 2
    canvas = np.zeros((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, c), dtype=np.float32)
    for k in range(n):
        r, col = divmod(k, columns)
        tile = images[k].repeat(scale, axis=0).repeat(scale, axis=1)
        y, x = pad + r * (h * scale + pad), pad + col * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = tile
    array = (canvas.clip(0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if c == 1 else array)
