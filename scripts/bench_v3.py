#!/usr/bin/env python
"""Measure DPM-Solver-v3 against DPM-Solver++ (2M, 3M) and UniPC: error versus NFE.

    python scripts/bench_v3.py --json scripts/results_v3.json            # analytic + digits-eps
    python scripts/bench_v3.py --analytic-only
    python scripts/bench_v3.py --skip-analytic --model digits-flow --scales 1 --json v3_flow.json

Analytic: the 2-D Gaussian mixture of ``fewstep bench --model analytic``; EMS estimated for it by the streamed
estimator (K = 8192 samples, 500 lambda intervals), RMSE to the exact PF-ODE endpoint from the same noise
(2000 points). digits-eps (or ``--model digits-flow``): the shipped EMS on its shipped time grid; for each
guidance scale, ``--samples`` held-out datapoints (seeds
10000+k, classes cycling 0-9) are sampled by every solver at every NFE; MSE (model space, [-1, 1]) against a
200-step DPM-Solver++ solve from the same noise (the metric v3 and DC-Solver report for Stable Diffusion), and
the Frechet distance of the samples to the real test digits in the digits-classifier's features.
v3 runs its defaults (order 2, pseudo-order corrector; order 3, the paper's choice for unconditional models, was
measured worse on both worlds here); the uniform-lambda grid on the mixture, the
time-quadratic grid on digits (measured best for v3 there); DPM-Solver++ and
UniPC run on their diffusers default grids (measured better than time-quadratic for them).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script

from fewstep import samplers
from fewstep._io import atomic_write
from fewstep.bench.analytic import AnalyticModel, default_mixture, exact_solution
from fewstep.bench.analytic_bench import SCHEDULE_CONFIGS
from fewstep.bench.digits_eval import classifier_features, per_sample_noise
from fewstep.bench.metrics import frechet_distance_features, rmse
from fewstep.datasets import load_digits_images, to_unit_range
from fewstep.pipelines import load_default
from fewstep.solvers.ems_estimate import _alpha_sigma_of_lambda, estimate_ems
from fewstep.solvers.schedules import VPSchedule

NFES = (5, 6, 8, 10, 15, 20)


def solvers(ems_file: str, time_grid: str) -> dict[str, dict]:
    return {
        "DPM-Solver++ 2M": {"name": "dpm-solver++"},
        "DPM-Solver++ 3M": {"name": "dpm-solver++", "solver_order": 3},
        "UniPC": {"name": "unipc"},
        "DPM-Solver-v3": {"name": "dpm-solver-v3", "ems_file": ems_file, "time_grid": time_grid},
        # the paper's advice for large guidance scales (its SD script: corrector only for CFG < 5)
        "DPM-Solver-v3, no corrector": {"name": "dpm-solver-v3", "ems_file": ems_file, "time_grid": time_grid,
                                        "use_corrector": False},
    }


def _make(spec: dict, config) -> samplers.FewstepScheduler:
    opts = {k: v for k, v in spec.items() if k != "name"}
    return samplers.from_config(spec["name"], config, **opts)


class _Start:
    def __init__(self, alpha: float, sigma: float):
        self.a, self.s = alpha, sigma

    def alpha_sigma(self, t):
        return self.a, self.s


def analytic(out: dict) -> None:
    cfg = SCHEDULE_CONFIGS["vp"]
    sched = VPSchedule.from_config(cfg)
    mixture = default_mixture(dim=2)

    def eps_fn(x, lam, dl):
        a, s = _alpha_sigma_of_lambda(sched, torch.tensor(lam, dtype=x.dtype) + dl)
        return mixture.eps_differentiable(x, a, s)

    start = time.perf_counter()
    data = mixture.sample(8192, generator=torch.Generator().manual_seed(1))
    ems = estimate_ems(eps_fn, data, sched, num_intervals=500, batch_size=8192, progress=False)
    path = "/tmp/fewstep_v3_analytic_ems.safetensors"
    from fewstep.solvers.ems import save_ems

    save_ems(path, ems)
    est_seconds = time.perf_counter() - start
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    refs: dict = {}
    rows = {}
    for label, spec in solvers(path, "uniform_lambda").items():
        rows[label] = {}
        for n in NFES:
            s = _make(spec, cfg)
            s.set_timesteps(n)
            model = AnalyticModel(mixture, s.noise_schedule, "epsilon")
            x = x_T
            for t in s.timesteps:
                x = s.step(model(x, t), t, x).prev_sample
            g = s.plan.grid
            key = (float(g.alphas[0]), float(g.sigmas[0]))
            if key not in refs:
                refs[key] = exact_solution(mixture, _Start(*key), x_T, 0.0, (1.0, 0.0))
            rows[label][n] = rmse(x, refs[key])
        print(f"analytic {label:16s} " + " ".join(f"{rows[label][n]:.4f}" for n in NFES))
    out["analytic"] = {"metric": "RMSE to the exact PF-ODE endpoint", "nfe": list(NFES), "rows": rows,
                       "ems_estimation_seconds": round(est_seconds, 1)}


@torch.no_grad()
def _sample(pipe, sched_factory, nfe: int, labels: list[int], noise: torch.Tensor, scale: float) -> torch.Tensor:
    from fewstep import guidance as guidance_rules

    pipe.scheduler = sched_factory()
    rule = guidance_rules.make("cfg", scale)
    return pipe(labels, num_inference_steps=nfe, guidance=rule, latents=noise, output_type="latent").images.float()


def digits(out: dict, num: int, scales: list[float], model: str = "digits-eps") -> None:
    """MSE to the 200-step solve and FD per (guidance scale, solver, NFE) on the embedded ``model``; progress
    printed per row."""
    from fewstep.samplers.dpm_solver_v3 import SHIPPED_EMS_TIME_GRID

    pipe = load_default(model, sampler=None)
    classifier = load_default("digits-classifier")
    config = pipe.scheduler.config
    size = pipe.unet.config.sample_size
    labels = [k % 10 for k in range(num)]
    noise = per_sample_noise((1, size, size), [10000 + k for k in range(num)])
    test_images, _ = load_digits_images(size, "test")
    test_feats, _ = classifier_features(classifier, to_unit_range(test_images))
    result = {}
    for scale in scales:
        ref = _sample(pipe, lambda: samplers.from_config("dpm-solver++", config), 200, labels, noise, scale)
        rows = {}
        for label, spec in solvers(model, SHIPPED_EMS_TIME_GRID[model]).items():
            rows[label] = {}
            for n in NFES:
                t0 = time.perf_counter()
                x = _sample(pipe, lambda spec=spec: _make(spec, config), n, labels, noise, scale)
                feats, _ = classifier_features(classifier, to_unit_range(x))
                rows[label][n] = {"mse": float((x - ref).pow(2).mean()),
                                  "fd": frechet_distance_features(feats, test_feats),
                                  "seconds": round(time.perf_counter() - t0, 2)}
            print(f"{model} CFG {scale:g} {label:16s} MSE " + " ".join(f"{rows[label][n]['mse']:.4f}" for n in NFES)
                  + " | FD " + " ".join(f"{rows[label][n]['fd']:.2f}" for n in NFES))
        result[f"cfg{scale:g}"] = rows
    out[model] = {"metric": "MSE to a 200-step DPM-Solver++ solve (same noise); FD (digits classifier)",
                  "samples": num, "nfe": list(NFES), "time_grid": SHIPPED_EMS_TIME_GRID[model], "rows": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=output_file, default=None, help="also write the results as JSON here")
    ap.add_argument("--analytic-only", action="store_true", help="run only the analytic 2-D mixture, skip digits")
    ap.add_argument("--skip-analytic", action="store_true", help="run only the digits model, skip the 2-D mixture")
    ap.add_argument("--model", choices=["digits-eps", "digits-flow"], default="digits-eps",
                    help="the embedded digits model (default digits-eps; both ship EMS)")
    ap.add_argument("--samples", type=count(2), default=200,
                    help="digits-eps held-out samples per guidance scale (default 200)")
    ap.add_argument("--scales", default="1,3,7", help="comma-separated digits-eps CFG scales (default 1,3,7)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out: dict = {}
    if args.analytic_only and args.skip_analytic:
        ap.error("--analytic-only and --skip-analytic leave nothing to run")
    if not args.skip_analytic:
        with torch.enable_grad():
            analytic(out)
    if not args.analytic_only:
        digits(out, args.samples, [float(v) for v in args.scales.split(",")], args.model)
    if args.json:
        text = json.dumps(out, indent=1) + "\n"  # atomic: a failed write keeps an existing file, leaves no partial one
        atomic_write(args.json, lambda p: p.write_text(text))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
