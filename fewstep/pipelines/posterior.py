"""Posterior sampling for inverse problems (DPS, PSLD, STSL) on VP diffusion models: the pixel-space digits model
(``digits-eps``, decoder = identity) and latent SD 1.x/2.x pipelines (decoder = the VAE).

``posterior_sample(pipe, operator, y, method="stsl", num_inference_steps=10)`` wraps the model into
``model_fn(z, i) -> (z0_hat, eps_hat)`` (any ``prediction_type``, DESIGN contract 2), builds the time grid from the
pipeline's scheduler config (diffusers spacing; ``strength < 1`` keeps the last part of a longer grid) and runs
the method from ``fewstep.guidance`` (``posterior.py``, ``stsl.py``). ``run_inverse_task`` restores held-out
test digits measured by a task's operator and scores PSNR, SSIM and the digits classifier's accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import guidance as guidance_lib
from .._checks import check_int
from ..datasets import held_out_digits
from ..guidance.operators import MeasurementOperator, make_operator
from ..guidance.posterior import InverseProblem, PosteriorMethod
from ..solvers.grids import spacing_grid
from ..solvers.parameterization import to_pair
from ..solvers.schedules import VPSchedule, is_flow_config
from .denoiser import unwrap_compiled
from .grad_state import check_autograd_available, frozen_parameters
from .loop_checks import check_generators

__all__ = ["POSTERIOR_TASKS", "DEFAULT_OPTIONS", "PosteriorOutput", "InverseTaskResult", "posterior_sample",
           "run_inverse_task", "default_method", "degraded_view", "held_out_digits", "score_restorations"]

#: tasks of ``run_inverse_task`` / ``fewstep generate --task ... --posterior`` (``guidance.operators`` names)
POSTERIOR_TASKS = ("inpaint", "random-inpaint", "sr", "sr-bicubic", "deblur", "motion-deblur")

#: per-method defaults on digits-eps (tuned by scripts/bench_inverse.py; see README "Inverse problems")
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "dps": {"step_size": 1.0},
    "psld": {"step_size": 1.0, "gluing": 0.1},
    "stsl": {"step_size": 2.0, "eta": 3.0, "trace_weight": "tweedie", "trace_sigma_min": 0.8, "inner_steps": 1,
             "strength": 0.5},
}


def default_method(name: str, **overrides) -> PosteriorMethod:
    """``guidance.get(name)`` built with this module's defaults for it, updated by ``overrides``."""
    if not guidance_lib.is_posterior(name):
        raise ValueError(f"unknown posterior method {name!r}; available: {', '.join(guidance_lib.names('posterior'))}")
    options = {**DEFAULT_OPTIONS.get(name, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return guidance_lib.make_posterior(name, **options)


@dataclass
class PosteriorOutput:
    """``images``: NCHW in the operator's image space (model range, nominally [-1, 1]); ``latents``: the final
    prior sample; ``nfe``: denoiser forward evaluations on the batch (probes included); ``grad_evals``: those
    backpropagated; ``seconds``: wall time."""

    images: torch.Tensor
    latents: torch.Tensor
    nfe: int
    grad_evals: int
    seconds: float
    method: dict = field(default_factory=dict)


def _is_sd(pipe: Any) -> bool:
    unet = getattr(pipe, "unet", None)
    return (unet is not None and type(unwrap_compiled(unet)).__name__ == "UNet2DConditionModel"
            and hasattr(pipe, "vae") and hasattr(pipe, "encode_prompt"))


class _Prior:
    """The denoiser of a supported pipeline as ``(z, t, alpha, sigma) -> (z0, eps)`` plus its decoder/encoder."""

    def __init__(self, pipe: Any, num_images: int, class_labels=None, prompt: str = ""):
        from .class_conditional import ClassConditionalPipeline
        from .fewstep_pipeline import FewstepPipeline

        if isinstance(pipe, FewstepPipeline):
            pipe = pipe.pipe
        self.frozen: list[torch.nn.Module] = []  # modules sampled through without parameter gradients
        config = dict(getattr(getattr(pipe, "scheduler", None), "config", {}) or {})
        if is_flow_config(config) or str(config.get("prediction_type", "")).startswith("flow"):
            raise ValueError(
                f"posterior sampling (dps, psld, stsl) needs a VP diffusion model; {type(pipe).__name__} here is a "
                "flow-matching model (e.g. digits-flow, SD3, Flux): use FlowChef (fewstep.pipelines.flowchef) for it"
            )
        self.pipe = pipe
        self.schedule = VPSchedule.from_config(config)
        self.config = config
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.n = num_images
        device = pipe._execution_device
        self.device = device
        if isinstance(pipe, ClassConditionalPipeline):
            self.kind = "pixel"
            self.unet = pipe.unet
            null = pipe.null_class
            labels = torch.full((num_images,), null, dtype=torch.long) if class_labels is None else \
                torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() != num_images or labels.min() < 0 or labels.max() > null:
                raise ValueError(f"`class_labels` must be {num_images} class ids in 0..{null} "
                                 f"({null} = unconditional), got {labels.tolist()}")
            self.cond = {"class_labels": labels.to(device)}
            cfg = pipe.unet.config
            self.shape = (num_images, cfg.in_channels, cfg.sample_size, cfg.sample_size)
            self.image_shape = self.shape
            self.decode = self.encode = None
        elif _is_sd(pipe):
            if getattr(pipe.unet.config, "addition_embed_type", None) is not None:
                raise ValueError("posterior sampling supports SD 1.x/2.x latent pipelines; SDXL's added conditions are "
                                 "not wired in")
            self.kind = "latent"
            self.unet = pipe.unet
            embeds = pipe.encode_prompt(prompt, device, 1, False)[0]
            self.cond = {"encoder_hidden_states": embeds.expand(num_images, *embeds.shape[1:])}
            vae = pipe.vae
            self.frozen.append(vae)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            size = pipe.unet.config.sample_size
            self.shape = (num_images, pipe.unet.config.in_channels, size, size)
            self.image_shape = (num_images, vae.config.in_channels, size * factor, size * factor)
            scale = float(vae.config.scaling_factor)
            # the solver's latents stay float32 for a half-precision pipeline: the VAE computes in its own dtype
            self.decode = lambda z: vae.decode((z / scale).to(vae.dtype)).sample.to(z.dtype)
            self.encode = lambda x: (vae.encode(x.to(vae.dtype)).latent_dist.mean * scale).to(x.dtype)
        else:
            raise ValueError(
                "posterior sampling supports the class-conditional digits pipelines (digits-eps) and SD 1.x/2.x "
                f"latent pipelines, got {type(pipe).__name__}"
            )
        self.frozen.append(self.unet)

    def __call__(self, z: torch.Tensor, t: float, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        reps = z.shape[0] // self.n  # STSL stacks probes along the batch
        cond = {k: v.repeat(reps, *([1] * (v.ndim - 1))) for k, v in self.cond.items()}
        t_batch = torch.full((z.shape[0],), float(t), device=z.device)
        out = self.unet(z.to(self.unet.dtype), t_batch, **cond).sample.to(z.dtype)
        return to_pair(out, z, alpha, sigma, self.prediction_type)


def _grid(prior: _Prior, num_inference_steps: int, strength: float):
    check_int("num_inference_steps", num_inference_steps, 1, numpy_ok=False)
    full = max(num_inference_steps, math.ceil(num_inference_steps / strength - 1e-9))
    grid = spacing_grid(prior.schedule, full, timestep_spacing=prior.config.get("timestep_spacing", "leading"),
                        steps_offset=int(prior.config.get("steps_offset", 0) or 0), final_sigmas_type="zero",
                        style="ddim")
    start = full - num_inference_steps
    return grid.timesteps[start:], grid.alphas[start:], grid.sigmas[start:]


def posterior_sample(
    pipe: Any,
    operator: MeasurementOperator,
    measurement: torch.Tensor,
    method: str | PosteriorMethod = "stsl",
    num_inference_steps: int = 10,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    class_labels=None,
    prompt: str = "",
) -> PosteriorOutput:
    """Sample ``p(z0 | y)`` for ``y = A D(z0) + n`` (``operator`` = A, ``measurement`` = y, one per image).

    ``method``: ``dps``, ``psld``, ``stsl`` (``DEFAULT_OPTIONS``) or a ``PosteriorMethod`` object. ``pipe``: a
    ``ClassConditionalPipeline`` of a VP model (unconditional by default: the null class; ``class_labels`` to
    condition) or an SD 1.x/2.x pipeline (``prompt``, default empty). ``latents``: the initial noise.
    ``generator``: one ``torch.Generator`` for the batch or a list of them, one per image (image ``n`` then gets
    the noise, DPS/PSLD's DDIM noise and STSL's probes it gets when sampled alone with ``generator[n]``).
    """
    check_autograd_available("posterior sampling")
    method = default_method(method) if isinstance(method, str) else guidance_lib.make_posterior(method)
    if not isinstance(measurement, torch.Tensor) or measurement.ndim != 4:
        raise ValueError(f"`measurement` must be an NCHW tensor, got {getattr(measurement, 'shape', measurement)!r}")
    prior = _Prior(pipe, measurement.shape[0], class_labels, prompt)
    operator.check_measurement(measurement, prior.image_shape)
    if measurement.shape[0] != prior.n:
        raise ValueError(f"`measurement` batch {measurement.shape[0]} must equal the number of images {prior.n}")
    check_generators(generator, prior.n)
    times, alphas, sigmas = _grid(prior, num_inference_steps, method.strength)
    dtype = prior.unet.dtype if prior.unet.dtype in (torch.float32, torch.float64) else torch.float32
    if latents is None:  # a list of generators: image n gets the noise it gets alone (diffusers' randn_tensor)
        noise = randn_tensor(prior.shape, generator=generator, device=prior.device, dtype=torch.float32).to(dtype)
    elif tuple(latents.shape) != prior.shape:
        raise ValueError(f"`latents` must have shape {prior.shape}, got {tuple(latents.shape)}")
    else:
        noise = latents.to(prior.device, dtype)
    problem = InverseProblem(operator, measurement.to(prior.device, dtype), prior.decode, prior.encode)

    def model_fn(z: torch.Tensor, i: int):
        return prior(z, times[i], float(alphas[i]), float(sigmas[i]))

    start = time.perf_counter()
    with frozen_parameters(*prior.frozen):  # gradients to the sample only; the caller's flags come back after
        result = method.sample(model_fn, problem, noise, alphas, sigmas, generator)
        with torch.no_grad():
            images = problem.to_image(result.sample)
    if not torch.isfinite(images).all():
        knobs = f"`step_size` (got {method.step_size})"
        if getattr(method, "gluing", 0):
            knobs += f" or `gluing` (got {method.gluing})"
        raise FloatingPointError(f"{method.name} produced NaN/Inf; lower {knobs}")
    return PosteriorOutput(images.detach(), result.sample, result.nfe, result.grad_evals,
                           time.perf_counter() - start, method.config())


def degraded_view(operator: MeasurementOperator, y: torch.Tensor) -> torch.Tensor:
    """The measurement as a picture of the image's size (SR: nearest upsampling; others: ``y`` itself)."""
    factor = getattr(operator, "factor", 1)
    return y.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1) if factor > 1 else y


@dataclass
class InverseTaskResult:
    images: torch.Tensor  # NCHW in [-1, 1]
    truth: torch.Tensor
    degraded: torch.Tensor
    labels: torch.Tensor
    nfe: int
    grad_evals: int
    seconds: float
    metrics: dict[str, float]
    method: dict


def score_restorations(images: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor, classifier=None) -> dict:
    """PSNR and SSIM (in [0, 1] range) against ``truth`` and the digits classifier's accuracy on ``labels``."""
    from ..bench.image_metrics import psnr, ssim
    from ..datasets import to_unit_range
    from .defaults import load_default

    a, b = to_unit_range(images.float().cpu()), to_unit_range(truth.float().cpu())
    classifier = classifier if classifier is not None else load_default("digits-classifier")
    with torch.no_grad():
        pred = classifier(images.float().cpu().clamp(-1, 1)).argmax(1)
    return {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean()),
            "accuracy": float((pred == labels).float().mean())}


def run_inverse_task(
    pipe: Any,
    task: str,
    method: str | PosteriorMethod = "stsl",
    num_images: int = 10,
    steps: int = 10,
    seed: int = 0,
    noise_std: float = 0.0,
    measurement: torch.Tensor | None = None,
    classifier=None,
    offset: int = 0,
) -> InverseTaskResult:
    """Restore held-out test digits measured by ``task``'s operator (seeded) with ``method``; metrics PSNR, SSIM,
    classifier accuracy. With ``measurement`` given (e.g. read from a file) it is restored instead (no metrics)."""
    if task not in POSTERIOR_TASKS:
        raise ValueError(f"unknown inverse task {task!r}; available: {', '.join(POSTERIOR_TASKS)}")
    size = pipe.unet.config.sample_size
    operator = make_operator(task, size=size, noise_std=noise_std)
    if measurement is None:
        truth, labels = held_out_digits(num_images, size, offset)
        y = operator.measure(truth, torch.Generator().manual_seed(seed + 1))
    else:
        truth = labels = None
        y = measurement
    out = posterior_sample(pipe, operator, y, method, steps, generator=torch.Generator().manual_seed(seed))
    metrics = score_restorations(out.images, truth, labels, classifier) if truth is not None else {}
    return InverseTaskResult(out.images, truth, degraded_view(operator, y), labels, out.nfe, out.grad_evals,
                             out.seconds, metrics, out.method)
