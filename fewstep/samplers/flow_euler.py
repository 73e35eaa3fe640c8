"""Flow-matching Euler (rectified flow) on the unified engine: diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers.configuration_utils import register_to_config

from .._checks import check_number
from ..solvers.methods import ddim_decisions
from ..solvers.schedules import is_flow_config
from .base import FewstepScheduler, SchedulerMixin  # noqa: F401 - SchedulerMixin: see base.py

__all__ = ["FewstepFlowEulerScheduler", "FewstepFlowChefScheduler"]

#: config keys that only a VP (DDPM-family) scheduler config has
_VP_KEYS = ("beta_schedule", "beta_start", "beta_end", "trained_betas", "alphas_cumprod")
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")


class FewstepFlowEulerScheduler(FewstepScheduler):
    """Flow-matching Euler: x_{s'} = x_s + (s' - s) v for rectified-flow models (SD3, Flux, digits-flow).

    Liu et al. (2022), Esser et al. (2024, eq. 23 for the shift). Same sigma grid as diffusers'
    FlowMatchEulerDiscreteScheduler (``sigma = linspace(1, s_min, N)`` with ``s_min`` pre-shifted for a static
    ``shift``, then shifted; dynamic shift ``e^mu`` from ``mu`` for Flux; custom ``sigmas`` are shifted as diffusers
    does), timesteps ``s * T`` as floats. On the engine this is DDIM (order 1, data form) on the flow schedule, so
    it accepts steering hooks such as FlowChef and inconsistent ``(x0, eps)`` pairs (CFG++). VP (DDPM-family)
    configs are refused: use ``ddim`` or another multistep sampler for those.
    """

    process = "flow"
    spacing_style = "ddim"
    flow_grid_style = "flowmatch"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        prediction_type: str = "flow",
        # engine settings shared by every fewstep scheduler (fixed for flow-euler)
        timestep_spacing: str = "linspace",
        final_sigmas_type: str = "zero",
        time_grid: str = "spacing",
        thresholding: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        steps_offset: int = 0,
    ):
        if prediction_type not in ("flow", "flow_prediction"):
            raise ValueError(
                f"`flow-euler` samples rectified-flow (velocity) models; got prediction_type={prediction_type!r} "
                "(a VP/diffusion config): use ddim, dpm-solver++ or unipc for it"
            )
        check_number("shift", shift, 0.0, low_open=True)
        for key in _UNSUPPORTED:
            if self.config[key]:
                raise ValueError(f"`{key}=True` is not supported by flow-euler (allowed: False)")
        if final_sigmas_type != "zero":
            raise ValueError(f"`final_sigmas_type` must be 'zero' for flow-euler, got {final_sigmas_type!r}")
        self._init_common()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """``diffusers`` ``from_config``, refusing a VP (DDPM-family) config instead of silently sampling a flow; a
        config that states its static shift as ``flow_shift`` only (UniPC/DPM-Solver flow sigmas) is sampled with
        that shift."""
        cfg = dict(config or {})
        vp = [k for k in _VP_KEYS if k in cfg]
        if vp and not is_flow_config({**cfg, **kwargs}):
            name = "flowchef" if issubclass(cls, FewstepFlowChefScheduler) else "flow-euler"
            raise ValueError(
                f"`{name}` needs a flow-matching config (FlowMatchEulerDiscreteScheduler, `shift`, "
                f"`use_dynamic_shifting`); got a VP config ({cfg.get('_class_name', 'scheduler')} with {vp[0]}): "
                "use ddim, dpm-solver++ or unipc for VP models"
            )
        if cfg.get("shift") is None and "shift" not in kwargs and cfg.get("flow_shift") is not None:
            # UniPC/DPM-Solver flow configs (Wan, SANA) and fewstep configs made from them state the static shift as
            # `flow_shift` (their `shift` is unset): this class reads `shift` only, whose default 1.0 would
            # sample them unshifted
            kwargs = {**kwargs, "shift": cfg["flow_shift"]}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _decisions(self, num_steps: int, final_is_clean: bool):
        return ddim_decisions(num_steps)


class FewstepFlowChefScheduler(FewstepFlowEulerScheduler):
    """FlowChef: flow-matching Euler steered by a cost on x0_hat = x - s v, v frozen (no model backprop, same NFE).

    Patel et al. (2024), "Steering Rectified Flow Models in the Vector Field" (sec. 3). The scheduler form of
    ``solvers.flowchef.FlowChefHook`` for any diffusers-style loop: give it a cost with ``set_cost(cost)`` (a callable
    ``x0_hat -> per-image losses``, e.g. ``solvers.flowchef.measurement_cost``), then sample as usual; every
    ``set_timesteps`` installs the hook for the new run. Options: ``flowchef_step_size`` (eta),
    ``flowchef_inner_steps`` (M), ``flowchef_steered_steps`` (K; ``None`` = all but the last), ``flowchef_optimizer``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        prediction_type: str = "flow",
        timestep_spacing: str = "linspace",
        final_sigmas_type: str = "zero",
        time_grid: str = "spacing",
        thresholding: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        steps_offset: int = 0,
        flowchef_step_size: float = 0.5,
        flowchef_inner_steps: int = 1,
        flowchef_steered_steps: int | None = None,
        flowchef_optimizer: str = "gd",
    ):
        # by keyword: the parent's @register_to_config lists positional arguments as "defaults used", and
        # from_config of this scheduler's config would then drop them (shift, dynamic shifting, ...)
        super().__init__(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type, stochastic_sampling=stochastic_sampling,
            prediction_type=prediction_type, timestep_spacing=timestep_spacing, final_sigmas_type=final_sigmas_type,
            time_grid=time_grid, thresholding=thresholding, clip_sample=clip_sample,
            clip_sample_range=clip_sample_range, steps_offset=steps_offset,
        )
        from ..solvers.flowchef import FlowChefConfig

        self.flowchef_config = FlowChefConfig(
            step_size=flowchef_step_size, inner_steps=flowchef_inner_steps, steered_steps=flowchef_steered_steps,
            optimizer=flowchef_optimizer,
        )
        self.cost = None

    def set_cost(self, cost: Any) -> None:
        """The cost on ``x0_hat`` (callable -> per-image losses or a scalar) used from the next ``set_timesteps``."""
        if not callable(cost):
            raise TypeError(f"`cost` must be callable (x0_hat -> per-image losses), got {type(cost).__name__}")
        self.cost = cost

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None) -> None:
        from ..solvers.flowchef import FlowChefHook

        if self.cost is None:
            raise ValueError("`flowchef` needs a cost: call scheduler.set_cost(cost) before set_timesteps "
                             "(or use flow-euler for unsteered sampling)")
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu)
        hook = FlowChefHook(self.cost, self.flowchef_config)
        grid = self.plan.grid
        try:
            hook.check_plan(grid.alphas, grid.sigmas, self.plan.num_steps)
        except ValueError:
            self.plan, self._state = None, None  # no unsteered run left behind: step() asks for set_timesteps
            raise
        self.add_step_hook(hook)
