"""``FewstepPipeline``: one denoising loop hosting a fewstep scheduler and a guidance rule around an existing
diffusers SD 1.x/2.x or SDXL pipeline (UNet2DConditionModel, SDXL's added text/time conditions).

Built with ``FewstepPipeline.from_pipe(pipe, scheduler="unipc", guidance="apg")``: the base pipeline's modules
are shared, not copied (diffusers' ``from_pipe``), and its own ``encode_prompt``, ``prepare_latents``,
``_get_add_time_ids``, VAE decode, safety checker / watermark and ``image_processor`` are reused; only the
loop is fewstep's: per step one UNet call on ``[uncond, cond]``, both outputs converted to ``(x0, eps)``
pairs, the rule combines them and the scheduler's ``step_pair`` advances (so CFG++ and APG work with every
fewstep solver). Not covered yet: SD3/Flux transformers, CUDA-graph replay, img2img/inpainting, IP-adapter,
LCM ``timestep_cond``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import ImagePipelineOutput

from .. import guidance as guidance_rules
from .. import samplers
from ..guidance import GuidanceRule

__all__ = ["FewstepPipeline", "PIPELINE_OUTPUT_TYPES"]

PIPELINE_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_CALLBACK_TENSORS = ("latents", "prompt_embeds")


def _family(pipe: Any) -> str:
    unet = getattr(pipe, "unet", None)
    if unet is None or type(unet).__name__ != "UNet2DConditionModel" or not hasattr(pipe, "encode_prompt"):
        raise ValueError(
            f"FewstepPipeline.from_pipe supports SD 1.x/2.x and SDXL text-to-image pipelines (a UNet2DConditionModel "
            f"and encode_prompt); got {type(pipe).__name__}"
        )
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd"


class FewstepPipeline:
    """A fewstep denoising loop around a diffusers SD/SDXL pipeline (see the module docstring).

    ``pipe`` holds the shared components with ``scheduler`` swapped in; ``guidance`` is the default rule of
    ``__call__`` (a call may pass another one).
    """

    def __init__(self, pipe: Any, guidance: GuidanceRule):
        self.family = _family(pipe)
        self.pipe = pipe
        self.guidance = guidance

    @classmethod
    def from_pipe(
        cls,
        pipe: Any,
        scheduler: str | Any | None = None,
        guidance: str | GuidanceRule | None = None,
        guidance_scale: float | None = None,
    ) -> FewstepPipeline:
        """Wrap ``pipe`` without copying weights.

        ``scheduler``: a fewstep sampler name (built ``from_config(pipe.scheduler.config)``), a scheduler
        object, or ``None`` to keep ``pipe``'s. ``guidance``: a rule name or object; ``None`` is CFG with
        ``guidance_scale`` (default 7.5, as diffusers).
        """
        _family(pipe)
        if isinstance(scheduler, str):
            scheduler = samplers.get(scheduler).from_config(pipe.scheduler.config)
        elif scheduler is None:
            scheduler = pipe.scheduler
        elif not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"`scheduler` must be a sampler name or a scheduler, got {type(scheduler).__name__}")
        rule = cls._make_rule(guidance, guidance_scale)
        cls._check_compatible(rule, scheduler)
        shared = type(pipe).from_pipe(pipe, scheduler=scheduler)
        shared.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return cls(shared, rule)

    @staticmethod
    def supports(pipe: Any) -> bool:
        """Whether ``from_pipe`` can host ``pipe`` (an SD 1.x/2.x or SDXL text-to-image pipeline)."""
        try:
            _family(pipe)
        except ValueError:
            return False
        return True

    @staticmethod
    def _make_rule(guidance: str | GuidanceRule | None, guidance_scale: float | None) -> GuidanceRule:
        if guidance is None:
            return guidance_rules.CFG(7.5 if guidance_scale is None else guidance_scale)
        return guidance_rules.make(guidance, guidance_scale)

    @staticmethod
    def _check_compatible(rule: GuidanceRule, scheduler: Any) -> None:
        if rule.needs_uncond and not guidance_rules.supports_pairs(scheduler):
            if not isinstance(rule, guidance_rules.CFG):
                raise ValueError(
                    f"guidance {rule.name!r} needs a fewstep scheduler (with `step_pair`), got "
                    f"{type(scheduler).__name__}; use one of: {', '.join(samplers.names('diffusion', standalone=True))}"
                )

    # ----------------------------------------------------------------------------------------------
    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def _encode(self, guided: bool, device, num_images_per_prompt: int, kw: dict) -> dict:
        p = self.pipe
        if self.family == "sd":
            pos, neg = p.encode_prompt(
                kw["prompt"], device, num_images_per_prompt, guided, kw["negative_prompt"],
                prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
            )  # fmt: skip
            return {"pos": pos, "neg": neg}
        pos, neg, pooled, neg_pooled = p.encode_prompt(
            prompt=kw["prompt"], device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided, negative_prompt=kw["negative_prompt"],
            prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
            pooled_prompt_embeds=kw["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=kw["negative_pooled_prompt_embeds"],
        )  # fmt: skip
        return {"pos": pos, "neg": neg, "pooled": pooled, "neg_pooled": neg_pooled}

    def _sdxl_added_conds(self, enc: dict, guided: bool, height: int, width: int, batch: int, device) -> dict:
        p = self.pipe
        te2 = getattr(p, "text_encoder_2", None)
        proj = int(enc["pooled"].shape[-1]) if te2 is None else te2.config.projection_dim
        size = (height, width)
        time_ids = p._get_add_time_ids(size, (0, 0), size, dtype=enc["pos"].dtype, text_encoder_projection_dim=proj)
        text = enc["pooled"]
        if guided:
            text = torch.cat([enc["neg_pooled"], text])
            time_ids = torch.cat([time_ids, time_ids])
        return {"text_embeds": text.to(device), "time_ids": time_ids.to(device).repeat(batch, 1)}

    def _decode(self, latents: torch.Tensor, output_type: str, device, dtype) -> Any:
        p = self.pipe
        if output_type == "latent":
            return latents
        vae = p.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            z = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            z = latents / vae.config.scaling_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        do_denormalize = None
        if self.family == "sd" and getattr(p, "safety_checker", None) is not None:
            image, nsfw = p.run_safety_checker(image, device, dtype)
            do_denormalize = [not flag for flag in nsfw] if nsfw is not None else None
        if self.family == "sdxl" and getattr(p, "watermark", None) is not None:
            image = p.watermark.apply_watermark(image)
        return p.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance: str | GuidanceRule | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Text-to-image with the hosted scheduler and guidance rule.

        ``guidance``/``guidance_scale`` override the pipeline's rule for this call (a name plus scale, a rule
        object, or ``guidance_scale`` alone: the pipeline's rule kind with that scale).
        ``callback_on_step_end(pipe, i, t, tensors) -> dict`` runs after each step with the tensors named in
        ``callback_on_step_end_tensor_inputs`` (``latents``, ``prompt_embeds``) and may replace them.
        ``output_type``: ``pil``, ``np``, ``pt`` or ``latent``.
        """
        p = self.pipe
        if guidance is None:
            rule = self.guidance if guidance_scale is None else self._make_rule(self.guidance.name, guidance_scale)
        else:
            rule = self._make_rule(guidance, guidance_scale)
        self._check_compatible(rule, p.scheduler)
        if output_type not in PIPELINE_OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(PIPELINE_OUTPUT_TYPES)}, got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in _CALLBACK_TENSORS]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {bad} not supported; allowed: {list(_CALLBACK_TENSORS)}"
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        height = height or p.unet.config.sample_size * p.vae_scale_factor
        width = width or p.unet.config.sample_size * p.vae_scale_factor
        device = p._execution_device
        guided = rule.needs_uncond
        rule.reset()

        enc = self._encode(guided, device, num_images_per_prompt, {
            "prompt": prompt, "negative_prompt": negative_prompt, "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
        })  # fmt: skip
        embeds = torch.cat([enc["neg"], enc["pos"]]) if guided else enc["pos"]
        n = batch * num_images_per_prompt
        added = self._sdxl_added_conds(enc, guided, height, width, n, device) if self.family == "sdxl" else None

        scheduler = p.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        x = p.prepare_latents(n, p.unet.config.in_channels, height, width, embeds.dtype, device, generator, latents)
        pairs = guidance_rules.supports_pairs(scheduler)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for i, t in enumerate(p.progress_bar(timesteps)):
            model_in = torch.cat([x, x]) if guided else x
            model_in = scheduler.scale_model_input(model_in, t)
            out = p.unet(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
            if guided:
                out_uncond, out_cond = out.chunk(2)
                if pairs:
                    x = guidance_rules.guided_step(scheduler, rule, out_cond, out_uncond, t, x, i)
                else:  # plain CFG on the raw output of a diffusers scheduler, as diffusers' pipelines do
                    out = guidance_rules.raw_cfg(rule, out_cond, out_uncond, i, len(timesteps))
                    x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
            else:
                x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {"latents": x, "prompt_embeds": embeds}
                outputs = callback_on_step_end(p, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                outputs = outputs or {}
                x = outputs.get("latents", x)
                embeds = outputs.get("prompt_embeds", embeds)
        image = self._decode(x, output_type, device, embeds.dtype)
        p.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
