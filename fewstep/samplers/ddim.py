"""DDIM on the unified engine: deterministic (eta = 0) or with DDIM's stochastic ``eta`` (a ``step`` argument)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .._checks import check_number
from ..solvers.engine import Plan
from ..solvers.methods import ddim_decisions, ddim_eta_plan
from ..solvers.schedules import is_flow_config
from .base import (  # noqa: F401 - SchedulerMixin: see base.py
    FewstepScheduler,
    FewstepSchedulerOutput,
    SchedulerMixin,
    _check_variance_noise,
    check_config_arg,
)

__all__ = ["FewstepDDIMScheduler"]


class FewstepDDIMScheduler(FewstepScheduler):
    """DDIM: first-order sampler, deterministic (eta=0) or stochastic (step's eta in (0, 1], as diffusers' DDIM).

    Song, Meng & Ermon (2021), eq. 12: ``x_t = alpha_t x0 + sqrt(sigma_t^2 - sigma_eta^2) eps + sigma_eta z`` with
    ``sigma_eta = eta sigma_t sqrt(1 - e^{-2h})`` (``h = lambda_t - lambda_s``), which on a VP schedule is eq. 16's
    ``eta sqrt((1 - abar_t)/(1 - abar_s)) sqrt(1 - abar_s/abar_t)``; ``eta`` is an argument of ``step`` (as
    diffusers' ``DDIMScheduler.step``, where diffusers pipelines pass their ``eta``), ``eta = 1`` is the ancestral
    (DDPM-like) sampler, identical to first-order SDE-DPM-Solver++. The diffusers-style ``clip_sample`` clips ``x0``
    only (``eps`` is kept), exactly as diffusers' DDIMScheduler does (default on for VP configs, off for flow).
    On a flow schedule DDIM (eta = 0) is exactly the flow-matching Euler step ``x + (s' - s) v``.
    Unlike diffusers, each step goes to the next listed timestep: diffusers steps to ``t - T // N``, which is not
    the next timestep it then evaluates for ``linspace`` spacing, nor for ``trailing`` spacing when ``N`` does not
    divide ``T`` (e.g. 666 -> 333, then the model is called at 332; ``linspace`` at N = 2 evaluates 999, steps to
    499, then calls the model at 0 on that sample). Measured with the exact denoiser of a 2-D Gaussian mixture on
    SD's scaled-linear schedule (relative difference of the final samples, epsilon and v-prediction alike):
    ``linspace`` 90% at N = 2, 36% at 3, 20% at 4, 8.6% at 7, 3.7% at 15, 2.0% at 30, 0.9% at 50; ``trailing``
    at most 1.1% (N = 7; 0.8% at 15, 0.5% at 30, 0.08% at 3, float rounding where N divides T). Neither is the
    more accurate everywhere: against the exact ODE solution diffusers' ``linspace`` run is closer below ~10 steps
    (N = 2: 32% vs fewstep's 87% error), fewstep's from 15 on. With ``leading`` spacing (SD 1.5, SDXL) and
    ``trailing`` at N dividing T the two agree to float rounding. With ``rescale_betas_zero_snr`` the last
    alpha_bar is 2^-24 (half the one before where that is smaller: linear betas) as in diffusers' DPM-Solver and
    UniPC (diffusers' DDIM keeps 0: 1e-4 relative with v-prediction on SD's betas, 2e-5 on linear ones).
    """

    spacing_style = "ddim"
    flow_grid_style = "flowmatch"
    tuple_with_x0 = True  # diffusers' DDIMScheduler.step(return_dict=False) gives (prev_sample, pred_original_sample)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        clip_sample: bool | None = None,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str | None = None,
        use_karras_sigmas: bool = False,
        time_grid: str = "spacing",
        shift: float | None = None,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
    ):
        if final_sigmas_type is None:
            # DDIM's `set_alpha_to_one` decides whether the last step lands on clean data or on alpha_bar[0]
            # (a VP notion: flow schedules end on clean data).
            clean = set_alpha_to_one or is_flow_config(dict(self.config))
            self.register_to_config(final_sigmas_type="zero" if clean else "sigma_min")
        # the mark ``from_config`` tells this class's configs by (diffusers writes it only on saving): without it a
        # constructor-built config lost its own final_sigmas_type in ``from_config(self.config)``
        self.register_to_config(_class_name=type(self).__name__)
        self._init_common()
        self._ddim_options: tuple | None = None  # the DDIM arguments of the step in progress (see ``_advance``)
        if clip_sample is None:
            # diffusers' DDIM clips x0 to [-1, 1] by default; that suits pixel-space VP models, never flow latents.
            self.register_to_config(clip_sample=not self.is_flow)
            self._check_clip_sample()

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """As diffusers' ``from_config``, except that another scheduler's ``final_sigmas_type`` is not taken over
        (only a fewstep DDIM config's or an explicit keyword's): it describes that scheduler's last step, while
        DDIM's is decided by ``set_alpha_to_one``, as in diffusers' DDIMScheduler. Without this a pipeline's
        scheduler gave another DDIM after ``save_pretrained`` / ``from_pretrained`` (which writes e.g. Euler's
        default ``final_sigmas_type="zero"`` explicitly) than before it. A fewstep DDIM config is one whose
        ``_class_name`` is this class's: every fewstep DDIM registers it (a constructor-built one too), so
        ``from_config(sched.config)`` rebuilds ``sched`` exactly."""
        check_config_arg(config)
        if config is not None and "final_sigmas_type" not in kwargs:
            source = dict(config)
            if source.get("_class_name") != cls.__name__ and "final_sigmas_type" in source:
                del source["final_sigmas_type"]
                config = source
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _decisions(self, num_steps: int, final_is_clean: bool):
        return ddim_decisions(num_steps)

    # ----------------------------------------------------------------------------------------------
    # eta (stochastic DDIM)
    def _eta_plan(self, eta: float) -> Plan:
        """``ddim_eta_plan(self.plan, eta)`` (built on the host from the coefficients of ``set_timesteps``); the
        last one is cached (with the plan it was built from: a new ``set_timesteps`` builds it again)."""
        cached: tuple[float, Plan, Plan] | None = getattr(self, "_eta_plan_cache", None)
        if cached is None or cached[0] != eta or cached[1] is not self.plan:
            cached = self._eta_plan_cache = (eta, self.plan, ddim_eta_plan(self.plan, eta))
        return cached[2]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Advance ``sample`` to the next grid point, with diffusers' ``DDIMScheduler.step`` arguments.

        ``eta`` in [0, 1]: the weight of fresh noise (DDIM's eq. 16; 0: deterministic DDIM, 1: ancestral), drawn
        from ``generator`` in the model output's dtype on every step as diffusers' DDIM draws it, or given as
        ``variance_noise`` (standard normal, the sample's shape; not together with ``generator``). Both are ignored
        at ``eta = 0``. ``use_clipped_model_output``: re-derive ``eps`` from the (clipped) ``x0``, as diffusers does.
        Otherwise as every fewstep scheduler's ``step`` (half-precision inputs are computed in float32 and returned
        in their own dtype).
        """
        eta = check_number("eta", eta, 0.0, 1.0, what="DDIM's noise weight: 0 deterministic, 1 ancestral")
        if use_clipped_model_output is None:  # diffusers' DDIMPipeline passes its default None (read as False)
            use_clipped_model_output = False
        if not isinstance(use_clipped_model_output, (bool, np.bool_)):
            raise ValueError(f"`use_clipped_model_output` must be True, False or None, got "
                             f"{use_clipped_model_output!r}")
        if eta > 0.0 and variance_noise is not None:
            if generator is not None:
                raise ValueError("pass either `generator` or `variance_noise`, not both (`variance_noise` is the "
                                 "step's noise itself)")
            _check_variance_noise(variance_noise, sample)
        self._ddim_options = (eta, bool(use_clipped_model_output), generator, variance_noise, model_output)
        try:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        finally:
            self._ddim_options = None

    def _advance(self, i, x, x0, eps, out_dtype, return_dict, noise=None, history=None):
        """The engine step of model call ``i``, with ``step``'s DDIM options: ``eps`` re-derived from the clipped
        ``x0`` (``use_clipped_model_output``) and, for ``eta > 0``, the stochastic plan and its noise (``step_pair``
        passes none: a plain deterministic step)."""
        options = self._ddim_options
        if options is None:
            return super()._advance(i, x, x0, eps, out_dtype, return_dict, noise, history)
        eta, clipped, generator, variance_noise, like = options
        if clipped:
            point = self.plan.calls[i][0]
            alpha, sigma = float(self.plan.grid.alphas[point]), float(self.plan.grid.sigmas[point])
            eps = (x - alpha * x0) / sigma
        if eta > 0.0:
            if variance_noise is None:  # as diffusers' DDIM draws it: on every step, in the model output's dtype
                variance_noise = randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)
            noise = variance_noise.to(x.dtype)
        state = self._state
        state.plan = self._eta_plan(eta)
        try:
            return super()._advance(i, x, x0, eps, out_dtype, return_dict, noise)
        finally:
            state.plan = self.plan
