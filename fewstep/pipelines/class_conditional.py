"""Class-conditional image generation with a guidance rule (CFG, CFG++, APG): the embedded digits models' pipeline."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .. import guidance as guidance_rules
from .._checks import check_int
from ..datasets import to_unit_range
from ..guidance import GuidanceRule
from .denoiser import prepare_denoiser

__all__ = ["ClassConditionalPipeline", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


class ClassConditionalPipeline(DiffusionPipeline):
    """``unet`` (a class-conditional ``UNet2DModel`` whose last class id is the null class) + ``scheduler``.

    Guidance is a ``fewstep.guidance`` rule (``guidance="cfg" | "cfg++" | "apg"`` or a rule object): the
    conditional and null-class outputs are converted to ``(x0, eps)`` pairs, combined by the rule and fed
    to the fewstep scheduler's ``step_pair``. Default: classifier-free guidance (Ho & Salimans 2022) with
    ``guidance_scale=3``; CFG at scale 1 runs the conditional model only. A diffusers scheduler (no
    ``step_pair``) supports plain CFG only, applied to the raw output.
    """

    model_cpu_offload_seq = "unet"
    #: what the loop calls instead of ``unet`` (a ``torch.compile``d wrapper); set by ``from_pipe(compile=...)``
    _denoiser = None

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pipe(
        cls,
        pipeline: DiffusionPipeline,
        quantized: str | os.PathLike | torch.nn.Module | None = None,
        quant_mode: str | None = None,
        compile: bool | str | Mapping[str, Any] | None = False,
        **kwargs: Any,
    ) -> ClassConditionalPipeline:
        """diffusers' ``from_pipe`` (shared modules, ``scheduler=`` etc. overrides), plus an optional quantized
        and/or ``torch.compile``d denoiser, as ``FewstepPipeline.from_pipe``: ``quantized`` a
        ``fewstep.quant.save_quantized`` directory for ``pipeline.unet`` (loaded onto a copy; ``quant_mode`` one
        of ``fewstep.quant.MODES`` or ``"auto"``, default ``"fake"``) or a quantized module; ``compile`` ``True``, a
        ``torch.compile`` mode or a dict of its arguments. ``pipeline`` itself is left unchanged."""
        unet = kwargs.get("unet", getattr(pipeline, "unet", None))
        if unet is None:
            raise ValueError(f"`pipeline` must have a `unet`, got {type(pipeline).__name__}")
        module, call = prepare_denoiser(unet, quantized, quant_mode, compile)
        if module is not unet:
            kwargs["unet"] = module
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = pipeline.dtype  # diffusers' from_pipe would cast everything to float32
        new = super().from_pipe(pipeline, **kwargs)
        new._denoiser = None if call is module else call
        return new

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null class is excluded)."""
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _check_inputs(self, class_labels, num_inference_steps, output_type) -> list[int]:
        if getattr(self.unet.config, "num_class_embeds", None) is None:
            raise ValueError(
                "this UNet is unconditional (num_class_embeds=None): guidance needs a class-conditional model "
                "whose last class id is the null class"
            )
        if isinstance(class_labels, (int, np.integer)):
            class_labels = [int(class_labels)]
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if not isinstance(class_labels, Sequence) or len(class_labels) == 0:
            raise ValueError(f"`class_labels` must be a non-empty list of ints, got {class_labels!r}")
        labels = []
        for c in class_labels:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < self.num_classes:
                raise ValueError(f"class label {c!r} is out of range: this model has classes 0..{self.num_classes - 1}")
            labels.append(int(c))
        check_int("num_inference_steps", num_inference_steps, 1, numpy_ok=False)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        return labels

    def _guidance_rule(self, guidance: str | GuidanceRule | None, guidance_scale: float | None) -> GuidanceRule:
        if guidance_scale is not None and (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}")
        if guidance is None:
            guidance = "cfg"
            guidance_scale = 3.0 if guidance_scale is None else guidance_scale
        rule = guidance_rules.make(guidance, guidance_scale)
        if not rule.needs_uncond:
            return rule
        if not guidance_rules.supports_pairs(self.scheduler) and not isinstance(rule, guidance_rules.CFG):
            raise ValueError(
                f"guidance {rule.name!r} needs a fewstep scheduler (with `step_pair`), got "
                f"{type(self.scheduler).__name__}; use one of: {', '.join(_sampler_names())}"
            )
        return rule

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | int,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        check_finite: bool = True,
        guidance: str | GuidanceRule | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of ``class_labels``.

        ``guidance``: a rule name (``cfg``, ``cfg++``, ``apg``; built with ``guidance_scale``, or the rule's
        default scale when that is ``None``) or a ``GuidanceRule`` object (then leave ``guidance_scale``
        unset). ``None`` is CFG with ``guidance_scale`` (default 3). Stateful rules are reset per call.

        Returns ``.images``: ``np`` NHWC floats in [0, 1], ``pil`` a list of grayscale images, ``pt`` an
        NCHW tensor in [0, 1], ``latent`` the final sample itself (model space, nominally [-1, 1], not
        clipped). With ``check_finite`` a NaN/Inf is reported with the first step that made it
        (tracked on the device, read once at the end: no per-step host sync).
        """
        labels = self._check_inputs(class_labels, num_inference_steps, output_type)
        rule = self._guidance_rule(guidance, guidance_scale)
        rule.reset()
        pairs = guidance_rules.supports_pairs(self.scheduler)
        device = self._execution_device
        dtype = self.unet.dtype
        shape = (len(labels), self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(device=device, dtype=dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

        cond = torch.tensor(labels, device=device)
        guided = rule.needs_uncond
        model_labels = torch.cat([cond, torch.full_like(cond, self.null_class)]) if guided else cond
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        denoiser = self.unet if self._denoiser is None else self._denoiser
        # stochastic steps draw their noise from `generator` (diffusers schedulers: when their step takes one)
        step_kwargs = guidance_rules.step_kwargs(self.scheduler, generator)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = torch.cat([x, x]) if guided else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            t_batch = t.reshape(1).to(device).expand(model_in.shape[0])
            out = denoiser(model_in, t_batch, class_labels=model_labels).sample
            if guided and pairs:
                out_cond, out_uncond = out.chunk(2)
                x = guidance_rules.guided_step(self.scheduler, rule, out_cond, out_uncond, t, x, i, generator=generator)
            else:
                if guided:  # plain CFG on the raw output (diffusers schedulers)
                    out_cond, out_uncond = out.chunk(2)
                    out = guidance_rules.raw_cfg(rule, out_cond, out_uncond, i, len(self.scheduler.timesteps))
                x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
            if check_finite:
                bad = ~torch.isfinite(x).all()
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
        if check_finite:
            step = int(first_bad)  # the one host sync, after the loop
            if step >= 0:
                raise FloatingPointError(
                    f"sampling produced NaN/Inf at step {step} of {num_inference_steps} "
                    f"(sampler {type(self.scheduler).__name__}); pass check_finite=False to return it anyway"
                )
        images = to_unit_range(x.float())
        if output_type == "latent":
            result = x
        elif output_type == "pt":
            result = images
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def _sampler_names() -> list[str]:
    from .. import samplers

    return samplers.names("diffusion")
