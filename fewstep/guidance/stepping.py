"""One guided step through a fewstep scheduler: raw outputs -> pairs -> rule -> ``step_pair``.

Duck-typed on fewstep's ``FewstepScheduler`` (``plan``, ``convert_model_output``, ``step_pair``), so this
module imports no scheduler class.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import numpy as np
import torch

from .._checks import check_int
from ..solvers.parameterization import compute_dtype
from .base import GuidanceRule, StepState
from .rules import CFG, rescale_to_std

__all__ = ["supports_pairs", "step_state", "guided_step", "raw_cfg", "step_kwargs"]


def supports_pairs(scheduler: Any) -> bool:
    """Whether ``scheduler`` takes ``(x0, eps)`` pairs (a fewstep scheduler)."""
    return all(hasattr(scheduler, a) for a in ("step_pair", "convert_model_output", "plan", "working_sample"))


def step_kwargs(scheduler: Any, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
    """Extra keyword arguments for ``scheduler.step``: ``generator`` when its step takes one (stochastic steps then
    draw their noise from it, as diffusers pipelines do), else none."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _as_index(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (an int, numpy integer or integer 0-d CPU tensor; not a bool, not
    a device tensor: reading it every step would sync the device)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.device.type != "cpu"):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def step_state(scheduler: Any, index: int) -> StepState:
    """The ``StepState`` of model call ``index`` of a fewstep scheduler after ``set_timesteps`` (host floats), at
    that call's grid point (two calls share one where an s3 schedule has an implicit corrector)."""
    plan = scheduler.plan
    if plan is None:
        raise ValueError("call `set_timesteps` on the scheduler before guiding a step")
    grid = plan.grid
    i, repeat = plan.calls[index]
    return StepState(i, plan.num_steps, float(grid.alphas[i]), float(grid.sigmas[i]),
                     getattr(scheduler, "prediction_type", "epsilon"), repeat)


def guided_step(
    scheduler: Any,
    rule: GuidanceRule,
    out_cond: torch.Tensor,
    out_uncond: torch.Tensor,
    timestep: Any,
    sample: torch.Tensor,
    index: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Advance ``sample`` by one step of ``scheduler`` guided by ``rule`` from raw model outputs.

    Both outputs are converted to ``(x0, eps)`` at the scheduler's next model call (the scheduler's own
    conversion), combined by the rule and fed to ``scheduler.step_pair``, which applies ``clip_sample`` to the
    guided ``x0`` (once, after combining, as diffusers clips the x0 of ``u + w (c - u)``); ``generator`` draws the
    noise of a stochastic (SDE) step. ``index``, when given, must be that call's index in ``scheduler.timesteps``
    (``begin_index + i`` in a loop over ``timesteps[begin_index:]``): a ``ValueError`` otherwise, as converting at
    one grid point and stepping from another is a wrong step.
    """
    if not isinstance(rule, GuidanceRule):
        raise TypeError(f"`rule` must be a GuidanceRule (e.g. fewstep.guidance.make('cfg', 5.0)), got {rule!r}")
    if not supports_pairs(scheduler):
        raise ValueError(
            f"guidance rule {rule.name!r} needs a fewstep scheduler (one with `step_pair`); "
            f"got {type(scheduler).__name__}"
        )
    for name, value in (("out_cond", out_cond), ("out_uncond", out_uncond), ("sample", sample)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a tensor, got {type(value).__name__}")
    if out_cond.shape != out_uncond.shape or out_cond.shape != sample.shape:
        raise ValueError(
            "conditional output, unconditional output and sample must have the same shape; got "
            f"{tuple(out_cond.shape)}, {tuple(out_uncond.shape)} and {tuple(sample.shape)}"
        )
    new_run = scheduler.step_index is None
    call = scheduler._begin_step(timestep)  # the model call this step is at (found from `timestep` on a new run)
    if index is not None:
        given = _as_index(index)
        if given is None:
            raise ValueError(f"`index` must be an integer (a model call's index in scheduler.timesteps; a Python int "
                             f"or a CPU tensor), got {index!r}")
        if given != call:
            raise ValueError(
                f"`index` {index!r} is not the scheduler's next model call {call} (its index in scheduler.timesteps; "
                "a loop over timesteps[begin_index:] passes begin_index + i); leave `index` out to use the "
                "scheduler's own count"
            )
    index = call
    if new_run:  # a new run, also one that begins part-way (img2img): forget APG's momentum
        rule.reset()
    dtype = compute_dtype(sample.dtype)
    # as the model saw it (an average_x0 start is shifted), in the precision step_pair integrates it in
    x = scheduler.model_sample(index, scheduler.working_sample(sample, dtype))
    cond = scheduler.convert_model_output(out_cond.to(dtype), x, index, clip=False)  # step_pair clips the result
    uncond = scheduler.convert_model_output(out_uncond.to(dtype), x, index, clip=False)
    x0, eps = rule(cond, uncond, step_state(scheduler, index))
    history = rule.history_pair(cond, uncond)  # CFG++ history="unconditional": what later steps remember
    kwargs = {} if history is None else {"history": history}
    if generator is not None:
        kwargs["generator"] = generator
    return scheduler.step_pair(x0, eps, timestep, sample, **kwargs).prev_sample


def raw_cfg(rule: CFG, out_cond: torch.Tensor, out_uncond: torch.Tensor, index: int, num_steps: int) -> torch.Tensor:
    """Plain CFG on raw model outputs, for schedulers without ``step_pair`` (diffusers' own): ``u + w (c - u)``
    then diffusers' ``guidance_rescale`` on the raw output, exactly as diffusers' pipelines do."""
    if not isinstance(rule, CFG):
        raise ValueError(f"only plain CFG can run on raw outputs, got guidance {getattr(rule, 'name', rule)!r}")
    for name, value in (("out_cond", out_cond), ("out_uncond", out_uncond)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a tensor, got {type(value).__name__}")
    if out_cond.shape != out_uncond.shape:
        raise ValueError(
            "conditional and unconditional outputs must have the same shape (batch included; no broadcasting); "
            f"got {tuple(out_cond.shape)} and {tuple(out_uncond.shape)}"
        )
    num_steps = check_int("num_steps", num_steps, 1)
    index = check_int("index", index, 0, num_steps - 1)
    if rule.scales is not None and len(rule.scales) != num_steps:
        raise ValueError(
            f"`guidance_scale` has {len(rule.scales)} per-step values, but this scheduler makes {num_steps} model "
            "calls (len(scheduler.timesteps); PNDM, Heun and KDPM2 call the model more than once per step): give one "
            "value per model call"
        )
    w = rule.scale_at(StepState(index, num_steps, 1.0, 1.0))
    out = out_uncond + w * (out_cond - out_uncond)
    if rule.guidance_rescale > 0:
        out = rescale_to_std(out, out_cond, rule.guidance_rescale)
    return out
