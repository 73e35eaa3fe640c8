"""Class-conditional image generation with a guidance rule (CFG, CFG++, APG): the embedded digits models' pipeline."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .. import guidance as guidance_rules
from .._checks import check_int, check_number
from ..guidance import GuidanceRule
from .denoiser import check_denoiser_current, check_savable, prepare_denoiser
from .sharing import share_modules

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
    _denoiser_for = None  # the module ``_denoiser`` was compiled from

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
        **components: Any,
    ) -> ClassConditionalPipeline:
        """A pipeline over ``pipeline``'s modules (shared, not copied, and not cast: diffusers' ``from_pipe`` would
        cast them to float32), with ``components`` (``unet=``, ``scheduler=``) in place of its own, plus an
        optional quantized and/or ``torch.compile``d denoiser, as ``FewstepPipeline.from_pipe``: ``quantized`` a
        ``fewstep.quant.save_quantized`` directory for the UNet (loaded onto a copy; ``quant_mode`` one of
        ``fewstep.quant.MODES`` or ``"auto"``, default ``"fake"``) or a quantized module; ``compile`` ``True``, a
        ``torch.compile`` mode or a dict of its arguments. ``pipeline`` itself is left unchanged."""
        unknown = sorted(set(components) - {"unet", "scheduler"})
        if unknown:
            raise ValueError(f"`from_pipe` takes the components 'unet' and 'scheduler', got {unknown}")
        unet = components.get("unet", getattr(pipeline, "unet", None))
        if not isinstance(unet, torch.nn.Module):
            where = "`unet`" if "unet" in components else f"`pipeline` ({type(pipeline).__name__}) has no UNet: `unet`"
            raise ValueError(f"{where} must be a UNet2DModel, got {type(unet).__name__}")
        scheduler = components.get("scheduler", getattr(pipeline, "scheduler", None))
        from .. import samplers

        if isinstance(scheduler, str):  # a sampler name, as FewstepPipeline.from_pipe takes it
            scheduler = samplers.get(scheduler).from_config(pipeline.scheduler.config)
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "config"):
            raise ValueError(f"`scheduler` must be a diffusers/fewstep scheduler or a sampler name "
                             f"({', '.join(samplers.names())}), got {type(scheduler).__name__}")  # fmt: skip
        module, call = prepare_denoiser(unet, quantized, quant_mode, compile)
        if isinstance(pipeline, cls):
            new = share_modules(pipeline, unet=module, scheduler=scheduler)
        else:
            new = cls(unet=module, scheduler=scheduler)
            new.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        new._denoiser = None if call is module else call
        new._denoiser_for = module
        return new

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained``, refused while the UNet is quantized (``check_savable``: it would
        reload with random weights; save the quantization with ``fewstep.quant.save_quantized``)."""
        check_savable(self.unet, "unet")
        super().save_pretrained(save_directory, **kwargs)

    # what diffusers callbacks read (set per call by the denoising loop)
    @property
    def num_timesteps(self) -> int:
        return int(getattr(self, "_num_timesteps", 0))

    @property
    def guidance_scale(self) -> float:
        return float(getattr(self, "_guidance_scale", 1.0))

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers' meaning: a guidance scale above 1."""
        return self.guidance_scale > 1.0

    @property
    def interrupt(self) -> bool:
        return bool(getattr(self, "_interrupt", False))

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null class is excluded)."""
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _check_inputs(self, class_labels, num_inference_steps, output_type) -> list[int]:
        labels = self.check_class_labels(class_labels)
        check_int("num_inference_steps", num_inference_steps, 1)  # numpy integers too, as FewstepPipeline
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        return labels

    def check_class_labels(self, class_labels: Sequence[int] | int | torch.Tensor) -> list[int]:
        """``class_labels`` as a list of ints in ``0..num_classes - 1`` (a ValueError otherwise, or when the UNet
        is unconditional)."""
        if getattr(self.unet.config, "num_class_embeds", None) is None:
            raise ValueError(
                "this UNet is unconditional (num_class_embeds=None): guidance needs a class-conditional model "
                "whose last class id is the null class"
            )
        if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, (bool, np.bool_)):
            class_labels = [int(class_labels)]
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            class_labels = class_labels.reshape(-1).tolist()
        if not isinstance(class_labels, Sequence) or len(class_labels) == 0:
            raise ValueError(f"`class_labels` must be a non-empty list of ints, got {class_labels!r}")
        labels = []
        for c in class_labels:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise ValueError(f"class labels must be ints, got {c!r} ({type(c).__name__}) in {class_labels!r}")
            if not 0 <= c < self.num_classes:
                raise ValueError(f"class label {c!r} is out of range: this model has classes 0..{self.num_classes - 1}")
            labels.append(int(c))
        return labels

    def _guidance_rule(self, guidance: str | GuidanceRule | None, guidance_scale: float | None) -> GuidanceRule:
        if guidance_scale is not None:  # numpy scalars too (np.float32 was refused, np.float64 accepted)
            guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        if guidance is None:
            guidance = "cfg"
            guidance_scale = 3.0 if guidance_scale is None else guidance_scale
        return guidance_rules.make(guidance, guidance_scale)  # its fit to the scheduler: FewstepPipeline's check

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | int | torch.Tensor,
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

        The loop is ``FewstepPipeline``'s (one denoising loop for every pipeline fewstep hosts);
        ``FewstepPipeline.from_pipe(this, ...)`` adds its options (``cuda_graph``, ``quantized``, ``compile``).
        """
        from .fewstep_pipeline import FewstepPipeline

        labels = self._check_inputs(class_labels, num_inference_steps, output_type)
        rule = self._guidance_rule(guidance, guidance_scale)
        if self._denoiser is not None:
            check_denoiser_current(self.unet, self._denoiser_for)
        host = FewstepPipeline(self, rule, denoiser=self._denoiser)
        return host(class_labels=labels, num_inference_steps=num_inference_steps, generator=generator,
                    latents=latents, output_type=output_type, return_dict=return_dict, check_finite=check_finite)
