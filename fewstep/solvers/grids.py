"""Timestep grids: where a sampler evaluates the model, and where it ends.

A ``TimeGrid`` holds ``N`` evaluation points (model timesteps with their ``alpha``, ``sigma``) and the
final target point ``N`` (which the model never sees). The grids offered:

* ``spacing_grid`` -- diffusers' ``leading`` / ``linspace`` / ``trailing`` integer timesteps (the
  multistep-scheduler flavour and the DDIM flavour differ slightly; both are reproduced);
* ``uniform_time_grid``, ``uniform_lambda_grid`` (uniform in logSNR), ``time_quadratic_grid``;
* ``karras_grid`` -- Karras et al. (2022) eq. 5 in ``rho = sigma/alpha`` with exponent 7;
* ``flow_grid`` -- diffusers' FlowMatchEulerDiscreteScheduler grid with static/dynamic shift;
* ``custom_timesteps_grid`` / ``custom_sigmas_grid`` -- user-given points, validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_int, check_number
from .schedules import FlowSchedule, FlowShift, NoiseSchedule, VPSchedule

__all__ = [
    "SPACINGS",
    "FINAL_SIGMAS",
    "TimeGrid",
    "spacing_timesteps",
    "spacing_grid",
    "uniform_time_grid",
    "uniform_lambda_grid",
    "time_quadratic_grid",
    "karras_grid",
    "flow_grid",
    "custom_timesteps_grid",
    "custom_sigmas_grid",
    "check_num_steps",
    "check_shift_terminal_points",
    "MIN_LAMBDA_GAP",
    "check_model_times_distinct",
    "check_lambda_gaps",
]

SPACINGS = ("leading", "linspace", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min")
#: the smallest log-SNR gap ``h`` allowed between two user-given evaluation points (custom ``timesteps``, solver
#: schedules): multistep solvers divide differences of model outputs by these gaps (derivative estimates, step ratios
#: ``h_prev / h``), and a float32 model output carries rounding of ~1e-7 of its size, so over a gap ``h`` that
#: estimate is off by ~1e-7 / h of the output's size: 1e-3 at ``h = 1e-4``, and growing as ``1/h`` below. Every
#: integer-timestep grid of the common VP (linear, scaled_linear, squaredcos_cap_v2) and flow schedules (1000 training
#: steps) has gaps of 3e-3 or more, 30 times this bound.
MIN_LAMBDA_GAP = 1e-4


@dataclass
class TimeGrid:
    """``N`` model evaluation points plus the final target, all float64 on the host.

    ``timesteps[i]`` is what the model is called with at point ``i``; ``alphas[i]``, ``sigmas[i]`` (length
    ``N + 1``) are what the solver uses, so a grid may feed rounded timesteps to the model while the solver
    integrates between unrounded noise levels (as diffusers does for Karras sigmas).
    """

    timesteps: np.ndarray
    alphas: np.ndarray
    sigmas: np.ndarray
    lambdas: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.timesteps = np.asarray(self.timesteps, dtype=np.float64)
        self.alphas = np.asarray(self.alphas, dtype=np.float64)
        self.sigmas = np.asarray(self.sigmas, dtype=np.float64)
        n = self.timesteps.size
        if self.timesteps.ndim != 1 or n < 1:
            raise ValueError(f"a TimeGrid needs at least one evaluation point (1-D timesteps), got shape "
                             f"{self.timesteps.shape}")
        if self.alphas.shape != (n + 1,) or self.sigmas.shape != (n + 1,):
            raise ValueError("a TimeGrid needs N timesteps and N+1 alphas/sigmas (the last one is the target)")
        if np.any(~np.isfinite(self.timesteps)):
            raise ValueError(f"grid timesteps must be finite, got {self.timesteps.tolist()}")
        if np.any(~np.isfinite(self.alphas)) or np.any(~np.isfinite(self.sigmas)):
            raise ValueError("grid alphas/sigmas must be finite")
        if np.any(self.sigmas[:-1] <= 0):
            raise ValueError("every evaluation point of a grid needs sigma > 0")
        if np.any(self.alphas <= 0) or self.sigmas[-1] < 0:
            i = int(np.argmax(self.alphas <= 0)) if np.any(self.alphas <= 0) else n
            where = f"t = {self.timesteps[i]:g}" if i < n else "the target"
            raise ValueError(
                f"every point of a grid needs alpha > 0 and sigma >= 0; point {i} ({where}) has alpha = "
                f"{self.alphas[i]:g}, sigma = {self.sigmas[i]:g} (pure noise, alpha = 0, has lambda = -inf: a flow "
                "schedule's t = T; start below it)"
            )
        with np.errstate(divide="ignore"):
            self.lambdas = np.log(self.alphas) - np.log(self.sigmas)
        gaps = np.diff(self.lambdas)
        if gaps.size and abs(gaps[-1]) <= 1e-9 * (1.0 + abs(self.lambdas[-2])):
            # a target equal to the last point up to rounding (a Karras grid's rho_min end against a sigma_min
            # target computed from the float32 schedule, on either side of it): snap it onto that point, a step
            # of exactly zero length rather than one of 1e-18 that divides by its length (CFG++'s equivalent
            # CFG scales, momentum)
            self.alphas[-1], self.sigmas[-1], self.lambdas[-1] = self.alphas[-2], self.sigmas[-2], self.lambdas[-2]
            gaps[-1] = 0.0
        # The target may coincide with the last evaluation point (DDIM's set_alpha_to_one=False ending at t=0).
        if np.any(gaps[:-1] <= 0) or (gaps.size and gaps[-1] < 0):
            raise ValueError(
                f"grid noise levels must strictly decrease (lambda strictly increase); got lambdas {self.lambdas}"
            )

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.size)

    @property
    def clean_end(self) -> bool:
        """Whether the target is clean data (sigma = 0, lambda = +inf)."""
        return bool(self.sigmas[-1] == 0.0)

    @property
    def finite_lambdas(self) -> np.ndarray:
        """The lambdas of every point with a finite lambda: the evaluation points, plus the target unless it is
        clean data."""
        return self.lambdas[:-1] if self.clean_end else self.lambdas

    @property
    def rhos(self) -> np.ndarray:
        """``sigma/alpha`` per point (diffusers' ``scheduler.sigmas`` for VP models)."""
        return self.sigmas / self.alphas

    @classmethod
    def from_times(cls, schedule: NoiseSchedule, times: np.ndarray, final: tuple[float, float] | None) -> TimeGrid:
        """Evaluation points at ``times``; target ``final = (alpha, sigma)``, or ``None`` to end at ``times[-1]``."""
        times = np.asarray(times, dtype=np.float64)
        if final is None:
            alphas, sigmas = schedule.alpha_sigma(times)
            return cls(times[:-1], alphas, sigmas)
        alphas, sigmas = schedule.alpha_sigma(times)
        return cls(times, np.append(alphas, final[0]), np.append(sigmas, final[1]))


def check_num_steps(num_inference_steps: Any, num_train_timesteps: int | None = None) -> int:
    """Validate ``num_inference_steps``: an integer in ``[1, num_train_timesteps]``."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}")
    if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be <= num_train_timesteps ({num_train_timesteps}), got {num_inference_steps}"
        )
    return int(num_inference_steps)


def check_shift_terminal_points(shift_terminal: float, num_points: int, what: str | None = None) -> None:
    """``shift_terminal`` stretches a flow grid by ``(1 - shift_terminal) / (1 - s_N)`` so that its last point
    ``s_N`` lands on ``shift_terminal`` (diffusers' ``stretch_shift_to_terminal``); a one-point grid has nothing to
    stretch: its only point, pure noise at ``s = 1``, would become NaN (0/0) or ``shift_terminal`` itself (the
    model then fed pure noise as if it were at ``s = shift_terminal``). Refused, naming both; ``what`` says where
    the points came from (default ``num_inference_steps=<num_points>``)."""
    check_number("shift_terminal", shift_terminal, 0.0, 1.0, low_open=True, allowed="(0, 1)")
    if shift_terminal == 1:
        raise ValueError(f"`shift_terminal` must be a finite number in (0, 1), got {shift_terminal!r}")
    num_points = check_int("num_points", num_points, 0)
    if num_points < 2:
        got = what if what is not None else f"num_inference_steps={num_points}"
        raise ValueError(f"`shift_terminal`={shift_terminal!r} needs at least 2 steps (it moves the last of them to "
                         f"s = shift_terminal), got {got}; use 2 or more steps, or drop shift_terminal for a single "
                         "step")  # fmt: skip


def spacing_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0, style: str = "multistep"
) -> np.ndarray:
    """diffusers' integer timesteps (Lin et al. 2023, Table 2), descending.

    ``style="multistep"`` is DPMSolverMultistep/UniPC's variant (``N+1`` linspace points, last dropped);
    ``style="ddim"`` is DDIMScheduler's (``N`` points including 0).
    """
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    n = check_num_steps(num_inference_steps, T)
    check_int("steps_offset", steps_offset, 0)
    if spacing not in SPACINGS:
        raise ValueError(f"`timestep_spacing` must be one of {list(SPACINGS)}, got {spacing!r}")
    if style not in ("multistep", "ddim"):
        raise ValueError(f"`style` must be 'multistep' or 'ddim', got {style!r}")
    if spacing == "linspace":
        if style == "ddim":
            ts = np.linspace(0, T - 1, n).round()[::-1]
        else:
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        if style == "ddim":
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1]
        else:
            ratio = T // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1]
        ts = ts + steps_offset
    else:
        # A float `arange` can return n + 1 points (e.g. T=1000, n=61), the extra one being t = -1 (diffusers
        # keeps it); the first n are diffusers' values exactly.
        ts = (np.arange(T, 0, -T / n).round() - 1)[:n]
    ts = ts.astype(np.int64).astype(np.float64)
    if ts[0] > T - 1:
        raise ValueError(
            f"steps_offset={steps_offset} puts the first of {n} {spacing!r} timesteps at {ts[0]:g}, past the last "
            f"training step {T - 1}; use a smaller `steps_offset`"
        )
    if np.any(np.diff(ts) >= 0):
        repeated = sorted({float(v) for v in ts[1:][np.diff(ts) >= 0]}, reverse=True)
        raise ValueError(
            f"{n} steps with timestep_spacing={spacing!r} give repeated timesteps ({repeated[:8]} among the "
            f"{T} training steps); use fewer steps"
        )
    return ts


def _vp_final(schedule: VPSchedule, final_sigmas_type: str) -> tuple[float, float]:
    if final_sigmas_type == "zero":
        return 1.0, 0.0
    if final_sigmas_type == "sigma_min":
        alpha, sigma = schedule.alpha_sigma(0.0)
        return float(alpha), float(sigma)
    raise ValueError(f"`final_sigmas_type` must be one of {list(FINAL_SIGMAS)}, got {final_sigmas_type!r}")


def spacing_grid(
    schedule: VPSchedule,
    num_inference_steps: int,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
    style: str = "multistep",
) -> TimeGrid:
    """diffusers-spaced integer timesteps of a VP schedule, ending at ``final_sigmas_type``."""
    if not isinstance(schedule, VPSchedule):
        raise ValueError(f"`timestep_spacing` grids need a VP schedule, got a {schedule.kind!r} schedule")
    ts = spacing_timesteps(schedule.num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset, style)
    return TimeGrid.from_times(schedule, ts, _vp_final(schedule, final_sigmas_type))


def _default_range(
    schedule: NoiseSchedule, t_start: float | None, t_end: float | None, finite_end: bool = False
) -> tuple[float, float]:
    """``(t_start, t_end)``: given values checked to lie in the schedule's ``[t_min, t_max]``; defaults are that
    range, except where a flow schedule's ends have infinite ``lambda`` (``alpha = 0`` at ``t = T``; ``sigma = 0``
    at ``t = 0``, which only a grid uniform in ``lambda`` cannot reach, ``finite_end``): there the default is
    ``T - 1`` at the start and ``1`` at the end (DPM-Solver-v3's EMS range)."""
    flow = isinstance(schedule, FlowSchedule)
    lo, hi = schedule.t_min, schedule.t_max
    if t_start is None:
        t_start = hi - 1.0 if flow else hi
    if t_end is None:
        t_end = lo + 1.0 if flow and finite_end else lo
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        check_number(name, value, lo, hi)
    t_start, t_end = float(t_start), float(t_end)
    if t_start <= t_end:
        raise ValueError(f"need t_start > t_end, got t_start={t_start!r}, t_end={t_end!r}")
    return t_start, t_end


def _final_from(schedule: NoiseSchedule, final_sigmas_type: str | None) -> tuple[float, float] | None:
    if final_sigmas_type is None:
        return None
    if final_sigmas_type == "zero":
        return 1.0, 0.0
    if final_sigmas_type == "sigma_min" and isinstance(schedule, VPSchedule):
        return _vp_final(schedule, "sigma_min")
    raise ValueError(f"`final_sigmas_type` must be one of {list(FINAL_SIGMAS)} or None, got {final_sigmas_type!r}")


def uniform_time_grid(
    schedule: NoiseSchedule, num_inference_steps: int, t_start=None, t_end=None, final_sigmas_type: str | None = None
) -> TimeGrid:
    """``N + 1`` times uniform in model time from ``t_start`` to ``t_end``; the last is the target
    (or, with ``final_sigmas_type``, ``N`` points and a clean/sigma_min target)."""
    n = check_num_steps(num_inference_steps)
    t_start, t_end = _default_range(schedule, t_start, t_end)
    final = _final_from(schedule, final_sigmas_type)
    times = np.linspace(t_start, t_end, n + 1)
    return TimeGrid.from_times(schedule, times[:-1] if final else times, final)


def uniform_lambda_grid(
    schedule: NoiseSchedule, num_inference_steps: int, t_start=None, t_end=None, final_sigmas_type: str | None = None
) -> TimeGrid:
    """Times uniform in ``lambda = log(alpha/sigma)`` (DPM-Solver's ``logSNR`` skip type)."""
    n = check_num_steps(num_inference_steps)
    t_start, t_end = _default_range(schedule, t_start, t_end, finite_end=True)
    final = _final_from(schedule, final_sigmas_type)
    ends = schedule.lambda_(np.array([t_start, t_end]))
    if not np.all(np.isfinite(ends)):
        raise ValueError(
            f"a grid uniform in lambda needs finite lambda at both ends; t_start={t_start:g}, t_end={t_end:g} give "
            f"lambda = {ends.tolist()} (alpha = 0 or sigma = 0 there)"
        )
    lam = np.linspace(schedule.lambda_(t_start), schedule.lambda_(t_end), n + 1)
    times = schedule.t_of_lambda(lam)
    times[0], times[-1] = t_start, t_end
    return TimeGrid.from_times(schedule, times[:-1] if final else times, final)


def time_quadratic_grid(
    schedule: NoiseSchedule, num_inference_steps: int, t_start=None, t_end=None, final_sigmas_type: str | None = None
) -> TimeGrid:
    """Times uniform in ``sqrt(t)`` (DPM-Solver's ``time_quadratic``; denser near the data)."""
    n = check_num_steps(num_inference_steps)
    t_start, t_end = _default_range(schedule, t_start, t_end)
    if t_end < 0:
        raise ValueError(f"time_quadratic needs t_end >= 0, got {t_end}")
    final = _final_from(schedule, final_sigmas_type)
    times = np.linspace(np.sqrt(t_start), np.sqrt(t_end), n + 1) ** 2
    return TimeGrid.from_times(schedule, times[:-1] if final else times, final)


def karras_grid(
    schedule: NoiseSchedule,
    num_inference_steps: int,
    rho_min: float | None = None,
    rho_max: float | None = None,
    exponent: float = 7.0,
    final_sigmas_type: str | None = "zero",
    round_timesteps: bool = True,
) -> TimeGrid:
    """Karras et al. (2022) eq. 5 in ``rho = sigma/alpha``: ``N`` points, then the final target.

    As in diffusers, the solver uses the exact Karras noise levels while the model gets
    ``t(rho)`` rounded to an integer (``round_timesteps``; VP schedules only).
    """
    n = check_num_steps(num_inference_steps)
    check_number("exponent", exponent, 0.0, low_open=True)
    vp = isinstance(schedule, VPSchedule)
    if rho_min is None:
        rho_min = float(schedule.rho(schedule.t_min if vp else 1.0))
    if rho_max is None:
        rho_max = float(schedule.rho(schedule.t_max if vp else schedule.t_max - 1))
    if not (0 < rho_min < rho_max):
        raise ValueError(f"need 0 < rho_min < rho_max, got rho_min={rho_min!r}, rho_max={rho_max!r}")
    ramp = np.linspace(0, 1, n)
    rhos = (rho_max ** (1 / exponent) + ramp * (rho_min ** (1 / exponent) - rho_max ** (1 / exponent))) ** exponent
    return _grid_from_rhos(schedule, rhos, final_sigmas_type, round_timesteps)


def _grid_from_rhos(
    schedule: NoiseSchedule, rhos: np.ndarray, final_sigmas_type: str | None, round_timesteps: bool
) -> TimeGrid:
    times = schedule.t_of_rho(rhos)
    if round_timesteps and isinstance(schedule, VPSchedule):
        # The model's integer timestep is diffusers' `_sigma_to_t` rounded: linear in log(rho) between the
        # training steps (clipped to [0, T-1]), not the log-alpha interpolation of `t_of_rho`; the two
        # round differently near t ~ 0..10 (e.g. Karras, 50 steps on SD's schedule).
        log_rho = np.log(schedule.discrete_rho())
        times = np.round(np.interp(np.log(rhos), log_rho, np.arange(log_rho.size, dtype=np.float64)))
    # the point of noise level rho on the schedule: alpha^2 + sigma^2 = 1 (VP) or alpha + sigma = 1 (flow)
    alphas = 1.0 / (1.0 + rhos) if isinstance(schedule, FlowSchedule) else 1.0 / np.sqrt(1.0 + rhos**2)
    sigmas = rhos * alphas
    if final_sigmas_type is None:
        return TimeGrid(times[:-1], alphas, sigmas)
    fa, fs = _final_from(schedule, final_sigmas_type)
    return TimeGrid(times, np.append(alphas, fa), np.append(sigmas, fs))


def flow_grid(
    schedule: FlowSchedule,
    num_inference_steps: int,
    shift: FlowShift | None = None,
    style: str = "flowmatch",
    dynamic: bool = False,
    shift_terminal: float | None = None,
) -> TimeGrid:
    """Flow-matching grids of diffusers, shifted by ``shift`` and ending at ``s = 0``.

    ``style="flowmatch"`` is FlowMatchEulerDiscreteScheduler's: ``s`` linear from 1 to ``s_min`` in ``N``
    points, where ``s_min = 1/T`` is itself pre-shifted unless the shift is ``dynamic``; then shifted.
    ``style="multistep"`` is UniPC's ``use_flow_sigmas``: ``N`` of ``N + 1`` points linear from 1 to ``1/T``,
    then shifted; ``style="dpmsolver"`` is DPMSolverMultistep's: ``N`` of ``N + 1`` points linear from
    ``1 - 1/T`` to 0, shifted. ``shift_terminal`` stretches the grid so its last point is ``s = shift_terminal``
    (``1 - s' = (1 - s)(1 - shift_terminal)/(1 - s_N)``, LTX-Video); it needs ``N >= 2``.
    """
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"flow grids need a flow schedule, got a {schedule.kind!r} schedule")
    if style not in ("flowmatch", "multistep", "dpmsolver"):
        raise ValueError(f"`style` must be 'flowmatch', 'multistep' or 'dpmsolver', got {style!r}")
    n = check_num_steps(num_inference_steps)
    if shift is None:
        shift = FlowShift(1.0)
    elif not isinstance(shift, FlowShift):
        shift = FlowShift(check_number("shift", shift, 0.0, low_open=True))
    T = schedule.num_train_timesteps
    if style == "flowmatch":
        s_min = 1.0 / T if dynamic else float(shift.apply(np.asarray(1.0 / T)))
        s = shift.apply(np.linspace(1.0, s_min, n))
    elif style == "multistep":
        s = shift.apply(np.linspace(1.0, 1.0 / T, n + 1)[:-1])
    else:
        s = shift.apply(np.linspace(1.0 - 1.0 / T, 0.0, n + 1)[:-1])
    if shift_terminal is not None:
        check_number("shift_terminal", shift_terminal, allowed="(0, 1)")
        if not 0 < shift_terminal < 1:
            raise ValueError(f"`shift_terminal` must lie in (0, 1), got {shift_terminal!r}")
        check_shift_terminal_points(shift_terminal, n)
        one_minus = 1.0 - s
        s = 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))
    return _flow_from_s(schedule, s, f"the flow grid of {n} steps with shift {shift.shift:g} (mu = "
                                     f"{math.log(shift.shift):g})")


