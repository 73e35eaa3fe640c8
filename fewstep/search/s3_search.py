"""S^3: predictor-guided evolutionary search over USF solver schedules (Liu et al. 2024, sec. 4).

The search space at a fixed NFE ``N``: the ``N - 1`` interior time points (positions in ``lambda`` between the
first evaluation at ``t_max`` and the last allowed one), and per step the prediction type (data/noise, plus
DPM-Solver-v3's ``"ems"`` when the space has the model's EMS tables), Taylor order (1-3, capped by the
available points), coefficient rule (taylor/bh1/bh2), linear relaxation ``c`` and the pseudo corrector.
Evolution: parents are the best evaluated schedules; children come from crossover (per-step genes from either
parent, time points from one or the average) and mutation (time jitter in lambda, delete-and-add a time point,
order, type, rule, corrector, relaxation; with EMS also the pseudo-order flags). With EMS, candidates that use
``"ems"`` steps get their time points snapped to the EMS grid (so the stored schedule holds the times it runs
at), DPM-Solver-v3's own decisions join the seeds, and the final step onto clean data is never an EMS step.
The released code evaluates every child; S^3's contribution is a **performance predictor** trained on the
schedules evaluated so far that ranks many children so that only the most promising are evaluated.

Our predictor: an extra-trees regressor (scikit-learn) on a fixed-length encoding of the schedule,
predicting ``log(metric)``. With tens to a few hundred evaluations, mixed discrete/continuous features
and no time to tune, a tree ensemble is the robust choice (an MLP needs more data and tuning), it fits
in milliseconds, and the spread of its trees gives an exploration bonus (we rank by mean - 0.5 std).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .._checks import check_bool, check_int, check_number
from .._dist import check_same_on_all_processes, is_main_process
from ..solvers import grids
from ..solvers.ems import EMS
from ..solvers.engine import StepDecision
from ..solvers.methods import dpm_solver_decisions, dpm_solver_v3_decisions, unipc_decisions
from ..solvers.s3 import SolverSchedule, check_afs_mean
from ..solvers.schedules import NoiseSchedule

__all__ = ["SearchSpace", "SearchResult", "encode", "random_schedule", "warm_start", "mutate", "crossover", "search"]

_RULES = ("taylor", "bh1", "bh2")
MetricFn = Callable[[SolverSchedule], float]


@dataclass
class SearchSpace:
    """What the search may change, for one noise schedule and NFE (first time fixed at ``t_max``).

    ``ems``: the model's DPM-Solver-v3 tables; with them ``"ems"`` is a prediction type of the search.
    ``afs``: the analytical first step joins the decisions -- a candidate may evaluate ``t_max`` analytically
    (``x0 = 0``) and spend its ``nfe`` model calls on the time points after it. ``afs_mean``: the data's mean
    image (nested lists shaped like one sample); with it the analytic step takes ``x0 =`` that mean
    (``average_x0``) instead of 0."""

    schedule: NoiseSchedule
    nfe: int
    max_order: int = 3
    lambda_end: float | None = None  # last allowed evaluation point, <= lambda at t_min (default: lambda at t_min)
    ems: EMS | None = None
    afs: bool = False
    afs_mean: list | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, NoiseSchedule):
            raise ValueError(f"`schedule` must be a fewstep.solvers.schedules.NoiseSchedule (e.g. VPSchedule), got "
                             f"{type(self.schedule).__name__}")
        check_int("nfe", self.nfe, 2, numpy_ok=False)
        check_bool("afs", self.afs)
        if self.afs_mean is not None:
            if not self.afs:
                raise ValueError("`afs_mean` (average_x0) needs afs=True")
            self.afs_mean = check_afs_mean(self.afs_mean)
        if self.ems is not None and not isinstance(self.ems, EMS):
            raise ValueError(f"`ems` must be fewstep.solvers.ems.EMS tables or None, got {type(self.ems).__name__}")
        if self.ems is not None and self.nfe + self.afs > self.ems.num_points - 1:
            raise ValueError(f"`nfe` {self.nfe} needs at least {self.nfe + self.afs + 1} EMS grid points, the EMS have "
                             f"{self.ems.num_points}")
        check_int("max_order", self.max_order, 1, 4, numpy_ok=False)
        self.t_max = float(self.schedule.t_max)
        self.lambda_start = float(self.schedule.lambda_(np.asarray([self.t_max]))[0])
        lambda_min_t = float(self.schedule.lambda_(np.asarray([float(self.schedule.t_min)]))[0])
        if not (math.isfinite(self.lambda_start) and math.isfinite(lambda_min_t)):
            raise ValueError(f"`schedule` ({type(self.schedule).__name__}) has lambda {self.lambda_start} at t_max and "
                             f"{lambda_min_t} at t_min; the search places its time points along lambda and needs a "
                             "finite range (a VP schedule)")
        if self.lambda_end is None:
            end = lambda_min_t
        else:  # between the first evaluation's lambda and lambda at t_min (beyond it all later times would be t_min)
            end = check_number("lambda_end", self.lambda_end, self.lambda_start, lambda_min_t, low_open=True,
                               what="the last allowed evaluation point in lambda; None: lambda at t_min")
        if not end > self.lambda_start:
            raise ValueError(f"`lambda_end` {end} must exceed the start lambda {self.lambda_start}")
        self.lambda_end = float(end)  # (a numpy scalar is a Python float from here on: JSON, metadata)
        if self.ems is not None:
            lo, hi = float(self.ems.lambdas[0]), float(self.ems.lambdas[-1])
            half = 0.5 * (hi - lo) / (self.ems.num_points - 1)
            if self.lambda_start < lo - half or self.lambda_end > hi + half:
                raise ValueError(
                    f"the EMS cover lambda in [{lo:.4f}, {hi:.4f}] but the search spans [{self.lambda_start:.4f}, "
                    f"{self.lambda_end:.4f}]: estimate EMS over the whole range or pass a smaller `lambda_end`"
                )

    @property
    def afs_kind(self) -> str:
        """The analytical first step candidates take: ``average_x0`` with ``afs_mean``, else ``zero_x0``."""
        return "average_x0" if self.afs_mean is not None else "zero_x0"

    @property
    def predictions(self) -> tuple[str, ...]:
        return ("data", "noise", "ems") if self.ems is not None else ("data", "noise")

    def times(self, positions: np.ndarray) -> list[float]:
        """Model times of the evaluations: ``t_max``, then interior ``positions`` in (0, 1] along lambda."""
        lam = self.lambda_start + np.sort(np.asarray(positions)) * (self.lambda_end - self.lambda_start)
        return [self.t_max] + [float(t) for t in self.schedule.t_of_lambda(lam)]

    def positions(self, schedule: SolverSchedule) -> np.ndarray:
        """Positions of the schedule's time points after ``t_max`` (the inverse of ``times``)."""
        return self.positions_of(schedule.timesteps[1:])

    def positions_of(self, times: Sequence[float]) -> np.ndarray:
        """Model times as positions along lambda: 0 at ``t_max``, 1 at the last allowed evaluation."""
        lam = self.schedule.lambda_(np.asarray(times, dtype=np.float64))
        return (np.asarray(lam) - self.lambda_start) / (self.lambda_end - self.lambda_start)


