"""The SD3 / Flux part of ``FewstepPipeline``: flow-matching transformers that predict a velocity.

SD3 runs true CFG (negative prompt) through the guidance rule; Flux uses its distilled guidance embedding
(``embedded_guidance_scale``, no unconditional pass) unless a rule is requested together with a negative prompt
(true CFG: two transformer calls per step, as diffusers' ``true_cfg_scale``). Flux latents are packed into 2x2
patches with ``latent_image_ids``/``text_ids``, and its dynamic shift ``mu`` comes from the image sequence length
(``flow_shift_mu``). Samplers of mean-reverting models and VP-only schedulers cannot sample a flow model
(``check_flow_scheduler``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import ImagePipelineOutput

from .. import samplers
from ..guidance import GuidanceRule
from ..solvers.schedules import is_flow_config
from .loop_checks import check_latents

__all__ = ["FLOW_FAMILIES", "TRANSFORMER_FAMILIES", "FLUX_EMBEDDED_SCALE", "flow_shift_mu", "flow_samplers",
           "check_flow_scheduler", "FlowFamilies"]

#: families whose model is a flow-matching transformer predicting a velocity
FLOW_FAMILIES = ("sd3", "flux")
#: transformer class name -> family
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
#: Flux's default distilled guidance scale (diffusers' FluxPipeline default)
FLUX_EMBEDDED_SCALE = 3.5


def flow_shift_mu(image_seq_len: int, config: Any, max_shift_default: float = 1.15) -> float:
    """Dynamic flow shift ``mu`` for an image of ``image_seq_len`` tokens: linear between ``base_shift`` at
    ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` (the scheduler config's values; Flux, and
    SD3 configs with ``use_dynamic_shifting``)."""
    base_len = config.get("base_image_seq_len", None) or 256
    max_len = config.get("max_image_seq_len", None) or 4096
    base_shift = config.get("base_shift", None)
    max_shift = config.get("max_shift", None)
    base_shift = 0.5 if base_shift is None else base_shift
    max_shift = max_shift_default if max_shift is None else max_shift
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (image_seq_len - base_len)


def flow_samplers() -> list[str]:
    """The fewstep samplers that sample a flow-matching model as they are built: the standalone diffusion samplers
    and the flow ones, except ``flowchef`` (it needs a cost, ``scheduler.set_cost``, before ``set_timesteps``)."""
    return samplers.names("diffusion", standalone=True) + [n for n in samplers.names("flow") if n != "flowchef"]


def check_flow_scheduler(scheduler: Any, family: str) -> None:
    """Refuse a scheduler that cannot integrate a flow model (mean-reverting or VP-only)."""
    name = type(scheduler).__name__
    flow = getattr(scheduler, "is_flow", None)
    if flow is None:
        flow = is_flow_config(dict(getattr(scheduler, "config", {}) or {}))
    if isinstance(scheduler, samplers.FewstepMRSScheduler) or not flow:
        raise ValueError(
            f"{family} is a flow-matching model; scheduler {name} cannot sample it (it is not built for a flow "
            f"schedule); use one of: {', '.join(flow_samplers())}"
        )


class FlowFamilies:
    """``FewstepPipeline``'s methods for SD3 and Flux (a mixin: it uses the host's ``pipe``, ``family``,
    ``denoiser`` and ``_denoise``)."""

    def _flow_encode(self, guided: bool, device, kw: dict) -> dict:
        """Prompt embeddings through the base pipeline's ``encode_prompt``: ``pos``/``pooled`` (+ ``neg``/
        ``neg_pooled`` when ``guided``), and Flux's ``text_ids``/``neg_text_ids``."""
        p, n = self.pipe, kw["num_images_per_prompt"]
        lora_scale = (kw["attention_kwargs"] or {}).get("scale")
        if self.family == "sd3":
            return self._encode_pooled(guided, device, n, {**kw, "lora_scale": lora_scale}, prompt_2=None,
                                       prompt_3=None)  # fmt: skip
        pos, pooled, text_ids = p.encode_prompt(
            prompt=kw["prompt"], prompt_2=None, device=device, num_images_per_prompt=n,
            prompt_embeds=kw["prompt_embeds"], pooled_prompt_embeds=kw["pooled_prompt_embeds"], lora_scale=lora_scale,
        )  # fmt: skip
        enc = {"pos": pos, "pooled": pooled, "text_ids": text_ids}
        if guided:
            neg_prompt = kw["negative_prompt"]
            if neg_prompt is None and kw["negative_prompt_embeds"] is None:
                raise ValueError(
                    "true CFG on Flux needs `negative_prompt` or `negative_prompt_embeds` (with "
                    "`negative_pooled_prompt_embeds`); omit `guidance` to use the distilled guidance embedding"
                )
            neg, neg_pooled, neg_ids = p.encode_prompt(
                prompt=neg_prompt, prompt_2=None, device=device, num_images_per_prompt=n,
                prompt_embeds=kw["negative_prompt_embeds"], pooled_prompt_embeds=kw["negative_pooled_prompt_embeds"],
                lora_scale=lora_scale,
            )  # fmt: skip
            enc.update(neg=neg, neg_pooled=neg_pooled, neg_text_ids=neg_ids)
        return enc

    def _flow_timesteps(self, num_inference_steps: int, image_seq_len: int, device) -> torch.Tensor:
        """``set_timesteps`` as the base pipeline calls it: Flux passes ``sigmas = linspace(1, 1/N, N)`` to
        flow-matching-Euler grids and ``mu`` from the image sequence length; SD3 passes ``mu`` only for a
        dynamically shifted config."""
        scheduler = self.pipe.scheduler
        cfg = scheduler.config
        kwargs: dict[str, Any] = {}
        params = inspect.signature(scheduler.set_timesteps).parameters
        if cfg.get("use_dynamic_shifting", False):
            kwargs["mu"] = flow_shift_mu(image_seq_len, cfg, 1.15 if self.family == "flux" else 1.16)
        euler_grid = getattr(scheduler, "flow_grid_style", "flowmatch") == "flowmatch"
        if self.family == "flux" and euler_grid and "sigmas" in params and not cfg.get("use_flow_sigmas", False):
            n = num_inference_steps
            kwargs["sigmas"] = [1.0 - k * (1.0 - 1.0 / n) / max(n - 1, 1) for k in range(n)]
            scheduler.set_timesteps(device=device, **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler.timesteps

    def decode_flow_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images in [-1, 1] (NCHW) from SD3/Flux latents (Flux: packed), differentiable: pixel-space costs
        of FlowChef backpropagate through the VAE decoder with this (never through the transformer)."""
        p = self.pipe
        if self.family == "flux":
            latents = p._unpack_latents(latents, height, width, p.vae_scale_factor)
        vae = p.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    def _flow_decode(self, latents: torch.Tensor, output_type: str, height: int, width: int) -> Any:
        if output_type == "latent":
            return latents
        image = self.decode_flow_latents(latents, height, width)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    def _flow_call(
        self, rule: GuidanceRule | None, embedded: float, batch: int, kw: dict
    ) -> ImagePipelineOutput | tuple:
        """The denoising loop of SD3/Flux (validated arguments of ``__call__`` in ``kw``)."""
        p = self.pipe
        flux = self.family == "flux"
        tr = p.transformer
        height = kw["height"] or p.default_sample_size * p.vae_scale_factor
        width = kw["width"] or p.default_sample_size * p.vae_scale_factor
        self._check_base_inputs(
            prompt=kw["prompt"], height=height, width=width, negative_prompt=kw["negative_prompt"],
            prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
            pooled_prompt_embeds=kw["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=kw["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=list(kw["callback_on_step_end_tensor_inputs"]),
        )  # fmt: skip
        device = self._exec_device()
        guided = self._guided(rule)
        if rule is not None:
            rule.reset()
        enc = self._flow_encode(guided, device, kw)
        n = batch * kw["num_images_per_prompt"]
        for key in ("pos", "neg", "pooled", "neg_pooled"):  # given embeddings: one row per prompt, not per image
            value = enc.get(key)
            if value is not None and value.shape[0] == batch and n != batch:
                enc[key] = value.repeat_interleave(kw["num_images_per_prompt"], dim=0)
        generator = kw["generator"]
        if kw["latents"] is not None:
            scale = p.vae_scale_factor
            if flux:  # packed 2x2 patches, as FluxPipeline._pack_latents lays them out
                h, w = 2 * (int(height) // (scale * 2)), 2 * (int(width) // (scale * 2))
                shape, layout = (n, (h // 2) * (w // 2), tr.config.in_channels), "Flux's packed latents: batch, " \
                    f"(height / {2 * scale}) * (width / {2 * scale}), channels * 4"
            else:
                shape = (n, tr.config.in_channels, int(height) // scale, int(width) // scale)
                layout = f"batch, channels, height / {scale}, width / {scale}"
            check_latents(kw["latents"], shape, layout)
            kw["latents"] = kw["latents"].to(enc["pos"].dtype)  # the dtype diffusers draws them in
        if flux:
            x, image_ids = p.prepare_latents(
                n, tr.config.in_channels // 4, height, width, enc["pos"].dtype, device, generator, kw["latents"]
            )
            seq_len = x.shape[1]
            embeds = enc["pos"]
        else:
            x = p.prepare_latents(
                n, tr.config.in_channels, height, width, enc["pos"].dtype, device, generator, kw["latents"]
            )
            patch = tr.config.patch_size
            seq_len = (x.shape[-2] // patch) * (x.shape[-1] // patch)
            embeds = torch.cat([enc["neg"], enc["pos"]]) if guided else enc["pos"]
            pooled = torch.cat([enc["neg_pooled"], enc["pooled"]]) if guided else enc["pooled"]
        timesteps = self._flow_timesteps(kw["num_inference_steps"], seq_len, device)
        denoiser = self.denoiser
        attention = kw["attention_kwargs"]
        if flux:
            conds = {"embeds": embeds, "pooled": enc["pooled"], "text_ids": enc["text_ids"], "image_ids": image_ids}
            if guided:
                conds.update(neg=enc["neg"], neg_pooled=enc["neg_pooled"], neg_text_ids=enc["neg_text_ids"])
            if tr.config.guidance_embeds:
                conds["guidance"] = torch.full((n,), embedded, device=device, dtype=torch.float32)

            def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
                t_in = t.expand(n).to(x.dtype) / 1000
                out = denoiser(hidden_states=x, timestep=t_in, guidance=c.get("guidance"),
                               pooled_projections=c["pooled"], encoder_hidden_states=c["embeds"],
                               txt_ids=c["text_ids"], img_ids=c["image_ids"], joint_attention_kwargs=attention,
                               return_dict=False)[0]  # fmt: skip
                if not guided:
                    return out
                out_uncond = denoiser(
                    hidden_states=x, timestep=t_in, guidance=c.get("guidance"), pooled_projections=c["neg_pooled"],
                    encoder_hidden_states=c["neg"], txt_ids=c["neg_text_ids"], img_ids=c["image_ids"],
                    joint_attention_kwargs=attention, return_dict=False,
                )[0]  # fmt: skip
                return torch.cat([out_uncond, out])
        else:
            conds = {"embeds": embeds, "pooled": pooled}

            def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
                model_in = torch.cat([x, x]) if guided else x
                return denoiser(hidden_states=model_in, timestep=t.expand(model_in.shape[0]),
                                encoder_hidden_states=c["embeds"], pooled_projections=c["pooled"],
                                joint_attention_kwargs=attention, return_dict=False)[0]  # fmt: skip

        # Flux's `guidance_scale` property is its embedding's scale, also under true CFG (as diffusers' FluxPipeline)
        self._set_call_state(rule, len(timesteps), embedded if self.family == "flux" else None, guided=guided,
                             clip_skip=kw["clip_skip"], attention=attention)
        x = self._denoise(model_fn, x, conds, timesteps, rule if guided else None, generator,
                          kw["callback_on_step_end"], kw["callback_on_step_end_tensor_inputs"],
                          kw["check_finite"])  # fmt: skip
        image = self._flow_decode(x, kw["output_type"], height, width)
        p.maybe_free_model_hooks()
        if not kw["return_dict"]:
            return (image,)
        return ImagePipelineOutput(images=image)