#: the largest flow time of a grid point: s = 1 has alpha = 0 (lambda = -inf); nudged as diffusers' multistep
#: schedulers nudge it
FLOW_S_MAX = 1.0 - 1e-6


def clamp_flow_top(s: np.ndarray, what: str) -> np.ndarray:
    """Flow times ``s`` with those above ``FLOW_S_MAX`` moved onto it. Refused when that would merge points (a grid
    shifted so far that several of its first points lie within 1e-6 of pure noise): ``what`` names the settings."""
    s = np.asarray(s, dtype=np.float64)
    merged = int(np.count_nonzero(s >= FLOW_S_MAX))
    if merged >= 2:
        raise ValueError(f"{what}: {merged} of its {s.size} points lie within 1e-6 of s = 1 (pure noise), where the "
                         "first point sits (s = 1 has log-SNR -inf), so they would be one point; use a smaller shift "
                         "(or mu), or fewer steps")
    return np.minimum(s, FLOW_S_MAX)


def _flow_from_s(schedule: FlowSchedule, s: np.ndarray, what: str = "the flow grid") -> TimeGrid:
    s = clamp_flow_top(s, what)
    times = s * schedule.num_train_timesteps
    return TimeGrid(times, np.append(1.0 - s, 1.0), np.append(s, 0.0))