def _decision(pred: str, order: int, rule: str, relax: float, corrector: str, pseudo: bool = False,
              corrector_pseudo: bool = False) -> StepDecision:
    """A step decision with an EMS step's fixed genes applied (v3 steps: Taylor coefficients, no relaxation)."""
    if pred == "ems":
        rule, relax = "taylor", 0.0
    return StepDecision(pred, order, None, rule, float(relax), corrector, pseudo=pseudo and rule == "taylor",
                        corrector_pseudo=corrector_pseudo and rule == "taylor")


def _snap_positions(space: SearchSpace, pos: np.ndarray) -> np.ndarray:
    """Interior positions moved to EMS grid points: distinct, after the first evaluation's point, in range."""
    ems = space.ems
    lam = space.lambda_start + pos * (space.lambda_end - space.lambda_start)
    step = (ems.lambdas[-1] - ems.lambdas[0]) / (ems.num_points - 1)
    # the last EMS point inside the search range
    top = int(np.clip(np.floor((space.lambda_end - ems.lambdas[0]) / step + 1e-9), 0, ems.num_points - 1))
    idx = np.clip(np.round((lam - ems.lambdas[0]) / step), 0, top).astype(np.int64)
    first = int(ems.snap([space.lambda_start])[0])
    if top - first < idx.size:
        raise ValueError(f"{idx.size + 1} evaluations do not fit on the {top - first + 1} EMS grid points of the "
                         "search range; use fewer steps or EMS on a finer grid")
    m = idx.size
    for k in range(m):  # strictly increasing after the first evaluation's point ...
        idx[k] = max(idx[k], (idx[k - 1] if k else first) + 1)
    for k in range(m - 1, -1, -1):  # ... and within the grid
        idx[k] = min(idx[k], (idx[k + 1] if k + 1 < m else top + 1) - 1)
    return (ems.lambdas[idx] - space.lambda_start) / (space.lambda_end - space.lambda_start)


