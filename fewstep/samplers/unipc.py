"""UniPC multistep predictor-corrector on the unified engine."""

from __future__ import annotations

from typing import Literal

from diffusers.configuration_utils import register_to_config

from ..solvers.methods import DPM_SOLVER_TYPES, unipc_decisions
from .base import FewstepScheduler, SchedulerMixin  # noqa: F401 - SchedulerMixin: see base.py

__all__ = ["FewstepUniPCScheduler", "check_unipc_noise_form"]


def check_unipc_noise_form(scheduler) -> None:
    """UniPC's noise-form corrector on a flow schedule: its weight grows like ``e^h`` over the first step from
    ``s = 1`` (``h`` ~ 10 in log-SNR), so the samples blow up; diffusers refuses flow models with
    ``predict_x0=False`` too."""
    if scheduler.is_flow and not scheduler.config.predict_x0:
        raise ValueError("UniPC with predict_x0=False (noise form) on a flow-matching schedule diverges (the corrector "
                         "weight of the first, very long step is ~e^10); use predict_x0=True (the default)")


class FewstepUniPCScheduler(FewstepScheduler):
    """UniPC: multistep UniP predictor + UniC corrector (bh1/bh2, orders 1-3), corrector costs no extra NFE.

    Zhao et al. (2023), Algorithms 1-2 (B(h) = h for bh1, e^h - 1 for bh2). Matches diffusers'
    UniPCMultistepScheduler step for step, and also runs in float64 and float16. Two edge cases differ on purpose:
    with ``use_karras_sigmas`` and ``final_sigmas_type="sigma_min"`` diffusers' UniPC ends on the last Karras sigma
    (its last step then has length 0 when the config sets ``sigma_min``; with one step it does not move), fewstep at
    the training schedule's sigma_min, as DPM-Solver does; on flow grids (``use_flow_sigmas``) diffusers hands the
    model ``int(s T)``, fewstep ``s T`` itself (under one timestep apart; the sigmas are the same).
    """

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
        predict_x0: bool = True,
        solver_type: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 - diffusers' config default, never mutated
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
        # other multistep schedulers' values (a config copied from one) read as bh2, as diffusers maps them; that
        # includes fewstep's own DPM-Solver "taylor" (dc-solver maps it so too)
        if solver_type in (*DPM_SOLVER_TYPES, "logrho"):
            self.register_to_config(solver_type="bh2")
        self._init_common()
        check_unipc_noise_form(self)
        self._decisions(1, True)

    def _decisions(self, num_steps: int, final_is_clean: bool):
        cfg = self.config
        return unipc_decisions(
            num_steps,
            solver_order=cfg.solver_order,
            prediction="data" if cfg.predict_x0 else "noise",
            solver_type=cfg.solver_type,
            lower_order_final=cfg.lower_order_final,
            disable_corrector=cfg.disable_corrector or (),
            final_is_clean=final_is_clean,
        )
