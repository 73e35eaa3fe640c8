"""The static denoising step of ``FewstepPipeline``: what ``cuda_graph=True`` captures once and replays.

One step (the model call(s), the conversion to ``(x0, eps)`` pairs, the guidance rule and the solver step) reads
every per-step number from device tables at a step index held on the device (``fewstep.solvers.static``,
``fewstep.guidance.static``) and writes the latents in place, so replaying it never syncs with the host. Its
inputs live in static buffers (``StaticRun``), kept between calls of the same shapes. The same step also runs
uncaptured (loop mode ``"static"``), which is how CPU tests check it against the eager loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import guidance as guidance_rules
from .. import samplers
from ..guidance import GuidanceRule
from ..guidance.static import GUIDANCE_COLUMNS, StaticGuidance
from ..solvers.parameterization import compute_dtype, resume_precision
from ..solvers.schedules import is_flow_config
from ..solvers.static import StaticEngine, check_static_plan
from .loop_checks import FiniteWatch, callback_tensors, check_returned

__all__ = ["kwargs_cache_key", "graph_samplers", "check_graph_scheduler", "check_graph_rule", "check_graph_device",
           "StaticRun", "StaticLoop", "non_graph_classes"]


def kwargs_cache_key(value: Any) -> Any:
    """A hashable key of attention kwargs for graph mode's cache: a tensor counts by its storage address, shape,
    dtype and device (a captured step reads it at its address; its ``repr`` abbreviates large tensors, so two
    different ones looked equal), containers by their contents, anything else by its ``repr``."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), tuple(value.shape), tuple(value.stride()), str(value.dtype),
                str(value.device))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), kwargs_cache_key(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(kwargs_cache_key(v) for v in value))
    return ("value", repr(value))


def non_graph_classes() -> tuple[type, ...]:
    """fewstep scheduler classes whose step is not a static linear step (momentum history, step hooks, MR)."""
    return (samplers.FewstepHeavyBallScheduler, samplers.FewstepGHVBScheduler, samplers.FewstepMRSScheduler,
            samplers.FewstepDCSolverScheduler, samplers.FewstepFlowChefScheduler)


def graph_samplers(config: Any = None) -> list[str]:
    """Registered samplers that graph mode (``cuda_graph=True``) can replay; given a scheduler ``config`` (a
    pipeline's), only those that sample its process: a VP config leaves out the flow-only ones (``flow-euler``)."""
    bad = non_graph_classes()
    names = [n for n in samplers.names() if not issubclass(samplers.get(n), bad)]
    if config is not None and not is_flow_config(dict(config)):
        names = [n for n in names if samplers.process_of(n) != "flow"]
    return names


#: what the samplers that need an artifact (those ``samplers.names(standalone=True)`` leaves out) need in graph mode
_GRAPH_ARTIFACTS = {"dpm-solver-v3": "with ems_file or degenerated=True",
                    "s3": "with an s3_schedule without afs or implicit correctors"}


def _graph_advice(scheduler: Any) -> str:
    """``graph_samplers`` for ``scheduler``'s config (VP or flow), each one that needs an artifact saying which."""
    config = getattr(scheduler, "config", None)
    standalone = samplers.names(standalone=True)
    return ", ".join(
        n if n in standalone else f"{n} ({_GRAPH_ARTIFACTS.get(n, 'with its artifact')})"
        for n in graph_samplers(config if isinstance(config, Mapping) else None)
    )


def check_graph_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler graph mode cannot replay, offering those it can on the scheduler's config (VP or flow)."""
    name = type(scheduler).__name__
    if not isinstance(scheduler, samplers.FewstepScheduler) or not guidance_rules.supports_pairs(scheduler):
        raise ValueError(
            f"cuda_graph=True needs a fewstep scheduler: {name} (diffusers' own) reads its step state on the host "
            f"(step-index lookups, host syncs) and cannot be captured; use one of: {_graph_advice(scheduler)}"
        )
    if isinstance(scheduler, non_graph_classes()):
        raise ValueError(
            f"cuda_graph=True cannot replay {name} (momentum history, step hooks or a mean-reverting step); use "
            f"one of: {_graph_advice(scheduler)}"
        )


def check_graph_rule(rule: GuidanceRule) -> None:
    from ..guidance.static import STATIC_RULES

    if type(rule) not in STATIC_RULES:
        raise ValueError(
            f"cuda_graph=True supports the guidance rules {[r.name for r in STATIC_RULES]}, got "
            f"{type(rule).__name__} ({rule.name!r})"
        )
    if getattr(rule, "history", "guided") != "guided":
        raise ValueError(f"cuda_graph=True runs CFG++ with history='guided' only (the static step buffers one pair "
                         f"per evaluation), got history={rule.history!r}; run it eagerly (cuda_graph=False)")