AFS_DECISION = StepDecision("data", 1)  # the analytic step's own decision (x_1 = sigma_1/sigma_0 x_0 in any form)


def _repair(space: SearchSpace, positions: np.ndarray, decisions: list[StepDecision],
            afs: bool = False) -> SolverSchedule:
    """Make a candidate valid: distinct sorted positions, orders within the buffer, no final corrector; EMS
    steps only with EMS (never the final step onto clean data) and with their positions on the EMS grid; with
    ``afs`` (the space must allow it) the first step is the analytic one (first order; its corrector gene kept)
    and the candidate has ``nfe + 1`` time points."""
    afs = bool(afs and space.afs)
    n = space.nfe + afs  # time points
    pos = np.clip(np.sort(positions), 1e-3, 1.0)
    min_gap = 0.25 / n
    for i in range(1, pos.size):
        pos[i] = max(pos[i], pos[i - 1] + min_gap)
    if pos.size and pos[-1] > 1.0:  # squeeze back under the end
        pos = np.linspace(min_gap, 1.0, pos.size) * 0.5 + pos / pos[-1] * 0.5
    out = []
    for i, d in enumerate(decisions):
        order = max(1, min(d.order, i + 1, space.max_order))
        # the space holds no implicit corrector (+1 NFE; probability 0 in the published configs): a warm-start
        # schedule's implicit corrector becomes the pseudo one
        corrector = ("unic" if d.corrector == "implicit" else d.corrector) if i < n - 1 else "none"
        pred, rule, relax = d.prediction, d.coefficients, float(d.relaxation)
        if i == n - 1:
            order = 1  # the final step lands on sigma = 0: higher orders diverge there
            if pred == "ems":
                pred = "data"  # v3 steps stay on the EMS grid; its final step is this first-order data step
        if pred == "ems" and space.ems is None:
            pred = "data"
        if i == 0 and afs:
            pred, order = AFS_DECISION.prediction, AFS_DECISION.order
            rule, relax = AFS_DECISION.coefficients, AFS_DECISION.relaxation
        if pred == "ems":
            rule, relax = "taylor", 0.0
        pseudo = d.pseudo and rule == "taylor" and order > 2
        c_pseudo = d.corrector_pseudo and rule == "taylor" and corrector == "unic"
        c_order = d.corrector_order if corrector == "unic" and d.corrector_order is not None else None
        if c_order is not None:
            c_order = int(np.clip(c_order, 2, order + 1))
        out.append(StepDecision(pred, order, None, rule, relax, corrector, pseudo=pseudo, corrector_order=c_order,
                                corrector_pseudo=c_pseudo))
    if space.ems is not None and any(d.prediction == "ems" for d in out) and pos.size:
        pos = _snap_positions(space, pos)
    times = space.times(pos)
    if len(set(times)) != len(times) or np.any(np.diff(times) >= 0):
        times = space.times(np.linspace(1.0 / n, 1.0, n - 1))
    return SolverSchedule(times, out, "zero", afs=space.afs_kind if afs else None,
                          afs_mean=space.afs_mean if afs else None)


def _model_steps(schedule: SolverSchedule) -> tuple[np.ndarray, list[StepDecision]]:
    """The model times of the evaluations and the decision of the step each one starts: the same length (the
    NFE) with or without an analytical first step."""
    return np.asarray(schedule.timesteps[1:] if schedule.afs else schedule.timesteps), (
        schedule.decisions[1:] if schedule.afs else list(schedule.decisions))


