"""Heavy-ball (``hb``) and generalized heavy-ball (``ghvb``) momentum schedulers on the unified engine."""

from __future__ import annotations

from typing import Literal

from diffusers.configuration_utils import register_to_config

from .._checks import check_int
from ..solvers import grids
from ..solvers.engine import StepDecision
from ..solvers.methods import (
    DPM_SOLVER_TYPES,
    UNIPC_TYPES,
    ddim_decisions,
    dpm_solver_decisions,
    momentum_active,
    unipc_decisions,
)
from ..solvers.momentum import MomentumStep, check_beta, compile_momentum, split_fractional_order
from .base import FewstepScheduler, SchedulerMixin  # noqa: F401 - SchedulerMixin: see base.py
from .dpm_solver import ODE_ALGORITHMS, check_ode_algorithm_type
from .unipc import check_unipc_noise_form

__all__ = ["FewstepHeavyBallScheduler", "FewstepGHVBScheduler", "HB_BASES", "HB_DEFAULT_ORDERS"]

#: base method -> highest ``solver_order`` it supports.
HB_BASES = {"plms": 4, "dpm-solver++": 3, "unipc": 3}
#: base method -> the ``solver_order`` used when none is set: PLMS-4 (the paper's), and the default order of
#: fewstep's (and diffusers') DPM-Solver++ and UniPC schedulers.
HB_DEFAULT_ORDERS = {"plms": 4, "dpm-solver++": 2, "unipc": 2}


class _MomentumMixin:
    """Shared validation: ``momentum_order`` (fractional r) or ``solver_order`` + ``beta``."""

    def _order_and_beta(self, max_order: int, default_order: int = 4) -> tuple[int, float]:
        """``(order, beta)``: from ``momentum_order`` when set, else ``solver_order`` (``None``: ``default_order``,
        the base's own default) and ``beta``."""
        cfg = self.config
        if cfg.momentum_order is not None:
            k, beta = split_fractional_order(cfg.momentum_order)
            if k > max_order:
                raise ValueError(
                    f"`momentum_order`={cfg.momentum_order!r} needs a base of order {k}; this base supports orders "
                    f"1..{max_order}, i.e. momentum_order in (0, {max_order}]"
                )
            return k, beta
        order = default_order if cfg.solver_order is None else cfg.solver_order
        check_int("solver_order", order, 1, max_order, numpy_ok=False)
        return order, check_beta(cfg.beta)


