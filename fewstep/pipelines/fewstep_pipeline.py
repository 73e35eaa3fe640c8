"""``FewstepPipeline``: one denoising loop hosting a fewstep scheduler and a guidance rule around an existing
diffusers SD 1.x/2.x or SDXL pipeline (UNet2DConditionModel, SDXL's added text/time conditions), an SD3 or
Flux pipeline (flow-matching transformers), or the class-conditional pipeline of the embedded digits models
(``ClassConditionalPipeline``, family ``"class"``: ``class_labels`` instead of a prompt, the null class as the
unconditional branch; that pipeline's own ``__call__`` runs this loop too).

Built with ``FewstepPipeline.from_pipe(pipe, scheduler="unipc", guidance="apg")``: the base pipeline's modules
are shared, not copied (diffusers' ``from_pipe``), and its own ``encode_prompt``, ``prepare_latents``,
``_get_add_time_ids``, VAE decode, safety checker / watermark and ``image_processor`` are reused; only the
loop is fewstep's: per step one UNet call on ``[uncond, cond]``, both outputs converted to ``(x0, eps)``
pairs, the rule combines them and the scheduler's ``step_pair`` advances (so CFG++ and APG work with every
fewstep solver).

SD3 and Flux predict a velocity; fewstep schedulers built from their flow configs read it as such
(``prediction_type="flow"``). SD3 runs true CFG (negative prompt) through the rule; Flux uses its distilled guidance
embedding (``embedded_guidance_scale``, no unconditional pass) unless a rule is requested explicitly together with a
negative prompt (true CFG: two transformer calls per step, as diffusers' ``true_cfg_scale``). Flux latents are packed
into 2x2 patches with ``latent_image_ids``/``text_ids``, and its dynamic shift ``mu`` comes from the image sequence
length. Samplers of mean-reverting models (``mrs``) cannot sample a flow model: ``from_pipe`` refuses them.

Options of ``from_pipe``: ``quantized`` (a ``fewstep.quant`` directory or quantized module: the loop's UNet /
transformer is that 8-bit copy), ``compile`` (``torch.compile`` of the denoiser the loop calls) and
``cuda_graph=True``: one whole denoising step (the model call(s) of both CFG branches, the guidance rule and the
fewstep solver step) is captured once in a CUDA graph and replayed for every step. Its inputs live in static
buffers: the latents, the conditioning, the solver's evaluation buffer, APG's momentum, and one table of per-step
numbers (solver coefficients, timestep, ``alpha``/``sigma``, CFG scale) that the step reads at a step index held
on the device (``fewstep.solvers.static``, ``fewstep.guidance.static``), so replaying never syncs with the host.
The same static step also runs uncaptured (``_loop_mode = "static"``), which is how CPU tests check it against
the eager loop.
Not covered yet: img2img/inpainting, IP-adapter, LCM ``timestep_cond``, SD3 skip-layer guidance.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import guidance as guidance_rules
from .. import samplers
from .._checks import check_int
from ..datasets import to_unit_range
from ..guidance import GuidanceRule
from ..guidance.static import StaticGuidance
from ..solvers.schedules import is_flow_config
from ..solvers.static import StaticEngine, check_static_plan
from .denoiser import check_compile, prepare_denoiser

__all__ = ["FewstepPipeline", "PIPELINE_OUTPUT_TYPES", "flow_shift_mu"]

PIPELINE_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_CALLBACK_TENSORS = ("latents", "prompt_embeds")


#: families whose model is a flow-matching transformer predicting a velocity
FLOW_FAMILIES = ("sd3", "flux")
_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
#: default guidance of each family when ``from_pipe`` gets none (diffusers' defaults); Flux: its embedding
_DEFAULT_SCALE = {"sd": 7.5, "sdxl": 7.5, "sd3": 7.0, "class": 3.0}
#: the family of ``ClassConditionalPipeline`` (class labels, no text encoder or VAE)
CLASS_FAMILY = "class"
_FLUX_EMBEDDED_SCALE = 3.5


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


def _flow_samplers() -> list[str]:
    return samplers.names("diffusion", standalone=True) + samplers.names("flow")


def _check_flow_scheduler(scheduler: Any, family: str) -> None:
    """Refuse a scheduler that cannot integrate a flow model (mean-reverting or VP-only)."""
    name = type(scheduler).__name__
    flow = getattr(scheduler, "is_flow", None)
    if flow is None:
        flow = is_flow_config(dict(getattr(scheduler, "config", {}) or {}))
    if isinstance(scheduler, samplers.FewstepMRSScheduler) or not flow:
        raise ValueError(
            f"{family} is a flow-matching model; scheduler {name} cannot sample it (it is not built for a flow "
            f"schedule); use one of: {', '.join(_flow_samplers())}"
        )


def _family(pipe: Any) -> str:
    from .class_conditional import ClassConditionalPipeline

    if isinstance(pipe, ClassConditionalPipeline):
        return CLASS_FAMILY
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and hasattr(pipe, "encode_prompt"):
        family = _TRANSFORMERS.get(type(transformer).__name__)
        if family is not None:
            return family
    unet = getattr(pipe, "unet", None)
    if unet is None or type(unet).__name__ != "UNet2DConditionModel" or not hasattr(pipe, "encode_prompt"):
        raise ValueError(
            f"FewstepPipeline.from_pipe supports SD 1.x/2.x and SDXL text-to-image pipelines (a UNet2DConditionModel "
            f"and encode_prompt), SD3 (SD3Transformer2DModel), Flux (FluxTransformer2DModel) and fewstep's "
            f"ClassConditionalPipeline; got {type(pipe).__name__}"
        )
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd"


def _non_graph_classes() -> tuple[type, ...]:
    """fewstep scheduler classes whose step is not a static linear step (momentum history, step hooks, MR)."""
    return (samplers.FewstepHeavyBallScheduler, samplers.FewstepGHVBScheduler, samplers.FewstepMRSScheduler,
            samplers.FewstepDCSolverScheduler, samplers.FewstepFlowChefScheduler)


def graph_samplers() -> list[str]:
    """Registered samplers that graph mode (``cuda_graph=True``) can replay."""
    bad = _non_graph_classes()
    return [n for n in samplers.names() if not issubclass(samplers.get(n), bad)]


def _check_graph_scheduler(scheduler: Any) -> None:
    name = type(scheduler).__name__
    if not isinstance(scheduler, samplers.FewstepScheduler) or not guidance_rules.supports_pairs(scheduler):
        raise ValueError(
            f"cuda_graph=True needs a fewstep scheduler: {name} (diffusers' own) reads its step state on the host "
            f"(step-index lookups, host syncs) and cannot be captured; use one of: {', '.join(graph_samplers())}"
        )
    if isinstance(scheduler, _non_graph_classes()):
        raise ValueError(
            f"cuda_graph=True cannot replay {name} (momentum history, step hooks or a mean-reverting step); use "
            f"one of: {', '.join(graph_samplers())}"
        )


def _check_graph_rule(rule: GuidanceRule) -> None:
    from ..guidance.static import STATIC_RULES

    if type(rule) not in STATIC_RULES:
        raise ValueError(
            f"cuda_graph=True supports the guidance rules {[r.name for r in STATIC_RULES]}, got "
            f"{type(rule).__name__} ({rule.name!r})"
        )


def _check_graph_device(device: Any) -> None:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs the pipeline on a CUDA device, got {device} (torch.cuda.is_available() = "
            f"{torch.cuda.is_available()}); move it with pipe.to('cuda') or leave cuda_graph=False"
        )


def _static_pair(kind: str, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                 norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``solvers.parameterization.to_pair`` with this step's ``alpha``, ``sigma`` and ``alpha^2 + sigma^2`` as
    device scalars (the latter precomputed in float64, as the eager conversion computes it)."""
    if kind == "epsilon":
        return (x - sigma * out) / alpha, out
    if kind == "sample":
        return out, (x - alpha * out) / sigma
    if kind == "v_prediction":
        return (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
    return x - sigma * out, x + alpha * out


class _StaticRun:
    """The static buffers of graph mode (kept between calls of the same shapes) and, once captured, the graph."""

    def __init__(self, engine: StaticEngine, guide: StaticGuidance | None, x: torch.Tensor, conds: dict,
                 table: torch.Tensor, t_table: torch.Tensor):
        self.engine = engine
        self.guide = guide
        self.x = x.clone()
        self.conds = {k: v.clone() for k, v in conds.items()}
        self.table = table
        self.t_table = t_table.clone()
        self.graph: Any = None
        self.model_fn: Callable | None = None
        self.kind = ""
        self.postprocess: Callable | None = None

    def load(self, engine: StaticEngine, x: torch.Tensor, conds: dict, table: torch.Tensor, t_table: torch.Tensor,
             noise: torch.Tensor | None) -> None:
        """Copy this call's inputs into the static buffers and reset the state (start of a generation)."""
        if engine is not self.engine:
            self.engine.table.copy_(engine.table)
            self.engine.noise_coef.copy_(engine.noise_coef)
        self.table.copy_(table)
        self.t_table.copy_(t_table)
        for k, v in conds.items():
            if v is not self.conds[k]:
                self.conds[k].copy_(v)
        self.restart(x, noise)

    def restart(self, x: torch.Tensor, noise: torch.Tensor | None) -> None:
        self.x.copy_(x)
        self.engine.reset(noise)
        if self.guide is not None:
            self.guide.reset()


_COLUMNS = ("alpha", "sigma", "norm", "scale", "sigma_over_alpha", "alpha_over_sigma")


def _callback_tensors(x: torch.Tensor, conds: dict) -> dict:
    """What ``callback_on_step_end`` may ask for: the latents, and the prompt embeddings where there are some."""
    return {"latents": x, "prompt_embeds": conds["embeds"]} if "embeds" in conds else {"latents": x}


class _FiniteWatch:
    """The first step whose latents hold a NaN/Inf, tracked on the device (no host sync inside the loop)."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)

    def update(self, x: torch.Tensor, i: int) -> None:
        bad = ~torch.isfinite(x).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, i), self.first_bad)

    def raise_if_bad(self, num_steps: int, sampler: str) -> None:
        step = int(self.first_bad)  # the one host sync, after the loop
        if step >= 0:
            raise FloatingPointError(
                f"sampling produced NaN/Inf at step {step} of {num_steps} (sampler {sampler}); pass "
                "check_finite=False to return it anyway"
            )


def _share(pipe: Any, **modules: Any) -> Any:
    """A second pipeline object over ``pipe``'s modules, with ``modules`` registered in place of its own; ``pipe``
    is left unchanged (its config, attributes and modules). Not diffusers' ``from_pipe``: that casts the new
    pipeline, and so every module it shares, to one dtype (float32 unless told another), which would silently
    run a fp16 UNet in float32, mix dtypes in a half-precision SD3, or cast a float32 VAE kept beside a fp16
    UNet."""
    shared = copy.copy(pipe)  # register_modules gives the copy its own config dict; the modules are shared
    shared.register_modules(**modules)
    return shared


class FewstepPipeline:
    """A fewstep denoising loop around a diffusers SD/SDXL/SD3/Flux pipeline (see the module docstring).

    ``pipe`` holds the shared components with ``scheduler`` swapped in; ``guidance`` is the default rule of
    ``__call__`` (a call may pass another one); ``None`` only for Flux: its distilled guidance embedding with
    ``embedded_guidance_scale``.
    """

    def __init__(
        self,
        pipe: Any,
        guidance: GuidanceRule | None,
        embedded_guidance_scale: float = _FLUX_EMBEDDED_SCALE,
        denoiser: Callable[..., Any] | None = None,
        cuda_graph: bool = False,
    ):
        self.family = _family(pipe)
        if guidance is None and self.family != "flux":
            raise ValueError(f"{self.family} needs a guidance rule (only Flux has a distilled guidance embedding)")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"`cuda_graph` must be a bool, got {cuda_graph!r}")
        if denoiser is not None and not callable(denoiser):
            raise ValueError(f"`denoiser` must be callable like the pipeline's UNet/transformer, got "
                             f"{type(denoiser).__name__}")  # fmt: skip
        self.pipe = pipe
        self.guidance = guidance
        self.embedded_guidance_scale = float(embedded_guidance_scale)
        self._compiled = denoiser
        #: "eager" (the reference loop), "cuda-graph" (capture one step, replay it) or "static" (the captured
        #: step's code run uncaptured, any device: what the CPU tests compare with "eager")
        self._loop_mode = "cuda-graph" if cuda_graph else "eager"
        self._graph_cache: tuple[tuple, _StaticRun] | None = None

    @property
    def _model(self) -> torch.nn.Module:
        return self.pipe.transformer if self.is_flow else self.pipe.unet

    @property
    def denoiser(self) -> Callable[..., Any]:
        """What the loop calls: the ``torch.compile``d wrapper given by ``from_pipe(compile=...)``, else the
        pipeline's current UNet/transformer (so ``fp.pipe.unet = other`` takes effect)."""
        return self._compiled if self._compiled is not None else self._model

    @property
    def cuda_graph(self) -> bool:
        """Whether the loop captures one denoising step in a CUDA graph and replays it."""
        return self._loop_mode == "cuda-graph"

    @property
    def is_flow(self) -> bool:
        """Whether the hosted model is a flow-matching transformer (SD3, Flux)."""
        return self.family in FLOW_FAMILIES

    @classmethod
    def from_pipe(
        cls,
        pipe: Any,
        scheduler: str | Any | None = None,
        guidance: str | GuidanceRule | None = None,
        guidance_scale: float | None = None,
        quantized: str | os.PathLike | torch.nn.Module | None = None,
        quant_mode: str | None = None,
        compile: bool | str | Mapping[str, Any] | None = False,
        cuda_graph: bool = False,
    ) -> FewstepPipeline:
        """Wrap ``pipe`` without copying weights.

        ``scheduler``: a fewstep sampler name (built ``from_config(pipe.scheduler.config)``), a scheduler
        object, or ``None`` to keep ``pipe``'s. ``guidance``: a rule name or object; ``None`` is CFG with
        ``guidance_scale`` (default as diffusers: 7.5 SD, 5.0 SDXL, 7.0 SD3), except for Flux, where ``None`` is
        the distilled guidance embedding with ``guidance_scale`` (default 3.5) and no unconditional pass.
        A sampler that cannot integrate the model's process (``mrs`` on a flow model) is a ValueError.

        ``quantized``: a directory written by ``fewstep.quant.save_quantized`` for this pipeline's UNet/transformer
        (loaded onto a copy with ``load_quantized``, which checks it matches these weights; ``quant_mode``: its
        execution mode, one of ``fewstep.quant.MODES`` or ``"auto"``, default ``"fake"``) or a module from
        ``quantize`` / ``load_quantized``; the wrapper pipeline then holds the quantized denoiser, ``pipe`` keeps
        its own.
        ``compile``: ``torch.compile`` the denoiser the loop calls: ``True``, a mode name (``"max-autotune"``,
        ...) or a dict of ``torch.compile`` arguments (``{"backend": "aot_eager"}``); compiles on the first call.
        ``cuda_graph=True``: capture one whole denoising step in a CUDA graph and replay it for every step (see
        the module docstring); needs a CUDA pipeline and a fewstep scheduler without momentum or step hooks
        (ddim, dpm-solver++, unipc, dpm-solver-v3, flow-euler), and a CFG, CFG++ or APG rule; with ``compile``,
        not a setting that captures CUDA graphs itself (modes ``"reduce-overhead"``, ``"max-autotune"``).
        """
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"`cuda_graph` must be a bool, got {cuda_graph!r}")
        compile_kwargs = check_compile(compile)
        if cuda_graph and compile_kwargs is not None and (
            compile_kwargs.get("mode") in ("reduce-overhead", "max-autotune")
            or (compile_kwargs.get("options") or {}).get("triton.cudagraphs")
        ):
            raise ValueError(
                f"`compile`={compile!r} captures CUDA graphs itself (modes 'reduce-overhead' and 'max-autotune', "
                "option triton.cudagraphs); with cuda_graph=True use 'max-autotune-no-cudagraphs' or 'default'"
            )
        family = _family(pipe)
        flow = family in FLOW_FAMILIES
        if isinstance(scheduler, str):
            samplers.get(scheduler)  # unknown names: the registry's error
            if flow and samplers.process_of(scheduler) == "mean-reverting":
                raise ValueError(
                    f"sampler {scheduler!r} ({samplers.process_of(scheduler)}) cannot sample the flow-matching "
                    f"{family} model; use one of: {', '.join(_flow_samplers())}"
                )
            scheduler = samplers.get(scheduler).from_config(pipe.scheduler.config)
        elif scheduler is None:
            scheduler = pipe.scheduler
        elif not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"`scheduler` must be a sampler name or a scheduler, got {type(scheduler).__name__}")
        if flow:
            _check_flow_scheduler(scheduler, family)
        if family == "flux" and guidance is None:
            rule, embedded = None, _FLUX_EMBEDDED_SCALE if guidance_scale is None else float(guidance_scale)
        else:
            rule, embedded = cls._make_rule(guidance, guidance_scale, family), _FLUX_EMBEDDED_SCALE
            cls._check_compatible(rule, scheduler)
        if cuda_graph:
            _check_graph_scheduler(scheduler)
            if rule is not None:
                _check_graph_rule(rule)
            _check_graph_device(pipe._execution_device)
        model = pipe.transformer if flow else pipe.unet
        module, call = prepare_denoiser(model, quantized, quant_mode, compile)
        overrides = {} if module is model else {"transformer" if flow else "unet": module}
        shared = _share(pipe, scheduler=scheduler, **overrides)
        shared.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return cls(shared, rule, embedded, denoiser=None if call is module else call, cuda_graph=cuda_graph)

    @staticmethod
    def family_of(pipe: Any) -> str | None:
        """``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"`` or ``"class"`` for a pipeline ``from_pipe`` can host, else
        ``None``."""
        try:
            return _family(pipe)
        except ValueError:
            return None

    @staticmethod
    def supports(pipe: Any) -> bool:
        """Whether ``from_pipe`` can host ``pipe`` (an SD 1.x/2.x, SDXL, SD3 or Flux text-to-image pipeline, or a
        ``ClassConditionalPipeline``)."""
        try:
            _family(pipe)
        except ValueError:
            return False
        return True

    @staticmethod
    def _make_rule(
        guidance: str | GuidanceRule | None, guidance_scale: float | None, family: str = "sd"
    ) -> GuidanceRule:
        if guidance is None:
            return guidance_rules.CFG(_DEFAULT_SCALE.get(family, 7.5) if guidance_scale is None else guidance_scale)
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

    @staticmethod
    def _step(scheduler, rule, pairs: bool, out: torch.Tensor, t, x: torch.Tensor, i: int, n: int,
              step_kwargs: dict) -> torch.Tensor:
        """One scheduler step from the model output (``[uncond, cond]`` halves when ``rule`` guides): the rule
        on ``(x0, eps)`` pairs for fewstep schedulers, else plain CFG on the raw output, as diffusers' pipelines
        do for theirs."""
        if rule is not None:
            out_uncond, out_cond = out.chunk(2)
            if pairs:
                return guidance_rules.guided_step(scheduler, rule, out_cond, out_uncond, t, x, i,
                                                  step_kwargs.get("generator"))  # fmt: skip
            out = guidance_rules.raw_cfg(rule, out_cond, out_uncond, i, n)
        return scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]

    # ----------------------------------------------------------------------------------------------
    # the denoising loop: eager, or one static step (uncaptured, or captured in a CUDA graph and replayed)
    def _denoise(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor],
        x: torch.Tensor,
        conds: dict,
        timesteps: torch.Tensor,
        rule: GuidanceRule | None,
        generator: Any,
        callback: Callable | None,
        callback_inputs: Sequence[str],
        check_finite: bool = False,
    ) -> torch.Tensor:
        """Run every step from ``x``: ``model_fn(x, t, conds)`` is the raw model output (``[uncond, cond]``
        halves when ``rule`` guides); ``conds`` holds the conditioning tensors (``embeds``, when present, is what
        the callback sees as ``prompt_embeds``). ``check_finite``: a NaN/Inf in ``x`` is a FloatingPointError
        naming the first step that made it (tracked on the device, read once after the loop)."""
        if self._loop_mode != "eager":
            return self._denoise_static(model_fn, x, conds, timesteps, rule, generator, callback, callback_inputs,
                                        check_finite)  # fmt: skip
        p = self.pipe
        scheduler = p.scheduler
        pairs = guidance_rules.supports_pairs(scheduler)
        step_kwargs = guidance_rules.step_kwargs(scheduler, generator)
        finite = _FiniteWatch(x.device) if check_finite else None
        for i, t in enumerate(p.progress_bar(timesteps)):
            out = model_fn(x, t, conds)
            x = self._step(scheduler, rule, pairs, out, t, x, i, len(timesteps), step_kwargs)
            if callback is not None:
                tensors = _callback_tensors(x, conds)
                outputs = callback(p, i, t, {k: tensors[k] for k in callback_inputs}) or {}
                x = outputs.get("latents", x)
                if "embeds" in conds:
                    conds["embeds"] = outputs.get("prompt_embeds", conds["embeds"])
            if finite is not None:
                finite.update(x, i)
        if finite is not None:
            finite.raise_if_bad(len(timesteps), type(scheduler).__name__)
        return x

    def _static_inputs(self, x: torch.Tensor, rule: GuidanceRule | None, generator: Any):
        """This call's engine (coefficient tables), guidance, per-step table and stochastic noise draws."""
        scheduler = self.pipe.scheduler
        _check_graph_scheduler(scheduler)
        if rule is not None:
            _check_graph_rule(rule)
        plan = scheduler.plan
        check_static_plan(plan, scheduler._state.hooks if scheduler._state is not None else ())
        cdtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        n = plan.num_steps
        engine = StaticEngine(plan, x.shape, x.device, cdtype)
        alphas = np.asarray(plan.grid.alphas[:n], dtype=np.float64)
        sigmas = np.asarray(plan.grid.sigmas[:n], dtype=np.float64)
        guide = StaticGuidance(rule, x.shape, x.device, cdtype) if rule is not None else None
        extra = guide.columns(alphas, sigmas) if guide is not None else np.zeros((n, 3))
        cols = np.concatenate([np.stack([alphas, sigmas, alphas * alphas + sigmas * sigmas], axis=1), extra], axis=1)
        table = torch.as_tensor(cols, dtype=cdtype).to(x.device)
        noise = None
        if engine.stochastic:  # drawn up front, in step order, as the eager steps draw them
            noise = torch.zeros((n, *x.shape), dtype=cdtype, device=x.device)
            for i, decision in enumerate(plan.decisions):
                if decision.stochastic:
                    noise[i] = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return engine, guide, table, noise

    def _static_key(self, x: torch.Tensor, conds: dict, engine: StaticEngine, table: torch.Tensor,
                    timesteps: torch.Tensor, rule: GuidanceRule | None) -> tuple:
        """What a captured step depends on besides the values copied into its buffers."""
        sched = self.pipe.scheduler
        rule_key = None if rule is None else (type(rule).__name__, repr(sorted(rule.config().items())))
        return (
            self.family, self._loop_mode, id(self.denoiser), rule_key, tuple(x.shape), x.dtype, str(x.device),
            tuple(engine.table.shape), engine.stochastic, tuple(table.shape), tuple(timesteps.shape),
            timesteps.dtype, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(conds.items())),
            sched.prediction_type, bool(getattr(sched.config, "clip_sample", False)),
            float(getattr(sched.config, "clip_sample_range", 1.0) or 1.0),
        )

    def _static_step(self, run: _StaticRun) -> None:
        """One denoising step on the static buffers of ``run`` (what graph mode captures): the model call(s),
        the pair conversion, the guidance rule and the solver step, then ``x`` and the step index in place."""
        engine = run.engine
        row = engine.row(run.table)
        t = engine.row(run.t_table)
        alpha, sigma, norm, scale, s_over_a, a_over_s = (row[k] for k in range(len(_COLUMNS)))
        out = run.model_fn(run.x, t, run.conds)
        x = run.x.to(engine.dtype)
        if run.guide is not None:
            out_uncond, out_cond = out.chunk(2)
            cond = run.postprocess(*_static_pair(run.kind, out_cond.to(engine.dtype), x, alpha, sigma, norm))
            uncond = run.postprocess(*_static_pair(run.kind, out_uncond.to(engine.dtype), x, alpha, sigma, norm))
            x0, eps = run.guide.combine(cond, uncond, scale, s_over_a, a_over_s)
            x0, eps = run.postprocess(x0.to(engine.dtype), eps.to(engine.dtype))
        else:
            x0, eps = run.postprocess(*_static_pair(run.kind, out.to(engine.dtype), x, alpha, sigma, norm))
        run.x.copy_(engine.advance(x, x0, eps).to(run.x.dtype))
        engine.index.add_(1)

    def _capture(self, run: _StaticRun, x: torch.Tensor, noise: torch.Tensor | None) -> None:
        """Warm up one step on a side stream (lazy initialisation, ``torch.compile``, library handles), restore
        the start state, capture one step into ``run.graph``."""
        device = run.x.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._static_step(run)
        torch.cuda.current_stream(device).wait_stream(side)
        run.restart(x, noise)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_step(run)
        run.graph = graph
        run.restart(x, noise)  # capturing records the kernels without running them; restart to be explicit

    def _denoise_static(self, model_fn, x, conds, timesteps, rule, generator, callback, callback_inputs,
                        check_finite=False):
        p = self.pipe
        graph = self._loop_mode == "cuda-graph"
        if graph:
            _check_graph_device(x.device)
        engine, guide, table, noise = self._static_inputs(x, rule, generator)
        key = self._static_key(x, conds, engine, table, timesteps, rule)
        if self._graph_cache is not None and self._graph_cache[0] == key:
            run = self._graph_cache[1]
            run.load(engine, x, conds, table, timesteps, noise)
        else:
            self._graph_cache = None  # free the previous graph and buffers first
            run = _StaticRun(engine, guide, x, conds, table, timesteps)
            run.restart(x, noise)
            self._graph_cache = (key, run)
        run.model_fn = model_fn
        run.kind = p.scheduler.prediction_type
        run.postprocess = p.scheduler._postprocess_pair
        if graph and run.graph is None:
            self._capture(run, x, noise)
        finite = _FiniteWatch(x.device) if check_finite else None
        for i, t in enumerate(p.progress_bar(timesteps)):
            if graph:
                run.graph.replay()
            else:
                self._static_step(run)
            if finite is not None:
                finite.update(run.x, i)
            if callback is not None:
                tensors = _callback_tensors(run.x, run.conds)
                outputs = callback(p, i, t, {k: tensors[k] for k in callback_inputs}) or {}
                for name, value in outputs.items():
                    if name in tensors and value is not tensors[name]:
                        raise ValueError(
                            f"callback_on_step_end returned a new `{name}` at step {i}: with cuda_graph=True the "
                            "replayed step reads static buffers, so change the given tensor in place "
                            f"(tensors[{name!r}].copy_(...)) or run without cuda_graph"
                        )
        if finite is not None:
            finite.raise_if_bad(len(timesteps), type(p.scheduler).__name__)
        return run.x.clone()

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
        embedded_guidance_scale: float | None = None,
        class_labels: Sequence[int] | int | torch.Tensor | None = None,
        check_finite: bool = False,
    ) -> ImagePipelineOutput | tuple:
        """Text-to-image (class-conditional: ``class_labels``) with the hosted scheduler and guidance rule.

        ``guidance``/``guidance_scale`` override the pipeline's rule for this call (a name plus scale, a rule
        object, or ``guidance_scale`` alone: the pipeline's rule kind with that scale).
        ``callback_on_step_end(pipe, i, t, tensors) -> dict`` runs after each step with the tensors named in
        ``callback_on_step_end_tensor_inputs`` (``latents``, ``prompt_embeds``) and may replace them.
        ``output_type``: ``pil``, ``np``, ``pt`` or ``latent`` (Flux: packed latents, as diffusers).
        Flux: ``embedded_guidance_scale`` (default: the pipeline's, 3.5) feeds the guidance embedding of
        guidance-distilled transformers; without a rule (the default) ``guidance_scale`` alone sets it; a rule
        needs ``negative_prompt`` or ``negative_prompt_embeds`` (true CFG).
        Class-conditional pipelines (family ``"class"``) take ``class_labels`` (one image per label and per
        ``num_images_per_prompt``) and no prompt; the unconditional branch is the null class; images as
        ``ClassConditionalPipeline`` returns them (``np``: NHWC in [0, 1]).
        ``check_finite``: raise a FloatingPointError naming the first step whose latents hold a NaN/Inf (tracked on
        the device, read once after the loop).
        """
        p = self.pipe
        embedded = self.embedded_guidance_scale if embedded_guidance_scale is None else float(embedded_guidance_scale)
        if guidance is None and self.guidance is None:  # Flux, distilled guidance embedding only
            rule = None
            if guidance_scale is not None:
                embedded = float(guidance_scale)
        elif guidance is None:
            rule = self.guidance if guidance_scale is None else self._make_rule(self.guidance.name, guidance_scale)
        else:
            rule = self._make_rule(guidance, guidance_scale)
        if rule is not None:
            self._check_compatible(rule, p.scheduler)
        if output_type not in PIPELINE_OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(PIPELINE_OUTPUT_TYPES)}, got {output_type!r}")
        check_int("num_inference_steps", num_inference_steps, 1, numpy_ok=False)
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in _CALLBACK_TENSORS]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {bad} not supported; allowed: {list(_CALLBACK_TENSORS)}"
            )
        if not isinstance(check_finite, bool):
            raise ValueError(f"`check_finite` must be True or False, got {check_finite!r}")
        check_int("num_images_per_prompt", num_images_per_prompt, 1, numpy_ok=False)
        if self.family == CLASS_FAMILY:
            if prompt is not None or prompt_embeds is not None:
                raise ValueError("a class-conditional pipeline takes `class_labels`, not `prompt`/`prompt_embeds`")
            if "prompt_embeds" in callback_on_step_end_tensor_inputs:
                raise ValueError("`callback_on_step_end_tensor_inputs`: a class-conditional pipeline has no "
                                 "prompt_embeds; allowed: ['latents']")  # fmt: skip
            return self._class_call(rule, class_labels, num_inference_steps, num_images_per_prompt, generator,
                                    latents, output_type, return_dict, callback_on_step_end,
                                    callback_on_step_end_tensor_inputs, check_finite)  # fmt: skip
        if class_labels is not None:
            raise ValueError(f"`class_labels` is for class-conditional pipelines; this one is {self.family} "
                             "(text-to-image: pass `prompt`)")  # fmt: skip
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        if self.is_flow:
            return self._flow_call(
                rule, embedded, batch, {
                    "prompt": prompt, "height": height, "width": width, "num_inference_steps": num_inference_steps,
                    "negative_prompt": negative_prompt, "num_images_per_prompt": num_images_per_prompt,
                    "generator": generator, "latents": latents, "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": negative_prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
                    "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds, "output_type": output_type,
                    "return_dict": return_dict, "callback_on_step_end": callback_on_step_end,
                    "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
                    "check_finite": check_finite,
                },
            )  # fmt: skip
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
        conds = {"embeds": embeds} if added is None else {"embeds": embeds, **added}
        denoiser = self.denoiser

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
            model_in = torch.cat([x, x]) if guided else x
            model_in = scheduler.scale_model_input(model_in, t)
            added_kw = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]} if "time_ids" in c else None
            return denoiser(model_in, t, encoder_hidden_states=c["embeds"], added_cond_kwargs=added_kw,
                            return_dict=False)[0]  # fmt: skip

        x = self._denoise(model_fn, x, conds, timesteps, rule if guided else None, generator, callback_on_step_end,
                          callback_on_step_end_tensor_inputs, check_finite)  # fmt: skip
        image = self._decode(x, output_type, device, embeds.dtype)
        p.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ----------------------------------------------------------------------------------------------
    # class-conditional UNet2DModel (the embedded digits models)
    def _class_call(self, rule: GuidanceRule, class_labels: Any, num_inference_steps: int, per_label: int,
                    generator: Any, latents: torch.Tensor | None, output_type: str, return_dict: bool,
                    callback: Callable | None, callback_inputs: Sequence[str], check_finite: bool
                    ) -> ImagePipelineOutput | tuple:
        """The denoising loop of a ``ClassConditionalPipeline``: one UNet call per step on ``[null, labels]``
        (``[labels]`` without guidance), validated arguments of ``__call__``."""
        p = self.pipe
        labels = [c for c in p.check_class_labels(class_labels) for _ in range(per_label)]
        unet = p.unet
        device = p._execution_device
        dtype = unet.dtype
        shape = (len(labels), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        scheduler = p.scheduler
        x = latents.to(device=device, dtype=dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
        guided = rule.needs_uncond
        rule.reset()
        cond = torch.tensor(labels, device=device)
        conds = {"labels": torch.cat([torch.full_like(cond, p.null_class), cond]) if guided else cond}
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        denoiser = self.denoiser

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
            model_in = torch.cat([x, x]) if guided else x
            model_in = scheduler.scale_model_input(model_in, t)
            t_batch = t.reshape(1).to(device).expand(model_in.shape[0])
            return denoiser(model_in, t_batch, class_labels=c["labels"]).sample

        x = self._denoise(model_fn, x, conds, timesteps, rule if guided else None, generator, callback,
                          callback_inputs, check_finite)  # fmt: skip
        image = self._class_images(x, output_type)
        p.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _class_images(self, x: torch.Tensor, output_type: str) -> Any:
        """``ClassConditionalPipeline``'s outputs: the sample itself (``latent``, model space), NCHW in [0, 1]
        (``pt``), NHWC numpy in [0, 1] (``np``) or grayscale PIL images."""
        if output_type == "latent":
            return x
        images = to_unit_range(x.float())
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        return self.pipe.numpy_to_pil(array) if output_type == "pil" else array

    # ----------------------------------------------------------------------------------------------
    # SD3 / Flux (flow-matching transformers)
    def _flow_encode(self, guided: bool, device, kw: dict) -> dict:
        """Prompt embeddings through the base pipeline's ``encode_prompt``: ``pos``/``pooled`` (+ ``neg``/
        ``neg_pooled`` when ``guided``), and Flux's ``text_ids``/``neg_text_ids``."""
        p, n = self.pipe, kw["num_images_per_prompt"]
        if self.family == "sd3":
            pos, neg, pooled, neg_pooled = p.encode_prompt(
                prompt=kw["prompt"], prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=n,
                do_classifier_free_guidance=guided, negative_prompt=kw["negative_prompt"],
                prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
                pooled_prompt_embeds=kw["pooled_prompt_embeds"],
                negative_pooled_prompt_embeds=kw["negative_pooled_prompt_embeds"],
            )  # fmt: skip
            return {"pos": pos, "neg": neg, "pooled": pooled, "neg_pooled": neg_pooled}
        pos, pooled, text_ids = p.encode_prompt(
            prompt=kw["prompt"], prompt_2=None, device=device, num_images_per_prompt=n,
            prompt_embeds=kw["prompt_embeds"], pooled_prompt_embeds=kw["pooled_prompt_embeds"],
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

    def default_image_size(self) -> int:
        """Side in pixels of an image generated without ``height``/``width``."""
        p = self.pipe
        if self.family == CLASS_FAMILY:
            return int(p.unet.config.sample_size)
        base = p.default_sample_size if self.is_flow else p.unet.config.sample_size
        return int(base * p.vae_scale_factor)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, height: int | None = None, width: int | None = None
                       ) -> torch.Tensor:
        """Images in [0, 1] (NCHW, float32, CPU) from the latents a call with ``output_type="latent"`` returned,
        by the same VAE decode as ``output_type="pt"``; ``height``/``width``: those of that call (needed to unpack
        Flux latents; default :meth:`default_image_size`)."""
        if self.family == CLASS_FAMILY:
            image = self._class_images(latents, "pt")
        elif self.is_flow:
            size = self.default_image_size()
            image = self._flow_decode(latents, "pt", height or size, width or size)
        else:
            image = self._decode(latents, "pt", latents.device, latents.dtype)
        return image.float().cpu()

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
        device = p._execution_device
        guided = rule is not None and rule.needs_uncond
        if rule is not None:
            rule.reset()
        enc = self._flow_encode(guided, device, kw)
        n = batch * kw["num_images_per_prompt"]
        for key in ("pos", "neg", "pooled", "neg_pooled"):  # given embeddings: one row per prompt, not per image
            value = enc.get(key)
            if value is not None and value.shape[0] == batch and n != batch:
                enc[key] = value.repeat_interleave(kw["num_images_per_prompt"], dim=0)
        generator = kw["generator"]
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
                               txt_ids=c["text_ids"], img_ids=c["image_ids"], return_dict=False)[0]  # fmt: skip
                if not guided:
                    return out
                out_uncond = denoiser(
                    hidden_states=x, timestep=t_in, guidance=c.get("guidance"), pooled_projections=c["neg_pooled"],
                    encoder_hidden_states=c["neg"], txt_ids=c["neg_text_ids"], img_ids=c["image_ids"],
                    return_dict=False,
                )[0]  # fmt: skip
                return torch.cat([out_uncond, out])
        else:
            conds = {"embeds": embeds, "pooled": pooled}

            def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
                model_in = torch.cat([x, x]) if guided else x
                return denoiser(hidden_states=model_in, timestep=t.expand(model_in.shape[0]),
                                encoder_hidden_states=c["embeds"], pooled_projections=c["pooled"],
                                return_dict=False)[0]  # fmt: skip

        x = self._denoise(model_fn, x, conds, timesteps, rule if guided else None, generator,
                          kw["callback_on_step_end"], kw["callback_on_step_end_tensor_inputs"],
                          kw["check_finite"])  # fmt: skip
        image = self._flow_decode(x, kw["output_type"], height, width)
        p.maybe_free_model_hooks()
        if not kw["return_dict"]:
            return (image,)
        return ImagePipelineOutput(images=image)