def encode(space: SearchSpace, schedule: SolverSchedule) -> np.ndarray:
    """Fixed-length features, aligned by model evaluation: the AFS flag and its step's corrector, the
    evaluation positions (``t_max`` = 0), then per evaluation's step type, order, rule, relaxation, corrector."""
    times, decisions = _model_steps(schedule)
    feats = [schedule.afs is not None, schedule.afs is not None and schedule.decisions[0].corrector == "unic"]
    feats += list(space.positions_of(times))
    for d in decisions:
        feats += [d.prediction == "data", d.prediction == "ems", d.order / space.max_order,
                  *[d.coefficients == r for r in _RULES], d.relaxation, d.corrector == "unic", d.pseudo,
                  d.corrector_pseudo]
    return np.asarray(feats, dtype=np.float64)


def random_schedule(space: SearchSpace, rng: np.random.Generator) -> SolverSchedule:
    afs = space.afs and rng.random() < 0.3
    n = space.nfe + afs  # time points
    positions = np.sort(rng.uniform(0.02, 1.0, n - 1))
    kinds, probs = (["data", "noise"], [0.7, 0.3]) if space.ems is None else (["data", "noise", "ems"], [0.4, 0.2, 0.4])
    decisions = [
        _decision(
            str(rng.choice(kinds, p=probs)),
            int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3])),
            str(rng.choice(_RULES)),
            float(rng.normal(0, 0.05)) if rng.random() < 0.3 else 0.0,
            str(rng.choice(["none", "unic"])),
        )
        for _ in range(n)
    ]
    return _repair(space, positions, decisions, afs)


def seed_schedules(space: SearchSpace) -> list[SolverSchedule]:
    """Hand-designed starting points: DPM-Solver++ 2M and UniPC-2 bh1/bh2 (diffusers' rules) on two grids,
    diffusers' time-uniform one (``linspace``) and one uniform in lambda; with EMS also DPM-Solver-v3."""
    n = space.nfe
    t_max, t_min = space.t_max, float(space.schedule.t_min)
    lin_times = np.linspace(t_max, t_min, n + 1)[1:-1]
    lam = space.schedule.lambda_(lin_times)
    positions = [(np.asarray(lam) - space.lambda_start) / (space.lambda_end - space.lambda_start)]
    positions.append(np.linspace(1.0, n - 1.0, n - 1) / n)  # uniform in lambda, last evaluation short of the end
    out = []
    for pos in positions:
        for decisions in (
            dpm_solver_decisions(n, 2),
            unipc_decisions(n, 2, solver_type="bh1"),
            unipc_decisions(n, 2, solver_type="bh2"),
        ):
            out.append(_repair(space, pos, decisions))
    if space.ems is not None:
        # DPM-Solver-v3 as the dpm-solver-v3 sampler runs it on the shipped tables (order 2, pseudo-order corrector)
        # on its time-quadratic grid over the EMS range, and on the two grids above
        t_start = float(space.schedule.t_of_lambda(space.ems.lambdas[0]))
        t_end = float(space.schedule.t_of_lambda(space.ems.lambdas[-1]))
        quad = grids.time_quadratic_grid(space.schedule, n, t_start=t_start, t_end=t_end).timesteps[1:]
        lam_q = np.asarray(space.schedule.lambda_(quad))
        v3 = dpm_solver_v3_decisions(n, solver_order=2)
        for pos in [(lam_q - space.lambda_start) / (space.lambda_end - space.lambda_start), *positions]:
            out.append(_repair(space, pos, v3))
    if space.afs:  # DPM-Solver++ 2M and UniPC-2 bh2 after an analytical first step, uniform in lambda
        pos = np.linspace(1.0, float(n), n) / (n + 1)
        out.append(_repair(space, pos, dpm_solver_decisions(n + 1, 2), afs=True))
        out.append(_repair(space, pos, unipc_decisions(n + 1, 2, solver_type="bh2"), afs=True))
    return out


def _insert_step(pos: list[float], decisions: list[StepDecision], gap: int) -> tuple[list[float], list]:
    """A new evaluation midway (in lambda) through step ``gap``; the step it starts repeats step ``gap``'s
    decision. ``pos`` are the interior positions; step ``gap`` runs from point ``gap`` (0 = ``t_max``) to the
    next one (position 1 = the end of the range for the last step)."""
    bounds = [0.0, *pos, 1.0]
    mid = 0.5 * (bounds[gap] + bounds[gap + 1])
    return pos[:gap] + [mid] + pos[gap:], decisions[:gap + 1] + [decisions[gap]] + decisions[gap + 1:]


