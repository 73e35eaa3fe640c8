"""DDIM (eta = 0) on the unified engine."""

from __future__ import annotations

from typing import Any, Literal

from diffusers.configuration_utils import register_to_config

from ..solvers.methods import ddim_decisions
from ..solvers.schedules import is_flow_config
from .base import FewstepScheduler, SchedulerMixin, check_config_arg  # noqa: F401 - SchedulerMixin: see base.py

__all__ = ["FewstepDDIMScheduler"]


class FewstepDDIMScheduler(FewstepScheduler):
    """DDIM (eta=0): first-order deterministic sampler, x_t = alpha_t x0 + sigma_t eps.

    Song, Meng & Ermon (2021), eq. 12 with sigma = 0. The diffusers-style ``clip_sample`` clips ``x0`` only
    (``eps`` is kept), exactly as diffusers' DDIMScheduler does (default on for VP configs, off for flow).
    On a flow schedule DDIM is exactly the flow-matching Euler step ``x + (s' - s) v``.
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
        self._init_common()
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
        default ``final_sigmas_type="zero"`` explicitly) than before it."""
        check_config_arg(config)
        if config is not None and "final_sigmas_type" not in kwargs:
            source = dict(config)
            if source.get("_class_name") != cls.__name__ and "final_sigmas_type" in source:
                del source["final_sigmas_type"]
                config = source
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _decisions(self, num_steps: int, final_is_clean: bool):
        return ddim_decisions(num_steps)
