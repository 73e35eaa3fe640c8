#!/usr/bin/env python
"""Measure DC-Solver against UniPC and DPM-Solver++ on digits-eps (MSE to a many-step reference, FD) and on
the exact analytic reference.

    python scripts/bench_dc.py --json dc_bench.json                 # digits-eps, shipped ratios and CPR
    python scripts/bench_dc.py --analytic-only

digits-eps: for each guidance scale, ``--samples`` held-out datapoints (seeds 10000+k, classes cycling 0-9)
are sampled by every solver at every NFE. MSE is the mean squared error (model space, [-1, 1]) of the first
``--mse-samples`` against a ``--reference`` many-step solve from the same noise; FD is the Frechet distance
of all samples to the real test digits in the digits-classifier's features. DC uses the shipped searched
ratios (``DC``) and the shipped CPR fit (``DC-CPR``); at the held-out ``--heldout NFE:CFG`` (not in the CPR
fit) it also searches ratios there for comparison. Analytic: Gaussian mixtures (4-D with the digits grid, and
the 2-D setting of ``fewstep bench --model analytic``), ratios searched on 10 points against the exact PF-ODE
solution, MSE/RMSE on 2000 other points.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script
from diffusers import DDPMScheduler

from fewstep import samplers
from fewstep._io import atomic_write
from fewstep.bench.analytic import AnalyticModel, default_mixture, exact_solution
from fewstep.bench.analytic_bench import SCHEDULE_CONFIGS
from fewstep.bench.digits_eval import classifier_features
from fewstep.bench.metrics import frechet_distance_features
from fewstep.calibrate.dc import (
    calibrate_class_conditional,
    class_conditional_model_fn,
    exact_reference_states,
    reference_states,
    search_ratios,
)
from fewstep.datasets import load_digits_images, to_unit_range
from fewstep.pipelines import load_default
from fewstep.solvers import grids


def _scheduler(name: str, config, nfe: int, guidance: float, ratios=None, cpr: bool = False):
    if name == "dc":
        extra = {"dc_ratios": ratios} if ratios is not None else {"dc_ratios_file": "digits-eps"}
        sched = samplers.get("dc-solver").from_config(
            config, dc_model="digits-eps", dc_guidance_scale=guidance, **extra
        )
    elif name == "dc-cpr":
        sched = samplers.get("dc-solver").from_config(
            config, dc_model="digits-eps", dc_guidance_scale=guidance, dc_cpr="digits-eps"
        )
    else:
        sched = samplers.get(name).from_config(config)
    sched.set_timesteps(nfe)
    return sched


@torch.no_grad()
def _sample(sched, model_fn, x):
    for t in sched.timesteps:
        x = sched.step(model_fn(x, float(t)), t, x).prev_sample
    return x


def bench_digits(args) -> list[dict]:
    torch.manual_seed(0)
    pipe = load_default("digits-eps", sampler=None)
    unet = pipe.unet
    config = pipe.scheduler.config
    classifier = load_default("digits-classifier")
    test_images, _ = load_digits_images(unet.config.sample_size, "test")
    test_feats, _ = classifier_features(classifier, to_unit_range(test_images))
    n = args.samples
    labels = torch.tensor([k % 10 for k in range(n)])
    noise = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(10_000 + k)) for k in range(n)])
    rows = []
    cells = [(nfe, g) for g in args.guidance_scale for nfe in args.nfe]
    held_nfe, held_g = (float(v) for v in args.heldout.split(":"))
    cells.append((int(held_nfe), held_g))
    refs: dict[float, torch.Tensor] = {}
    for nfe, g in cells:
        model_fn = class_conditional_model_fn(unet, labels, g, 10)
        if g not in refs:
            t0 = time.time()
            sched1 = samplers.get("unipc").from_config(config)
            one = grids.spacing_grid(sched1.noise_schedule, 1, "trailing")  # t = 999 -> clean, refined below
            m = args.mse_samples
            fn_m = class_conditional_model_fn(unet, labels[:m], g, 10)
            refs[g] = reference_states(fn_m, "epsilon", sched1.noise_schedule, one, noise[:m], args.reference)[-1]
            print(f"reference {args.reference} at CFG {g:g}: {time.time() - t0:.0f} s", flush=True)
        heldout = (nfe, g) == (int(held_nfe), held_g)
        names = ["unipc", "dpm-solver++", "dc", "dc-cpr"]
        searched = None
        if heldout:
            entries, _ = calibrate_class_conditional(pipe, [nfe], [g], progress=False)
            searched = entries[0].ratios
        for name in names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched = _scheduler(name, config, nfe, g, ratios=searched if name == "dc" else None)
            x = _sample(sched, model_fn, noise.clone())
            mse = ((x[: args.mse_samples] - refs[g]) ** 2).mean().item()
            feats, _ = classifier_features(classifier, to_unit_range(x))
            fd = frechet_distance_features(feats, test_feats)
            ratios = getattr(sched, "dc_ratios_used", None)
            row = {
                "nfe": nfe,
                "cfg": g,
                "sampler": name,
                "mse": mse,
                "fd": fd,
                "heldout": heldout,
                "ratios": [round(r, 4) for r in ratios] if ratios else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def converged_fd(args) -> list[dict]:
    """FD (and MSE to the reference) of UniPC at ``--converged-nfe`` steps: where FD lands near the ODE solution."""
    pipe = load_default("digits-eps", sampler=None)
    classifier = load_default("digits-classifier")
    test_images, _ = load_digits_images(pipe.unet.config.sample_size, "test")
    test_feats, _ = classifier_features(classifier, to_unit_range(test_images))
    n = args.samples
    labels = torch.tensor([k % 10 for k in range(n)])
    noise = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(10_000 + k)) for k in range(n)])
    rows = []
    for g in args.guidance_scale:
        model_fn = class_conditional_model_fn(pipe.unet, labels, g, 10)
        sched = _scheduler("unipc", pipe.scheduler.config, args.converged_nfe, g)
        x = _sample(sched, model_fn, noise.clone())
        feats, _ = classifier_features(classifier, to_unit_range(x))
        row = {
            "nfe": args.converged_nfe,
            "cfg": g,
            "sampler": "unipc",
            "fd": frechet_distance_features(feats, test_feats),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_plugin(args) -> list[dict]:
    """Predictor-only DC on DDIM and DPM-Solver++ (ratios searched here, 10 datapoints): MSE vs the base."""
    pipe = load_default("digits-eps", sampler=None)
    config = pipe.scheduler.config
    m = args.mse_samples
    labels = torch.tensor([k % 10 for k in range(m)])
    noise = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(10_000 + k)) for k in range(m)])
    rows = []
    for g in args.guidance_scale:
        model_fn = class_conditional_model_fn(pipe.unet, labels, g, 10)
        sched1 = samplers.get("unipc").from_config(config)
        one = grids.spacing_grid(sched1.noise_schedule, 1, "trailing")
        ref = reference_states(model_fn, "epsilon", sched1.noise_schedule, one, noise, args.reference)[-1]
        for base in ("dpm-solver++", "ddim"):
            for nfe in (5, 10):
                entries, _ = calibrate_class_conditional(
                    pipe, [nfe], [g], scheduler_overrides={"dc_base": base}, progress=False
                )
                row = {"cfg": g, "nfe": nfe, "base": base, "ratios": [round(r, 4) for r in entries[0].ratios]}
                for label, ratios in (("mse_base", [1.0] * nfe), ("mse_dc", entries[0].ratios)):
                    sched = samplers.get("dc-solver").from_config(config, dc_base=base, dc_ratios=ratios)
                    sched.set_timesteps(nfe)
                    row[label] = ((_sample(sched, model_fn, noise.clone()) - ref) ** 2).mean().item()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench_analytic(nfes, dim: int, config: dict, train_seed: int, test_seed: int, n_test: int = 2000) -> list[dict]:
    """Ratios searched on 10 points against the exact solution; MSE/RMSE on ``n_test`` other points."""
    mixture = default_mixture(dim=dim, seed=0)
    x_train = torch.randn(10, dim, generator=torch.Generator().manual_seed(train_seed), dtype=torch.float64)
    x_test = torch.randn(n_test, dim, generator=torch.Generator().manual_seed(test_seed), dtype=torch.float64)
    rows = []
    for nfe in nfes:
        probe = samplers.get("dc-solver").from_config(config, dc_ratios=[1.0] * nfe)
        probe.set_timesteps(nfe)
        schedule, grid = probe.noise_schedule, probe.plan.grid
        model = AnalyticModel(mixture, schedule)
        exact = exact_solution(mixture, schedule, x_test, float(grid.timesteps[0]))
        targets = exact_reference_states(mixture, schedule, grid, x_train)
        fn = lambda x, t, m=model: m(x, t)  # noqa: E731
        result = search_ratios(probe.plan, fn, "epsilon", x_train, targets, progress=False)
        for name in ("unipc", "dpm-solver++", "dc"):
            if name == "dc":
                sched = samplers.get("dc-solver").from_config(config, dc_ratios=result.ratios)
            else:
                sched = samplers.get(name).from_config(config)
            sched.set_timesteps(nfe)
            x = x_test.clone()
            for t in sched.timesteps:
                x = sched.step(model(x, t), t, x).prev_sample
            mse = ((x - exact) ** 2).mean().item()
            row = {
                "dim": dim,
                "nfe": nfe,
                "sampler": name,
                "mse": mse,
                "rmse": mse**0.5,
                "ratios": [round(r, 4) for r in result.ratios] if name == "dc" else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(result: dict) -> str:
    """README tables from a result dict (``--from-json`` re-prints them)."""
    out = []
    digits = result.get("digits", [])
    if digits:
        out.append(
            "| CFG | NFE | MSE UniPC | MSE DPM++ | MSE DC (searched) | MSE DC (CPR) | DC vs UniPC "
            "| FD UniPC | FD DPM++ | FD DC | FD DC-CPR |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        cells = sorted({(r["cfg"], r["nfe"], r["heldout"]) for r in digits}, key=lambda c: (c[2], c[0], c[1]))
        for g, n, held in cells:
            by = {r["sampler"]: r for r in digits if (r["cfg"], r["nfe"], r["heldout"]) == (g, n, held)}
            gain = 100 * (by["dc"]["mse"] / by["unipc"]["mse"] - 1)
            tag = " (held out)" if held else ""
            out.append(
                f"| {g:g}{tag} | {n} | {by['unipc']['mse']:.5f} | {by['dpm-solver++']['mse']:.5f} "
                f"| {by['dc']['mse']:.5f} | {by['dc-cpr']['mse']:.5f} | {gain:+.0f}% | {by['unipc']['fd']:.2f} "
                f"| {by['dpm-solver++']['fd']:.2f} | {by['dc']['fd']:.2f} | {by['dc-cpr']['fd']:.2f} |"
            )
    conv = result.get("converged", [])
    if conv:
        out.append("")
        out.append(
            "UniPC at NFE "
            + str(conv[0]["nfe"])
            + ": FD "
            + ", ".join(f"{r['fd']:.2f} (CFG {r['cfg']:g})" for r in conv)
        )
    plugin = result.get("plugin", [])
    if plugin:
        out.append("")
        out.append("| base | CFG | NFE | MSE base | MSE base + DC | change |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        for r in plugin:
            out.append(
                f"| {r['base']} | {r['cfg']:g} | {r['nfe']} | {r['mse_base']:.5f} | {r['mse_dc']:.5f} "
                f"| {100 * (r['mse_dc'] / r['mse_base'] - 1):+.0f}% |"
            )
    for key in ("analytic", "analytic_readme"):
        rows = result.get(key, [])
        if rows:
            out.append("")
            out.append(f"{key}: | NFE | MSE UniPC | MSE DPM++ | MSE DC | DC vs UniPC |")
            for n in sorted({r["nfe"] for r in rows}):
                by = {r["sampler"]: r for r in rows if r["nfe"] == n}
                gain = 100 * (by["dc"]["mse"] / by["unipc"]["mse"] - 1)
                out.append(
                    f"| {n} | {by['unipc']['mse']:.5f} | {by['dpm-solver++']['mse']:.5f} "
                    f"| {by['dc']['mse']:.5f} | {gain:+.0f}% |"
                )
    return "\n".join(out)


def _nfe_cfg(text: str) -> str:
    """argparse type: ``NFE:CFG`` (an integer NFE >= 2 and a number), checked before any work."""
    try:
        nfe, cfg = text.split(":")
        ok = int(nfe) >= 2 and float(cfg) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected NFE:CFG like 7:5 (NFE >= 2, CFG >= 0), got {text!r}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nfe", type=count(2), nargs="+", default=[5, 6, 8, 10],
                        help="NFEs of the digits-eps cells and the 4-D analytic mixture (default 5 6 8 10)")
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[1.0, 3.0, 7.0],
                        help="CFG scales of the digits-eps, converged and plug-in parts (default 1 3 7)")
    parser.add_argument("--heldout", type=_nfe_cfg, default="7:5",
                        help="NFE:CFG outside the CPR fit (searched here for comparison)")
    parser.add_argument("--samples", type=count(2), default=200, help="samples per cell (FD)")
    parser.add_argument("--mse-samples", type=count(1), default=60,
                        help="of which compared with the reference (MSE); the plug-in part samples this many")
    parser.add_argument("--reference", default="ddim:200",
                        help="many-step reference solve METHOD:STEPS for the MSE (default ddim:200)")
    parser.add_argument("--analytic-only", action="store_true", help="only the analytic mixtures, skip digits-eps")
    parser.add_argument("--converged-nfe", type=count(1), default=25,
                        help="FD of UniPC at this NFE (near-converged)")
    parser.add_argument("--converged-only", action="store_true", help="only the near-converged UniPC FD")
    parser.add_argument("--plugin-only", action="store_true", help="only the predictor-only DDIM/DPM++ plug-in")
    parser.add_argument("--json", type=output_file, default=None, help="also write the results as JSON here")
    parser.add_argument("--from-json", nargs="+", default=None, help="only print the tables of earlier runs")
    args = parser.parse_args()
    if args.from_json:
        merged: dict = {}
        for path in args.from_json:
            with open(path) as f:
                merged.update({k: v for k, v in json.load(f).items() if k != "args"})
        print(markdown(merged))
        return
    digits_part = not (args.analytic_only or args.converged_only or args.plugin_only)
    if digits_part and args.mse_samples > args.samples:
        parser.error(f"argument --mse-samples: {args.mse_samples} exceeds --samples {args.samples} (the MSE is taken "
                     "over the first --mse-samples of the samples)")
    torch.set_num_threads(1)
    if args.converged_only or args.plugin_only:
        result = {"converged": converged_fd(args)} if args.converged_only else {"plugin": bench_plugin(args)}
        print(markdown(result))
        if args.json:
            write_json(args.json, {"args": vars(args), **result})
        return
    trailing = dict(DDPMScheduler(timestep_spacing="trailing").config)
    result = {
        # issue table: digits-eps-like grid (trailing), 4-D mixture
        "analytic": bench_analytic(args.nfe, 4, trailing, train_seed=0, test_seed=1),
        # README methods table setting: `fewstep bench --model analytic` (2-D, 2000 samples, default config)
        "analytic_readme": bench_analytic([5, 10, 20], 2, SCHEDULE_CONFIGS["vp"], train_seed=100, test_seed=0),
    }
    if not args.analytic_only:
        result["digits"] = bench_digits(args)
        result["converged"] = converged_fd(args)
        result["plugin"] = bench_plugin(args)
    print(markdown(result))
    if args.json:
        write_json(args.json, {"args": vars(args), **result})


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON atomically: serialised in full first, then renamed onto ``path`` (an error,
    e.g. a value JSON cannot hold, leaves an earlier file intact instead of truncated)."""
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write(path, lambda p: p.write_text(text))


if __name__ == "__main__":
    main()