def _delete_step(pos: list[float], decisions: list[StepDecision], point: int) -> tuple[list[float], list]:
    """Drop interior evaluation ``point`` (1-based like the steps it starts) and the step that starts there."""
    return pos[:point - 1] + pos[point:], decisions[:point] + decisions[point + 1:]


def warm_start(space: SearchSpace, schedule: SolverSchedule) -> list[SolverSchedule]:
    """Starting candidates for ``space`` from a schedule of any NFE (e.g. the searched schedule of the
    neighbouring NFE): the same NFE is repaired as it is; a shorter schedule gets one candidate per step
    in which a new evaluation is inserted midway (in lambda), with the decision of the step it splits, then
    further ones in the widest gaps until the NFE fits; a longer one gets one candidate per interior evaluation
    removed, then further ones at the narrowest gaps. Candidates are repaired into the space (``_repair``); an
    analytical first step is kept where the space allows it (else ``t_max`` becomes a model evaluation)."""
    if not isinstance(schedule, SolverSchedule):
        raise TypeError(f"`schedule` must be a SolverSchedule, got {type(schedule).__name__}")
    afs = schedule.afs is not None and space.afs
    pos, dec = [float(p) for p in space.positions(schedule)], list(schedule.decisions)
    n, m = space.nfe + afs, len(dec)  # time points wanted / given
    if m == n:
        variants = [(pos, dec)]
    elif m < n:
        variants = [_insert_step(pos, dec, k) for k in range(m)]
    else:
        variants = [_delete_step(pos, dec, j) for j in range(1, m)]
    out, seen = [], set()
    for p, d in variants:
        while len(d) < n:
            widths = np.diff([0.0, *p, 1.0])
            p, d = _insert_step(p, d, int(np.argmax(widths)))
        while len(d) > n:
            widths = np.diff([0.0, *p])
            p, d = _delete_step(p, d, int(np.argmin(widths)) + 1 if len(p) else 1)
        candidate = _repair(space, np.asarray(p), d, afs)
        if _key(candidate) not in seen:
            seen.add(_key(candidate))
            out.append(candidate)
    return out


def _toggle_afs(pos: np.ndarray, decisions: list[StepDecision], afs: bool) -> tuple[np.ndarray, list, bool]:
    """Switch the analytical first step at the same NFE. On: ``t_max`` turns analytic and a model evaluation
    is added midway (in lambda) to the next point, taking over the first step's decision. Off: the first model
    evaluation is dropped and ``t_max`` becomes a model evaluation with that evaluation's decision."""
    if afs:
        return pos[1:], decisions[1:], False
    first = pos[0] if pos.size else 1.0
    return np.concatenate([[0.5 * first], pos]), [AFS_DECISION, *decisions], True


