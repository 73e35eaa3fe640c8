"""DPM-Solver-v3 on the unified engine: EMS-parameterised multistep predictor + corrector (a diffusers scheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from diffusers.configuration_utils import register_to_config

from ..solvers import grids
from ..solvers.ems import EMS, load_ems, snap_grid
from ..solvers.engine import EMSGrid, compile_plan
from ..solvers.methods import dpm_solver_v3_decisions
from ..solvers.s3 import schedule_fingerprint
from ..solvers.schedules import FlowSchedule, NoiseSchedule
from .base import FewstepScheduler, SchedulerMixin  # noqa: F401 - SchedulerMixin: see base.py

__all__ = [
    "FewstepDPMSolverV3Scheduler", "SHIPPED_EMS", "SHIPPED_EMS_TIME_GRID", "CORRECTOR_REGIONS", "V3_TIME_GRIDS",
    "shipped_ems", "load_checked_ems", "check_ems_range",
]

_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "ems"
#: EMS that ship with fewstep, usable by name in ``ems_file``.
SHIPPED_EMS = {"digits-eps": _ASSETS / "digits-eps.safetensors", "digits-flow": _ASSETS / "digits-flow.safetensors"}
#: the time grid measured best with each shipped table (scripts/bench_v3.py and the README)
SHIPPED_EMS_TIME_GRID = {"digits-eps": "time_quadratic", "digits-flow": "uniform_time"}
#: where the corrector runs: everywhere, only at low noise (the paper's half-corrector, ``t <= split``) or only
#: at high noise (what the released code's ``half=True`` does: ``t > split``).
CORRECTOR_REGIONS = ("all", "low-noise", "high-noise")
V3_TIME_GRIDS = ("uniform_lambda", "uniform_time", "time_quadratic", "spacing")
#: grid points of the EMS-free tables ``degenerated=True`` builds when no EMS file is given (more when a run's
#: steps lie closer in lambda than a few table spacings, up to ``_DEGENERATE_MAX_POINTS``)
_DEGENERATE_POINTS = 2000
_DEGENERATE_MAX_POINTS = 200_000


def shipped_ems(name: str) -> Path:
    """Path of shipped EMS tables (``"digits-eps"``)."""
    if name not in SHIPPED_EMS:
        raise ValueError(f"no shipped EMS for {name!r}; available: {', '.join(SHIPPED_EMS)}")
    return SHIPPED_EMS[name]


def load_checked_ems(ems_file: str, noise_schedule, prediction_type: str, ems_model: str | None = None) -> EMS:
    """Load EMS tables (a file or a shipped name) and check they fit the model: its noise schedule, its
    prediction type and, when ``ems_model`` is given, the model name stored in the file."""
    if not isinstance(ems_file, (str, Path)):
        raise ValueError(f"`ems_file` must be a file path or a shipped name ({', '.join(SHIPPED_EMS)}), "
                         f"got {ems_file!r}")
    if ems_model is not None and (not isinstance(ems_model, str) or not ems_model):
        raise ValueError(f"`ems_model` must be a model name (a non-empty string), got {ems_model!r}")
    path = shipped_ems(ems_file) if ems_file in SHIPPED_EMS else Path(ems_file)
    ems = load_ems(path)
    meta = ems.meta
    want = schedule_fingerprint(noise_schedule)
    if meta.get("noise_schedule") not in (None, want):
        raise ValueError(
            f"EMS file {str(path)!r} was estimated for noise schedule {meta.get('noise_schedule')!r}, but this "
            f"scheduler's config gives {want!r}; estimate EMS for this model (`fewstep calibrate ems`)"
        )
    if ems_model is not None and meta.get("model") not in (None, ems_model):
        raise ValueError(f"EMS file {str(path)!r} was estimated for model {meta.get('model')!r}, not {ems_model!r}")
    if meta.get("prediction_type") not in (None, prediction_type):
        raise ValueError(
            f"EMS file {str(path)!r} was estimated for prediction_type {meta.get('prediction_type')!r}, but this "
            f"scheduler's config has {prediction_type!r}"
        )
    check_ems_range(ems, noise_schedule, f"EMS file {str(path)!r}")
    return ems


def check_ems_range(ems: EMS, noise_schedule, where: str = "EMS") -> None:
    """The EMS grid must lie inside the noise schedule's lambda range: every grid lambda must map to a model time and
    back (``lambda(t_of_lambda(lambda))``) to itself, up to ``1e-6 (1 + |lambda|)`` plus the stored values' rounding.
    Outside ``[lambda(t_max), lambda(t_min)]`` a VP schedule's ``t_of_lambda`` clamps to its end, so the steps would
    be snapped to grid points the model is never evaluated at (a flow schedule's ends, ``lambda = -inf / +inf``, are
    reached by no finite lambda, but a lambda too large for float64's ``s`` comes back infinite). ``where`` starts the
    message (e.g. the file)."""
    if not isinstance(ems, EMS):
        raise TypeError(f"`ems` must be fewstep.solvers.ems.EMS tables, got {type(ems).__name__}")
    if not isinstance(noise_schedule, NoiseSchedule):
        raise TypeError(f"`noise_schedule` must be a fewstep NoiseSchedule, got {type(noise_schedule).__name__}")
    lam = ems.lambdas
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        t = noise_schedule.t_of_lambda(lam)
        back = noise_schedule.lambda_(t)
        lo, hi = (float(v) for v in noise_schedule.lambda_(np.array([noise_schedule.t_max, noise_schedule.t_min])))
    slack = 1e-6 * (1.0 + np.abs(lam)) + ems.lambda_resolution
    off = ~(np.abs(back - lam) <= slack)  # (NaN/Inf count as off)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{where}: EMS `lambdas` run from {float(lam[0])!r} to {float(lam[-1])!r}, but this scheduler's noise "
            f"schedule spans lambda in [{lo:.6g}, {hi:.6g}] (t = {noise_schedule.t_max:g}..{noise_schedule.t_min:g}): "
            f"grid point {i} (lambda {float(lam[i])!r}) maps to t = {float(t[i]):.6g}, whose lambda is "
            f"{float(back[i]):.6g}; these tables were estimated for another noise schedule -- estimate EMS for this "
            "model (`fewstep calibrate ems`)"
        )


class FewstepDPMSolverV3Scheduler(FewstepScheduler):
    """DPM-Solver-v3: multistep exponential integrator on empirical model statistics (EMS), corrector at no NFE.

    Zheng, Lu, Chen & Zhu (NeurIPS 2023). The model output is reparameterised per element by tables
    ``l, s, b`` estimated from the model (``fewstep calibrate ems``; ``ems_file="digits-eps"`` ships); steps are
    snapped to the EMS grid (``time_grid``: ``uniform_time`` (default; the paper's choice for latent and
    high-resolution models), ``uniform_lambda`` (its choice for low resolution), ``time_quadratic``, or diffusers'
    ``spacing``). ``solver_order`` 1-3 (3 for unconditional, 2 for guided sampling, as the paper
    recommends), ``predictor_pseudo`` (pseudo-order predictor, very low NFE), ``use_corrector`` with
    ``corrector_pseudo`` (pseudo-order ``order + 1`` corrector, the paper's default) and ``corrector_region``
    (``"low-noise"`` is the paper's half-corrector for large guidance scales, ``"high-noise"`` what the released
    code runs). ``degenerated=True`` uses ``l = 1, s = b = 0``: exactly DPM-Solver++ (no EMS needed).
    ``ems_model`` (optional) must match the model name stored in the EMS file.
    """

    _artifact_config_keys = {"ems_file": SHIPPED_EMS}

    @classmethod
    def time_grids(cls, flow: bool) -> tuple[str, ...]:
        """``V3_TIME_GRIDS`` on VP and flow configs alike (on a flow config warped by the flow shift)."""
        return V3_TIME_GRIDS

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        solver_order: int = 2,
        predictor_pseudo: bool = False,
        use_corrector: bool = True,
        corrector_pseudo: bool = True,
        corrector_region: Literal["all", "low-noise", "high-noise"] = "all",
        corrector_split: float = 0.5,
        lower_order_final: bool = True,
        degenerated: bool = False,
        ems_file: str | None = None,
        ems_model: str | None = None,
        time_grid: str = "uniform_time",
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
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
        if time_grid not in V3_TIME_GRIDS:
            raise ValueError(f"`time_grid` must be one of {list(V3_TIME_GRIDS)} for dpm-solver-v3, got {time_grid!r}")
        if corrector_region not in CORRECTOR_REGIONS:
            raise ValueError(f"`corrector_region` must be one of {list(CORRECTOR_REGIONS)}, got {corrector_region!r}")
        if isinstance(corrector_split, bool) or not isinstance(corrector_split, (int, float)) or not (
            0.0 < corrector_split < 1.0
        ):
            raise ValueError(f"`corrector_split` must be a number in (0, 1) (a fraction of T), got {corrector_split!r}")
        for name, value in (("predictor_pseudo", predictor_pseudo), ("use_corrector", use_corrector),
                            ("corrector_pseudo", corrector_pseudo), ("degenerated", degenerated)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool, got {value!r}")
        if use_karras_sigmas:
            raise ValueError("dpm-solver-v3 snaps its steps to the EMS grid: use `time_grid`, not use_karras_sigmas")
        self._init_common()
        self._ems: EMS | None = None
        if ems_file is not None:
            self._ems = self._load(ems_file)
        elif not degenerated:
            raise ValueError(
                "dpm-solver-v3 needs empirical model statistics: pass `ems_file` (a file from `fewstep calibrate ems "
                f"--model MODEL --out ems.safetensors`, or a shipped name: {', '.join(SHIPPED_EMS)}), or "
                "`degenerated=True` for the EMS-free variant (= DPM-Solver++)"
            )
        self._decisions(2, True)  # validate the method options now
        self._anchor_artifact_files()  # a relative file name: the file read here, from any directory

    # ----------------------------------------------------------------------------------------------
    def _load(self, ems_file: str) -> EMS:
        ems = load_checked_ems(ems_file, self.noise_schedule, self.prediction_type, self.config.ems_model)
        return ems.degenerated() if self.config.degenerated else ems

    def _tables(self, grid: grids.TimeGrid | None = None) -> EMS:
        """The EMS tables of the current run: the loaded ones, or EMS-free ones (``degenerated=True`` without a file):
        l = 1, s = b = 0 on a uniform lambda grid over the schedule's whole range (one value per grid point,
        broadcast over every element), of ``_DEGENERATE_POINTS`` spacings, or -- for a run (``grid``, at
        ``set_timesteps``) with two points closer than one spacing, which would snap onto one point (800 steps on a
        zero-terminal-SNR schedule did) -- of three spacings between its closest points. Chosen from the run's own
        grid, so a run never depends on an earlier one."""
        if not self._ems_free:
            return self._ems
        if grid is None:
            if self._ems is None:
                self._ems = self._ems_free_tables(_DEGENERATE_POINTS)
            return self._ems
        lo, hi = self._lambda_range()
        gaps = np.diff(grid.finite_lambdas)
        points = _DEGENERATE_POINTS
        if gaps.size and float(gaps.min()) < (hi - lo) / points:
            points = min(int(np.ceil(3.0 * (hi - lo) / float(gaps.min()))), _DEGENERATE_MAX_POINTS)
        self._ems = self._ems_free_tables(points)
        return self._ems

    @property
    def _ems_free(self) -> bool:
        return self.config.ems_file is None

    def _lambda_range(self) -> tuple[float, float]:
        t_hi, t_lo = self._time_range()
        return float(self.noise_schedule.lambda_(t_hi)), float(self.noise_schedule.lambda_(t_lo))

    def _ems_free_tables(self, points: int) -> EMS:
        """EMS-free tables of ``points`` spacings, kept per size (the default's and the last other one), so their
        compiled transitions (cached on the EMS object) are reused across runs."""
        cache = self.__dict__.setdefault("_ems_free_cache", {})
        if points not in cache:
            for size in [k for k in cache if k != _DEGENERATE_POINTS]:
                del cache[size]
            lo, hi = self._lambda_range()
            lam = np.linspace(lo, hi, points + 1)
            cache[points] = EMS(lam, np.ones(lam.size), np.zeros(lam.size), np.zeros(lam.size), {"degenerated": True})
        return cache[points]

    def _time_range(self) -> tuple[float, float]:
        sched = self.noise_schedule
        if isinstance(sched, FlowSchedule):
            # s in [1/T, 1 - 1/T]: alpha = 0 and sigma = 0 have infinite lambda
            T = sched.num_train_timesteps
            return T - 1.0, 1.0
        return sched.t_max, sched.t_min

    # ----------------------------------------------------------------------------------------------
    def _grid(self, num_inference_steps, timesteps, sigmas, mu) -> grids.TimeGrid:
        cfg = self.config
        sched = self.noise_schedule
        if timesteps is None and sigmas is None and cfg.time_grid != "spacing":
            ems = self._tables()
            lam_hi, lam_lo = ems.lambdas[0], ems.lambdas[-1]
            t_start, t_end = float(sched.t_of_lambda(lam_hi)), float(sched.t_of_lambda(lam_lo))
            builder = {"uniform_lambda": grids.uniform_lambda_grid, "uniform_time": grids.uniform_time_grid,
                       "time_quadratic": grids.time_quadratic_grid}[cfg.time_grid]
            grid = builder(sched, num_inference_steps, t_start=t_start, t_end=t_end,
                           final_sigmas_type=cfg.final_sigmas_type)
            if isinstance(sched, FlowSchedule):
                grid = self._shift_flow_grid(grid, mu)
        else:
            grid = super()._grid(num_inference_steps, timesteps, sigmas, mu)
            if isinstance(sched, FlowSchedule):
                grid = self._clamp_flow_start(grid)
        snapped = self._snap(grid)
        if isinstance(sched, FlowSchedule) and timesteps is not None:
            snapped = self._user_flow_times(snapped, grid, timesteps, mu)
        return snapped

    def _user_flow_times(self, snapped: grids.TimeGrid, given: grids.TimeGrid, timesteps, mu: float | None
                         ) -> grids.TimeGrid:
        """The model times of a flow grid built from user ``timesteps``, after snapping. As diffusers' flow
        schedulers (and every other fewstep sampler) treat them, user timesteps are the model's own times: the
        model is called at ``t`` while the noise level is the shifted ``s = shift(t / T)`` (then ``shift_terminal``'s
        stretch). Snapping moves ``s`` to an EMS grid point ``s'``; the model is called at the time that maps to
        it, ``T shift^-1(s')`` -- the user's ``t`` up to the snap -- never at ``s' T`` (the shifted level)."""
        T = self.noise_schedule.num_train_timesteps
        n = snapped.num_steps
        shift = self._flow_shift(mu)
        s = np.asarray(snapped.sigmas[:n], dtype=np.float64)
        if self.config.shift_terminal:
            # the stretch is 1 - s = (1 - shift(t / T)) c, one constant c for the whole grid: read it off the last
            # evaluation point before snapping (the one the stretch pins to shift_terminal)
            last = float(np.asarray(timesteps, dtype=np.float64).reshape(-1)[n - 1]) / T
            c = (1.0 - float(given.sigmas[n - 1])) / (1.0 - float(shift.apply(np.array([last]))[0]))
            s = 1.0 - (1.0 - s) / c
        k = shift.shift
        times = T * s / (k - (k - 1.0) * s)  # the inverse of s = k u / (1 + (k - 1) u)
        return grids.TimeGrid(times, snapped.alphas, snapped.sigmas)

    def _clamp_flow_start(self, grid: grids.TimeGrid) -> grids.TimeGrid:
        """A flow grid that starts at pure noise (``s = 1``: diffusers' flow grids, the Flux pipeline's ``sigmas``)
        starts where no EMS grid reaches (``lambda = -inf``): its first point moves to the EMS grid's upper end
        (``s = 1 - 1/T`` for degenerate tables), where ``x`` is still noise up to ``alpha = 1/T``."""
        s_top = 1.0 / (1.0 + np.exp(self._tables().lambdas[0]))  # flow: lambda = log((1 - s) / s)
        if grid.sigmas[0] <= s_top or grid.sigmas[1] >= s_top:
            return grid  # inside the EMS range already, or more than one point above it (snapping names it)
        sigmas = grid.sigmas.copy()
        sigmas[0] = s_top
        timesteps = grid.timesteps.copy()
        timesteps[0] = min(timesteps[0], s_top * self.noise_schedule.num_train_timesteps)
        return grids.TimeGrid(timesteps, 1.0 - sigmas, sigmas)

    def _shift_flow_grid(self, grid: grids.TimeGrid, mu: float | None) -> grids.TimeGrid:
        """A flow model's ``time_grid`` warped by the config's ``shift`` (or ``e^mu``) as diffusers' flow schedulers
        warp theirs, ``s -> shift s / (1 + (shift - 1) s)``, then scaled by the constant that keeps the first point
        where it was (on the EMS grid's upper end); ``shift = 1`` leaves the grid unchanged."""
        if self.config.shift_terminal:
            raise ValueError(f"`shift_terminal`={self.config.shift_terminal!r} is not supported by dpm-solver-v3's "
                             "time grids (they span the EMS grid); pass `sigmas` to set_timesteps instead")
        shift = self._flow_shift(mu)
        s = grid.sigmas  # flow: sigma = s, the target included (s = 0 stays 0)
        warped = shift.apply(s) * (s[0] / shift.apply(s[:1])[0])
        return grids.TimeGrid(warped[:-1] * self.noise_schedule.num_train_timesteps, 1.0 - warped, warped)

    def _snap(self, grid: grids.TimeGrid) -> grids.TimeGrid:
        """Move every evaluation point (and a non-clean target) to the nearest EMS grid point (v3 sec. 3.3)."""
        snapped, self._ems_indices = snap_grid(self._tables(grid), self.noise_schedule, grid)
        return snapped

    def _corrector_allowed(self, grid: grids.TimeGrid) -> list[bool]:
        """Per step ``i``: may its corrector run (judged at the corrected point ``i + 1``, time as a fraction of T)?"""
        cfg = self.config
        n = grid.num_steps
        if cfg.corrector_region == "all":
            return [True] * n
        T = float(self.noise_schedule.num_train_timesteps)
        frac = [(float(grid.timesteps[i + 1]) + 1.0) / T if i + 1 < n else 0.0 for i in range(n)]
        if cfg.corrector_region == "low-noise":
            return [f <= cfg.corrector_split for f in frac]
        return [f > cfg.corrector_split for f in frac]

    def _decisions(self, num_steps: int, final_is_clean: bool, corrector_at=None):
        cfg = self.config
        return dpm_solver_v3_decisions(
            num_steps, solver_order=cfg.solver_order, predictor_pseudo=cfg.predictor_pseudo,
            use_corrector=cfg.use_corrector, corrector_pseudo=cfg.corrector_pseudo,
            lower_order_final=cfg.lower_order_final, corrector_at=corrector_at, final_is_clean=final_is_clean,
        )

    def _grid_decisions(self, grid):
        return self._decisions(grid.num_steps, grid.clean_end, self._corrector_allowed(grid))

    def _compile_plan(self, grid, decisions):
        return compile_plan(grid, decisions, ems=EMSGrid(self._tables(), self._ems_indices))

    @property
    def ems(self) -> EMS:
        """The EMS tables in use (degenerate ones for ``degenerated=True`` without a file)."""
        return self._tables()
