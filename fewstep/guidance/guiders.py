"""Adapters to ``diffusers.guiders.BaseGuidance`` (modular pipelines): APG and CFG++.

A diffusers guider sees only the raw model outputs (``pred_cond``, ``pred_uncond``: eps, v or flow
velocity) plus the step index and timestep, never ``alpha``/``sigma`` and never the scheduler. Hence:

* ``APGGuider`` runs fewstep's APG algebra (``APG.direction``: momentum -> clip -> projection) on the raw
  outputs with the **paper's** scale: ``pred = pred_cond + (w - 1)(Delta_perp + eta Delta_par)``. This
  equals diffusers' ``AdaptiveProjectedGuidance(guidance_scale=w - 1, use_original_formulation=True, ...)``
  (tested). Differences from diffusers' guider defaults: fewstep uses ``eta = 0`` and momentum
  ``beta = -0.5`` (paper), diffusers ``eta = 1`` and no momentum (CFG plus norm clipping), and diffusers'
  default formulation adds ``w Delta~`` to the *unconditional* output. Differences from fewstep's own
  ``APG`` rule: the rule works in the denoised (``x0``) space, as the paper recommends; the guider works
  in whatever space the model predicts (for an eps model, ``APG(space="eps")``).
* ``CFGPlusPlusGuider`` returns CFG with the per-step scale ``w_i = lam rho_i/(rho_i - rho_{i+1})`` read
  from the scheduler's grid, which is exactly CFG++ for first-order schedulers (fewstep ``ddim``,
  diffusers ``EulerDiscreteScheduler``, flow Euler) and only an approximation for multistep ones, whose
  history then holds guided predictions. Its ``GuiderOutput`` also carries ``pred_cond``/``pred_uncond``,
  so a pair-aware loop can run exact CFG++ with ``fewstep.guidance.guided_step``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from .rules import APG, CFGPlusPlus, cfgpp_equivalent_scales, scheduler_rhos

__all__ = ["APGGuider", "CFGPlusPlusGuider"]


class _TwoPredictionGuider(BaseGuidance):
    """Shared batching: one conditional and (when active) one unconditional batch per step."""

    _input_predictions = ["pred_cond", "pred_uncond"]

    def _on_first_step(self) -> None:
        """Reset per-generation state (called when ``prepare_inputs`` sees step 0)."""

    def _active(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None and self._step is not None:
            start = int(self._start * self._num_inference_steps)
            stop = int(self._stop * self._num_inference_steps)
            return start <= self._step < stop
        return True

    def prepare_inputs(self, data: dict[str, Any]) -> list:
        if self._step == 0:
            self._on_first_step()
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, str | tuple[str, str]]) -> list:
        if self._step == 0:
            self._on_first_step()
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, name)
            for i, name in zip(indices, self._input_predictions)
        ]

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._active() else 1

    @staticmethod
    def _check_preds(pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None) -> None:
        if pred_uncond is not None and pred_uncond.shape != pred_cond.shape:
            raise ValueError(
                "`pred_cond` and `pred_uncond` must have the same shape (batch included); got "
                f"{tuple(pred_cond.shape)} and {tuple(pred_uncond.shape)}"
            )


class APGGuider(_TwoPredictionGuider):
    """APG (Sadat et al. 2025) as a diffusers guider, paper scale ``w``, on the raw model outputs.

    Args: ``guidance_scale`` paper ``w`` (1 = conditional only); ``eta`` weight of the parallel part (>= 0,
    paper default 0); ``norm_threshold`` r > 0 or ``None`` (no clipping); ``momentum`` beta in (-1, 1)
    (0 = none), reset at step 0; ``norm_dims`` dims of the per-sample norm/projection (default all
    non-batch dims); ``start``/``stop`` fractions of the steps where guidance is active. Arguments are
    keyword-only: diffusers' ``register_to_config`` records positional ones as defaults, so ``new()`` and
    ``from_config`` would silently drop them.
    """

    @register_to_config
    def __init__(
        self,
        *,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        norm_threshold: float | None = 15.0,
        momentum: float = -0.5,
        norm_dims: list[int] | None = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        # validation and the algebra live in the pair rule; the guider uses its `direction`
        self.rule = APG(
            guidance_scale=guidance_scale,
            eta=eta,
            norm_threshold=norm_threshold,
            momentum=momentum,
            space="eps",
            norm_dims=norm_dims,
        )

    def _on_first_step(self) -> None:
        self.rule.reset()

    def _active(self) -> bool:
        return super()._active() and not math.isclose(self.rule.guidance_scale, 1.0)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        self._check_preds(pred_cond, pred_uncond)
        if not self._active() or pred_uncond is None:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        update = self.rule.direction(pred_cond - pred_uncond, pred_cond)
        pred = pred_cond + (self.rule.guidance_scale - 1.0) * update
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class CFGPlusPlusGuider(_TwoPredictionGuider):
    """CFG++ (Chung et al. 2025) as a diffusers guider: CFG with ``w_i = lam rho_i/(rho_i - rho_{i+1})``.

    ``scheduler`` (not part of the saved config; pass it to the constructor or ``set_scheduler``) must be a
    fewstep scheduler, ``EulerDiscreteScheduler`` or ``FlowMatchEulerDiscreteScheduler``; its grid after
    ``set_timesteps`` gives ``rho_i``. Exact CFG++ for first-order schedulers (see the module docstring).
    The unconditional batch is always computed, also at ``lam = 0`` or ``1``.
    """

    ignore_for_config = ["scheduler"]  # runtime state, not configuration

    @register_to_config
    def __init__(
        self,
        *,
        guidance_scale: float = 0.6,
        allow_extrapolation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        scheduler: Any = None,
    ):
        super().__init__(start, stop, enabled)
        self.rule = CFGPlusPlus(guidance_scale=guidance_scale, allow_extrapolation=allow_extrapolation)
        self.scheduler = scheduler

    def set_scheduler(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def current_scale(self) -> float:
        """The CFG scale equivalent to CFG++ at the current step (host float)."""
        if self.scheduler is None:
            raise ValueError("CFGPlusPlusGuider needs the scheduler: pass scheduler= or call set_scheduler()")
        scales = cfgpp_equivalent_scales(self.rule.guidance_scale, scheduler_rhos(self.scheduler))
        # a run that begins part-way (img2img: diffusers' loops call set_begin_index(t_start) and count `step` from
        # 0 over the remaining timesteps) is at grid step begin_index + step
        begin = getattr(self.scheduler, "begin_index", None) or 0
        index = None if self._step is None else begin + self._step
        if index is None or not 0 <= index < len(scales):
            raise ValueError(f"step {self._step!r} (grid step {index!r}: the scheduler begins at {begin}) is outside "
                             f"the scheduler's {len(scales)} steps; call set_state")
        return scales[index]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        self._check_preds(pred_cond, pred_uncond)
        if not self._active() or pred_uncond is None:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        pred = pred_uncond + self.current_scale() * (pred_cond - pred_uncond)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
