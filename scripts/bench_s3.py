#!/usr/bin/env python
"""Searched S3 schedules vs hand-designed samplers on held-out seeds (and classes), and predictor-guided
vs plain evolutionary search at equal evaluation budget.

    python scripts/bench_s3.py heldout --nfe 4 5 6 --sets 4 --out scripts/results_s3.json
    python scripts/bench_s3.py predictor --nfe 5 --budget 60 --repeats 3
    python scripts/bench_s3.py afs --nfe 3 4 5 6 --budget 60 --repeats 3 --out scripts/results_s3.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script

from fewstep import samplers
from fewstep._io import atomic_write
from fewstep.pipelines.defaults import default_sampler_options
from fewstep.samplers.s3 import shipped_schedule_path
from fewstep.search import SearchSpace, search
from fewstep.search.objectives import HELD_OUT_SEED, AnalyticObjective, DigitsMSEObjective, DigitsObjective
from fewstep.search.s3_search import seed_schedules
from fewstep.solvers.s3 import SolverSchedule

HAND = {"DPM-Solver++ 2M": ("dpm-solver++", {}), "UniPC-2 bh2": ("unipc", {}),
        "UniPC-2 bh2, uniform lambda": ("unipc", {"time_grid": "uniform_lambda"})}
#: hand-designed samplers on digits-eps (DPM-Solver-v3 with the shipped EMS and its measured-best time grid)
_V3 = default_sampler_options("digits-eps", "dpm-solver-v3")
HAND_DIGITS = {**HAND, "DPM-Solver-v3": ("dpm-solver-v3", _V3),
               "DPM-Solver-v3, uniform time": ("dpm-solver-v3", {**_V3, "time_grid": "uniform_time"})}


def real_digits_fd(digits: DigitsObjective, num_per_class: int, seed: int) -> float:
    """FD of real training digits (``num_per_class`` of each class) to the test digits: what a perfect sampler
    would score at this sample size."""
    import torch

    from fewstep.datasets import load_digits_images, to_unit_range

    images, labels = load_digits_images(digits.pipe.unet.config.sample_size, "train")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), num_per_class, replace=False)
                          for c in digits.classes])
    return digits.frechet(to_unit_range(images[torch.from_numpy(idx)]))


def heldout_analytic(nfes: list[int]) -> list[dict]:
    rows = []
    analytic = AnalyticObjective(num_samples=2000, seed=123)  # other initial noise than the search's
    for nfe in nfes:
        searched = SolverSchedule.load(shipped_schedule_path("analytic", nfe))
        row = {"model": "analytic", "nfe": nfe, "S3 (searched)": analytic(searched)}
        space = SearchSpace(analytic.noise_schedule, nfe)
        row["best seed schedule"] = min(analytic(s) for s in seed_schedules(space))
        for label, (sampler, opts) in HAND.items():
            sched = samplers.get(sampler)(**opts)
            sched.set_timesteps(nfe)
            row[label] = analytic(SolverSchedule.from_grid(sched.plan.grid, sched.plan.decisions,
                                                           schedule=sched.noise_schedule))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def heldout_digits(nfes: list[int], sets: int, num_per_class: int, reference_steps: int,
                   schedules: dict[int, str] | None = None, only_searched: bool = False,
                   floor_sets: int | None = None) -> dict:
    """FD on ``sets`` disjoint held-out seed sets (all 10 classes; the search saw classes 0-6 and seeds < 10 000):
    the shipped searched schedule (or ``schedules[nfe]``), the hand-designed samplers (DPM-Solver-v3 with the
    shipped EMS), the best of the search's seed schedules (first set only: it is picked on held-out data) and
    the FD floor, a ``reference_steps`` UniPC solve from the same noise, on the first ``floor_sets`` sets (default:
    all) (``only_searched``: the searched schedules only, e.g. new ones against baselines measured before)."""
    out: dict = {"metric": "Frechet distance (digits classifier features) to the test digits", "sets": sets,
                 "samples_per_set": 10 * num_per_class, "reference_steps": reference_steps, "cells": {}}
    options = default_sampler_options("digits-eps", "s3")
    for k in range(sets):
        digits = DigitsObjective(classes=range(10), num_per_class=num_per_class, seed=HELD_OUT_SEED + 100_000 * k)
        cells = {}
        if not only_searched and (floor_sets is None or k < floor_sets):
            cells[f"floor: UniPC-2 x{reference_steps}"] = (samplers.from_config("unipc", digits.model_config),
                                                           reference_steps)
        for nfe in nfes:
            path = (schedules or {}).get(nfe) or shipped_schedule_path("digits-eps", nfe)
            cells[f"S3 (searched) x{nfe}"] = (samplers.get("s3").from_config(
                digits.model_config, s3_schedule=str(path), **options), nfe)
            for label, (sampler, opts) in ({} if only_searched else HAND_DIGITS).items():
                cells[f"{label} x{nfe}"] = (samplers.from_config(sampler, digits.model_config, **opts), nfe)
        for label, (sched, steps) in cells.items():
            value = digits.frechet(digits.images(sched, steps))
            out["cells"].setdefault(label, []).append(value)
            print(json.dumps({"set": k, "cell": label, "fd": value}), flush=True)
        if only_searched:
            continue
        value = real_digits_fd(digits, num_per_class, k)
        out["cells"].setdefault("real training digits", []).append(value)
        print(json.dumps({"set": k, "cell": "real training digits", "fd": value}), flush=True)
        if k == 0:
            for nfe in nfes:
                space = SearchSpace(digits.noise_schedule, nfe, ems=digits.ems)
                value = min(digits(s) for s in seed_schedules(space))
                out["cells"][f"best seed schedule (set 0) x{nfe}"] = [value]
                print(json.dumps({"set": k, "cell": f"best seed schedule x{nfe}", "fd": value}), flush=True)
    out["cells"] = {label: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                            "values": v} for label, v in out["cells"].items()}
    return out


def heldout_mse(path: str) -> dict:
    """MSE to a 200-step reference on unseen seeds and all 10 classes, for a schedule searched with --metric mse."""
    searched = SolverSchedule.load(path)
    nfe = searched.nfe
    objective = DigitsMSEObjective(classes=range(10), num_per_class=10, seed=HELD_OUT_SEED)
    row = {"model": "digits-eps (MSE)", "nfe": nfe, "S3 (searched)": objective(searched)}
    space = SearchSpace(objective.noise_schedule, nfe, ems=objective.ems)
    row["best seed schedule"] = min(objective(s) for s in seed_schedules(space))
    for label, (sampler, opts) in HAND_DIGITS.items():
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


def afs_ablation(nfes: list[int], budget: int, repeats: int) -> dict:
    """The analytical first step in the search space or not, at equal budget: geometric mean over ``repeats``
    searches of the best RMSE (analytic reference, the search's own 500 points) and how many winners use AFS."""
    objective = AnalyticObjective(num_samples=500)
    out = {"budget": budget, "repeats": repeats, "rows": []}
    for nfe in nfes:
        row = {"nfe": nfe}
        for afs in (False, True):
            results = [search(objective, SearchSpace(objective.noise_schedule, nfe, afs=afs), budget, seed=r,
                              progress=False).best for r in range(repeats)]
            row["with AFS" if afs else "without AFS"] = float(np.exp(np.mean(np.log([v for _, v in results]))))
            if afs:
                row["winners using AFS"] = sum(s.afs is not None for s, _ in results)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("heldout", help="searched S3 schedules vs hand-designed samplers on held-out seeds and classes")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10], help="NFEs to evaluate (default 4 5 6 8 10)")
    p.add_argument("--sets", type=count(1), default=4, help="disjoint held-out seed sets for digits-eps (default 4)")
    p.add_argument("--num-per-class", type=count(1), default=30,
                   help="digits-eps samples per class and set (default 30)")
    p.add_argument("--reference-steps", type=count(2), default=50, help="steps of the FD-floor solve (default 50)")
    p.add_argument("--schedule", nargs=2, action="append", metavar=("NFE", "FILE"), default=[],
                   help="evaluate this schedule file instead of the shipped one at NFE")
    p.add_argument("--floor-sets", type=count(0), default=None,
                   help="compute the FD floor on the first N sets only (default: all)")
    p.add_argument("--skip-analytic", action="store_true", help="skip the analytic (RMSE) part, digits-eps only")
    p.add_argument("--only-searched", action="store_true", help="digits-eps: the searched schedules only")
    p.add_argument("--out", type=output_file, default=None,
                   help="merge the results into this JSON (sections and cells of other runs are kept)")
    m = sub.add_parser("heldout-mse", help="MSE to a 200-step DPM-Solver++ solve on unseen seeds, all 10 classes")
    m.add_argument("schedule", help="digits-eps schedule file (its NFE is used), e.g. a shipped one "
                                    "(fewstep/assets/s3/digits-eps-nfe4.json) or one searched with --metric mse")
    q = sub.add_parser("predictor", help="predictor-guided vs plain evolutionary search at equal budget (analytic)")
    q.add_argument("--nfe", type=count(2), default=5, help="NFE of the searched schedules (default 5)")
    q.add_argument("--budget", type=count(1), default=60, help="schedules evaluated per search (default 60)")
    q.add_argument("--repeats", type=count(1), default=3,
                   help="searches per variant, best-so-far curves geometric-averaged (default 3)")
    a = sub.add_parser("afs", help="analytical first step in the search space or not, equal budget (analytic)")
    a.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6], help="NFEs to search (default 3 4 5 6)")
    a.add_argument("--budget", type=count(1), default=60, help="schedules evaluated per search (default 60)")
    a.add_argument("--repeats", type=count(1), default=3,
                   help="searches per NFE and variant, best RMSE geometric-averaged (default 3)")
    a.add_argument("--out", type=output_file, default=None,
                   help="store the rows under 'analytic-afs' in this results JSON")
    args = parser.parse_args()
    if args.what == "heldout":
        if args.out and Path(args.out).is_file():  # merging cells of another protocol would mix incomparable FDs
            stored = json.loads(Path(args.out).read_text()).get("digits-eps", {})
            protocol = {"sets": args.sets, "samples_per_set": 10 * args.num_per_class,
                        "reference_steps": args.reference_steps}
            differ = {k: (stored[k], v) for k, v in protocol.items() if k in stored and stored[k] != v}
            if differ:
                parser.error(f"--out {args.out}: its digits-eps cells were measured with another protocol "
                             + ", ".join(f"{k} {old} (this run: {new})" for k, (old, new) in differ.items())
                             + "; write to another file")
        result = {} if args.skip_analytic else {"analytic": heldout_analytic(args.nfe)}
        result["digits-eps"] = heldout_digits(args.nfe, args.sets, args.num_per_class, args.reference_steps,
                                              {int(n): f for n, f in args.schedule}, args.only_searched,
                                              args.floor_sets)
        print(json.dumps(result["digits-eps"], indent=1))
        if args.out:  # merge into an existing results file: other sections, other cells and notes are kept
            results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
            if "analytic" in result:
                results["analytic"] = result["analytic"]
            digits = results.get("digits-eps", {})
            cells = {**digits.get("cells", {}), **result["digits-eps"]["cells"]}
            results["digits-eps"] = {**digits, **result["digits-eps"], "cells": cells}
            if "notes" in digits:
                results["digits-eps"]["notes"] = digits["notes"]
            atomic_write(args.out, lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    elif args.what == "heldout-mse":
        heldout_mse(args.schedule)
    elif args.what == "afs":
        rows = afs_ablation(args.nfe, args.budget, args.repeats)
        if args.out:
            results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
            results["analytic-afs"] = rows
            atomic_write(args.out, lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    else:
        predictor(args.nfe, args.budget, args.repeats)


if __name__ == "__main__":
    main()
