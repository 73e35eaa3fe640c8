"""Restoration with a mean-reverting (IR-SDE) diffusion model: the ``digits-mr`` pipeline.

The model was trained on ``z = (x - mu) / lam`` (``mu`` the degraded image, ``lam`` the SDE's stationary
std), which is a VP process (see ``fewstep.solvers.schedules.mean_reverting_alphas_cumprod``); any fewstep
VP scheduler therefore samples it in ``z``, starting from ``x_T = mu + lam * noise``, and so does a diffusers
``DDPMScheduler`` (IR-SDE's posterior sampling is DDPM's ancestral step in ``z``). The MR sampler ``mrs``
works on ``x`` itself and takes ``mu`` in its ``step``. The UNet sees ``concat(x_t, mu)`` and predicts the noise.
"""

from __future__ import annotations

import warnings

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .._checks import check_bool, check_int
from ..guidance.stepping import step_kwargs
from ..samplers.mrs import FewstepMRSScheduler
from .loop_checks import FiniteWatch, check_generators
from .sharing import PIXEL_OUTPUT_TYPES, pixel_outputs

__all__ = ["MeanRevertingPipeline", "box_inpainting"]


def box_inpainting(images: torch.Tensor, box: int = 6, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``digits-mr`` degradation: a random ``box x box`` square set to background (-1) in each image."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = (f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(f"`images` must be a floating NCHW tensor in [-1, 1] (the box is set to -1), got {got}")
    n, _, h, w = images.shape
    box = check_int("box", box, 1, min(h, w))
    ys = torch.randint(0, h - box + 1, (n,), generator=generator)
    xs = torch.randint(0, w - box + 1, (n,), generator=generator)
    out = images.clone()
    for i in range(n):
        out[i, :, ys[i]:ys[i] + box, xs[i]:xs[i] + box] = -1.0
    return out


class MeanRevertingPipeline(DiffusionPipeline):
    """``unet`` (input ``concat(x_t, mu)``, noise prediction) + ``scheduler`` (the VP schedule of ``z``)."""

    model_cpu_offload_seq = "unet"

    @register_to_config
    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, stationary_std: float = 0.4):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        num_inference_steps: int = 10,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        check_finite: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Restore ``measurement`` (NCHW in [-1, 1], the degraded images ``mu``); images come back in [0, 1]
        (``output_type`` ``"np"``, ``"pt"`` or ``"pil"``; ``"latent"``: the restored sample itself, in [-1, 1]).
        ``check_finite``: a NaN/Inf in the sample is a FloatingPointError naming the first step that made it
        (tracked on the device, read once after the loop); ``False`` returns it as it is."""
        if (not isinstance(measurement, torch.Tensor) or measurement.ndim != 4 or measurement.shape[0] < 1
                or not measurement.is_floating_point()):
            got = (f"a {measurement.dtype} tensor of shape {tuple(measurement.shape)}"
                   if isinstance(measurement, torch.Tensor) else type(measurement).__name__)
            raise ValueError(f"`measurement` must be a floating NCHW tensor of N >= 1 degraded images in [-1, 1], "
                             f"got {got}")
        expected = (self.unet.config.in_channels // 2, self.unet.config.sample_size, self.unet.config.sample_size)
        if tuple(measurement.shape[1:]) != expected:
            raise ValueError(f"`measurement` must have shape [N, {', '.join(map(str, expected))}], "
                             f"got {tuple(measurement.shape)}")
        check_int("num_inference_steps", num_inference_steps, 1, numpy_ok=False)
        check_bool("check_finite", check_finite)
        if output_type not in PIXEL_OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(PIXEL_OUTPUT_TYPES)}, got {output_type!r}")
        device, dtype = self._execution_device, self.unet.dtype
        lam = float(self.config.stationary_std)
        in_x = isinstance(self.scheduler, FewstepMRSScheduler)
        if in_x and abs(self.scheduler.stationary_std - lam) > 1e-12 * lam:
            raise ValueError(
                f"the scheduler's `stationary_std` {self.scheduler.stationary_std} differs from the model's {lam}; "
                "build it with swap_sampler(pipe, 'mrs') or pass stationary_std=pipe.config.stationary_std"
            )
        check_generators(generator, measurement.shape[0])
        mu = measurement.to(device=device, dtype=dtype)
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("`measurement` contains NaN or Inf")
        lo, hi = float(mu.min()), float(mu.max())
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:  # set-up code: reading the range back once is fine
            raise ValueError(f"`measurement` must hold images in [-1, 1] (the model's range), got values in "
                             f"[{lo:.4g}, {hi:.4g}]; map [0, 1] images with 2 * x - 1")
        if lo >= -1e-6:
            warnings.warn(f"`measurement` lies in [{lo:.3g}, {hi:.3g}]: the model expects [-1, 1]; were [0, 1] "
                          "images passed (map them with 2 * x - 1)?", stacklevel=2)
        z = randn_tensor(mu.shape, generator=generator, device=device, dtype=dtype)
        x = mu + lam * z  # the MR prior, x_T ~ N(mu, lam^2)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # any other scheduler runs the VP process of z = (x - mu) / lam in its own variable (sigma-space ones such as
        # Euler scale the start by init_noise_sigma and the model input by scale_model_input, as diffusers loops do)
        z = z * getattr(self.scheduler, "init_noise_sigma", 1.0)
        timesteps = self.scheduler.timesteps
        # `generator` only where the scheduler's step takes one (diffusers' UniPC, DEIS, PNDM do not)
        extra = {} if in_x else step_kwargs(self.scheduler, generator)
        finite = FiniteWatch(x.device, len(timesteps)) if check_finite else None
        for i, t in enumerate(self.progress_bar(timesteps)):
            t_batch = t.reshape(1).to(device).expand(x.shape[0])
            if not in_x:
                x = mu + lam * self.scheduler.scale_model_input(z, t)
            eps = self.unet(torch.cat([x, mu], dim=1), t_batch).sample
            if in_x:
                x = self.scheduler.step(eps, t, x, mu=mu, generator=generator).prev_sample
            else:
                z = self.scheduler.step(eps, t, z, **extra).prev_sample
            if finite is not None:
                finite.update(x if in_x else z, i)
        if finite is not None:
            finite.raise_if_bad(len(timesteps), type(self.scheduler).__name__)
        if not in_x:
            x = mu + lam * z  # the last step ends at sigma 0, where the scheduler's variable is z itself
        result = pixel_outputs(x, output_type, self.numpy_to_pil)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
