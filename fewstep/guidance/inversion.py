"""Guided DDIM inversion (clean image -> the latent that DDIM sampling maps back to it), CFG or CFG++.

DDIM inversion (Song et al. 2021; Mokady et al. 2023) runs the deterministic DDIM step backwards on the
same grid: from level ``k+1`` (less noise) to level ``k``, with the model evaluated at the current sample
and the timestep of level ``k`` (the usual shortcut, as in diffusers' ``DDIMInverseScheduler``)::

    x0_hat = (x - sigma_{k+1} eps_den) / alpha_{k+1},   x_k = alpha_k x0_hat + sigma_k eps_ren

CFG uses the guided noise for both (``eps_den = eps_ren = eps_u + w (eps_c - eps_u)``). CFG++ inversion
(Chung et al. 2025, sec. 3.3, the mirror image of its sampler) denoises with the unconditional noise and
renoises with the guided one (``eps_den = eps_u``, ``eps_ren = eps_lam``). In terms of a rule's pair
``(x0_r, eps_r)`` evaluated at level ``k``: ``eps_den = eps_r`` and ``eps_ren = (x - alpha_k x0_r)/sigma_k``,
which gives both cases. Its error per step is scaled by ``lam <= 1`` instead of ``w > 1``. With ``clip_sample``
``x0_hat`` is clipped (as diffusers' ``DDIMInverseScheduler`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_output_shape
from ..solvers.parameterization import compute_dtype
from .base import GuidanceRule, StepState
from .stepping import supports_pairs

__all__ = ["ddim_invert"]

ModelFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def _check_outputs(images: torch.Tensor, **outputs: Any) -> None:
    """Each of ``model_fn``'s outputs must be a tensor of the images' shape: the pair conversion broadcasts, so one
    output for a batch of images was inverted silently with v-prediction and flow models, and a wrong channel count
    failed inside torch."""
    for name, out in outputs.items():
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"`model_fn`'s `{name}` must be a torch.Tensor of the images' shape, got "
                            f"{type(out).__name__}")
    check_output_shape(images, of="images", whose="the images'", unit="image", prefix="`model_fn`'s ",
                       doubled="return the conditional and unconditional halves separately (uncond, cond = "
                               "noise_pred.chunk(2); return cond, uncond)", **outputs)  # fmt: skip


@torch.no_grad()
def ddim_invert(model_fn: ModelFn, images: torch.Tensor, scheduler: Any, rule: GuidanceRule) -> torch.Tensor:
    """Invert clean ``images`` to the first grid level of ``scheduler`` (a fewstep scheduler after
    ``set_timesteps`` that calls the model once per grid level: no implicit corrector, no analytical first step;
    DDIM sampling on the same grid with the same rule maps the result back). A per-step rule (``CFG([w_0, ...])``)
    applies ``w_k`` at level ``k``, where sampling applies it.

    ``model_fn(x, t) -> (out_cond, out_uncond)`` returns the raw conditional and unconditional outputs, each of the
    images' shape (refused otherwise); ``x`` has the images' dtype. Half-precision images are inverted in float32 (as
    ``step`` does) and returned in their dtype.
    """
    if not supports_pairs(scheduler) or scheduler.plan is None:
        raise ValueError(f"`scheduler` must be a fewstep scheduler after set_timesteps, got {type(scheduler).__name__}")
    if not isinstance(rule, GuidanceRule):
        raise TypeError(f"`rule` must be a GuidanceRule, got {type(rule).__name__}")
    plan = scheduler.plan
    if len(plan.calls) != plan.num_steps or plan.analytic_start is not None:
        raise ValueError(f"`scheduler` must make one model call per grid level from the first (DDIM inversion runs "
                         f"the grid backwards); its plan has {len(plan.calls)} calls on {plan.num_steps} levels"
                         + (" and an analytical first step" if plan.analytic_start is not None else ""))
    grid = plan.grid
    n = grid.num_steps
    timesteps = list(scheduler.timesteps)
    dtype = images.dtype
    work = compute_dtype(dtype)  # as `step`: half precision is stepped in float32
    x = images.to(work)
    rule.reset()  # once: the steps run backwards, so the rule's own reset at step 0 would fire at the end
    for k in range(n - 1, -1, -1):  # level k+1 -> level k
        a_k, s_k = float(grid.alphas[k]), float(grid.sigmas[k])
        a_up, s_up = float(grid.alphas[k + 1]), float(grid.sigmas[k + 1])
        out_c, out_u = model_fn(x.to(dtype), timesteps[k])  # the model sees the images' dtype
        _check_outputs(images, out_cond=out_c, out_uncond=out_u)  # the pair conversion would broadcast them
        cond = scheduler.convert_model_output(out_c.to(work), x, k, clip=False)
        uncond = scheduler.convert_model_output(out_u.to(work), x, k, clip=False)
        # the state of sampling step k (a per-step scale w_k applies at level k, as when sampling)
        state = StepState(k, n, a_k, s_k, getattr(scheduler, "prediction_type", "epsilon"))
        x0_r, eps_r = rule.combine(*rule.check_inputs(cond, uncond, state), state)
        eps_ren = (x - a_k * x0_r) / s_k
        # clip_sample applies to the x0 the step denoises to (sampling clips the guided x0 it renoises from; diffusers'
        # DDIMInverseScheduler clips this one), not to x0_r: that is x read at level k, where x is not, so clipping
        # it changed eps_ren and broke the round trip
        x0_hat, _ = scheduler._postprocess_pair((x - s_up * eps_r) / a_up, eps_r)
        x = a_k * x0_hat + s_k * eps_ren
    return x.to(dtype)
