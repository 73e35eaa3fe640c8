#!/usr/bin/env python
"""Inverse problems on ``digits-eps``: DPS (first-order Tweedie, gradient through the denoiser) against STSL
(second-order surrogate with a Hutchinson trace term, noised ``A^+ y`` start) at several NFE.

Held-out test digits (``load_digits_images(16, "test")``, the first ``--num-images``), measured by each task's
operator with Gaussian noise (``--noise-std``, seeded), unconditional model (null class), the same seed for
every method. Tasks: centred 6x6 box inpainting, 2x average-pool super-resolution, 5x5 Gaussian deblurring
(std 1). Metrics: PSNR and SSIM against the clean digit (whole 16x16 image in [0, 1]) and the accuracy of the
shipped ``digits-classifier`` on the restored digits.

Cost accounting, the same for every method: ``nfe`` counts every denoiser forward evaluation on the batch
(STSL's probe evaluations included, a batched call of P probes counts P); ``grad_evals`` counts those that were
backpropagated (DPS: all of them; STSL: all of them with ``reuse_eval``, the default); ``seconds`` is wall time
of the sampling loop (a shared machine: +-30%).

Settings were picked on a separate validation slice (test digits 200-231, same tasks, noise and seed), never on
the evaluation digits 0..N-1: DPS's zeta per task and step count from 0.5-6 (the best PSNR; README lists the grids);
STSL's zeta (from {1, 1.5, 2, 3, 4}), steps, strength and eta (trace weight "tweedie", eta in {0.2, 1, 3, 10}; the
trace term off below sigma 0.8 or 0.9). Ablations: ``STSL eta=0`` (same loop and steps, no trace term and no
probes: what the second-order term adds; ``(equal NFE)``: with as many steps as STSL's NFE and its own tuned zeta,
from {1, 1.5, 2, 3}), ``DPS+init`` (DPS started like STSL: what the initialisation adds) and ``STSL (before)``,
the previous configuration (5 x 2 inner steps, paper's constant trace weight eta 0.2, a fresh evaluation before
each DDIM step).

    python scripts/bench_inverse.py --num-images 64 --json scripts/results_inverse.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script

from fewstep._io import atomic_write
from fewstep.guidance import DPS, STSL
from fewstep.pipelines import load_default
from fewstep.pipelines.posterior import held_out_digits, run_inverse_task, score_restorations

TASKS = ("inpaint", "sr", "deblur")

#: DPS zeta per (task, steps), picked on the validation slice
DPS_RUNS = {
    "inpaint": {12: 2.0, 25: 2.0, 50: 1.0, 100: 1.0},
    "sr": {12: 4.0, 25: 3.0, 50: 2.0, 100: 1.0},
    "deblur": {12: 2.0, 25: 2.0, 50: 2.0, 100: 1.5},
}
#: STSL settings per task: (steps, zeta, strength, trace_sigma_min), K = 1, one probe, picked on the validation slice
STSL_RUNS = {
    "inpaint": [(10, 2.0, 0.5, 0.9), (16, 1.5, 0.5, 0.8), (36, 1.0, 0.5, 0.8)],
    "sr": [(10, 3.0, 0.5, 0.9), (16, 3.0, 0.5, 0.8), (36, 1.5, 0.5, 0.8)],
    "deblur": [(10, 2.0, 0.5, 0.9), (16, 2.0, 0.5, 0.8), (36, 2.0, 0.5, 0.8)],
}
STSL_COMMON = {"inner_steps": 1, "eta": 3.0, "trace_weight": "tweedie"}
#: zeta of the eta=0 ablation at STSL's NFE (as many steps), tuned on the validation slice like the others
ETA0_ZETA = {"inpaint": {12: 1.5, 22: 1.5, 50: 1.0}, "sr": {12: 3.0, 22: 1.5, 50: 1.0},
             "deblur": {12: 2.0, 22: 2.0, 50: 1.5}}
#: the previous configuration: (steps, K, zeta, strength), eta 0.2 constant, fresh DDIM evaluation
STSL_BEFORE = {"inpaint": (5, 2, 2.0, 0.5), "sr": (5, 2, 3.0, 0.5), "deblur": (5, 2, 3.0, 0.5)}
#: ablation: DPS started like STSL (noised A^+ y at strength 0.5), 25 steps, zeta 2
DPS_INIT = (25, 2.0, 0.5)


def backprojection_row(task: str, n: int, noise_std: float, seed: int, classifier, offset: int = 0) -> dict:
    from fewstep.guidance.operators import make_operator

    truth, labels = held_out_digits(n, offset=offset)
    op = make_operator(task, 16, noise_std=noise_std)
    y = op.measure(truth, torch.Generator().manual_seed(seed + 1))
    guess = op.backproject(y).clamp(-1, 1)
    return {"task": task, "method": "A+y", "steps": 0, "nfe": 0, "grad_evals": 0, "seconds": 0.0,
            **score_restorations(guess, truth, labels, classifier)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=count(1), default=64, help="test digits per task (default 64)")
    parser.add_argument("--noise-std", type=float, default=0.05,
                        help="std of the Gaussian measurement noise, images in [-1, 1] (default 0.05)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling; the measurement noise uses seed + 1 (default 0)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="comma-separated tasks to run (default inpaint,sr,deblur)")
    parser.add_argument("--offset", type=int, default=0, help="first test digit (validation slice: 200)")
    parser.add_argument("--json", type=output_file, default=None, help="write the results here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_default("digits-eps")
    classifier = load_default("digits-classifier")
    rows = []
    start_all = time.perf_counter()

    def record(task, name, method, steps):
        r = run_inverse_task(pipe, task, method, num_images=args.num_images, steps=steps, seed=args.seed,
                             noise_std=args.noise_std, classifier=classifier, offset=args.offset)
        row = {"task": task, "method": name, "steps": steps, "nfe": r.nfe, "grad_evals": r.grad_evals,
               "seconds": round(r.seconds, 2), **{k: round(v, 4) for k, v in r.metrics.items()}, "options": r.method}
        rows.append(row)
        print(f"{task:8s} {name:12s} steps {steps:3d} NFE {r.nfe:4d}  PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}"
              f"  acc {row['accuracy']:.3f}  {r.seconds:6.1f} s", flush=True)
        return r.nfe

    for task in args.tasks.split(","):
        rows.append(backprojection_row(task, args.num_images, args.noise_std, args.seed, classifier, args.offset))
        for steps, zeta in DPS_RUNS[task].items():
            record(task, "DPS", DPS(step_size=zeta), steps)
        steps, zeta, strength = DPS_INIT
        record(task, "DPS+init", DPS(step_size=zeta, init="adjoint", strength=strength), steps)
        steps, k, zeta, strength = STSL_BEFORE[task]
        record(task, "STSL (before)", STSL(step_size=zeta, inner_steps=k, strength=strength, eta=0.2,
                                           reuse_eval=False), steps)
        for steps, zeta, strength, sigma_min in STSL_RUNS[task]:
            options = {**STSL_COMMON, "step_size": zeta, "strength": strength}
            nfe = record(task, "STSL", STSL(**options, trace_sigma_min=sigma_min), steps)
            record(task, "STSL eta=0", STSL(**{**options, "eta": 0.0}), steps)
            zeta0 = ETA0_ZETA[task].get(nfe, zeta)
            record(task, "STSL eta=0 (equal NFE)", STSL(**{**options, "eta": 0.0, "step_size": zeta0}), nfe)
    comparison = []
    for task in args.tasks.split(","):
        dps = [r for r in rows if r["task"] == task and r["method"] == "DPS"]
        stsl = [r for r in rows if r["task"] == task and r["method"] == "STSL"]
        for d in dps:
            match = [s for s in stsl if s["psnr"] >= d["psnr"] and s["ssim"] >= d["ssim"] - 0.005]
            best = min(match, key=lambda s: s["nfe"]) if match else None
            comparison.append({"task": task, "dps_nfe": d["nfe"], "dps_psnr": d["psnr"], "dps_ssim": d["ssim"],
                               "dps_seconds": d["seconds"],
                               "stsl_min_nfe_to_match": best["nfe"] if best else None,
                               "stsl_seconds": best["seconds"] if best else None,
                               "nfe_ratio": round(d["nfe"] / best["nfe"], 2) if best else None})
    payload = {"num_images": args.num_images, "offset": args.offset, "noise_std": args.noise_std, "seed": args.seed,
               "seconds": round(time.perf_counter() - start_all, 1), "rows": rows, "comparison": comparison}
    print(json.dumps(comparison, indent=1))
    if args.json:
        atomic_write(args.json, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
