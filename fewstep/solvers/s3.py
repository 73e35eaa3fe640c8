"""Solver schedules of the unified sampling framework (USF, Liu et al. 2024, sec. 3) as data.

A schedule is the list of per-step :class:`~fewstep.solvers.engine.StepDecision` plus the time points:
``timesteps`` (the model's time at each of the N evaluations, strictly decreasing, continuous) and the
target ``final`` (``"zero"`` for clean data, or a model time below the last timestep). The engine runs any
such schedule; DPM-Solver++, UniPC and DDIM are particular schedules (tests check they reproduce the
dedicated schedulers), and S^3's search only produces schedules.

Supported decisions: timestep, prediction type (data/noise, or ``"ems"``: DPM-Solver-v3's per-element
reparameterisation, which needs the model's empirical model statistics), order 1-5, derivative points, coefficient
rule, linear relaxation ``c`` (first derivative scaled by ``1 + c h``), corrector (``"unic"``, the pseudo
corrector: no extra NFE; ``"implicit"``: the model is called again at the corrected point, +1 NFE), and the
analytical first step (``afs="zero_x0"``: the first time point's evaluation is ``x0 = 0``, not a model call, one
NFE saved; ``afs="average_x0"``: ``x0 =`` the data's mean image, carried by the schedule; see
``engine.with_analytic_first_step``). A schedule's NFE is its number of time points, less one with ``afs``, plus
one per implicit corrector. The search (``fewstep.search``) proposes no implicit corrector (probability 0 in the
published search configs); its AFS is ``zero_x0``, or ``average_x0`` given the data mean. Not supported: U-Net
skip coefficients (they change the model, which a diffusers scheduler does not control).

A schedule with ``"ems"`` steps runs only with EMS tables (``plan(schedule, ems=...)``; the ``s3`` scheduler's
``ems_file``): all its time points are then snapped to the nearest EMS grid point, as DPM-Solver-v3 does, so
every step sees the same grid. Schedules without ``"ems"`` steps ignore the tables and are never snapped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ems import EMS, snap_grid
from .engine import (
    EMSGrid,
    Plan,
    StepDecision,
    check_analytic_first_decision,
    compile_plan,
    with_analytic_first_step,
)
from .grids import TimeGrid, check_decreasing, check_lambda_gaps, check_model_times_distinct
from .schedules import NoiseSchedule

__all__ = ["SolverSchedule", "SCHEDULE_VERSION", "AFS_KINDS", "check_afs_mean", "decisions_from_dicts",
           "schedule_fingerprint"]

SCHEDULE_VERSION = 1
#: analytical first steps a schedule may start with (USF): ``zero_x0`` takes ``x0 = 0`` at the first time point
AFS_KINDS = ("zero_x0", "average_x0")
_DECISION_KEYS = {
    "prediction", "order", "points", "coefficients", "relaxation", "corrector", "stochastic", "pseudo",
    "corrector_order", "corrector_pseudo",
}
#: the top-level keys ``SolverSchedule.to_dict`` writes (``from_dict`` refuses others, as it refuses unknown decision
#: keys: a misspelt ``"fnal"`` would otherwise run with the default silently)
_SCHEDULE_KEYS = {"version", "nfe", "timesteps", "final", "afs", "afs_mean", "decisions", "metadata"}


def schedule_fingerprint(schedule: NoiseSchedule) -> str:
    """A short id of a noise schedule (VP: its alphas_cumprod; flow: its kind), stored with searched schedules
    so that a schedule is never applied to a model with another noise process."""
    import hashlib

    from .schedules import VPSchedule

    if isinstance(schedule, VPSchedule):
        digest = hashlib.sha256(np.round(schedule.alphas_cumprod, 12).tobytes()).hexdigest()[:16]
        return f"vp-{schedule.alphas_cumprod.size}-{digest}"
    return f"{type(schedule).__name__.lower()}-{schedule.num_train_timesteps}"


def decisions_from_dicts(items: Sequence[Mapping[str, Any]]) -> list[StepDecision]:
    """``StepDecision``s from plain dicts (JSON); unknown keys and values are errors naming the step."""
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"`decisions` must be a list of per-step decisions, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"step {i}: a decision must be a mapping, got {type(item).__name__}")
        unknown = set(item) - _DECISION_KEYS
        if unknown:
            raise ValueError(f"step {i}: unknown decision keys {sorted(unknown)}; allowed: {sorted(_DECISION_KEYS)}")
        relaxation = item.get("relaxation", 0.0)
        if isinstance(relaxation, bool) or not isinstance(relaxation, (int, float)):
            raise ValueError(f"step {i}: `relaxation` must be a number, got {relaxation!r}")
        kw = dict(item)
        if kw.get("points") is not None:
            kw["points"] = tuple(kw["points"])
        try:
            out.append(StepDecision(**kw))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"step {i}: {exc}") from None
    return out


def check_afs_mean(mean: Any) -> list:
    """The ``average_x0`` mean image as nested lists of floats (one sample's shape), or a clear error."""
    try:
        arr = np.asarray(mean, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("`afs_mean` must be nested lists of numbers shaped like one sample") from None
    if arr.ndim == 0 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"`afs_mean` must be a non-empty array of finite numbers, got shape {arr.shape}")
    return arr.tolist()


@dataclass
class SolverSchedule:
    """Per-step decisions + time points (+ free-form metadata such as model and schedule config).

    ``afs="zero_x0"``: the first time point is evaluated analytically (``x0 = 0``), not by the model, so the
    NFE is one less than the number of time points and the first decision must be a first-order data or
    noise step; samplers start from noise scaled by ``sigma_1 / sigma_0`` at the second time point.
    ``afs="average_x0"``: the same with ``x0 =`` ``afs_mean``, the data's mean image (nested lists shaped like
    one sample, without the batch), which the schedule file carries; samplers then also add
    ``(alpha_1 - sigma_1 alpha_0 / sigma_0) * afs_mean`` to the scaled noise (``engine.AnalyticStart``)."""

    timesteps: list[float]
    decisions: list[StepDecision]
    final: str | float = "zero"
    metadata: dict = field(default_factory=dict)
    afs: str | None = None
    afs_mean: list | None = None

    def __post_init__(self) -> None:
        if isinstance(self.timesteps, (str, bytes)) or not all(
            isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, (bool, np.bool_))
            for t in np.asarray(self.timesteps, dtype=object).reshape(-1)
        ):
            raise ValueError(f"`timesteps` must be a list of numbers (model times), got {self.timesteps!r}")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"`metadata` must be a JSON object (dict), got {type(self.metadata).__name__}")
        ts = check_decreasing("timesteps", self.timesteps)  # non-empty, finite, strictly decreasing
        check_model_times_distinct("timesteps", ts)  # ... also as the model gets them (float32)
        self.timesteps = ts.tolist()
        if len(self.decisions) != ts.size:
            raise ValueError(f"need one decision per timestep: {ts.size} timesteps, {len(self.decisions)} decisions")
        for i, d in enumerate(self.decisions):
            if not isinstance(d, StepDecision):
                raise TypeError(f"decisions[{i}] must be a StepDecision, got {type(d).__name__}")
        if self.afs is not None:
            if self.afs not in AFS_KINDS:
                raise ValueError(f"`afs` must be None or one of {list(AFS_KINDS)}, got {self.afs!r}")
            if ts.size < 2:
                raise ValueError("a schedule with an analytical first step (`afs`) needs at least 2 timesteps: the "
                                 "analytic one and one model evaluation")
            check_analytic_first_decision(self.decisions[0])
        if (self.afs == "average_x0") != (self.afs_mean is not None):
            raise ValueError(f"`afs_mean` (the data's mean image) goes with afs='average_x0' and only with it; got "
                             f"afs={self.afs!r} and {'an' if self.afs_mean is not None else 'no'} afs_mean")
        if self.afs_mean is not None:
            self.afs_mean = check_afs_mean(self.afs_mean)
        if isinstance(self.final, (bool, np.bool_)) or not isinstance(self.final, (str, int, float, np.number)):
            raise ValueError(f"`final` must be 'zero' or a model time below the last timestep, got {self.final!r}")
        if isinstance(self.final, str):
            if self.final != "zero":
                raise ValueError(f"`final` must be 'zero' or a model time below the last timestep, got {self.final!r}")
        else:
            final = float(self.final)
            if not (math.isfinite(final) and final < ts[-1]):
                raise ValueError(
                    f"`final` must be 'zero' or a model time below the last timestep {ts[-1]}, got {self.final!r}"
                )
            self.final = final

    @property
    def nfe(self) -> int:
        """Model evaluations: one per time point, less the analytic first one (``afs``), plus one per implicit
        corrector (the model is called again at each corrected point)."""
        implicit = sum(d.corrector == "implicit" for d in self.decisions)
        return len(self.timesteps) - (self.afs is not None) + implicit

    @property
    def ems_steps(self) -> list[int]:
        """Indices of the steps with ``prediction="ems"`` (DPM-Solver-v3 steps, which need EMS tables)."""
        return [i for i, d in enumerate(self.decisions) if d.prediction == "ems"]

    def check_ems(self, ems: EMS | None) -> None:
        """A clear error when the schedule has ``"ems"`` steps and ``ems`` is missing (or not an :class:`EMS`), or
        differs from the tables the schedule was searched with (``metadata["ems_digest"]``, when recorded)."""
        steps = self.ems_steps
        if ems is not None and not isinstance(ems, EMS):
            raise TypeError(f"`ems` must be fewstep.solvers.ems.EMS tables or None, got {type(ems).__name__}")
        if steps and ems is None:
            raise ValueError(
                f"this solver schedule uses prediction='ems' (DPM-Solver-v3) at steps {steps} and needs empirical "
                "model statistics: pass `ems` (the s3 scheduler: `ems_file`, a file from `fewstep calibrate ems` or "
                "a shipped name such as 'digits-eps'), or search a schedule without EMS steps"
            )
        searched_with = self.metadata.get("ems_digest")
        if steps and searched_with is not None and ems.digest != searched_with:
            raise ValueError(
                f"this solver schedule was searched with EMS tables {searched_with!r} "
                f"({self.metadata.get('ems', 'unnamed')}), but the given ones are {ems.digest!r}: its EMS steps "
                "were chosen for those tables -- pass the EMS it was searched with, or search again with these"
            )

    # ----------------------------------------------------------------------------------------------
    def grid(self, schedule: NoiseSchedule) -> TimeGrid:
        """The schedule's time grid on a noise schedule (times checked against its range, and to lie at least
        ``grids.MIN_LAMBDA_GAP`` apart in its ``lambda``: the solver divides by those gaps)."""
        ts = np.asarray(self.timesteps)
        if ts[0] > schedule.t_max or ts[-1] < schedule.t_min:
            raise ValueError(
                f"schedule timesteps {ts[0]}..{ts[-1]} lie outside the model's range "
                f"[{schedule.t_min}, {schedule.t_max}]"
            )
        if self.final == "zero":
            grid = TimeGrid.from_times(schedule, ts, (1.0, 0.0))
        else:
            if self.final < schedule.t_min:
                raise ValueError(f"`final` time {self.final} is below the model's range start {schedule.t_min}")
            alpha, sigma = schedule.alpha_sigma(np.asarray([self.final]))
            grid = TimeGrid.from_times(schedule, ts, (float(alpha[0]), float(sigma[0])))
        source = getattr(self, "_source", None)  # the file `load` read, for the message
        check_lambda_gaps(grid, f"solver schedule {source!r} `timesteps`" if source else "solver schedule `timesteps`")
        return grid

    def ems_grid(self, schedule: NoiseSchedule, ems: EMS | None = None) -> tuple[TimeGrid, EMSGrid | None]:
        """The time grid to run on and, for a schedule with ``"ems"`` steps, its EMS indices: the grid is then
        snapped to the EMS grid (an error when ``ems`` is missing or two points snap together)."""
        self.check_ems(ems)
        grid = self.grid(schedule)
        if not self.ems_steps:
            return grid, None
        snapped, indices = snap_grid(ems, schedule, grid)
        return snapped, EMSGrid(ems, indices)

    def plan(self, schedule: NoiseSchedule, ems: EMS | None = None) -> Plan:
        """Compile to an engine plan (validates orders against the available buffered points).

        ``ems``: DPM-Solver-v3 tables of the model, required when the schedule has ``"ems"`` steps."""
        grid, ems_grid = self.ems_grid(schedule, ems)
        plan = compile_plan(grid, self.decisions, ems=ems_grid)
        if self.afs is None:
            return plan
        return with_analytic_first_step(plan, self.mean_image())

    def mean_image(self) -> torch.Tensor | None:
        """``afs_mean`` as a float64 tensor (``None`` unless ``afs="average_x0"``)."""
        return None if self.afs_mean is None else torch.tensor(self.afs_mean, dtype=torch.float64)

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        steps = []
        for d in self.decisions:
            item = asdict(d)
            item["points"] = list(d.points) if d.points is not None else None
            steps.append(item)
        out = {
            "version": SCHEDULE_VERSION, "nfe": self.nfe, "timesteps": self.timesteps, "final": self.final,
            "afs": self.afs, "decisions": steps, "metadata": self.metadata,
        }
        if self.afs_mean is not None:
            out["afs_mean"] = self.afs_mean
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SolverSchedule:
        if not isinstance(data, Mapping) or "timesteps" not in data or "decisions" not in data:
            raise ValueError("a solver schedule needs 'timesteps' and 'decisions'")
        unknown = set(data) - _SCHEDULE_KEYS
        if unknown:
            raise ValueError(f"unknown solver schedule keys {sorted(map(str, unknown))}; allowed: "
                             f"{sorted(_SCHEDULE_KEYS)}")
        version = data.get("version", SCHEDULE_VERSION)
        if isinstance(version, bool) or version != SCHEDULE_VERSION:  # (True == 1 in Python)
            raise ValueError(
                f"schedule format version {version!r} is not supported (this fewstep reads {SCHEDULE_VERSION}): "
                "search the schedule again with this fewstep (`fewstep search --model MODEL --nfe N --out FILE`), "
                "or use the fewstep that wrote it"
            )
        meta = data.get("metadata") or {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"`metadata` must be a JSON object, got {meta!r}")
        steps = data["timesteps"]
        if not isinstance(steps, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in steps):
            raise ValueError(f"`timesteps` must be a list of numbers (model times), got {steps!r}")
        nfe = data.get("nfe")
        if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int)):
            raise ValueError(f"`nfe` must be an integer (the number of model evaluations), got {nfe!r}")
        out = cls(list(steps), decisions_from_dicts(data["decisions"]), data.get("final", "zero"), dict(meta),
                  data.get("afs"), data.get("afs_mean"))
        if "nfe" in data and data["nfe"] != out.nfe:
            raise ValueError(f"schedule says nfe={data['nfe']} but its {len(out.timesteps)} timesteps make "
                             f"{out.nfe} model evaluations")
        return out

    def save(self, path: str | Path) -> Path:
        """Write the schedule as JSON (atomically)."""
        from .._io import atomic_write

        path = Path(path)
        try:
            text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the schedule's metadata cannot be written as JSON ({exc}); metadata values must be "
                             "strings, finite numbers, bools, None, or lists/dicts of those") from None
        atomic_write(path, lambda p: p.write_text(text))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SolverSchedule:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"solver schedule {str(path)!r} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"solver schedule {str(path)!r} is not UTF-8 JSON text ({exc})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"solver schedule {str(path)!r} is not valid JSON: {exc}") from None
        try:
            out = cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"solver schedule {str(path)!r}: {exc}") from None
        out._source = str(path)  # named by checks that need the model's noise schedule (`grid`)
        return out

    @classmethod
    def from_grid(cls, grid: TimeGrid, decisions: Sequence[StepDecision], metadata: dict | None = None,
                  schedule: NoiseSchedule | None = None):
        """The schedule of an existing grid + decisions (e.g. to encode DPM-Solver++ or UniPC).

        A schedule stores model times only, and its noise levels are those times' levels on the model's noise
        schedule. A grid that feeds the model rounded timesteps while integrating between exact levels (Karras
        grids, as in diffusers) cannot be stored exactly: with ``schedule`` given, such a grid is refused."""
        if grid.sigmas[-1] != 0:
            raise ValueError("from_grid needs a grid ending at sigma = 0; pass `final` times explicitly otherwise")
        if schedule is not None:
            levels = TimeGrid.from_times(schedule, grid.timesteps, (1.0, 0.0)).lambdas[:-1]
            gap = float(np.max(np.abs(levels - grid.lambdas[:-1])))
            if gap > 1e-9 * (1.0 + float(np.max(np.abs(levels)))):
                raise ValueError(
                    f"this grid's noise levels are not those of its model timesteps (log-SNR off by up to {gap:.3g}: "
                    "a Karras grid feeds rounded timesteps); a solver schedule stores model times only, so it would "
                    "run another sampler: use a grid without use_karras_sigmas"
                )
        return cls(grid.timesteps.tolist(), list(decisions), "zero", dict(metadata or {}))