def mutate(space: SearchSpace, schedule: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
    """USF mutation: each decision changes with a small probability; time points jitter in lambda; with an
    AFS space the analytical first step is switched on or off (same NFE) with probability 0.1."""
    pos = space.positions(schedule).copy()
    decisions, afs = list(schedule.decisions), schedule.afs is not None and space.afs
    if space.afs and rng.random() < 0.1:
        pos, decisions, afs = _toggle_afs(pos, decisions, afs)
    if pos.size:
        if rng.random() < 0.5:
            pos = pos + rng.normal(0, 0.3 / space.nfe, pos.size)
        if rng.random() < 0.2:  # delete a step and add one elsewhere (keeps the NFE)
            pos[rng.integers(pos.size)] = rng.uniform(0.02, 1.0)
    out = []
    for d in decisions:
        pred, order, rule, relax, corr = d.prediction, d.order, d.coefficients, d.relaxation, d.corrector
        pseudo, c_pseudo = d.pseudo, d.corrector_pseudo
        if rng.random() < 0.15:
            others = [p for p in space.predictions if p != pred]
            pred = others[0] if len(others) == 1 else str(rng.choice(others))
        if rng.random() < 0.2:
            order = int(np.clip(order + rng.choice([-1, 1]), 1, space.max_order))
        if rng.random() < 0.15:
            rule = str(rng.choice(_RULES))
        if rng.random() < 0.2:
            relax = float(relax + rng.normal(0, 0.03))
        if rng.random() < 0.2:
            corr = "none" if corr == "unic" else "unic"
        if space.ems is not None:  # v3's pseudo-order predictor / corrector
            if rng.random() < 0.1:
                pseudo = not pseudo
            if rng.random() < 0.15:
                c_pseudo = not c_pseudo
        out.append(_decision(pred, order, rule, relax, corr, pseudo, c_pseudo))
    return _repair(space, pos, out, afs)


def crossover(space: SearchSpace, a: SolverSchedule, b: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
    """Per-step genes from either parent ("deep crossover", aligned by model evaluation); time points from one
    parent or their mean (parents with and without an analytical first step: the points and the AFS choice
    come from one parent)."""
    pa, pb = space.positions(a), space.positions(b)
    choice = rng.random()
    if (a.afs is None) != (b.afs is None) and choice >= 0.8:
        choice = rng.random() * 0.8
    pos = pa if choice < 0.4 else pb if choice < 0.8 else 0.5 * (pa + pb)
    lead = b if 0.4 <= choice < 0.8 else a
    genes = [da if rng.random() < 0.5 else db for da, db in zip(_model_steps(a)[1], _model_steps(b)[1])]
    if lead.afs is not None:
        genes = [lead.decisions[0], *genes]
    return _repair(space, pos, genes, lead.afs is not None)


@dataclass
class SearchResult:
    """All evaluated schedules with their metric, in evaluation order (``best`` is the lowest metric)."""

    evaluated: list[tuple[SolverSchedule, float]]

    @property
    def best(self) -> tuple[SolverSchedule, float]:
        return min(self.evaluated, key=lambda item: item[1])

    def best_so_far(self) -> list[float]:
        out, best = [], math.inf
        for _, value in self.evaluated:
            best = min(best, value)
            out.append(best)
        return out


def _canonical(d: StepDecision) -> StepDecision:
    """``d`` with the genes that cannot change the sampler reset: a corrector order equal to its default
    (``order + 1``), and the coefficient rule and relaxation of a first-order step without corrector (no derivative
    term for them to act on; a corrector reads the step's own rule, so a corrected step keeps it)."""
    c_order = None if d.corrector_order == d.order + 1 else d.corrector_order
    rule, relax = d.coefficients, d.relaxation
    if d.order == 1 and d.corrector == "none" and not d.stochastic and d.prediction != "ems":
        rule, relax = "taylor", 0.0
    return replace(d, corrector_order=c_order, coefficients=rule, relaxation=relax)


def _key(schedule: SolverSchedule) -> str:
    """Identity of a schedule up to genes that do not change it (``_canonical``): the search evaluates each once."""
    canonical = replace(schedule, decisions=[_canonical(d) for d in schedule.decisions])
    return json.dumps(canonical.to_dict()["decisions"]) + json.dumps([round(t, 6) for t in schedule.timesteps])


#: version of the resumable search state file (``search(state_path=...)``)
STATE_VERSION = 3  # 3: equivalent schedules share one key (_canonical)


def check_state_early(state: str | Path, identity: Mapping[str, Any]) -> None:
    """Before an expensive objective is built: refuse an existing search state whose recorded ``identity`` differs
    from the given (partial) one, e.g. ``nfe``, ``seed``, ``metric`` -- the same ``ValueError`` ``search`` raises
    later with the full identity. A missing file passes; an unreadable one is left for ``search`` to report."""
    state = Path(state)
    if not state.is_file():
        return
    try:
        data = json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    theirs = data.get("identity") if isinstance(data, dict) else None
    if isinstance(theirs, dict):
        _compare_identity(state, {k: v for k, v in theirs.items() if k in identity}, dict(identity))


def _compare_identity(state: Path, theirs: dict, identity: dict) -> None:
    differ = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
    if differ:
        def show(v: Any) -> str:
            text = repr(v)
            return text if len(text) <= 80 else text[:77] + "..."

        shown = "; ".join(f"{k}: {show(theirs.get(k))} there, {show(identity.get(k))} here" for k in differ)
        raise ValueError(f"search state {str(state)!r} belongs to another search ({shown}); delete it, pass another "
                         "--state, or repeat that search's settings to resume it")


def _load_state(state: Path, identity: dict) -> dict:
    """The search state in ``state``, checked: a JSON object of this version, written by the same search
    (``identity``: model, metric, NFE, seed, search options) -- anything else is a ``ValueError`` naming the file."""
    try:
        data = json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"search state {str(state)!r} is not a readable JSON state file ({exc}); delete it or pass "
                         "another --state") from None
    version = data.get("version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != STATE_VERSION:
        raise ValueError(f"search state {str(state)!r} has state format version {version} (this fewstep reads "
                         f"{STATE_VERSION}: another fewstep wrote it), so it cannot be resumed; delete it or pass "
                         "another --state to start the search over")  # fmt: skip
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION or not isinstance(
            data.get("evaluated"), list) or not isinstance(data.get("rng"), dict):
        raise ValueError(f"search state {str(state)!r} is not a fewstep search state (version {STATE_VERSION}: "
                         "'identity', 'rng', 'evaluated'); delete it or pass another --state")  # fmt: skip
    theirs = data.get("identity", {})
    _compare_identity(state, theirs if isinstance(theirs, dict) else {}, identity)
    try:
        data["evaluated"] = [(SolverSchedule.from_dict(d), v) for d, v in data["evaluated"]]
        data["pending"] = [SolverSchedule.from_dict(d) for d in data.get("pending", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"search state {str(state)!r} holds a malformed schedule ({exc}); delete it") from None
    for schedule, value in data["evaluated"]:
        # search() stores finite values only (a failed evaluation scores 1e6) and schedules of its own NFE
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"search state {str(state)!r} holds a metric value {value!r} (finite numbers only); "
                             "delete it")
        if schedule.nfe != identity.get("nfe", schedule.nfe):
            raise ValueError(f"search state {str(state)!r} holds a schedule of NFE {schedule.nfe} in a search of NFE "
                             f"{identity['nfe']}; delete it")
    data["evaluated"] = [(s, float(v)) for s, v in data["evaluated"]]
    return data


def search(
    metric: MetricFn,
    space: SearchSpace,
    budget: int,
    seed: int = 0,
    use_predictor: bool = True,
    per_round: int = 4,
    candidates_per_round: int = 256,
    num_parents: int = 8,
    state_path: str | Path | None = None,
    progress: bool = True,
    initial: Sequence[SolverSchedule] = (),
    identity: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Evaluate ``budget`` schedules (``metric``: lower is better) and return them all.

    Start: the hand-designed seeds, the ``warm_start`` candidates of the ``initial`` schedules (any NFE; e.g.
    the searched schedule of the neighbouring NFE), plus random schedules (a quarter of the budget at most). Each round
    breeds ``candidates_per_round`` children of the best ``num_parents``; with ``use_predictor`` the
    predictor picks the ``per_round`` most promising, otherwise they are drawn at random (the released
    code's plain evolution). ``state_path`` (JSON) makes the search resumable: after each evaluation it stores the
    evaluated schedules, the random generator's state and the round's remaining candidates, so an interrupted
    search resumed with the same settings evaluates exactly what the uninterrupted one would. ``identity``
    describes the run (model, metric, objective settings); a state file of another run is refused.
    """
    from sklearn.ensemble import ExtraTreesRegressor

    if not callable(metric):
        raise ValueError(f"`metric` must be a callable schedule -> float (lower is better), got {metric!r}")
    if not isinstance(space, SearchSpace):
        raise ValueError(f"`space` must be a SearchSpace, got {type(space).__name__}")
    check_int("budget", budget, 1, numpy_ok=False)
    check_int("seed", seed, 0, numpy_ok=False)
    for name, count in (("per_round", per_round), ("candidates_per_round", candidates_per_round),
                        ("num_parents", num_parents)):
        check_int(name, count, 1, numpy_ok=False)
    check_bool("use_predictor", use_predictor)
    check_bool("progress", progress)
    rng = np.random.default_rng(seed)
    ident = {**(identity or {}), "nfe": space.nfe, "seed": seed, "use_predictor": use_predictor,
             "per_round": per_round, "candidates_per_round": candidates_per_round, "num_parents": num_parents,
             "afs": space.afs, "afs_mean": space.afs_mean is not None, "ems": space.ems is not None,
             "max_order": space.max_order, "initial": [_key(s) for s in initial]}
    ident = json.loads(json.dumps(ident))  # as stored: tuples become lists
    evaluated: list[tuple[SolverSchedule, float]] = []
    pending: list[SolverSchedule] = []  # this round's candidates not evaluated yet
    state = Path(state_path) if state_path is not None else None
    resumed = None  # what a resumed state decides: the evaluations so far, the round's rest, the generator
    if state is not None and state.is_file():
        data = _load_state(state, ident)
        evaluated, pending = data["evaluated"], data["pending"]
        try:
            rng.bit_generator.state = data["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"search state {str(state)!r} holds a malformed random generator state ({exc!r}); "
                             "delete it") from None
        resumed = {"evaluated": [[_key(s), v] for s, v in evaluated], "pending": [_key(s) for s in pending],
                   "rng": rng.bit_generator.state}
    # under a distributed launch every process runs this search on its share of each evaluation's samples: processes
    # given other settings (or resuming other state files) would mix their evaluations and drift apart
    ems_digest = None if space.ems is None else space.ems.digest
    check_same_on_all_processes({**ident, "budget": budget, "lambda_end": space.lambda_end,
                                 "afs_mean": space.afs_mean, "ems_digest": ems_digest, "resumed": resumed},
                                "search settings")
    seen = {_key(s) for s, _ in evaluated}
    main = is_main_process()  # under accelerate launch every process runs the same search (same seed, same
    # gathered metric values); the objective splits each evaluation's samples; one process shows and writes
    bar = tqdm(total=budget, initial=min(len(evaluated), budget), desc=f"S3 search NFE {space.nfe}",
               disable=not (progress and main))

    def save() -> None:
        if state is not None and main:
            from .._io import atomic_write

            payload = {"version": STATE_VERSION, "identity": ident, "rng": rng.bit_generator.state,
                       "pending": [c.to_dict() for c in pending], "evaluated": [[s.to_dict(), v] for s, v in evaluated]}
            atomic_write(state, lambda p: p.write_text(json.dumps(payload)))

    def run(schedule: SolverSchedule) -> None:
        key = _key(schedule)
        if key in seen or len(evaluated) >= budget:
            return
        seen.add(key)
        try:
            value = float(metric(schedule))
        except (ValueError, FloatingPointError):
            value = math.inf
        if not math.isfinite(value):
            value = 1e6
        evaluated.append((schedule, value))
        bar.update(1)
        save()

    def flush() -> None:
        while pending and len(evaluated) < budget:
            run(pending.pop(0))

    starts = seed_schedules(space) + [c for schedule in initial for c in warm_start(space, schedule)]
    for s in starts:
        run(s)
    while len(evaluated) < min(budget, max(len(starts) + 2, budget // 4)):
        run(random_schedule(space, rng))
    flush()  # a resumed search first finishes the round it was interrupted in
    while len(evaluated) < budget:
        ranked = sorted(evaluated, key=lambda item: item[1])[:num_parents]
        parents = [s for s, _ in ranked]
        children = []
        for _ in range(candidates_per_round):
            if len(parents) > 1 and rng.random() < 0.5:
                i, j = rng.choice(len(parents), 2, replace=False)
                child = crossover(space, parents[i], parents[j], rng)
                child = mutate(space, child, rng) if rng.random() < 0.5 else child
            else:
                child = mutate(space, parents[rng.integers(len(parents))], rng)
            if _key(child) not in seen:
                children.append(child)
        if not children:
            children = [random_schedule(space, rng)]
        if use_predictor and len(evaluated) >= 6:
            x = np.stack([encode(space, s) for s, _ in evaluated])
            y = np.log(np.maximum([v for _, v in evaluated], 1e-12))
            model = ExtraTreesRegressor(n_estimators=100, min_samples_leaf=2, random_state=int(rng.integers(2**31)))
            model.fit(x, y)
            feats = np.stack([encode(space, c) for c in children])
            per_tree = np.stack([t.predict(feats) for t in model.estimators_])
            score = per_tree.mean(0) - 0.5 * per_tree.std(0)
            order = np.argsort(score)
        else:
            order = rng.permutation(len(children))
        pending[:] = [children[int(k)] for k in order[:per_round]]
        flush()
    bar.close()
    return SearchResult(evaluated)