def as_numbers(name: str, values: Any) -> np.ndarray:
    """``values`` as a flat float64 array; ``ValueError`` naming ``name`` for what is no list of numbers (a string
    such as ``"999,500"``, a ragged list, objects)."""
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a list of numbers, got {values!r}") from None


def check_decreasing(name: str, values: Any) -> np.ndarray:
    """``values`` as a flat float64 array, checked non-empty, finite and strictly decreasing (noise to data);
    ``ValueError`` naming ``name`` and the values otherwise."""
    arr = as_numbers(name, values)
    if arr.size < 1:
        raise ValueError(f"`{name}` must hold at least one value")
    if np.any(~np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite (no NaN/Inf), got {arr.tolist()}")
    if np.any(np.diff(arr) >= 0):
        raise ValueError(f"`{name}` must be strictly decreasing, got {arr.tolist()}")
    return arr


def check_model_times_distinct(name: str, times: Any) -> None:
    """Strictly decreasing model times must stay strictly decreasing as the model sees them: a scheduler hands its
    ``timesteps`` to the model as float32 (int64 when all are integers, exact in float32 too), so two times that only
    differ below float32's resolution (``715.9`` and ``715.8999999``) would be one model call's time for two noise
    levels -- the solver then divides the rounding noise of two identical evaluations by a tiny gap. ``ValueError``
    naming ``name``, the two times and their float32 value."""
    ts = np.asarray(times, dtype=np.float64).reshape(-1)
    as_model = ts.astype(np.float32)
    same = np.flatnonzero(np.diff(as_model) >= 0)
    if same.size:
        i = int(same[0])
        raise ValueError(
            f"`{name}` holds {float(ts[i])!r} and {float(ts[i + 1])!r} (points {i} and {i + 1}), which are one model "
            f"time in float32 ({float(as_model[i])!r}; a scheduler's `timesteps`, what the model is called with, are "
            "float32): the times must strictly decrease after that cast; drop one of them or move them apart"
        )


def check_lambda_gaps(grid: TimeGrid, what: str = "`timesteps`") -> None:
    """The grid's evaluation points must be at least ``MIN_LAMBDA_GAP`` apart in ``lambda`` (see there: the solver
    divides model-output differences by these gaps). ``what`` names where the points came from in the message."""
    n = grid.num_steps
    gaps = np.diff(grid.lambdas[:n])
    small = np.flatnonzero(gaps < MIN_LAMBDA_GAP)
    if small.size:
        i = int(small[0])
        raise ValueError(
            f"{what}: points {i} and {i + 1} (t = {grid.timesteps[i]:.9g} and {grid.timesteps[i + 1]:.9g}) are "
            f"{gaps[i]:.3g} apart in log-SNR lambda; they must be at least {MIN_LAMBDA_GAP:g} apart (the solver "
            "divides differences of model outputs by these gaps, and below that float32 rounding of the outputs "
            "dominates them): drop one of the points or move them apart"
        )


def custom_timesteps_grid(
    schedule: NoiseSchedule, timesteps: Any, final_sigmas_type: str | None = "zero"
) -> TimeGrid:
    """User-given model timesteps (strictly decreasing also in float32, the dtype the model gets them in; inside
    the schedule's range; at least ``MIN_LAMBDA_GAP`` apart in ``lambda``)."""
    ts = check_decreasing("timesteps", timesteps)
    check_model_times_distinct("timesteps", ts)
    if ts[0] > schedule.t_max or ts[-1] < schedule.t_min:
        raise ValueError(
            f"`timesteps` must lie in [{schedule.t_min}, {schedule.t_max}], got {ts[0]}..{ts[-1]}"
        )
    if final_sigmas_type is None:
        grid = TimeGrid.from_times(schedule, ts, None)
    else:
        grid = TimeGrid.from_times(schedule, ts, _final_from(schedule, final_sigmas_type))
    check_lambda_gaps(grid, "`timesteps`")
    return grid


def custom_sigmas_grid(
    schedule: NoiseSchedule, sigmas: Any, final_sigmas_type: str | None = "zero", round_timesteps: bool = True
) -> TimeGrid:
    """User-given noise levels in diffusers' convention: ``rho = sigma/alpha`` for VP, ``s`` for flow.

    A trailing 0 in ``sigmas`` is taken as the clean target.
    """
    arr = as_numbers("sigmas", sigmas)
    if arr.size >= 2 and arr[-1] == 0:
        arr, final_sigmas_type = arr[:-1], "zero"
    arr = check_decreasing("sigmas", arr)
    if np.any(arr <= 0):
        raise ValueError(f"`sigmas` must be > 0 (a single trailing 0 marks the clean target), got {arr.tolist()}")
    if isinstance(schedule, FlowSchedule):
        if np.any(arr > 1):
            raise ValueError(f"flow `sigmas` must lie in (0, 1], got {arr.tolist()}")
        if final_sigmas_type not in (None, "zero"):
            raise ValueError(f"flow `final_sigmas_type` must be 'zero' or None, got {final_sigmas_type!r}")
        if final_sigmas_type is None:
            times = arr * schedule.num_train_timesteps
            return TimeGrid(times[:-1], 1.0 - arr, arr)
        return _flow_from_s(schedule, arr, f"flow `sigmas` {arr.tolist()}")
    return _grid_from_rhos(schedule, arr, final_sigmas_type, round_timesteps)
