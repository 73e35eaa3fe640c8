"""``fewstep calibrate ems``: DPM-Solver-v3's empirical model statistics for a model (v3 app. C.1, D, J.2).

The estimation itself (streamed sums, JVPs) is ``fewstep.solvers.ems_estimate``; this module supplies the model
and the data: the embedded digits models (clean images from the training split, the null class as the
unconditional branch) and SD 1.x/2.x pipelines (latents the pipeline generates itself from prompts, as the
paper does for Stable Diffusion, and the empty prompt's embedding as the unconditional branch).
"""

from __future__ import annotations

import functools
import math
import os
import resource
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._checks import check_int
from ..pipelines.grad_state import eval_mode
from ..solvers.ems import EMS
from ..solvers.ems_estimate import estimate_ems, forward_ad_safe, model_eps_fn, weights_digest
from ..solvers.parameterization import compute_dtype
from ..solvers.s3 import schedule_fingerprint
from ..solvers.schedules import FlowSchedule, NoiseSchedule, schedule_from_config

__all__ = ["class_conditional_ems", "text_to_image_ems"]


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _schedule_and_prediction(config: Any) -> tuple[NoiseSchedule, str]:
    """The noise schedule of a scheduler config and the model's prediction type (flow configs: velocity)."""
    schedule = schedule_from_config(dict(config))
    if isinstance(schedule, FlowSchedule):
        return schedule, "flow"
    return schedule, config.get("prediction_type", "epsilon")


def _check_samples(num_samples: Any) -> int:
    check_int("num_samples", num_samples, 2, numpy_ok=False)
    return num_samples


def _run(unet, model_fn, data, schedule, prediction_type: str, meta: dict, **kw) -> EMS:
    device = data.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    meta = {**meta, "model_digest": weights_digest(unet)}  # a checkpoint of another model's run is refused
    with forward_ad_safe(unet):
        ems = estimate_ems(model_eps_fn(model_fn, schedule, prediction_type), data, schedule, meta=meta, **kw)
    ems.meta.update({"seconds": round(time.perf_counter() - start, 1),
                     "peak_memory_mib": round(_peak_memory_mib(device), 1), "device": str(device)})
    return ems


def _unet_in_eval_mode(fn):
    """Run ``fn(pipe, ...)`` with ``pipe.unet`` in eval mode, restoring the caller's ``training`` flags after."""

    @functools.wraps(fn)
    def wrapper(pipe: Any, *args: Any, **kwargs: Any) -> EMS:
        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, torch.nn.Module):
            return fn(pipe, *args, **kwargs)  # refused inside, with the function's own message
        with eval_mode(unet):
            return fn(pipe, *args, **kwargs)

    return wrapper


@_unet_in_eval_mode
def class_conditional_ems(
    pipe: Any,
    model: str,
    num_samples: int = 1024,
    num_intervals: int = 64,
    batch_size: int = 256,
    probes: int = 1,
    seed: int = 0,
    t_start: float | None = None,
    t_end: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    time_derivative: str = "difference",
) -> EMS:
    """EMS of a class-conditional digits pipeline (``digits-eps``, ``digits-flow``: VP or flow) on its
    unconditional (null-class) branch, from the first ``num_samples`` training images (v3 app. C.1.1: ``x0`` from
    the data, ``x = alpha x0 + sigma z``). ``time_derivative`` defaults to ``"difference"``: models trained on
    integer timesteps are rough in ``t`` (see ``solvers.ems_estimate.estimate_ems``); measured on digits-eps, EMS
    with the exact JVP time derivative did not beat DPM-Solver++, with the difference they do."""
    from ..datasets import load_digits_images

    _check_samples(num_samples)
    unet = pipe.unet  # in eval mode (the decorator), the caller's flags restored after
    size = int(unet.config.sample_size)
    data, _ = load_digits_images(size, "train")
    if num_samples > data.shape[0]:
        raise ValueError(f"`num_samples` {num_samples} exceeds the {data.shape[0]} training images")
    device = unet.device
    # the estimate (noised samples, model times, lambda) runs in float32 for a half-precision UNet (in bf16 the
    # model times round to multiples of 4 and reach t = 1000); the UNet sees its own dtype
    data = data[:num_samples].to(device=device, dtype=compute_dtype(unet.dtype))
    null = int(pipe.null_class)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)
        return unet(x.to(unet.dtype), t, class_labels=labels).sample.to(x.dtype)

    schedule, prediction_type = _schedule_and_prediction(pipe.scheduler.config)
    meta = {"model": model, "noise_schedule": schedule_fingerprint(schedule), "prediction_type": prediction_type,
            "branch": "unconditional (null class)", "data": f"digits training split, first {num_samples}"}
    return _run(unet, model_fn, data, schedule, prediction_type, meta, num_intervals=num_intervals,
                batch_size=batch_size, probes=probes, seed=seed, t_start=t_start, t_end=t_end, checkpoint=checkpoint,
                progress=progress, time_derivative=time_derivative)


