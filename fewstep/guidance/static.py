"""Guidance rules as one static step: per-step numbers read from a device table, state in fixed buffers.

``GuidanceRule.combine`` reads host floats from the ``StepState`` (the scale of a CFG schedule, ``alpha``,
``sigma``) and APG keeps its momentum in a Python attribute that starts as ``None``. A CUDA graph replayed for
every step needs both on the device: :class:`StaticGuidance` puts the per-step numbers in columns of the
pipeline's step table (``columns``) and APG's momentum in a buffer zeroed by ``reset`` (an all-zero buffer adds
an exact zero, so the first step equals the eager rule's). ``combine`` then computes what the rule computes,
operation for operation (host ratios such as ``alpha/sigma`` are precomputed in float64 as the eager rule's
``state.alpha / state.sigma`` are).

Supported: :class:`~fewstep.guidance.CFG` (scale schedules and ``guidance_rescale`` included),
:class:`~fewstep.guidance.CFGPlusPlus` and :class:`~fewstep.guidance.APG`, not subclasses (their ``combine``
may differ).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import GuidanceRule, Pair
from .rules import APG, CFG, CFGPlusPlus, apg_update, rescale_coefficients, rescale_eps_pair, rescale_pair

__all__ = ["StaticGuidance", "STATIC_RULES", "GUIDANCE_COLUMNS"]

STATIC_RULES = (CFG, CFGPlusPlus, APG)
#: the columns :meth:`StaticGuidance.columns` fills: the CFG scale, ``sigma/alpha``, ``alpha/sigma`` and CFG's
#: raw-output rescale coefficients (``rules.rescale_coefficients``; zeros when unused)
GUIDANCE_COLUMNS = ("scale", "sigma_over_alpha", "alpha_over_sigma", "raw_c_x0", "raw_c_eps", "move_x0", "move_eps")


class StaticGuidance:
    """``rule`` for samples of ``shape`` (compute dtype ``dtype``) on ``device``; see the module docstring."""

    def __init__(self, rule: GuidanceRule, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype,
                 prediction_type: str = "epsilon"):
        if type(rule) not in STATIC_RULES:
            raise ValueError(
                f"graph mode supports the guidance rules {[r.name for r in STATIC_RULES]} (classes "
                f"{[r.__name__ for r in STATIC_RULES]}), got {type(rule).__name__}"
            )
        self.rule = rule
        self.prediction_type = prediction_type  # the raw output CFG's guidance_rescale acts on, as diffusers does
        self.momentum: torch.Tensor | None = None
        if isinstance(rule, APG) and rule.momentum != 0.0:
            self.momentum = torch.zeros(tuple(shape), dtype=dtype, device=device)

    def reset(self) -> None:
        """Forget the momentum (start of a generation)."""
        if self.momentum is not None:
            self.momentum.zero_()

    def columns(self, alphas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
        """``(N, 3)`` float64: per evaluated step the CFG scale, ``sigma/alpha`` and ``alpha/sigma`` (``alphas``,
        ``sigmas``: the ``N`` evaluation points). Raises where the eager rule would (a scale schedule of the wrong
        length; ``alpha = 0`` where the rule divides by it)."""
        a = np.asarray(alphas, dtype=np.float64)
        s = np.asarray(sigmas, dtype=np.float64)
        n = a.size
        rule = self.rule
        scale = np.zeros(n)
        if isinstance(rule, CFG):
            if rule.scales is not None and len(rule.scales) != n:
                raise ValueError(
                    f"`guidance_scale` has {len(rule.scales)} per-step values but sampling runs {n} steps"
                )
            scale[:] = rule.scales if rule.scales is not None else rule.guidance_scale
            if rule.guidance_rescale > 0.0 and np.any(a <= 0.0):
                raise ValueError("`guidance_rescale` needs alpha > 0 at every evaluated step (got alpha = 0)")
        if isinstance(rule, APG) and rule.space == "eps" and np.any(a <= 0.0):
            raise ValueError("APG with space='eps' needs alpha > 0 at every evaluated step (got alpha = 0)")
        s_over_a = np.array([float(si) / float(ai) if ai > 0 else 0.0 for ai, si in zip(a, s)])
        a_over_s = np.array([float(ai) / float(si) for ai, si in zip(a, s)])
        raw = np.zeros((n, 4))
        if isinstance(rule, CFG) and rule.guidance_rescale > 0.0 and self.prediction_type != "epsilon":
            # the eager rule's host float64 numbers, step by step: the static step computes what it computes
            raw = np.array([rescale_coefficients(float(ai), float(si), self.prediction_type) for ai, si in zip(a, s)])
        return np.concatenate([np.stack([scale, s_over_a, a_over_s], axis=1), raw], axis=1)

    def _direction(self, diff: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rule = self.rule
        if self.momentum is not None:
            diff = diff + rule.momentum * self.momentum
            self.momentum.copy_(diff)
        return apg_update(diff, cond, rule.eta, rule.norm_threshold, rule.norm_dims)

    def combine(self, cond: Pair, uncond: Pair, scale: torch.Tensor, sigma_over_alpha: torch.Tensor,
                alpha_over_sigma: torch.Tensor, *rescale: torch.Tensor) -> Pair:
        """The rule's pair from the conditional and unconditional pairs; the other arguments are this step's
        columns (0-dim device tensors; ``rescale``: the four raw-output rescale coefficients, which CFG's
        ``guidance_rescale`` needs on a non-epsilon model)."""
        rule = self.rule
        if isinstance(rule, CFG):
            x0 = uncond[0] + scale * (cond[0] - uncond[0])
            eps = uncond[1] + scale * (cond[1] - uncond[1])
            if rule.guidance_rescale > 0.0:
                if self.prediction_type == "epsilon":
                    x0, eps = rescale_eps_pair((x0, eps), cond[1], rule.guidance_rescale, sigma_over_alpha)
                else:
                    x0, eps = rescale_pair((x0, eps), cond, rule.guidance_rescale, rescale)
            return x0, eps
        if isinstance(rule, CFGPlusPlus):
            return rule.combine(cond, uncond, None)  # host constant only: no per-step number
        w1 = rule.guidance_scale - 1.0
        if rule.space == "x0":
            x0 = cond[0] + w1 * self._direction(cond[0] - uncond[0], cond[0])
            eps = cond[1] - alpha_over_sigma * (x0 - cond[0])
            return x0, eps
        eps = cond[1] + w1 * self._direction(cond[1] - uncond[1], cond[1])
        x0 = cond[0] - sigma_over_alpha * (eps - cond[1])
        return x0, eps