def check_graph_device(device: Any) -> None:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs the pipeline on a CUDA device, got {device} (torch.cuda.is_available() = "
            f"{torch.cuda.is_available()}); move it with pipe.to('cuda') or leave cuda_graph=False"
        )


def static_pair(kind: str, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
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


# host values a forward reads and a captured graph bakes in, by attribute name: peft's LoRA state (per-adapter
# `scaling`, the active and the merged adapters, the disabled flag; `fuse_lora` merges in place, so the weights'
# addresses stay) and FreeU's factors on a UNet's up blocks (`enable_freeu`/`disable_freeu`)
_FORWARD_HOST_STATE = frozenset({"scaling", "_active_adapter", "merged_adapters", "_disable_adapters",
                                 "s1", "s2", "b1", "b2"})


def module_state_key(module: torch.nn.Module) -> tuple:
    """What a captured graph of ``module`` reads by address or bakes in, besides its inputs: the storage of every
    parameter and buffer, the derived tensors and execution mode of each quantized layer, the attention
    processors, each module's train/eval mode and the host values its forward branches on or multiplies by
    (``_FORWARD_HOST_STATE``: peft LoRA adapters and scales, FreeU). A module changed in place (another pipeline
    over the same quantized UNet switching its mode or rebuilding its derived tensors, weights reloaded, a LoRA
    fused, re-weighted or disabled, FreeU switched, processors swapped) gets a new key, so the step is captured
    again instead of replaying kernels on freed or stale memory or with stale constants. Host metadata only (no
    sync); read once per pipeline call."""
    if not isinstance(module, torch.nn.Module):
        return ()
    key: list = []
    append, extend = key.append, key.extend
    # one pre-order walk over the modules' own dicts (an SD UNet: ~700 modules), as `modules()` visits them but
    # without its generator and name prefixes (about 1.8x faster; this runs on every call); each module once
    stack, seen = [module], {id(module)}
    while stack:
        state = stack.pop().__dict__
        params, buffers = state["_parameters"], state["_buffers"]
        if params:
            extend([t.data_ptr() for t in params.values() if t is not None])
        if buffers:
            extend([t.data_ptr() for t in buffers.values() if t is not None])
        append(state.get("training"))  # (a torch.compile wrapper forwards it to the module it holds)
        if not _FORWARD_HOST_STATE.isdisjoint(state):
            extend([(name, kwargs_cache_key(state[name])) for name in sorted(_FORWARD_HOST_STATE.intersection(state))])
        derived = state.get("_derived")
        if derived is not None and "mode" in state:  # a fewstep QuantLayer
            append(state["mode"])
            extend([(k, t.data_ptr()) for k, t in derived.items()])
        processor = state.get("processor")
        if processor is not None:
            append(id(processor))
        children = state["_modules"]
        if children:
            fresh = []
            for child in children.values():
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    fresh.append(child)
            stack.extend(reversed(fresh))  # popped in order: pre-order
    return tuple(key)


class StaticRun:
    """The static buffers of graph mode (kept between calls of the same shapes) and, once captured, the graph."""

    def __init__(self, engine: StaticEngine, guide: StaticGuidance | None, x: torch.Tensor, conds: dict,
                 table: torch.Tensor, t_table: torch.Tensor):
        self.engine = engine
        self.guide = guide
        self.x = x.clone()
        # the float32 state of a half-precision run (as the eager steps keep it: `working_sample`)
        self.x_full = x.to(engine.dtype) if x.dtype != engine.dtype else None
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
        if self.x_full is not None:
            self.x_full.copy_(x)
        self.engine.reset(noise)
        if self.guide is not None:
            self.guide.reset()


COLUMNS = ("alpha", "sigma", "norm", *GUIDANCE_COLUMNS)


class StaticLoop:
    """``FewstepPipeline``'s static-step loop (a mixin: it uses the host's ``pipe``, ``family``, ``denoiser``,
    ``_loop_mode``, ``_graph_cache`` and ``_model_kwargs_key``)."""

    def _static_inputs(self, x: torch.Tensor, rule: GuidanceRule | None, generator: Any):
        """This call's engine (coefficient tables), guidance, per-step table and stochastic noise draws."""
        scheduler = self.pipe.scheduler
        check_graph_scheduler(scheduler)
        if rule is not None:
            check_graph_rule(rule)
        plan = scheduler.plan
        check_static_plan(plan, scheduler._state.hooks if scheduler._state is not None else ())
        cdtype = compute_dtype(x.dtype)
        n = plan.num_steps
        engine = StaticEngine(plan, x.shape, x.device, cdtype)
        alphas = np.asarray(plan.grid.alphas[:n], dtype=np.float64)
        sigmas = np.asarray(plan.grid.sigmas[:n], dtype=np.float64)
        guide = (StaticGuidance(rule, x.shape, x.device, cdtype, scheduler.prediction_type) if rule is not None
                 else None)
        extra = guide.columns(alphas, sigmas) if guide is not None else np.zeros((n, len(GUIDANCE_COLUMNS)))
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
        # CFG's scale (or per-step scales) sits in the device table: a new scale replays the same graph; CFG++'s
        # lambda and APG's w are constants of the captured step, so a new one recaptures
        in_table = ("guidance_scale",) if type(rule) is guidance_rules.CFG else ()
        rule_key = None if rule is None else (
            type(rule).__name__, repr(sorted((k, v) for k, v in rule.config().items() if k not in in_table)))
        return (
            self.family, self._loop_mode, id(self.denoiser), module_state_key(self._model), self._model_kwargs_key,
            rule_key, tuple(x.shape),
            x.dtype, str(x.device),
            tuple(engine.table.shape), engine.stochastic, tuple(table.shape), tuple(timesteps.shape),
            timesteps.dtype, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(conds.items())),
            sched.prediction_type, bool(getattr(sched.config, "clip_sample", False)),
            float(getattr(sched.config, "clip_sample_range", 1.0) or 1.0),
        )

    def _static_step(self, run: StaticRun) -> None:
        """One denoising step on the static buffers of ``run`` (what graph mode captures): the model call(s),
        the pair conversion, the guidance rule and the solver step, then ``x`` and the step index in place."""
        engine = run.engine
        row = engine.row(run.table)
        t = engine.row(run.t_table)
        alpha, sigma, norm, scale, s_over_a, a_over_s, *rescale = (row[k] for k in range(len(COLUMNS)))
        out = run.model_fn(run.x, t, run.conds)
        # latents left as returned continue from the float32 result of a half-precision run (a callback's edits win)
        x = run.x.to(engine.dtype) if run.x_full is None else resume_precision(run.x, run.x_full)
        if run.guide is not None:
            out_uncond, out_cond = out.chunk(2)
            cond = static_pair(run.kind, out_cond.to(engine.dtype), x, alpha, sigma, norm)
            uncond = static_pair(run.kind, out_uncond.to(engine.dtype), x, alpha, sigma, norm)
            x0, eps = run.guide.combine(cond, uncond, scale, s_over_a, a_over_s, *rescale)  # clipped once, after
            x0, eps = run.postprocess(x0.to(engine.dtype), eps.to(engine.dtype))
        else:
            x0, eps = run.postprocess(*static_pair(run.kind, out.to(engine.dtype), x, alpha, sigma, norm))
        new = engine.advance(x, x0, eps)
        if run.x_full is not None:
            run.x_full.copy_(new)
        run.x.copy_(new.to(run.x.dtype))
        engine.index.add_(1)

    def _capture(self, run: StaticRun, x: torch.Tensor, noise: torch.Tensor | None) -> None:
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
                        check_finite=True):
        p = self.pipe
        graph = self._loop_mode == "cuda-graph"
        if graph:
            check_graph_device(x.device)
        engine, guide, table, noise = self._static_inputs(x, rule, generator)
        key = self._static_key(x, conds, engine, table, timesteps, rule)
        if self._graph_cache is not None and self._graph_cache[0] == key:
            run = self._graph_cache[1]
            run.load(engine, x, conds, table, timesteps, noise)
        else:
            self._graph_cache = None  # free the previous graph and buffers first
            run = StaticRun(engine, guide, x, conds, table, timesteps)
            run.restart(x, noise)
            self._graph_cache = (key, run)
        run.model_fn = model_fn
        run.kind = p.scheduler.prediction_type
        run.postprocess = p.scheduler._postprocess_pair
        if graph and run.graph is None:
            self._capture(run, x, noise)
        finite = FiniteWatch(x.device, len(timesteps)) if check_finite else None
        for i, t in enumerate(p.progress_bar(timesteps)):
            if getattr(p, "_interrupt", False):  # set by a callback: skip the remaining steps (diffusers' interrupt)
                continue
            p._current_timestep = t  # diffusers' `current_timestep`, e.g. for callbacks
            if graph:
                run.graph.replay()
            else:
                self._static_step(run)
            if callback is not None:
                tensors = callback_tensors(run.x, run.conds)
                outputs = callback(p, i, t, {k: tensors[k] for k in callback_inputs}) or {}
                for name, value in outputs.items():
                    if name in tensors and value is not tensors[name]:
                        check_returned(name, value, tensors[name], i)  # a new shape: the eager loop's advice
                        raise ValueError(
                            f"callback_on_step_end returned a new `{name}` at step {i}: with cuda_graph=True the "
                            "replayed step reads static buffers, so change the given tensor in place "
                            f"(tensors[{name!r}].copy_(...)) or run without cuda_graph"
                        )
            if finite is not None:  # after the callback, as in the eager loop (it may change the latents)
                finite.update(run.x, i)
        p._current_timestep = None
        if finite is not None:
            finite.raise_if_bad(len(timesteps), type(p.scheduler).__name__)
        return run.x.clone()