@_unet_in_eval_mode
def text_to_image_ems(
    pipe: Any,
    model: str,
    prompts: Sequence[str],
    num_samples: int = 1024,
    num_intervals: int = 64,
    batch_size: int = 16,
    probes: int = 1,
    seed: int = 0,
    sample_steps: int = 20,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    time_derivative: str = "difference",
) -> EMS:
    """EMS of an SD 1.x/2.x pipeline (v3 app. J.2): ``x0`` are latents the pipeline generates itself (prompts
    cycled, ``sample_steps`` of fewstep's DPM-Solver++ at ``guidance_scale``), statistics of the unconditional
    branch (the empty prompt)."""
    from .. import samplers

    _check_samples(num_samples)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("`prompts` must hold at least one prompt")
    if not hasattr(pipe, "encode_prompt") or not hasattr(getattr(pipe, "unet", None), "config"):
        raise ValueError(f"EMS for text-to-image need an SD 1.x/2.x pipeline, got {type(pipe).__name__}")
    unet = pipe.unet  # in eval mode (the decorator), the caller's flags restored after
    device = unet.device
    gen_pipe = pipe.__class__(**pipe.components)
    gen_pipe.scheduler = samplers.get("dpm-solver++").from_config(pipe.scheduler.config)
    gen_pipe.set_progress_bar_config(disable=True)
    latents = []
    n_batches = math.ceil(num_samples / batch_size)
    from tqdm.auto import tqdm

    for b in tqdm(range(n_batches), desc="EMS data (model samples)", disable=not progress):
        k = min(batch_size, num_samples - b * batch_size)
        chosen = [prompts[(b * batch_size + j) % len(prompts)] for j in range(k)]
        gen = torch.Generator(device="cpu").manual_seed(seed * 100_003 + b)
        out = gen_pipe(chosen, num_inference_steps=sample_steps, guidance_scale=guidance_scale, height=height,
                       width=width, generator=gen, output_type="latent")
        latents.append(out.images.to(compute_dtype(unet.dtype)))
    data = torch.cat(latents).to(device)
    with torch.no_grad():
        uncond, _ = pipe.encode_prompt([""], device, 1, False)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x.to(unet.dtype), t, encoder_hidden_states=uncond.expand(x.shape[0], -1, -1)).sample.to(x.dtype)

    schedule, prediction_type = _schedule_and_prediction(pipe.scheduler.config)
    meta = {"model": model, "noise_schedule": schedule_fingerprint(schedule), "prediction_type": prediction_type,
            "branch": "unconditional (empty prompt)",
            "data": f"{num_samples} latents generated with dpm-solver++ {sample_steps} steps, CFG {guidance_scale:g}, "
                    f"{len(prompts)} prompts"}
    return _run(unet, model_fn, data, schedule, prediction_type, meta, num_intervals=num_intervals,
                batch_size=batch_size, probes=probes, seed=seed, t_start=t_start, t_end=t_end, checkpoint=checkpoint,
                progress=progress, time_derivative=time_derivative)
