"""``fewstep generate``: load a model (embedded default, local diffusers pipeline or hub id), swap in a
fewstep sampler, generate, and tile the images into one PNG grid."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import samplers
from .._checks import check_bool, check_int
from .defaults import DEFAULT_MODELS
from .loop_checks import raise_if_diverged
from .swap import swap_sampler

__all__ = ["GenerationResult", "load_model", "load_measurement", "generate", "image_grid", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: embedded models `fewstep generate` can run (digits-mr restores degraded digits; the classifier only classifies)
GENERATORS = ("digits-eps", "digits-flow", "digits-mr")


@dataclass
class GenerationResult:
    images: np.ndarray  # NHWC floats in [0, 1]
    nfe: int
    seconds: float
    measurements: np.ndarray | None = None  # restoration models: the degraded inputs, NHWC in [0, 1]
    guided: bool = False  # each step evaluated the unconditional branch too (CFG and the other rules)


def load_measurement(path: str | Path, tile: int, flag: str = "--measurement") -> torch.Tensor:
    """Degraded images for a restoration model (or source images to edit) from an image file: grayscale, cut into
    ``tile x tile`` tiles (row-major), returned NCHW in [-1, 1]. A single digit is a 16x16 image; a strip of them
    is several. ``flag`` names the option in error messages."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r}: no such file")
    try:
        with Image.open(p) as img:
            gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise ValueError(f"{flag} {str(path)!r} is not a readable image: {exc}") from None
    h, w = gray.shape
    if h % tile or w % tile:
        verb = "restores" if flag == "--measurement" else "edits"
        raise ValueError(
            f"{flag} {str(path)!r} is {w}x{h} pixels; the model {verb} {tile}x{tile} images, so the "
            f"file must be one {tile}x{tile} image or a grid of them (width and height multiples of {tile})"
        )
    tiles = gray.reshape(h // tile, tile, w // tile, tile).transpose(0, 2, 1, 3).reshape(-1, 1, tile, tile)
    return torch.from_numpy(tiles.copy()) * 2 - 1


def _held_out_measurements(num_images: int, size: int, seed: int) -> torch.Tensor:
    """Held-out test digits with the ``digits-mr`` degradation (a 6x6 box erased), seeded."""
    from ..datasets import held_out_digits
    from .mean_reverting import box_inpainting

    images, _ = held_out_digits(num_images, size)
    return box_inpainting(images, generator=torch.Generator().manual_seed(seed))


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"`device` {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r} requested but CUDA is not available here; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"`device` {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` {device!r} ({dev.type}) is not supported here; use auto, cpu, cuda or cuda:N")
    return dev


def load_model(
    model: str, sampler: str, device: str = "auto", dtype: str = "float32", sampler_options: dict | None = None
):
    """A pipeline for ``model`` with ``sampler`` swapped in: an embedded name, a local pipeline directory,
    or a hub id (needs the weights cached or a connection). ``sampler_options`` override the sampler's
    config (e.g. ``{"momentum_order": 3.8}`` for ``hb``); unknown names are an error."""
    from .defaults import default_sampler_options, load_default

    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}")
    dev = _resolve_device(device)
    samplers.get(sampler)  # an unknown name fails before anything is loaded
    torch_dtype = DTYPES[dtype]
    if model in DEFAULT_MODELS:
        if model not in GENERATORS:
            raise ValueError(f"`model` {model!r} is not an image generator; choose one of {', '.join(GENERATORS)}")
        pipe = load_default(model, sampler=None, device=dev, dtype=torch_dtype)
        options = {**default_sampler_options(model, sampler, with_schedule=True), **(sampler_options or {})}
        if (sampler_options or {}).get("degenerated"):
            options.pop("ems_file", None)
        return swap_sampler(pipe, sampler, **options)
    from diffusers import DiffusionPipeline

    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        raise ValueError(
            f"`model` {model!r} is neither an embedded model ({', '.join(DEFAULT_MODELS)}) nor a diffusers "
            "pipeline directory (no model_index.json there) nor a hub id like 'org/name'"
        )
    if looks_local:
        _check_model_index(path / "model_index.json")
    try:
        # fewstep's own pipeline classes are registered in diffusers' namespace (fewstep.pipelines)
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load `model` {model!r}: {str(exc).splitlines()[0]} -- without a network connection "
            "a hub id only works when its weights are in the local Hugging Face cache"
        ) from None
    except (KeyError, AttributeError, TypeError) as exc:  # a malformed model_index.json or component config
        raise ValueError(f"could not load `model` {model!r}: {type(exc).__name__}: {exc}") from None
    return swap_sampler(pipe, sampler, **(sampler_options or {})).to(dev)


def _check_model_index(path: Path) -> None:
    """A diffusers ``model_index.json``: a JSON object naming a pipeline class diffusers (or fewstep) provides."""
    import json

    import diffusers

    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"`model` {str(path.parent)!r}: {path.name} is not readable JSON ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ValueError(f"`model` {str(path.parent)!r}: {path.name} must be a JSON object with the pipeline's "
                         "\"_class_name\" (a diffusers pipeline directory)")  # fmt: skip
    name = index["_class_name"]
    from .. import pipelines as fewstep_pipelines

    if getattr(diffusers, name, None) is None and getattr(fewstep_pipelines, name, None) is None:
        raise ValueError(f"`model` {str(path.parent)!r}: {path.name} names pipeline class {name!r}, which neither "
                         f"diffusers {diffusers.__version__} nor fewstep provides")  # fmt: skip


def _restores_progress_bar_config(fn):
    """Run ``fn(pipe, ...)`` and give ``pipe`` back its own progress-bar settings afterwards: ``generate`` sets the
    bar for its run (``progress``), which must not outlive the call (a later plain ``pipe(...)`` showed a "sampling"
    bar, or none)."""

    @functools.wraps(fn)
    def wrapper(pipe: Any, *args: Any, **kwargs: Any) -> GenerationResult:
        missing = object()
        saved = getattr(pipe, "_progress_bar_config", missing)
        saved = dict(saved) if isinstance(saved, dict) else saved
        try:
            return fn(pipe, *args, **kwargs)
        finally:
            if saved is missing:
                if "_progress_bar_config" in getattr(pipe, "__dict__", {}):
                    del pipe._progress_bar_config
            else:
                pipe._progress_bar_config = saved

    return wrapper


@_restores_progress_bar_config
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
    measurement: torch.Tensor | None = None,
    compile: bool | str | dict | None = None,
    cuda_graph: bool = False,
    guidance_options: dict[str, Any] | None = None,
) -> GenerationResult:
    """Run the pipeline once; class-conditional pipelines take ``classes``, text-to-image ones ``prompt``,
    restoration (mean-reverting) ones ``measurement`` (NCHW in [-1, 1]; default: held-out test digits with
    a box erased).

    ``guidance``: ``cfg``, ``cfg++`` or ``apg`` (``fewstep.guidance``) with ``guidance_scale`` (``None``: the
    rule's default; CFG 3). SD 1.x/2.x, SDXL, SD3 and Flux pipelines run in ``FewstepPipeline`` (any rule;
    on Flux ``cfg`` is its distilled guidance embedding, default 3.5, and ``cfg++``/``apg`` run true guidance
    against the empty prompt); other text-to-image pipelines support ``cfg`` only. ``guidance_options``: the
    rule's other arguments (``fewstep.guidance.make``), e.g. ``{"eta": 0.5}`` for APG or ``{"history":
    "unconditional"}`` for CFG++ (not for Flux's distilled guidance embedding nor for pipelines outside
    ``FewstepPipeline``).

    ``compile``: ``torch.compile`` the denoiser (``True``, a mode name or a dict of its arguments; the digits
    pipelines and ``FewstepPipeline``). ``cuda_graph=True``: ``FewstepPipeline``'s CUDA-graph mode (the pipelines
    it hosts, digits included, on a CUDA device only).
    """
    from .. import guidance as guidance_rules
    from .class_conditional import ClassConditionalPipeline
    from .mean_reverting import MeanRevertingPipeline

    check_int("num_images", num_images, 1, numpy_ok=False)
    check_int("steps", steps, 1, numpy_ok=False)
    if guidance_options is not None and not isinstance(guidance_options, dict):
        raise ValueError(f"`guidance_options` must be a dict of the rule's arguments, got {guidance_options!r}")
    options = dict(guidance_options or {})
    if "guidance_scale" in options:
        raise ValueError("`guidance_options` must not hold `guidance_scale`; pass it as `guidance_scale`")
    if options and isinstance(pipe, MeanRevertingPipeline):
        raise ValueError(f"`guidance_options` {options}: a restoration (mean-reverting) model is guided by its "
                         "measurement, not by a guidance rule")
    name = guidance
    if options:  # the rule is built once, here (bad options fail before sampling); the branches below take it
        guidance, guidance_scale = guidance_rules.make(guidance, guidance_scale, **options), None
    check_bool("cuda_graph", cuda_graph)
    from .fewstep_pipeline import FewstepPipeline

    if cuda_graph and not FewstepPipeline.supports(pipe):
        raise ValueError(f"`cuda_graph` needs a pipeline FewstepPipeline hosts (SD 1.x/2.x, SDXL, SD3, Flux, or a "
                         f"class-conditional digits model); got {type(pipe).__name__}")
    if compile and isinstance(pipe, MeanRevertingPipeline):
        raise ValueError("`compile` applies to the digits generators and FewstepPipeline, not to a restoration model")
    pipe.set_progress_bar_config(disable=not progress, desc="sampling")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    if measurement is not None and not isinstance(pipe, MeanRevertingPipeline):
        raise ValueError("`measurement` is for restoration (mean-reverting) models such as digits-mr")
    if isinstance(pipe, MeanRevertingPipeline):
        if classes or prompt is not None:
            raise ValueError("a restoration model takes no --class/--prompt; pass --measurement IMAGE (or nothing)")
        size = pipe.unet.config.sample_size
        mu = measurement if measurement is not None else _held_out_measurements(num_images, size, seed)
        restored = pipe(mu, num_inference_steps=steps, generator=generator, output_type="np").images
        seconds = time.perf_counter() - start
        degraded = ((mu.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return GenerationResult(np.asarray(restored, dtype=np.float32), len(pipe.scheduler.timesteps), seconds,
                                degraded)
    if isinstance(pipe, ClassConditionalPipeline):
        if prompt is not None:
            raise ValueError("`prompt` given to a class-conditional model; use --class with digits 0-9 instead")
        pool = classes if classes else list(range(pipe.num_classes))
        labels = [pool[i % len(pool)] for i in range(num_images)]
        rule = guidance_rules.make(guidance, guidance_scale)
        pipe = FewstepPipeline.from_pipe(pipe, guidance=rule, compile=compile or False, cuda_graph=cuda_graph)
        images = pipe(class_labels=labels, num_inference_steps=steps, generator=generator, output_type="np",
                      check_finite=True).images  # fmt: skip
    else:
        if classes:
            raise ValueError("`classes` given to a text-to-image pipeline; use --prompt instead")
        if not prompt:
            raise ValueError("this pipeline is text-to-image: pass --prompt")
        extra: dict = {}
        hosting = {"compile": compile or False, "cuda_graph": cuda_graph}
        is_cfg = guidance_rules.get(name) is guidance_rules.CFG
        if options and not FewstepPipeline.supports(pipe):
            raise ValueError(f"`guidance_options` {options} need a pipeline FewstepPipeline hosts (SD 1.x/2.x, SDXL, "
                             f"SD3, Flux); {type(pipe).__name__} runs its own CFG")
        if FewstepPipeline.family_of(pipe) == "flux":
            if is_cfg and options:
                raise ValueError(f"`guidance_options` {options}: Flux's `cfg` is its distilled guidance embedding, "
                                 "which takes no rule options; use cfg++ or apg for true guidance")
            # Flux: plain CFG is the distilled guidance embedding; other rules run true CFG vs the empty prompt
            pipe = FewstepPipeline.from_pipe(pipe, guidance=None if is_cfg else guidance, guidance_scale=guidance_scale,
                                             **hosting)
            extra = {} if is_cfg else {"negative_prompt": ""}
        elif FewstepPipeline.supports(pipe):  # fewstep's loop: any guidance rule
            if guidance_scale is None and is_cfg and not options:  # (a rule built with options has CFG's 3)
                guidance_scale = 3.0
            pipe = FewstepPipeline.from_pipe(pipe, guidance=guidance, guidance_scale=guidance_scale, **hosting)
        elif compile:
            raise ValueError(f"`compile` needs an SD 1.x/2.x, SDXL, SD3 or Flux pipeline (FewstepPipeline) or an "
                             f"embedded digits model; got {type(pipe).__name__}")
        elif not is_cfg:
            raise ValueError(
                f"`guidance` {guidance!r} needs an SD 1.x/2.x, SDXL, SD3 or Flux pipeline (FewstepPipeline) or an "
                f"embedded digits model; {type(pipe).__name__} supports cfg only"
            )
        else:
            guidance_scale = 3.0 if guidance_scale is None else guidance_scale
        images = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale, **extra,
                      generator=generator, num_images_per_prompt=num_images, output_type="np").images
    seconds = time.perf_counter() - start
    nfe = len(pipe.scheduler.timesteps)
    if isinstance(pipe, FewstepPipeline):
        guided = pipe.last_call_guided
    else:  # a diffusers text-to-image pipeline: its own per-call property
        guided = bool(getattr(pipe, "do_classifier_free_guidance", False))
    return GenerationResult(np.asarray(images, dtype=np.float32), nfe, seconds, guided=guided)


def image_grid(images: np.ndarray, columns: int | None = None, min_cell: int = 96) -> Image.Image:
    """Tile NHWC images in [0, 1] into one picture, upscaled (nearest) so each cell is >= ``min_cell`` px."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"`images` must be a non-empty NHWC array, got shape {images.shape}")
    raise_if_diverged(images)
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
