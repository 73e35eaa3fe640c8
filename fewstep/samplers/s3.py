"""``s3``: run a searched (or any hand-written) USF solver schedule as a diffusers scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from diffusers.configuration_utils import register_to_config

from ..solvers import grids
from ..solvers.ems import EMS
from ..solvers.engine import Plan, StepDecision, compile_plan, with_analytic_first_step
from ..solvers.s3 import SolverSchedule, schedule_fingerprint
from .base import FewstepScheduler, SchedulerMixin  # noqa: F401 - SchedulerMixin: see base.py
from .dpm_solver_v3 import SHIPPED_EMS

__all__ = ["FewstepS3Scheduler", "SHIPPED_SCHEDULES", "shipped_schedule_path"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "s3"
#: searched schedules that ship with fewstep: ``s3_schedule="digits-eps"`` picks the one for the NFE.
SHIPPED_SCHEDULES = ("digits-eps", "analytic")


def shipped_schedule_path(name: str, nfe: int) -> Path:
    """Path of a shipped searched schedule; a clear error lists what ships for ``name``."""
    if name not in SHIPPED_SCHEDULES:
        raise ValueError(f"no shipped schedules for {name!r}; shipped: {', '.join(SHIPPED_SCHEDULES)}")
    path = _ASSETS / f"{name}-nfe{nfe}.json"
    if not path.is_file():
        have = sorted(int(p.stem.rsplit("nfe", 1)[1]) for p in _ASSETS.glob(f"{name}-nfe*.json"))
        raise ValueError(f"no shipped {name!r} schedule for NFE {nfe}; shipped NFEs: {have}")
    return path


class FewstepS3Scheduler(FewstepScheduler):
    """S3 / USF: executes a solver schedule (per-step decisions + time points), e.g. one found by `fewstep search`.

    Liu et al. (2024): every step's timestep, prediction type, order, derivative points, relaxation and
    pseudo corrector are data. ``s3_schedule`` is a schedule file, a shipped name (``"digits-eps"``:
    the file for the requested NFE) or an inline dict; ``set_timesteps(num_inference_steps)`` must ask for
    the schedule's NFE, and the schedule's noise-schedule fingerprint (and ``s3_model``, when both name
    one) must match -- a schedule searched for another model or NFE is an error, never a silent fallback.

    A schedule with an analytical first step (``afs="zero_x0"``) calls the model at its time points after the
    first; ``set_timesteps`` then sets ``init_noise_sigma`` to ``sigma_1 / sigma_0``, which diffusers pipelines
    apply to the initial noise (text-to-image; img2img-style partial sampling is not meaningful with AFS).

    Schedules may use DPM-Solver-v3 steps (``prediction="ems"``); those need the model's empirical model
    statistics in ``ems_file`` (a file from ``fewstep calibrate ems`` or a shipped name, e.g. ``"digits-eps"``;
    ``load_default``/``generate``/``fewstep bench`` pass the shipped ones), checked against the model like
    ``dpm-solver-v3`` does (``ems_model``: the model name stored in the file must match). The time points of
    such a schedule are snapped to the EMS grid; schedules without ``"ems"`` steps ignore ``ems_file``.
    """

    _artifact_config_keys = {"s3_schedule": SHIPPED_SCHEDULES, "ems_file": SHIPPED_EMS}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        s3_schedule: str | dict | None = None,
        s3_model: str | None = None,
        ems_file: str | None = None,
        ems_model: str | None = None,
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
        if s3_schedule is not None and not isinstance(s3_schedule, (str, dict)):
            raise ValueError(f"`s3_schedule` must be a file path, a shipped name or a dict, got {s3_schedule!r}")
        if ems_model is not None and not isinstance(ems_model, str):
            raise ValueError(f"`ems_model` must be a model name (str) or None, got {ems_model!r}")
        self._init_common()
        self._ems: EMS | None = None
        if ems_file is not None:
            from .dpm_solver_v3 import load_checked_ems

            self._ems = load_checked_ems(ems_file, self.noise_schedule, self.prediction_type, ems_model)
        self._loaded: SolverSchedule | None = None
        self._shipped: dict[int, SolverSchedule] = {}  # shipped schedules by NFE, read and checked once
        if isinstance(s3_schedule, dict) or (isinstance(s3_schedule, str) and s3_schedule not in SHIPPED_SCHEDULES):
            self._loaded = self._load(None)  # validate files and inline schedules now
        self._anchor_artifact_files()  # a relative file name: the file read here, from any directory

    @property
    def ems(self) -> EMS | None:
        """The EMS tables given by ``ems_file`` (``None`` without one)."""
        return self._ems

    def _load(self, nfe: int | None) -> SolverSchedule:
        spec = self.config.s3_schedule
        if spec is None:
            raise ValueError("`s3_schedule` is not set: pass a schedule file (fewstep search --out), a shipped name "
                             f"({', '.join(SHIPPED_SCHEDULES)}) or a dict")
        if isinstance(spec, dict):
            sched = SolverSchedule.from_dict(spec)
        elif spec in SHIPPED_SCHEDULES:
            if nfe is None:
                raise ValueError("a shipped schedule name needs the NFE: it is resolved in set_timesteps")
            sched = SolverSchedule.load(shipped_schedule_path(spec, nfe))
        else:
            sched = SolverSchedule.load(spec)
        meta = sched.metadata
        want = schedule_fingerprint(self.noise_schedule)
        if meta.get("noise_schedule") not in (None, want):
            raise ValueError(
                f"this solver schedule was made for noise schedule {meta['noise_schedule']!r}, but the model's is "
                f"{want!r}: search a schedule for this model"
            )
        model = self.config.s3_model or (spec if isinstance(spec, str) and spec in SHIPPED_SCHEDULES else None)
        if model is not None and meta.get("model") not in (None, model):
            raise ValueError(f"this solver schedule was searched for model {meta['model']!r}, not {model!r}")
        sched.check_ems(self._ems)
        return sched

    def _grid(self, num_inference_steps, timesteps, sigmas, mu) -> grids.TimeGrid:
        if timesteps is not None or sigmas is not None:
            raise ValueError("`s3` takes its time points from the schedule; pass only num_inference_steps")
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps (the schedule's NFE)")
        sched = self._loaded
        if sched is None:  # a shipped name: its file for this NFE, read (and checked against the EMS) once
            sched = self._shipped.get(num_inference_steps)
            if sched is None:
                sched = self._shipped[num_inference_steps] = self._load(num_inference_steps)
        if sched.nfe != num_inference_steps:
            raise ValueError(
                f"the solver schedule has NFE {sched.nfe}, but num_inference_steps={num_inference_steps}; "
                "search (or pick) a schedule for this NFE"
            )
        self._current = sched
        grid, self._ems_grid = sched.ems_grid(self.noise_schedule, self._ems)
        return grid

    def _decisions(self, num_steps: int, final_is_clean: bool) -> list[StepDecision]:
        return list(self._current.decisions)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """As diffusers' (img2img starts part-way); refused for a schedule with an analytical first step, whose
        analytic point only exists at the start."""
        plan = self.plan
        if plan is not None and plan.analytic_start is not None and begin_index != 0:
            raise ValueError(
                f"`begin_index` {begin_index!r}: this solver schedule starts with an analytical first step (afs), "
                "which only applies to sampling from pure noise; use a schedule without `afs` for img2img"
            )
        super().set_begin_index(begin_index)

    def _compile_plan(self, grid: grids.TimeGrid, decisions: list[StepDecision]) -> Plan:
        plan = compile_plan(grid, decisions, ems=self._ems_grid)
        # AFS: the model is first called at the second time point, on noise scaled by init_noise_sigma (plus, for
        # average_x0, the mean image's share, added by scale_model_input / step at that call)
        if self._current.afs is None:
            return plan
        return with_analytic_first_step(plan, self._current.mean_image())
