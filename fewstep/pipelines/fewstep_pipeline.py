"""``FewstepPipeline``: one denoising loop hosting a fewstep scheduler and a guidance rule around an existing
diffusers SD 1.x/2.x or SDXL pipeline (UNet2DConditionModel, SDXL's added text/time conditions), an SD3 or
Flux pipeline (flow-matching transformers), or the class-conditional pipeline of the embedded digits models
(``ClassConditionalPipeline``, family ``"class"``: ``class_labels`` instead of a prompt, the null class as the
unconditional branch; that pipeline's own ``__call__`` runs this loop too).

Built with ``FewstepPipeline.from_pipe(pipe, scheduler="unipc", guidance="apg")``: the base pipeline's modules
are shared, not copied and not cast (``sharing.share_modules``; diffusers' ``from_pipe`` would cast them), and its own
``encode_prompt``, ``prepare_latents``, ``_get_add_time_ids``, VAE decode, safety checker / watermark and
``image_processor`` are reused; only the loop is fewstep's: per step one UNet call on ``[uncond, cond]``, both
outputs converted to ``(x0, eps)`` pairs, the rule combines them and the scheduler's ``step_pair`` advances (so
CFG++ and APG work with every fewstep solver).

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
the eager loop. The static step lives in ``graph_step.py`` and the SD3/Flux methods in ``flow_families.py``
(mixins of ``FewstepPipeline``); this module holds the shared loop, SD/SDXL and the class-conditional family.
Image-to-image and inpainting pipelines (with text-to-image UNets) are hosted as their text-to-image siblings
(``sharing.text_to_image_base``); not covered yet: their image inputs, IP-adapter, LCM ``timestep_cond``, SD3
skip-layer guidance.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from diffusers import ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import guidance as guidance_rules
from .. import samplers
from .._checks import check_bool, check_int, check_number
from ..guidance import GuidanceRule
from .denoiser import check_compile, check_denoiser_current, check_savable, prepare_denoiser, unwrap_compiled
from .execution_device import ExecutionDevice
from .flow_families import (
    FLOW_FAMILIES,
    FLUX_EMBEDDED_SCALE,
    TRANSFORMER_FAMILIES,
    FlowFamilies,
    check_flow_scheduler,
    flow_samplers,
    flow_shift_mu,
)
from .graph_step import (
    StaticLoop,
    StaticRun,
    check_graph_device,
    check_graph_rule,
    check_graph_scheduler,
    kwargs_cache_key,
)
from .loop_checks import FiniteWatch, callback_tensors, check_generators, check_latents, check_returned
from .sharing import pixel_outputs, share_modules, stable_diffusion_scheduler_fixes, text_to_image_base

__all__ = ["FewstepPipeline", "PIPELINE_OUTPUT_TYPES", "flow_shift_mu"]

PIPELINE_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_CALLBACK_TENSORS = ("latents", "prompt_embeds")


#: default guidance of each family when ``from_pipe`` gets none (diffusers' defaults); Flux: its embedding
_DEFAULT_SCALE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "class": 3.0}
#: the family of ``ClassConditionalPipeline`` (class labels, no text encoder or VAE)
CLASS_FAMILY = "class"



def _check_text_to_image(pipe: Any, model: Any) -> None:
    """Refuse pipelines whose denoiser needs inputs the text-to-image loop does not give it (a ControlNet's
    residuals; an inpainting, depth, pix2pix or upscaling UNet's extra input channels), rather than run them
    wrong or fail deep inside the model. Their own pipelines take a fewstep scheduler directly."""
    how = ("use it with a fewstep scheduler as it is (pipe.scheduler = fewstep.samplers.get(name).from_config("
           "pipe.scheduler.config)), or host its text-to-image base pipeline")
    name = type(pipe).__name__
    if getattr(pipe, "controlnet", None) is not None:
        raise ValueError(f"FewstepPipeline hosts text-to-image loops; {name} has a ControlNet, whose residuals "
                         f"this loop does not compute: {how}")  # fmt: skip
    cfg = model.config
    if getattr(cfg, "time_cond_proj_dim", None) is not None:
        raise ValueError(
            f"FewstepPipeline does not host guidance-distilled UNets (LCM: {type(model).__name__} with "
            f"time_cond_proj_dim={cfg.time_cond_proj_dim} takes the guidance scale as an embedding, "
            f"`timestep_cond`, and runs one branch): use {name} itself"
        )
    in_ch = getattr(cfg, "in_channels", None)
    out_ch = getattr(cfg, "out_channels", None) or in_ch
    if in_ch is not None and in_ch != out_ch:
        raise ValueError(
            f"FewstepPipeline hosts text-to-image loops; {name}'s {type(model).__name__} takes {in_ch} input "
            f"channels for {out_ch} output channels (an inpainting, depth, pix2pix or upscaling model that expects "
            f"extra image inputs): {how}"
        )


def _input_scaling(scheduler: Any) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The scheduler's ``scale_model_input``; diffusers' flow schedulers (FlowMatchEulerDiscreteScheduler) have no
    input scaling, nor the method: identity for them."""
    return getattr(scheduler, "scale_model_input", lambda sample, t: sample)


def _family(pipe: Any) -> str:
    from .class_conditional import ClassConditionalPipeline

    if isinstance(pipe, ClassConditionalPipeline):
        return CLASS_FAMILY
    for attr in ("transformer", "unet"):
        model = getattr(pipe, attr, None)
        if model is not None and hasattr(model, "config"):
            _check_text_to_image(pipe, model)
            break
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and hasattr(pipe, "encode_prompt"):
        family = TRANSFORMER_FAMILIES.get(type(unwrap_compiled(transformer)).__name__)
        if family is not None:
            return family
    unet = getattr(pipe, "unet", None)
    if (unet is None or type(unwrap_compiled(unet)).__name__ != "UNet2DConditionModel"
            or not hasattr(pipe, "encode_prompt")):
        raise ValueError(
            f"FewstepPipeline.from_pipe supports SD 1.x/2.x and SDXL text-to-image pipelines (a UNet2DConditionModel "
            f"and encode_prompt), SD3 (SD3Transformer2DModel), Flux (FluxTransformer2DModel) and fewstep's "
            f"ClassConditionalPipeline; got {type(pipe).__name__}"
        )
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd"


def _component_names(pipe: Any) -> Collection[str]:
    """The names a diffusers pipeline registers as components (its config keys, without the private ones)."""
    config = getattr(pipe, "config", None)
    return [k for k in config.keys() if not k.startswith("_")] if isinstance(config, Mapping) else ()


class FewstepPipeline(StaticLoop, FlowFamilies):
    """A fewstep denoising loop around a diffusers SD/SDXL/SD3/Flux pipeline or a ``ClassConditionalPipeline``
    (see the module docstring).

    ``pipe`` holds the shared components with ``scheduler`` swapped in; ``guidance`` is the default rule of
    ``__call__`` (a call may pass another one); ``None`` only for Flux: its distilled guidance embedding with
    ``embedded_guidance_scale``.
    """

    def __init__(
        self,
        pipe: Any,
        guidance: GuidanceRule | None,
        embedded_guidance_scale: float = FLUX_EMBEDDED_SCALE,
        denoiser: Callable[..., Any] | None = None,
        cuda_graph: bool = False,
    ):
        self.family = _family(pipe)
        if guidance is not None and not isinstance(guidance, GuidanceRule):
            raise TypeError(f"`guidance` must be a GuidanceRule or None (FewstepPipeline.from_pipe also takes a name "
                            f"like 'cfg'), got {guidance!r}")  # fmt: skip
        if guidance is None and self.family != "flux":
            raise ValueError(f"{self.family} needs a guidance rule (only Flux has a distilled guidance embedding)")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"`cuda_graph` must be a bool, got {cuda_graph!r}")
        if denoiser is not None and not callable(denoiser):
            raise ValueError(f"`denoiser` must be callable like the pipeline's UNet/transformer, got "
                             f"{type(denoiser).__name__}")  # fmt: skip
        self.pipe = pipe
        self.guidance = guidance
        self.embedded_guidance_scale = check_number("embedded_guidance_scale", embedded_guidance_scale, 0.0)
        self._compiled = denoiser
        #: the module ``denoiser`` was made from (a swapped ``pipe.unet`` would otherwise be silently ignored)
        self._compiled_for = self._model if denoiser is not None else None
        #: "eager" (the reference loop), "cuda-graph" (capture one step, replay it) or "static" (the captured
        #: step's code run uncaptured, any device: what the CPU tests compare with "eager")
        self._loop_mode = "cuda-graph" if cuda_graph else "eager"
        self._graph_cache: tuple[tuple, StaticRun] | None = None
        self._device_cache = ExecutionDevice()
        #: this call's attention kwargs (``kwargs_cache_key``): part of graph mode's cache key (a LoRA scale is
        #: baked into a captured step)
        self._model_kwargs_key: Any = None
        #: whether the last call evaluated the unconditional branch too (CFG on a doubled batch, Flux true CFG)
        self.last_call_guided = False

    def _exec_device(self) -> torch.device:
        """The base pipeline's ``_execution_device``, cached while its components stay put (``ExecutionDevice``:
        diffusers walks every submodule for offloading hooks on each call)."""
        return self._device_cache(self.pipe)

    @property
    def _model(self) -> torch.nn.Module:
        return self.pipe.transformer if self.is_flow else self.pipe.unet

    @property
    def denoiser(self) -> Callable[..., Any]:
        """What the loop calls: the ``torch.compile``d wrapper given by ``from_pipe(compile=...)``, else the
        pipeline's current UNet/transformer (so ``fp.pipe.unet = other`` takes effect; with a compiled denoiser such
        a swap is an error: the compiled one would run the old module)."""
        if self._compiled is None:
            return self._model
        check_denoiser_current(self._model, self._compiled_for)
        return self._compiled

    @property
    def cuda_graph(self) -> bool:
        """Whether the loop captures one denoising step in a CUDA graph and replays it."""
        return self._loop_mode == "cuda-graph"

    @property
    def is_flow(self) -> bool:
        """Whether the hosted model is a flow-matching transformer (SD3, Flux)."""
        return self.family in FLOW_FAMILIES

    # the per-call properties diffusers pipelines expose (set by each call on ``pipe``; see ``_set_call_state``)
    @property
    def num_timesteps(self) -> int | None:
        """Model calls of the last (or running) call, as diffusers' ``pipe.num_timesteps``."""
        return getattr(self.pipe, "_num_timesteps", None)

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the last (or running) call, as diffusers' ``pipe.guidance_scale``."""
        return getattr(self.pipe, "_guidance_scale", None)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the last (or running) call evaluates the unconditional branch (``last_call_guided``): also for
        per-step CFG scales and CFG++, where ``pipe.guidance_scale`` (diffusers' scale-above-1 test) says no."""
        return bool(self.last_call_guided)

    @property
    def interrupt(self) -> bool:
        """diffusers' interrupt flag (set ``fp.pipe._interrupt = True`` in a callback to stop after the step)."""
        return bool(getattr(self.pipe, "_interrupt", False))

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
        """Wrap ``pipe`` without copying weights. ``pipe`` may be another ``FewstepPipeline``: its hosted pipeline
        (scheduler, quantized denoiser) is wrapped anew; its ``compile`` and ``cuda_graph`` settings are not carried.

        ``scheduler``: a fewstep sampler name (built ``from_config(pipe.scheduler.config)``), a scheduler
        object, or ``None`` to keep ``pipe``'s. A new one gets the config fixes ``StableDiffusionPipeline`` gives the
        schedulers it is built with (``steps_offset = 1``, ``clip_sample = False``; SD 1.x/2.x only).
        ``guidance``: a rule name or object; ``None`` is CFG with ``guidance_scale`` (default as diffusers: 7.5 SD,
        5.0 SDXL, 7.0 SD3), except for Flux, where ``None`` is the distilled guidance embedding with
        ``guidance_scale`` (default 3.5) and no unconditional pass. A sampler that cannot integrate the model's
        process (``mrs`` on a flow model) is a ValueError.

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
        if isinstance(pipe, FewstepPipeline):  # another wrapper: host its pipeline (scheduler, quantized denoiser)
            pipe = pipe.pipe
        family = _family(pipe)
        pipe = text_to_image_base(pipe, family)
        flow = family in FLOW_FAMILIES
        if isinstance(scheduler, str):
            samplers.get(scheduler)  # unknown names: the registry's error
            if flow and samplers.process_of(scheduler) == "mean-reverting":
                raise ValueError(
                    f"sampler {scheduler!r} ({samplers.process_of(scheduler)}) cannot sample the flow-matching "
                    f"{family} model; use one of: {', '.join(flow_samplers())}"
                )
            scheduler = samplers.get(scheduler).from_config(pipe.scheduler.config)
        elif scheduler is None:
            scheduler = pipe.scheduler
        elif not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"`scheduler` must be a sampler name or a scheduler, got {type(scheduler).__name__}")
        if flow:
            check_flow_scheduler(scheduler, family)
        if scheduler is not pipe.scheduler:  # a new one: as StableDiffusionPipeline.from_pipe(pipe, scheduler=...)
            stable_diffusion_scheduler_fixes(pipe, scheduler)
        if family == "flux" and guidance is None:
            rule, embedded = None, FLUX_EMBEDDED_SCALE if guidance_scale is None else float(guidance_scale)
        else:
            rule, embedded = cls._make_rule(guidance, guidance_scale, family), FLUX_EMBEDDED_SCALE
            cls._check_compatible(rule, scheduler, family)
        if cuda_graph:
            check_graph_scheduler(scheduler)
            if rule is not None:
                check_graph_rule(rule)
            check_graph_device(pipe._execution_device)
        model = pipe.transformer if flow else pipe.unet
        module, call = prepare_denoiser(model, quantized, quant_mode, compile, "transformer" if flow else "unet")
        overrides = {} if module is model else {"transformer" if flow else "unet": module}
        shared = share_modules(pipe, scheduler=scheduler, **overrides)
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
        if guidance is None or (guidance == "cfg" and guidance_scale is None):  # CFG: the family's diffusers default
            return guidance_rules.CFG(_DEFAULT_SCALE.get(family, 7.5) if guidance_scale is None else guidance_scale)
        return guidance_rules.make(guidance, guidance_scale)

    def _guided(self, rule: GuidanceRule | None) -> bool:
        """Whether this call runs the unconditional branch. As in diffusers' text-to-image pipelines, plain CFG
        with a (single) scale <= 1 runs the conditional model alone (``guidance_scale=0`` for distilled "turbo"
        models), guidance_rescale included; the class-conditional digits pipelines keep the formula literally
        (``w = 0``: the unconditional model) and other rules always run both branches."""
        if rule is None or not rule.needs_uncond:
            return False
        plain = type(rule) is guidance_rules.CFG and rule.scales is None
        return not (plain and self.family != CLASS_FAMILY and rule.guidance_scale <= 1.0)

    def _check_base_inputs(self, **known: Any) -> None:
        """The base pipeline's own ``check_inputs`` (divisible sizes, prompt/embedding combinations and shapes), with
        the arguments this call knows; the rest at their defaults or ``None``."""
        check = getattr(self.pipe, "check_inputs", None)
        if check is None:
            return
        params = inspect.signature(check).parameters
        check(**{name: known.get(name) for name, prm in params.items()
                 if name in known or (prm.default is prm.empty and prm.kind is not prm.VAR_KEYWORD)})  # fmt: skip

    @staticmethod
    def _check_compatible(rule: GuidanceRule, scheduler: Any, family: str) -> None:
        """A rule other than plain CFG needs a scheduler that takes ``(x0, eps)`` pairs; the message lists the
        fewstep samplers that can integrate this family's model."""
        if rule.needs_uncond and not guidance_rules.supports_pairs(scheduler):
            if not isinstance(rule, guidance_rules.CFG):
                names = flow_samplers() if family in FLOW_FAMILIES else samplers.names("diffusion", standalone=True)
                raise ValueError(
                    f"guidance {rule.name!r} needs a fewstep scheduler (with `step_pair`), got "
                    f"{type(scheduler).__name__}; use one of: {', '.join(names)}"
                )

    # ----------------------------------------------------------------------------------------------
    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    # the DiffusionPipeline conveniences a diffusers user reaches for on the pipeline in hand
    def to(self, *args: Any, **kwargs: Any) -> FewstepPipeline:
        """``DiffusionPipeline.to`` on the hosted pipeline (its components, the quantized denoiser included);
        returns this wrapper, so ``fp = fp.to("cuda")`` keeps the fewstep loop."""
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        """The hosted pipeline's device (``DiffusionPipeline.device``)."""
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        """The hosted pipeline's dtype (``DiffusionPipeline.dtype``)."""
        return self.pipe.dtype

    @property
    def components(self) -> dict[str, Any]:
        """The hosted pipeline's components (``DiffusionPipeline.components``: the fewstep scheduler, and the
        quantized denoiser where there is one)."""
        return self.pipe.components

    def __getattr__(self, name: str) -> Any:
        """What the wrapper does not define is read from the hosted pipeline, as on the diffusers pipeline in hand:
        its components (``fp.vae``, ``fp.unet``, ``fp.tokenizer``), ``config``, ``encode_prompt`` and the
        pipeline-wide switches (``fp.enable_model_cpu_offload()``, ``fp.enable_attention_slicing()``,
        ``fp.load_lora_weights(...)``, ``fp.enable_freeu(...)``). Private names are not forwarded."""
        pipe = self.__dict__.get("pipe")
        if pipe is None or name.startswith("_"):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")
        try:
            return getattr(pipe, name)
        except AttributeError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}, nor has the "
                                 f"{type(pipe).__name__} it hosts") from None

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning one of the hosted pipeline's components (``fp.scheduler = ...``, ``fp.unet = ...``) replaces it
        there, as on a diffusers pipeline (the next call checks it as it checks ``fp.pipe.scheduler = ...``);
        other names are the wrapper's own attributes."""
        pipe = self.__dict__.get("pipe")
        if pipe is not None and name != "pipe" and name in _component_names(pipe):
            setattr(pipe, name, value)
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        pipe = self.__dict__.get("pipe")
        forwarded = {n for n in dir(pipe) if not n.startswith("_")} if pipe is not None else set()
        return sorted(set(super().__dir__()) | forwarded)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained`` of the hosted pipeline: its components with the fewstep
        scheduler's config (``DiffusionPipeline.from_pretrained`` reloads it after ``import fewstep.pipelines``).
        Refused while the denoiser is quantized: diffusers would write the 8-bit layers under names its model
        classes do not know, and reloading would give random weights. Save the quantization with
        ``fewstep.quant.save_quantized``, the base pipeline with its own ``save_pretrained``, and rebuild with
        ``FewstepPipeline.from_pipe(pipe, quantized=DIR)``."""
        check_savable(self._model, "transformer" if self.is_flow else "unet")
        self.pipe.save_pretrained(save_directory, **kwargs)

    def _check_model_kwargs(self, clip_skip: Any, cross_attention_kwargs: Any, joint_attention_kwargs: Any
                            ) -> dict[str, Any] | None:
        """Validate diffusers' ``clip_skip`` / ``cross_attention_kwargs`` / ``joint_attention_kwargs`` for this
        family; returns the attention kwargs the denoiser takes (and remembers them for graph mode's cache key)."""
        family = self.family
        if clip_skip is not None:
            if family not in ("sd", "sdxl", "sd3"):
                raise ValueError(f"`clip_skip` applies to SD, SDXL and SD3 (CLIP text encoders); this pipeline is "
                                 f"{family}")  # fmt: skip
            check_int("clip_skip", clip_skip, 0)
        flow = family in FLOW_FAMILIES
        wrong, right = ("cross_attention_kwargs", "joint_attention_kwargs") if flow else (
            "joint_attention_kwargs", "cross_attention_kwargs")
        given = {"cross_attention_kwargs": cross_attention_kwargs, "joint_attention_kwargs": joint_attention_kwargs}
        if given[wrong] is not None:
            if family == CLASS_FAMILY:
                raise ValueError(f"`{wrong}` applies to text-to-image pipelines; the class-conditional UNet takes none")
            raise ValueError(f"`{wrong}` is for {'UNet' if flow else 'transformer'} pipelines; {family} takes "
                             f"`{right}`")  # fmt: skip
        kwargs = given[right]
        if kwargs is not None:
            if family == CLASS_FAMILY:
                raise ValueError(f"`{right}` applies to text-to-image pipelines; the class-conditional UNet takes none")
            if not isinstance(kwargs, Mapping):
                raise ValueError(f"`{right}` must be a dict of attention-processor arguments, got "
                                 f"{type(kwargs).__name__}")  # fmt: skip
            kwargs = dict(kwargs)
        self._model_kwargs_key = None if kwargs is None else kwargs_cache_key(kwargs)
        return kwargs

    def _encode(self, guided: bool, device, num_images_per_prompt: int, kw: dict) -> dict:
        p = self.pipe
        if self.family == "sd":
            pos, neg = p.encode_prompt(
                kw["prompt"], device, num_images_per_prompt, guided, kw["negative_prompt"],
                prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
                lora_scale=kw.get("lora_scale"), clip_skip=kw.get("clip_skip"),
            )  # fmt: skip
            return {"pos": pos, "neg": neg}
        return self._encode_pooled(guided, device, num_images_per_prompt, kw)

    def _encode_pooled(self, guided: bool, device, num_images_per_prompt: int, kw: dict, **extra: Any) -> dict:
        """``encode_prompt`` of pipelines with pooled embeddings (SDXL, SD3; ``extra``: e.g. SD3's unused
        ``prompt_2``/``prompt_3``): ``pos``, ``neg``, ``pooled``, ``neg_pooled``."""
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=kw["prompt"], **extra, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided, negative_prompt=kw["negative_prompt"],
            prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
            pooled_prompt_embeds=kw["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=kw["negative_pooled_prompt_embeds"], lora_scale=kw.get("lora_scale"),
            clip_skip=kw.get("clip_skip"),
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

    def _decode(self, latents: torch.Tensor, output_type: str, device, dtype, with_nsfw: bool = False) -> Any:
        """VAE decode and postprocessing as the base pipeline does (SD's safety checker, SDXL's float32 upcast of a
        float16 VAE with ``force_upcast`` and its watermark); ``with_nsfw``: also return the checker's flags."""
        p = self.pipe
        if output_type == "latent":
            return (latents, None) if with_nsfw else latents
        vae = p.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.family == "sdxl" and mean is not None and std is not None:  # as StableDiffusionXLPipeline (SD: no)
            c = latents.shape[1]
            mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            z = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            z = latents / vae.config.scaling_factor
        force_upcast = bool(getattr(vae.config, "force_upcast", False))
        upcast = self.family == "sdxl" and vae.dtype == torch.float16 and force_upcast
        if upcast:  # SDXL's VAE overflows in float16: decode in float32, as StableDiffusionXLPipeline does
            vae.to(dtype=torch.float32)
        try:
            image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        do_denormalize, nsfw = None, None
        if self.family == "sd" and getattr(p, "safety_checker", None) is not None:
            image, nsfw = p.run_safety_checker(image, device, dtype)
            do_denormalize = [not flag for flag in nsfw] if nsfw is not None else None
        if self.family == "sdxl" and getattr(p, "watermark", None) is not None:
            image = p.watermark.apply_watermark(image)
        image = p.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        return (image, nsfw) if with_nsfw else image

    def _set_call_state(self, rule: GuidanceRule | None, num_timesteps: int, scale: float | None = None, *,
                        guided: bool, clip_skip: int | None = None, attention: dict | None = None) -> None:
        """The base pipeline's per-call properties that diffusers callbacks read (``num_timesteps``,
        ``guidance_scale``, ``do_classifier_free_guidance``, ``interrupt``, ``clip_skip``,
        ``cross_attention_kwargs``/``joint_attention_kwargs``), set on this wrapper's own pipeline object (``pipe``
        is untouched). Setting ``pipe._interrupt = True`` in a callback skips the remaining steps, as in diffusers.
        ``last_call_guided``: whether this call evaluates the unconditional branch too."""
        p = self.pipe
        if scale is None:
            scale = getattr(rule, "guidance_scale", None)
        p._num_timesteps = int(num_timesteps)
        p._guidance_scale = float(scale) if isinstance(scale, (int, float)) else 1.0
        p._guidance_rescale = float(getattr(rule, "guidance_rescale", 0.0) or 0.0)
        p._interrupt = False
        p._current_timestep = None
        p._denoising_end = None  # SDXL's property, read by callbacks (this loop runs to the end)
        p._clip_skip = clip_skip
        p._cross_attention_kwargs = None if self.is_flow else attention
        p._joint_attention_kwargs = attention if self.is_flow else None
        self.last_call_guided = bool(guided)

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
        check_finite: bool = True,
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
        finite = FiniteWatch(x.device, len(timesteps)) if check_finite else None
        for i, t in enumerate(p.progress_bar(timesteps)):
            if getattr(p, "_interrupt", False):  # set by a callback: skip the remaining steps (diffusers' interrupt)
                continue
            p._current_timestep = t  # diffusers' `current_timestep`, e.g. for callbacks
            out = model_fn(x, t, conds)
            x = self._step(scheduler, rule, pairs, out, t, x, i, len(timesteps), step_kwargs)
            if callback is not None:
                tensors = callback_tensors(x, conds)
                outputs = callback(p, i, t, {k: tensors[k] for k in callback_inputs}) or {}
                x = check_returned("latents", outputs.get("latents", x), x, i)
                if "embeds" in conds:
                    conds["embeds"] = check_returned("prompt_embeds", outputs.get("prompt_embeds", conds["embeds"]),
                                                     conds["embeds"], i)  # fmt: skip
            if finite is not None:
                finite.update(x, i)
        p._current_timestep = None
        if finite is not None:
            finite.raise_if_bad(len(timesteps), type(scheduler).__name__)
        return x

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
        check_finite: bool = True,
        clip_skip: int | None = None,
        guidance_rescale: float | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> ImagePipelineOutput | StableDiffusionPipelineOutput | tuple:
        """Text-to-image (class-conditional: ``class_labels``) with the hosted scheduler and guidance rule.

        ``guidance``/``guidance_scale`` override the pipeline's rule for this call (a name plus scale, a rule
        object, or ``guidance_scale`` alone: the pipeline's rule kind with that scale).
        ``callback_on_step_end(pipe, i, t, tensors) -> dict`` runs after each step with the tensors named in
        ``callback_on_step_end_tensor_inputs`` (``latents``, ``prompt_embeds``) and may replace them.
        ``output_type``: ``pil``, ``np``, ``pt`` or ``latent`` (Flux: packed latents, as diffusers).
        Flux: ``embedded_guidance_scale`` (default: the pipeline's, 3.5) feeds the guidance embedding of
        guidance-distilled transformers; without a rule (the default) ``guidance_scale`` alone sets it (ignored, as
        diffusers ignores it, by a transformer without the embedding: FLUX.1-schnell); a rule
        needs ``negative_prompt`` or ``negative_prompt_embeds`` (true CFG).
        Class-conditional pipelines (family ``"class"``) take ``class_labels`` (one image per label and per
        ``num_images_per_prompt``) and no prompt; the unconditional branch is the null class; images as
        ``ClassConditionalPipeline`` returns them (``np``: NHWC in [0, 1]).
        ``check_finite`` (default on, as ``ClassConditionalPipeline``): raise a FloatingPointError naming the first
        step whose latents hold a NaN/Inf (tracked on the device, read once after the loop; fp16 overflow is the usual
        cause); ``False`` returns such latents/images as they are.
        As diffusers: ``guidance_rescale`` (the cfg rule's ``rescale_noise_cfg`` factor for this call), ``clip_skip``
        (SD, SDXL, SD3: prompt embeddings from that many CLIP layers before the last),
        ``cross_attention_kwargs`` (SD, SDXL: passed to the UNet's attention processors; its ``scale`` is the LoRA
        scale of the text encoders too) and ``joint_attention_kwargs`` (SD3, Flux: the same for the transformer).
        """
        p = self.pipe
        if embedded_guidance_scale is not None and self.family != "flux":
            raise ValueError(f"`embedded_guidance_scale` feeds the guidance embedding of Flux transformers; this "
                             f"pipeline is {self.family} (use `guidance_scale`)")  # fmt: skip
        if embedded_guidance_scale is not None and not p.transformer.config.guidance_embeds:
            raise ValueError("`embedded_guidance_scale` feeds the guidance embedding, which this Flux transformer "
                             "does not have (guidance_embeds=False, e.g. FLUX.1-schnell); use a guidance rule "
                             "(guidance='cfg') or leave it out")
        embedded = self.embedded_guidance_scale if embedded_guidance_scale is None else check_number(
            "embedded_guidance_scale", embedded_guidance_scale, 0.0)
        if guidance is None and self.guidance is None:  # Flux, distilled guidance embedding only
            rule = None
            if guidance_scale is not None:  # the embedding's scale, as FluxPipeline's guidance_scale
                embedded = check_number("guidance_scale", guidance_scale, 0.0)
        elif guidance is None:
            rule = self.guidance if guidance_scale is None else self.guidance.with_scale(guidance_scale)
        else:
            rule = self._make_rule(guidance, guidance_scale, self.family)
        if guidance_rescale is not None and not isinstance(rule, guidance_rules.CFG) and guidance_rescale == 0:
            guidance_rescale = None  # diffusers' default value: no rescaling, whatever the rule
        if guidance_rescale is not None:  # diffusers' argument: the CFG rule's own setting for this call
            if not isinstance(rule, guidance_rules.CFG):
                raise ValueError(f"`guidance_rescale` is a setting of the cfg rule (diffusers' rescale_noise_cfg); "
                                 f"this call's rule is {'none' if rule is None else repr(rule.name)}")  # fmt: skip
            rule = guidance_rules.CFG(**{**rule.config(), "guidance_rescale": guidance_rescale})
        if rule is not None:
            self._check_compatible(rule, p.scheduler, self.family)
        if output_type not in PIPELINE_OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(PIPELINE_OUTPUT_TYPES)}, got {output_type!r}")
        check_int("num_inference_steps", num_inference_steps, 1)
        num_inference_steps = int(num_inference_steps)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("`callback_on_step_end` must be callable (pipe, step, timestep, tensors) -> dict, or a "
                             f"diffusers PipelineCallback; got {type(callback_on_step_end).__name__}")  # fmt: skip
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs  # as diffusers
        if isinstance(callback_on_step_end_tensor_inputs, str) or not isinstance(callback_on_step_end_tensor_inputs,
                                                                                  Collection):
            raise ValueError("`callback_on_step_end_tensor_inputs` must be a list of names, e.g. ['latents'], got "
                             f"{callback_on_step_end_tensor_inputs!r}")  # fmt: skip
        check_generators(generator)
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                check_int(name, value, 1)
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in _CALLBACK_TENSORS]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {bad} not supported; allowed: {list(_CALLBACK_TENSORS)}"
            )
        check_bool("check_finite", check_finite)
        check_int("num_images_per_prompt", num_images_per_prompt, 1)
        num_images_per_prompt = int(num_images_per_prompt)
        attention_kwargs = self._check_model_kwargs(clip_skip, cross_attention_kwargs, joint_attention_kwargs)
        if self.family == CLASS_FAMILY:
            if prompt is not None or prompt_embeds is not None:
                raise ValueError("a class-conditional pipeline takes `class_labels`, not `prompt`/`prompt_embeds`")
            if "prompt_embeds" in callback_on_step_end_tensor_inputs:
                raise ValueError("`callback_on_step_end_tensor_inputs`: a class-conditional pipeline has no "
                                 "prompt_embeds; allowed: ['latents']")  # fmt: skip
            text_only = {"height": height, "width": width, "negative_prompt": negative_prompt,
                         "negative_prompt_embeds": negative_prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
                         "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
                         "embedded_guidance_scale": embedded_guidance_scale}  # fmt: skip
            given = [f"`{k}`" for k, v in text_only.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: text-to-image arguments; a class-conditional pipeline takes "
                                 "`class_labels` (its image size is the model's, its unconditional branch the null "
                                 "class)")  # fmt: skip
            return self._class_call(rule, class_labels, num_inference_steps, num_images_per_prompt, generator,
                                    latents, output_type, return_dict, callback_on_step_end,
                                    callback_on_step_end_tensor_inputs, check_finite)  # fmt: skip
        if class_labels is not None:
            raise ValueError(f"`class_labels` is for class-conditional pipelines; this one is {self.family} "
                             "(text-to-image: pass `prompt`)")  # fmt: skip
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                 and all(isinstance(q, str) for q in prompt))):
                raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        # one generator per image: diffusers' SD3/Flux skip their own check when `latents` are given, yet the
        # generators still drive an SDE sampler's noise
        check_generators(generator, batch * num_images_per_prompt)
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
                    "check_finite": check_finite, "clip_skip": clip_skip, "attention_kwargs": attention_kwargs,
                },
            )  # fmt: skip
        height = height or p.unet.config.sample_size * p.vae_scale_factor
        width = width or p.unet.config.sample_size * p.vae_scale_factor
        self._check_base_inputs(
            prompt=prompt, height=height, width=width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
        )  # fmt: skip
        device = self._exec_device()
        guided = self._guided(rule)
        rule.reset()

        enc = self._encode(guided, device, num_images_per_prompt, {
            "prompt": prompt, "negative_prompt": negative_prompt, "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds, "clip_skip": clip_skip,
            "lora_scale": (attention_kwargs or {}).get("scale"),
        })  # fmt: skip
        embeds = torch.cat([enc["neg"], enc["pos"]]) if guided else enc["pos"]
        n = batch * num_images_per_prompt
        added = self._sdxl_added_conds(enc, guided, height, width, n, device) if self.family == "sdxl" else None

        scheduler = p.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if latents is not None:
            shape = (n, p.unet.config.in_channels, int(height) // p.vae_scale_factor, int(width) // p.vae_scale_factor)
            check_latents(latents, shape, f"batch, channels, height / {p.vae_scale_factor}, width / "
                                          f"{p.vae_scale_factor}")
            latents = latents.to(embeds.dtype)  # the dtype diffusers draws them in (float32 latents, fp16 model)
        x = p.prepare_latents(n, p.unet.config.in_channels, height, width, embeds.dtype, device, generator, latents)
        conds = {"embeds": embeds} if added is None else {"embeds": embeds, **added}
        denoiser = self.denoiser
        scale_model_input = _input_scaling(scheduler)

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
            model_in = torch.cat([x, x]) if guided else x
            model_in = scale_model_input(model_in, t)
            added_kw = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]} if "time_ids" in c else None
            return denoiser(model_in, t, encoder_hidden_states=c["embeds"], added_cond_kwargs=added_kw,
                            cross_attention_kwargs=attention_kwargs, return_dict=False)[0]  # fmt: skip

        self._set_call_state(rule, len(timesteps), guided=guided, clip_skip=clip_skip, attention=attention_kwargs)
        x = self._denoise(model_fn, x, conds, timesteps, rule if guided else None, generator, callback_on_step_end,
                          callback_on_step_end_tensor_inputs, check_finite)  # fmt: skip
        image, nsfw = self._decode(x, output_type, device, embeds.dtype, with_nsfw=True)
        p.maybe_free_model_hooks()
        if self.family == "sd":  # as StableDiffusionPipeline: the safety checker's flags (None without one)
            return (image, nsfw) if not return_dict else StableDiffusionPipelineOutput(images=image,
                                                                                     nsfw_content_detected=nsfw)
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
        device = self._exec_device()
        dtype = unet.dtype
        shape = (len(labels), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        check_generators(generator, len(labels))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            check_latents(latents, shape, "batch, channels, height, width")
            if check_finite and not bool(torch.isfinite(latents).all()):  # set-up: one read-back, not per step
                raise ValueError("`latents` contain NaN or Inf (the starting noise must be finite)")
        scheduler = p.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)  # may set init_noise_sigma (s3's AFS)
        timesteps = scheduler.timesteps
        x = latents.to(device=device, dtype=dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
        guided = self._guided(rule)
        rule.reset()
        cond = torch.tensor(labels, device=device)
        conds = {"labels": torch.cat([torch.full_like(cond, p.null_class), cond]) if guided else cond}
        denoiser = self.denoiser
        scale_model_input = _input_scaling(scheduler)

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
            model_in = torch.cat([x, x]) if guided else x
            model_in = scale_model_input(model_in, t)
            t_batch = t.reshape(1).to(device).expand(model_in.shape[0])
            return denoiser(model_in, t_batch, class_labels=c["labels"]).sample

        self._set_call_state(rule, len(timesteps), guided=guided)
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
        return pixel_outputs(x, output_type, self.pipe.numpy_to_pil)

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