class FewstepHeavyBallScheduler(_MomentumMixin, FewstepScheduler):
    """Heavy-ball momentum on PLMS, DPM-Solver++ or UniPC: larger stability region against divergence artifacts.

    Wizadwongsa et al. (2024), eq. 11: ``v_n = (1 - beta) v_{n-1} + beta e_n`` where ``e_n`` is the base
    method's update direction -- the Adams-Bashforth (PLMS-k) combination of noise predictions in DDIM space
    (``base="plms"``), or the DPM-Solver++/UniPC data-prediction combination in ``x/sigma`` space. First order
    for ``beta < 1``; ``beta = 1`` is the base method. ``momentum_order=r`` is the paper's shorthand for
    ``solver_order = floor(r) + 1, beta = r - floor(r)`` (3.8: fourth order, beta 0.8) and overrides both.
    ``nesterov=True`` steps with ``(1 - beta) v_n + beta e_n``.

    ``solver_order=None`` (the default) is the base's own default order: 4 for PLMS, 2 for DPM-Solver++ and
    UniPC. ``lower_order_final`` applies to the ``dpm-solver++``/``unipc`` bases; PLMS keeps its order to the
    last step (as diffusers' PNDM), so with ``base="plms"`` the option changes nothing. The base's own options are
    honoured, so ``beta = 1`` is that base on the same config: ``algorithm_type`` (``"dpmsolver++"``, data
    prediction, or ``"dpmsolver"``, noise prediction) and ``euler_at_final`` for ``dpm-solver++``;
    ``predict_x0`` and ``disable_corrector`` for ``unipc`` (options of the other bases are ignored, as keys of
    a foreign config are). The momentum lives in the space of the base's prediction form (``x/sigma`` against
    ``alpha/sigma`` for data prediction, DDIM's ``x/alpha`` against ``sigma/alpha`` for noise prediction, see
    ``fewstep.solvers.momentum``). The SDE variants (``"sde-dpmsolver++"``, ``"sde-dpmsolver"``) are refused:
    eq. 11 averages the update directions of an ODE solver; on SDE steps it would average the injected noise.

    Which steps carry momentum: with ``plms`` every step (``v`` starts at the first direction, so the first
    step is plain DDIM); with ``dpm-solver++``/``unipc`` only the multistep updates -- the first-order
    warm-up step and the low-order final steps run plain, as in the authors' code. With UniPC the momentum
    wraps the corrected update (the one that defines the trajectory); the predictor only picks the next
    evaluation point. Momentum state is reset by ``set_timesteps``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        base: Literal["plms", "dpm-solver++", "unipc"] = "plms",
        solver_order: int | None = None,
        beta: float = 0.8,
        momentum_order: float | None = None,
        nesterov: bool = False,
        solver_type: str | None = None,
        lower_order_final: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        use_karras_sigmas: bool = False,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
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
        algorithm_type: Literal["dpmsolver++", "dpmsolver"] = "dpmsolver++",
        euler_at_final: bool = False,
        predict_x0: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 - diffusers' config default, never mutated
    ):
        if base not in HB_BASES:
            raise ValueError(f"`base` must be one of {list(HB_BASES)}, got {base!r}")
        if not isinstance(nesterov, bool):
            raise ValueError(f"`nesterov` must be a bool, got {nesterov!r}")
        allowed = {"plms": (None,), "dpm-solver++": (None, *DPM_SOLVER_TYPES), "unipc": (None, *UNIPC_TYPES)}[base]
        if solver_type not in allowed:
            # Configs copied from other schedulers carry their own solver_type: ignore what does not apply.
            if solver_type in DPM_SOLVER_TYPES + UNIPC_TYPES + ("logrho",):
                # listed as a default value, so that a scheduler built from this config in memory takes its own
                # default instead of this None: fewstep's from_config drops such nulls anyway (a reloaded config has
                # no default list), diffusers' UniPC/DPM-Solver would refuse them ("None is not implemented")
                used = [k for k in self.config.get("_use_default_values", []) if k != "solver_type"]
                self.register_to_config(solver_type=None, _use_default_values=[*used, "solver_type"])
            else:
                raise ValueError(f"`solver_type` for base {base!r} must be one of {list(allowed)}, got {solver_type!r}")
        check_ode_algorithm_type(self, algorithm_type, "base",
                                 "heavy-ball momentum (eq. 11) averages the update directions of an ODE solver, on "
                                 "SDE steps it would average the injected noise")
        self._init_common()
        if base == "unipc":
            check_unipc_noise_form(self)
        self._order()
        self._decisions(1, True)

    def _order(self) -> tuple[int, float]:
        base = self.config.base
        return self._order_and_beta(HB_BASES[base], HB_DEFAULT_ORDERS[base])

    def _prediction(self) -> str:
        """The base's prediction form: ``"noise"`` for PLMS, DPM-Solver (``algorithm_type="dpmsolver"``) and
        UniPC with ``predict_x0=False``; else ``"data"``."""
        cfg = self.config
        if cfg.base == "plms":
            return "noise"
        if cfg.base == "dpm-solver++":
            return ODE_ALGORITHMS[cfg.algorithm_type]
        return "data" if cfg.predict_x0 else "noise"

    def _decisions(self, num_steps: int, final_is_clean: bool) -> list[StepDecision]:
        cfg = self.config
        order, _ = self._order()
        prediction = self._prediction()
        if cfg.base == "plms":
            return ddim_decisions(num_steps, prediction=prediction)
        if cfg.base == "dpm-solver++":
            return dpm_solver_decisions(
                num_steps, order, prediction, cfg.solver_type or "midpoint", cfg.lower_order_final,
                euler_at_final=cfg.euler_at_final, final_is_clean=final_is_clean,
            )
        return unipc_decisions(
            num_steps, order, prediction, cfg.solver_type or "bh2", cfg.lower_order_final,
            disable_corrector=cfg.disable_corrector or (), final_is_clean=final_is_clean,
        )

    def _momentum(self, grid: grids.TimeGrid, decisions: list[StepDecision], start: int = 0
                  ) -> list[MomentumStep | None]:
        cfg = self.config
        order, beta = self._order()
        if cfg.base == "plms":
            return compile_momentum(grid, "hb", order, beta, space="noise", nesterov=cfg.nesterov, start=start)
        return compile_momentum(
            grid, "hb", 1, beta, space=self._prediction(), active=momentum_active(decisions), nesterov=cfg.nesterov,
            start=start,
        )


class FewstepGHVBScheduler(_MomentumMixin, FewstepScheduler):
    """Generalized heavy ball (GHVB): a k-step method (k = 1..5) whose beta trades accuracy for stability.

    Wizadwongsa et al. (2024), eq. 13: in DDIM space ``v_n = (1 - beta) v_{n-1} + beta eps_n`` and
    ``x_{n+1}/alpha_{n+1} = x_n/alpha_n + (sigma-bar_{n+1} - sigma-bar_n) sum_j g_j(beta) v_{n-j}``; keeps
    order k, ``beta = 1`` is PLMS-k, ``beta -> 0`` tends to PLMS-(k-1). ``momentum_order=r`` sets
    ``k = floor(r) + 1, beta = r - floor(r)`` (3.8: k = 4, beta = 0.8). Lower orders while the history is
    short (every step carries momentum); state reset by ``set_timesteps``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        solver_order: int = 4,
        beta: float = 0.8,
        momentum_order: float | None = None,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        use_karras_sigmas: bool = False,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
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
        self._init_common()
        self._order_and_beta(5)

    def _decisions(self, num_steps: int, final_is_clean: bool) -> list[StepDecision]:
        return ddim_decisions(num_steps, prediction="noise")

    def _momentum(self, grid: grids.TimeGrid, decisions: list[StepDecision], start: int = 0
                  ) -> list[MomentumStep | None]:
        order, beta = self._order_and_beta(5)
        return compile_momentum(grid, "ghvb", order, beta, space="noise", start=start)
