#!/usr/bin/env python
"""CFG vs CFG++ vs APG at high guidance on the embedded ``digits-eps`` model, and guided DDIM inversion.

    python scripts/bench_guidance.py                      # the README table (about 15 min on 1 CPU core)
    python scripts/bench_guidance.py --num-per-class 10 --steps 10 --inversion-images 50   # quick look

Part 1, sampling (``--sampler``, default UniPC, at each ``--steps``): class accuracy (``digits-classifier``),
Frechet distance in classifier features to the real test digits (``fd_floor``: real train vs test),
saturation of the final samples in model space (data in [-1, 1]): mean |x| and the share of pixels with
|x| > 1 (real digits: 0 by construction). Part 2, inversion: real test digits are inverted with guided
DDIM (CFG or CFG++, the true label as condition) and regenerated with DDIM and the same rule; RMSE to the
originals in [-1, 1] units. Each sample's noise comes from its own seed (batch-size independent).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script

from fewstep import guidance, samplers
from fewstep._io import atomic_write
from fewstep.bench.digits_eval import evaluate_digits
from fewstep.datasets import load_digits_images
from fewstep.pipelines import load_default

#: (label, rule factory): CFG 8 is the high-scale baseline; CFG++ and APG settings were picked to keep
#: CFG 8's class accuracy (>= 99%) at 10 NFE (see README).
SAMPLING = [
    ("CFG w=3", lambda: guidance.CFG(3.0)),
    ("CFG w=8", lambda: guidance.CFG(8.0)),
    ("CFG++ lam=1.0", lambda: guidance.CFGPlusPlus(1.0)),
    ("APG w=8 eta=0 r=1 beta=-0.5", lambda: guidance.APG(8.0, eta=0.0, norm_threshold=1.0, momentum=-0.5)),
    ("APG w=8 eta=0 r=1 beta=0", lambda: guidance.APG(8.0, eta=0.0, norm_threshold=1.0, momentum=0.0)),
]
INVERSION = [
    ("CFG w=1 (conditional)", lambda sch: guidance.CFG(1.0)),
    ("CFG w=3", lambda sch: guidance.CFG(3.0)),
    ("CFG w=8", lambda sch: guidance.CFG(8.0)),
    ("CFG++ lam=0.5", lambda sch: guidance.CFGPlusPlus(0.5)),
    ("CFG w_i = CFG++ lam=0.5 schedule", lambda sch: guidance.CFG(_cfgpp_scales(0.5, sch))),
    ("CFG++ lam=1.0", lambda sch: guidance.CFGPlusPlus(1.0)),
    ("CFG w_i = CFG++ lam=1.0 schedule", lambda sch: guidance.CFG(_cfgpp_scales(1.0, sch))),
]


def _cfgpp_scales(lam: float, scheduler) -> list[float]:
    """The per-step CFG scales that make DDIM *sampling* identical to CFG++ (so only the inversion differs)."""
    return guidance.cfgpp_equivalent_scales(lam, guidance.scheduler_rhos(scheduler))


def run_sampling(args, classifier) -> list[dict]:
    pipe = load_default("digits-eps", sampler=args.sampler)
    rows = []
    for steps in args.steps:
        for label, make in SAMPLING:
            start = time.perf_counter()
            q = evaluate_digits(
                pipe, classifier, args.num_per_class, steps, guidance_scale=None, guidance=make(), seed=args.seed,
                progress=False,
            )  # fmt: skip
            row = {"rule": label, "sampler": args.sampler, **q.as_dict(), "seconds": time.perf_counter() - start}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def run_inversion(args) -> list[dict]:
    pipe = load_default("digits-eps", sampler="ddim")
    images, labels = load_digits_images(pipe.unet.config.sample_size, "test")
    images, labels = images[: args.inversion_images], labels[: args.inversion_images]
    null = torch.full_like(labels, pipe.null_class)

    def model_fn(x, t):
        t_batch = torch.as_tensor(t).reshape(1).expand(2 * x.shape[0])
        out = pipe.unet(torch.cat([x, x]), t_batch, class_labels=torch.cat([labels, null])).sample
        return out.chunk(2)

    rows = []
    for steps in args.steps:
        for label, make in INVERSION:
            pipe.scheduler.set_timesteps(steps)
            rule = make(pipe.scheduler)
            latent = guidance.ddim_invert(model_fn, images, pipe.scheduler, rule)
            back = pipe(labels.tolist(), steps, guidance=rule, latents=latent, output_type="latent").images
            rmse = (back - images).pow(2).mean().sqrt().item()
            row = {"rule": label, "steps": steps, "num_images": len(labels), "rmse": rmse}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(sampling: list[dict], inversion: list[dict], real: dict) -> str:
    lines = [
        "| rule | steps | class accuracy | FD | mean abs(x) | share abs(x) > 1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sampling:
        lines.append(
            f"| {r['rule']} | {r['nfe']} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | {r['mean_abs']:.3f} "
            f"| {100 * r['clipped']:.1f}% |"
        )
    floor = f"{real['fd_floor']:.2f} (floor)" if real["fd_floor"] is not None else ""
    lines.append(f"| real test digits | | | {floor} | {real['mean_abs']:.3f} | 0% |")
    lines += ["", "| inversion + regeneration (DDIM) | steps | RMSE |", "| --- | --- | --- |"]
    for r in inversion:
        lines.append(f"| {r['rule']} | {r['steps']} | {r['rmse']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampler", default="unipc", choices=samplers.names(),
                        help="sampler of the sampling part (default unipc)")
    parser.add_argument("--steps", type=count(1), nargs="+", default=[10, 20],
                        help="NFEs of both parts (default 10 20)")
    parser.add_argument("--num-per-class", type=count(2), default=100,
                        help="sampling part: samples per digit class (default 100)")
    parser.add_argument("--inversion-images", type=count(1), default=200,
                        help="inversion part: test digits inverted and regenerated (default 200)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling part: noise seed of the first sample, sample k uses seed + k (default 0)")
    parser.add_argument("--threads", type=count(1), default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=output_file, default=None, help="also write all rows as JSON here")
    parser.add_argument("--only", choices=["sampling", "inversion"], default=None, help="run one part only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier = load_default("digits-classifier")
    sampling = run_sampling(args, classifier) if args.only != "inversion" else []
    inversion = run_inversion(args) if args.only != "sampling" else []
    test_images, _ = load_digits_images(16, "test")
    real = {"mean_abs": test_images.abs().mean().item(), "fd_floor": sampling[0]["fd_floor"] if sampling else None}
    table = markdown(sampling, inversion, real)
    print(table)
    if args.json:
        payload = {"sampling": sampling, "inversion": inversion, "real": real, "table": table}
        atomic_write(args.json, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))


if __name__ == "__main__":
    main()
