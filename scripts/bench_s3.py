#!/usr/bin/env python
"""Searched S3 schedules vs hand-designed samplers on held-out seeds (and classes), and predictor-guided
vs plain evolutionary search at equal evaluation budget.

    python scripts/bench_s3.py heldout --nfe 4 5 6 8 10
    python scripts/bench_s3.py predictor --nfe 5 --budget 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from fewstep import samplers
from fewstep.samplers.s3 import shipped_schedule_path
from fewstep.search import SearchSpace, search
from fewstep.search.objectives import AnalyticObjective, DigitsMSEObjective, DigitsObjective
from fewstep.search.s3_search import seed_schedules
from fewstep.solvers.s3 import SolverSchedule

HAND = {"DPM-Solver++ 2M": ("dpm-solver++", {}), "UniPC-2 bh2": ("unipc", {}),
        "UniPC-2 bh2, uniform lambda": ("unipc", {"time_grid": "uniform_lambda"})}


def heldout(nfes: list[int]) -> list[dict]:
    rows = []
    analytic = AnalyticObjective(num_samples=2000, seed=123)  # other initial noise than the search's
    digits = DigitsObjective(classes=range(10), num_per_class=30, seed=10_000)  # unseen seeds, all 10 classes
    for nfe in nfes:
        for name, objective in (("analytic", analytic), ("digits-eps", digits)):
            searched = SolverSchedule.load(shipped_schedule_path(name, nfe))
            row = {"model": name, "nfe": nfe, "S3 (searched)": objective(searched)}
            space = SearchSpace(objective.noise_schedule, nfe)
            row["best seed schedule"] = min(objective(s) for s in seed_schedules(space))
            for label, (sampler, opts) in HAND.items():
                if name == "analytic":
                    sched = samplers.get(sampler)(clip_sample=False, **opts) if sampler == "ddim" else \
                        samplers.get(sampler)(**opts)
                    sched.set_timesteps(nfe)
                    sched_schedule = SolverSchedule.from_grid(sched.plan.grid, sched.plan.decisions)
                    row[label] = objective(sched_schedule)
                else:
                    sched = samplers.from_config(sampler, digits.model_config, **opts)
                    row[label] = digits.frechet(digits.images(sched, nfe))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def heldout_mse(path: str) -> dict:
    """MSE to a 200-step reference on unseen seeds and all 10 classes, for a schedule searched with --metric mse."""
    searched = SolverSchedule.load(path)
    nfe = searched.nfe
    objective = DigitsMSEObjective(classes=range(10), num_per_class=10, seed=10_000)
    row = {"model": "digits-eps (MSE)", "nfe": nfe, "S3 (searched)": objective(searched)}
    space = SearchSpace(objective.noise_schedule, nfe)
    row["best seed schedule"] = min(objective(s) for s in seed_schedules(space))
    for label, (sampler, opts) in HAND.items():
        row[label] = objective.mse(objective.images(samplers.from_config(sampler, objective.model_config, **opts), nfe))
    print(json.dumps(row))
    return row


def predictor(nfe: int, budget: int, repeats: int) -> dict:
    objective = AnalyticObjective(num_samples=500)
    space = SearchSpace(objective.noise_schedule, nfe)
    curves = {True: [], False: []}
    for use in (True, False):
        for r in range(repeats):
            result = search(objective, space, budget, seed=100 + r, use_predictor=use, progress=False)
            curves[use].append(result.best_so_far())
    out = {}
    for use, runs in curves.items():
        mean = np.exp(np.mean(np.log(np.asarray(runs)), axis=0))
        out["predictor" if use else "plain"] = {k: float(mean[k - 1]) for k in (10, 20, 30, 40, budget) if k <= budget}
    print(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("heldout")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    m = sub.add_parser("heldout-mse")
    m.add_argument("schedule")
    q = sub.add_parser("predictor")
    q.add_argument("--nfe", type=int, default=5)
    q.add_argument("--budget", type=int, default=60)
    q.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.what == "heldout":
        heldout(args.nfe)
    elif args.what == "heldout-mse":
        heldout_mse(args.schedule)
    else:
        predictor(args.nfe, args.budget, args.repeats)


if __name__ == "__main__":
    main()
