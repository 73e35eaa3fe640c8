"""S^3: predictor-guided evolutionary search over USF solver schedules (Liu et al. 2024, sec. 4).

The search space at a fixed NFE ``N``: the ``N - 1`` interior time points (positions in ``lambda`` between
the first evaluation at ``t_max`` and the last allowed one), and per step the prediction type
(data/noise), Taylor order (1-3, capped by the available points), coefficient rule (taylor/bh1/bh2),
linear relaxation ``c`` and the pseudo corrector. Evolution: parents are the best evaluated schedules;
children come from crossover (per-step genes from either parent, time points from one or the average)
and mutation (time jitter in lambda, delete-and-add a time point, order, type, rule, corrector,
relaxation). The released code evaluates every child; S^3's contribution is a **performance predictor**
trained on the schedules evaluated so far that ranks many children so that only the most promising are
evaluated.

Our predictor: an extra-trees regressor (scikit-learn) on a fixed-length encoding of the schedule,
predicting ``log(metric)``. With tens to a few hundred evaluations, mixed discrete/continuous features
and no time to tune, a tree ensemble is the robust choice (an MLP needs more data and tuning), it fits
in milliseconds, and the spread of its trees gives an exploration bonus (we rank by mean - 0.5 std).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..solvers.engine import StepDecision
from ..solvers.methods import dpm_solver_decisions, unipc_decisions
from ..solvers.s3 import SolverSchedule
from ..solvers.schedules import NoiseSchedule

__all__ = ["SearchSpace", "SearchResult", "encode", "random_schedule", "mutate", "crossover", "search"]

_RULES = ("taylor", "bh1", "bh2")
MetricFn = Callable[[SolverSchedule], float]


@dataclass
class SearchSpace:
    """What the search may change, for one noise schedule and NFE (first time fixed at ``t_max``)."""

    schedule: NoiseSchedule
    nfe: int
    max_order: int = 3
    lambda_end: float | None = None  # last allowed evaluation point (default: lambda at t_min)

    def __post_init__(self) -> None:
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 2:
            raise ValueError(f"`nfe` must be an integer >= 2, got {self.nfe!r}")
        if not 1 <= self.max_order <= 4:
            raise ValueError(f"`max_order` must be in [1, 4], got {self.max_order!r}")
        self.t_max = float(self.schedule.t_max)
        self.lambda_start = float(self.schedule.lambda_(np.asarray([self.t_max]))[0])
        end = self.lambda_end if self.lambda_end is not None else float(
            self.schedule.lambda_(np.asarray([float(self.schedule.t_min)]))[0]
        )
        if not end > self.lambda_start:
            raise ValueError(f"`lambda_end` {end} must exceed the start lambda {self.lambda_start}")
        self.lambda_end = end

    def times(self, positions: np.ndarray) -> list[float]:
        """Model times of the evaluations: ``t_max``, then interior ``positions`` in (0, 1] along lambda."""
        lam = self.lambda_start + np.sort(np.asarray(positions)) * (self.lambda_end - self.lambda_start)
        return [self.t_max] + [float(t) for t in self.schedule.t_of_lambda(lam)]

    def positions(self, schedule: SolverSchedule) -> np.ndarray:
        lam = self.schedule.lambda_(np.asarray(schedule.timesteps[1:]))
        return (np.asarray(lam) - self.lambda_start) / (self.lambda_end - self.lambda_start)


def _repair(space: SearchSpace, positions: np.ndarray, decisions: list[StepDecision]) -> SolverSchedule:
    """Make a candidate valid: distinct sorted positions, orders within the buffer, no final corrector."""
    pos = np.clip(np.sort(positions), 1e-3, 1.0)
    min_gap = 0.25 / space.nfe
    for i in range(1, pos.size):
        pos[i] = max(pos[i], pos[i - 1] + min_gap)
    if pos.size and pos[-1] > 1.0:  # squeeze back under the end
        pos = np.linspace(min_gap, 1.0, pos.size) * 0.5 + pos / pos[-1] * 0.5
    out = []
    n = space.nfe
    for i, d in enumerate(decisions):
        order = max(1, min(d.order, i + 1, space.max_order))
        corrector = d.corrector if i < n - 1 else "none"
        if i == n - 1:
            order = 1  # the final step lands on sigma = 0: higher orders diverge there
        out.append(StepDecision(d.prediction, order, None, d.coefficients, float(d.relaxation), corrector))
    times = space.times(pos)
    if len(set(times)) != len(times) or np.any(np.diff(times) >= 0):
        times = space.times(np.linspace(1.0 / n, 1.0, n - 1))
    return SolverSchedule(times, out, "zero")


def encode(space: SearchSpace, schedule: SolverSchedule) -> np.ndarray:
    """Fixed-length features: interior positions, then per step type, order, rule, relaxation, corrector."""
    feats = list(space.positions(schedule))
    for d in schedule.decisions:
        feats += [d.prediction == "data", d.order / space.max_order, *[d.coefficients == r for r in _RULES],
                  d.relaxation, d.corrector == "unic"]
    return np.asarray(feats, dtype=np.float64)


def random_schedule(space: SearchSpace, rng: np.random.Generator) -> SolverSchedule:
    n = space.nfe
    positions = np.sort(rng.uniform(0.02, 1.0, n - 1))
    decisions = [
        StepDecision(
            prediction=str(rng.choice(["data", "noise"], p=[0.7, 0.3])),
            order=int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3])),
            coefficients=str(rng.choice(_RULES)),
            relaxation=float(rng.normal(0, 0.05)) if rng.random() < 0.3 else 0.0,
            corrector=str(rng.choice(["none", "unic"])),
        )
        for _ in range(n)
    ]
    return _repair(space, positions, decisions)


def seed_schedules(space: SearchSpace) -> list[SolverSchedule]:
    """Hand-designed starting points: DPM-Solver++ 2M and UniPC-2 bh1/bh2 (diffusers' rules) on two grids,
    diffusers' time-uniform one (``linspace``) and one uniform in lambda."""
    n = space.nfe
    t_max, t_min = space.t_max, float(space.schedule.t_min)
    lin_times = np.linspace(t_max, t_min, n + 1)[1:-1]
    lam = space.schedule.lambda_(lin_times)
    grids = [(np.asarray(lam) - space.lambda_start) / (space.lambda_end - space.lambda_start)]
    grids.append(np.linspace(1.0, n - 1.0, n - 1) / n)  # uniform in lambda, last evaluation short of the end
    out = []
    for pos in grids:
        for decisions in (
            dpm_solver_decisions(n, 2),
            unipc_decisions(n, 2, solver_type="bh1"),
            unipc_decisions(n, 2, solver_type="bh2"),
        ):
            out.append(_repair(space, pos, decisions))
    return out


def mutate(space: SearchSpace, schedule: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
    """USF mutation: each decision changes with a small probability; time points jitter in lambda."""
    pos = space.positions(schedule).copy()
    if pos.size:
        if rng.random() < 0.5:
            pos = pos + rng.normal(0, 0.3 / space.nfe, pos.size)
        if rng.random() < 0.2:  # delete a step and add one elsewhere (keeps the NFE)
            pos[rng.integers(pos.size)] = rng.uniform(0.02, 1.0)
    out = []
    for d in schedule.decisions:
        pred, order, rule, relax, corr = d.prediction, d.order, d.coefficients, d.relaxation, d.corrector
        if rng.random() < 0.15:
            pred = "noise" if pred == "data" else "data"
        if rng.random() < 0.2:
            order = int(np.clip(order + rng.choice([-1, 1]), 1, space.max_order))
        if rng.random() < 0.15:
            rule = str(rng.choice(_RULES))
        if rng.random() < 0.2:
            relax = float(relax + rng.normal(0, 0.03))
        if rng.random() < 0.2:
            corr = "none" if corr == "unic" else "unic"
        out.append(StepDecision(pred, order, None, rule, relax, corr))
    return _repair(space, pos, out)


def crossover(space: SearchSpace, a: SolverSchedule, b: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
    """Per-step genes from either parent ("deep crossover"); time points from one parent or their mean."""
    pa, pb = space.positions(a), space.positions(b)
    choice = rng.random()
    pos = pa if choice < 0.4 else pb if choice < 0.8 else 0.5 * (pa + pb)
    genes = [da if rng.random() < 0.5 else db for da, db in zip(a.decisions, b.decisions)]
    return _repair(space, pos, genes)


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


def _key(schedule: SolverSchedule) -> str:
    return json.dumps(schedule.to_dict()["decisions"]) + json.dumps([round(t, 6) for t in schedule.timesteps])


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
) -> SearchResult:
    """Evaluate ``budget`` schedules (``metric``: lower is better) and return them all.

    Start: the hand-designed seeds plus random schedules (a quarter of the budget at most). Each round
    breeds ``candidates_per_round`` children of the best ``num_parents``; with ``use_predictor`` the
    predictor picks the ``per_round`` most promising, otherwise they are drawn at random (the released
    code's plain evolution). ``state_path`` (JSON) makes the search resumable: evaluated schedules are
    stored after each evaluation and reused on restart.
    """
    from sklearn.ensemble import ExtraTreesRegressor

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"`budget` must be an integer >= 1, got {budget!r}")
    rng = np.random.default_rng(seed)
    evaluated: list[tuple[SolverSchedule, float]] = []
    state = Path(state_path) if state_path is not None else None
    if state is not None and state.is_file():
        data = json.loads(state.read_text())
        if data.get("nfe") != space.nfe:
            raise ValueError(f"search state {str(state)!r} is for NFE {data.get('nfe')}, not {space.nfe}")
        evaluated = [(SolverSchedule.from_dict(s), float(v)) for s, v in data["evaluated"]]
        rng = np.random.default_rng(seed + len(evaluated))
    seen = {_key(s) for s, _ in evaluated}
    bar = tqdm(total=budget, initial=min(len(evaluated), budget), desc=f"S3 search NFE {space.nfe}",
               disable=not progress)

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
        if state is not None:
            from .._io import atomic_write

            payload = {"nfe": space.nfe, "evaluated": [[s.to_dict(), v] for s, v in evaluated]}
            atomic_write(state, lambda p: p.write_text(json.dumps(payload)))

    for s in seed_schedules(space):
        run(s)
    while len(evaluated) < min(budget, max(len(seed_schedules(space)) + 2, budget // 4)):
        run(random_schedule(space, rng))
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
        for k in order[:per_round]:
            run(children[int(k)])
    bar.close()
    return SearchResult(evaluated)
