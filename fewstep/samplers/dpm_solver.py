"""DPM-Solver++ / DPM-Solver multistep on the unified engine."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config

from ..solvers.methods import dpm_solver_decisions
from .base import (  # noqa: F401 - SchedulerMixin: see base.py
    FewstepScheduler,
    FewstepSchedulerOutput,
    SchedulerMixin,
    _check_variance_noise,
)

__all__ = ["FewstepDPMSolverScheduler", "ODE_ALGORITHMS", "check_ode_algorithm_type"]

_ALGORITHMS = {"dpmsolver++": "data", "dpmsolver": "noise", "sde-dpmsolver++": "data", "sde-dpmsolver": "noise"}
#: the ODE ``algorithm_type``s -> prediction form (what samplers built on a DPM-Solver base accept)
ODE_ALGORITHMS = {k: v for k, v in _ALGORITHMS.items() if not k.startswith("sde-")}


def check_ode_algorithm_type(scheduler: FewstepScheduler, algorithm_type: str, base_key: str, why: str) -> None:
    """``algorithm_type`` of a sampler built on a solver base named by its option ``base_key`` (``base``,
    ``dc_base``): DEIS configs' ``"deis"`` becomes ``"dpmsolver++"`` (as diffusers maps it); an SDE type is refused
    when the base is ``dpm-solver++`` (``why`` says why; other bases ignore the key, as keys of a foreign config
    are); anything else is refused."""
    if algorithm_type == "deis":
        scheduler.register_to_config(algorithm_type="dpmsolver++")
    elif algorithm_type not in _ALGORITHMS:
        raise ValueError(f"`algorithm_type` must be one of {list(ODE_ALGORITHMS)}, got {algorithm_type!r}")
    elif algorithm_type not in ODE_ALGORITHMS and scheduler.config[base_key] == "dpm-solver++":
        raise ValueError(f"`algorithm_type`={algorithm_type!r}: {why}; allowed with {base_key}='dpm-solver++': "
                         f"{list(ODE_ALGORITHMS)}")


class FewstepDPMSolverScheduler(FewstepScheduler):
    """DPM-Solver++ multistep (orders 1-3, data prediction; `algorithm_type="dpmsolver"` for noise prediction).

    Lu et al. (2022b), Algorithm 2 (multistep DPM-Solver++(2M)) and its third-order extension. With the
    default ``solver_type="midpoint"`` it reproduces diffusers' DPMSolverMultistepScheduler step for step;
    ``solver_type="taylor"`` uses the exact phi-function weights (full third order for ``solver_order=3``).
    ``algorithm_type="sde-dpmsolver++"`` / ``"sde-dpmsolver"`` integrate the reverse SDE (orders 1-2; noise
    from ``step(..., generator=)``), matching diffusers' SDE variants given the same noise.
    """

    flow_grid_style = "dpmsolver"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        algorithm_type: Literal["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun", "taylor"] = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
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
        if algorithm_type in ("deis",):
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type not in _ALGORITHMS:
            raise ValueError(f"`algorithm_type` must be one of {list(_ALGORITHMS)}, got {algorithm_type!r}")
        if solver_type in ("bh1", "bh2", "logrho"):  # other multistep schedulers' values (diffusers maps them too)
            self.register_to_config(solver_type="midpoint")
        self._init_common()
        if self.config.algorithm_type == "sde-dpmsolver" and final_sigmas_type == "zero":
            # the noise-form SDE step to sigma = 0 divides by it (diffusers refuses this too)
            raise ValueError("`final_sigmas_type`='zero' is not supported with algorithm_type='sde-dpmsolver' (its "
                             "last step to sigma = 0 blows up); use final_sigmas_type='sigma_min' or "
                             "algorithm_type='sde-dpmsolver++'")  # fmt: skip
        # Validate the method parameters now rather than at set_timesteps.
        self._decisions(1, True)

    def _decisions(self, num_steps: int, final_is_clean: bool):
        cfg = self.config
        return dpm_solver_decisions(
            num_steps,
            solver_order=cfg.solver_order,
            prediction=_ALGORITHMS[cfg.algorithm_type],
            solver_type=cfg.solver_type,
            lower_order_final=cfg.lower_order_final,
            euler_at_final=cfg.euler_at_final,
            final_is_clean=final_is_clean,
            stochastic=cfg.algorithm_type.startswith("sde-"),
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor, ...]:
        """Advance ``sample`` to the next grid point, with diffusers' ``DPMSolverMultistepScheduler.step`` arguments.

        ``variance_noise`` (standard normal, the sample's shape): the SDE step's noise itself, used instead of a draw
        from ``generator`` (as diffusers, it wins when both are given); the ODE algorithm types ignore it. Otherwise
        as every fewstep scheduler's ``step``."""
        if variance_noise is not None:
            _check_variance_noise(variance_noise, sample)
        self._variance_noise = variance_noise
        try:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        finally:
            self._variance_noise = None

    def _step_noise(self, k, x, generator, given=None):
        return super()._step_noise(k, x, generator, getattr(self, "_variance_noise", None) if given is None else given)
