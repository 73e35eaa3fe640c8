"""MRS: the fast ODE/SDE sampler for mean-reverting (IR-SDE) diffusion models, on the unified engine."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers.configuration_utils import register_to_config

from .._checks import check_int
from ..solvers.engine import StepDecision
from ..solvers.mean_reverting import (
    MR_PREDICTIONS,
    check_measurement,
    check_stationary_std,
    from_z,
    mean_reverting_betas,
    model_output_to_z,
    to_z,
)
from ..solvers.methods import dpm_solver_decisions, euler_maruyama_decisions
from ..solvers.schedules import is_flow_config
from .base import (  # noqa: F401 - SchedulerMixin: see base.py
    FewstepScheduler,
    FewstepSchedulerOutput,
    SchedulerMixin,
    _check_output_shape,
    _step_dtype,
)

__all__ = ["FewstepMRSScheduler", "MRS_SOLVERS", "MRS_DEFAULT_ORDERS"]

MRS_SOLVERS = {"ode": 3, "sde": 2, "euler-maruyama": 1}  # solver -> highest order
#: solver -> the ``solver_order`` used when none is set (``solver_order=None``)
MRS_DEFAULT_ORDERS = {"ode": 2, "sde": 2, "euler-maruyama": 1}
_ALGORITHMS = ("data", "noise")


class FewstepMRSScheduler(FewstepScheduler):
    """MRS: semi-analytic ODE (orders 1-3) and SDE (orders 1-2) solvers for mean-reverting diffusion models.

    Li et al. (2025), sec. 4: the MR-SDE ``dx = theta_t (mu - x) dt + g_t dw`` is a VP process in
    ``z = (x - mu) / lam``, so the exact-linear-part solutions of its PF-ODE and reverse SDE (noise or data
    form, ``algorithm_type``) are DPM-Solver(++) multistep updates on ``z``; ``solver="euler-maruyama"`` is the
    baseline. ``step`` works on ``x`` and needs the degraded image: ``step(out, t, x, mu=mu, generator=g)``.
    The model may predict ``epsilon``, ``sample`` (x0) or ``v_prediction`` (MRS's velocity, ``lam`` times the
    ``z``-process velocity). ``final_sigmas_type="sigma_min"`` ends at the first training index, as the
    reference code does; ``"zero"`` ends with the model's x0 (the optional final denoise). ``solver_order=None``
    (the default) is 2 for ``ode`` and ``sde`` and 1 for ``euler-maruyama`` (``MRS_DEFAULT_ORDERS``).

    Against the released sampler: ``solver_type="heun"`` is the paper's ODE-3 (second divided difference weighted
    ``phi_3``); the default ``"taylor"`` gives it the full Taylor weight ``2 phi_3`` (more accurate); at order 2
    both are the paper's ODE-2. The end-of-run orders follow diffusers' ``lower_order_final`` (the released code
    lowers them only below 10 steps and keeps the final step at full order), and ``time_grid="uniform_time"`` is
    the paper's unrounded grid (the default rounds the training indices).
    """

    process = "mean-reverting"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 101,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "mr_cosine",
        trained_betas: list[float] | None = None,
        stationary_std: float | None = None,
        mr_a_end: float = 0.005,
        solver: Literal["ode", "sde", "euler-maruyama"] = "ode",
        solver_order: int | None = None,
        algorithm_type: Literal["data", "noise"] = "data",
        solver_type: Literal["midpoint", "heun", "taylor"] = "taylor",
        lower_order_final: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        use_karras_sigmas: bool = False,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "sigma_min",
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
        if is_flow_config(dict(self.config)):
            from . import names

            fits = names("diffusion", standalone=True) + names("flow")
            raise ValueError("`mrs` samples mean-reverting (IR-SDE) models; this is a flow-matching config, which "
                             f"these samplers integrate: {', '.join(fits)}")
        if trained_betas is None:
            if beta_schedule != "mr_cosine":
                raise ValueError(
                    f"`mrs` needs a mean-reverting schedule: `trained_betas` (as MR models ship them) or "
                    f"beta_schedule='mr_cosine'; got beta_schedule={beta_schedule!r} -- is this a mean-reverting model?"
                )
            steps = check_int("num_train_timesteps", num_train_timesteps, 3, what="of beta_schedule='mr_cosine'")
            self.register_to_config(trained_betas=mean_reverting_betas(steps - 1, mr_a_end))
        if stationary_std is None:
            raise ValueError(
                "`stationary_std` (the MR-SDE's stationary std lambda) is required and is not part of a plain "
                "scheduler config; e.g. from_config(pipe.scheduler.config, stationary_std=pipe.config.stationary_std)"
            )
        self.stationary_std = check_stationary_std(stationary_std)
        if solver not in MRS_SOLVERS:
            raise ValueError(f"`solver` must be one of {list(MRS_SOLVERS)}, got {solver!r}")
        if algorithm_type not in _ALGORITHMS:
            raise ValueError(f"`algorithm_type` must be one of {list(_ALGORITHMS)}, got {algorithm_type!r}")
        if prediction_type not in MR_PREDICTIONS:
            raise ValueError(f"`prediction_type` must be one of {list(MR_PREDICTIONS)}, got {prediction_type!r}")
        top = MRS_SOLVERS[solver]
        if solver_order is None:
            solver_order = MRS_DEFAULT_ORDERS[solver]
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or not 1 <= solver_order <= top:
            raise ValueError(
                f"`solver_order` for solver={solver!r} must be an integer in [1, {top}], got {solver_order!r}"
            )
        if solver == "euler-maruyama" and final_sigmas_type == "zero":
            raise ValueError("solver='euler-maruyama' cannot step to sigma = 0; use final_sigmas_type='sigma_min'")
        self._init_common()
        self._decisions(1, final_sigmas_type == "zero")

    def _decisions(self, num_steps: int, final_is_clean: bool) -> list[StepDecision]:
        cfg = self.config
        if cfg.solver == "euler-maruyama":
            return euler_maruyama_decisions(num_steps)
        order = MRS_DEFAULT_ORDERS[cfg.solver] if cfg.solver_order is None else cfg.solver_order
        return dpm_solver_decisions(
            num_steps, order, cfg.algorithm_type, cfg.solver_type, cfg.lower_order_final,
            final_is_clean=final_is_clean, stochastic=cfg.solver == "sde",
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        mu: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor, ...]:
        """Advance ``sample`` (the MR state ``x``) to the next grid point; ``mu`` is the degraded image.
        ``model_output`` and ``mu`` must have the sample's shape."""
        dtype = _step_dtype(model_output=model_output, sample=sample)
        _check_output_shape(sample, model_output=model_output)
        mu = check_measurement(mu, sample)
        i = self._begin_step(timestep)
        lam = self.stationary_std
        mu_c = mu.to(dtype)
        z = to_z(self.working_sample(sample, dtype), mu_c, lam)  # a half-precision run continues in float32
        out_z = model_output_to_z(model_output.to(dtype), mu_c, lam, self.prediction_type)
        z0, eps = self.convert_model_output(out_z, z, i)
        prev_z = self._state.advance(i, z, z0, eps, self._step_noise(i, z, generator))
        self._step_index = i + 1
        prev = self._keep_precision(i, from_z(prev_z, mu_c, lam), sample.dtype)
        x0 = from_z(z0, mu_c, lam).to(sample.dtype)
        if not return_dict:
            return (prev,)
        return FewstepSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
        mu: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MR-SDE marginal at model timesteps ``timesteps``: ``a x0 + (1 - a) mu + lam sqrt(1 - a^2) eps``
        (IR-SDE eq. 7; the VP ``add_noise`` applied to ``z = (x - mu) / lam``). ``mu`` (the degraded image) is
        required: without it the state is not defined."""
        if mu is None:
            raise ValueError(
                "`mu` is required: the mean-reverting marginal a*x0 + (1 - a)*mu + lam*sqrt(1 - a^2)*eps drifts "
                "towards the degraded image mu; call add_noise(x0, noise, timesteps, mu=degraded)"
            )
        # the sample, noise and timesteps are checked first (a wrong sample shape is not mu's fault)
        a, s = self._alpha_sigma_at(original_samples, noise, timesteps, ("original_samples", "noise", "timesteps"))
        mu = check_measurement(mu, original_samples).to(original_samples.dtype)
        lam = self.stationary_std
        return from_z(a * to_z(original_samples, mu, lam) + s * noise, mu, lam)

    def step_pair(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("`mrs` takes model outputs through step(..., mu=...); step_pair is not defined")
