#!/usr/bin/env python
"""Restoration quality versus NFE on ``digits-mr``: MRS (ODE/SDE, orders 1-3) vs Euler-Maruyama and
IR-SDE's posterior sampling (DDPM's ancestral step in z) at 100 NFE.

Held-out test digits with a 6x6 box erased (seeded) are restored; reported: PSNR and SSIM against the
clean digit (scikit-image conventions, images in [0, 1]) and the shipped classifier's accuracy on the
restorations. Same measurement and same initial noise for every sampler.

    python scripts/bench_mrs.py --num-images 300 --out bench_mrs.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script
from diffusers import DDPMScheduler
from tqdm import tqdm

from fewstep._io import atomic_write
from fewstep.bench.digits_eval import classifier_features
from fewstep.bench.image_metrics import psnr, ssim
from fewstep.datasets import load_digits_images, to_unit_range
from fewstep.pipelines import box_inpainting, load_default
from fewstep.pipelines.swap import swap_sampler

# label -> (sampler, options, NFEs)
CELLS = {
    "MRS ODE-1 (data)": ("mrs", {"solver_order": 1}, (5, 10, 20)),
    "MRS ODE-2 (data)": ("mrs", {"solver_order": 2}, (5, 10, 20)),
    "MRS ODE-3 (data)": ("mrs", {"solver_order": 3}, (5, 10, 20)),
    "MRS ODE-2 (noise)": ("mrs", {"solver_order": 2, "algorithm_type": "noise"}, (5, 10, 20)),
    "MRS SDE-1 (data)": ("mrs", {"solver": "sde", "solver_order": 1}, (5, 10, 20)),
    "MRS SDE-2 (data)": ("mrs", {"solver": "sde", "solver_order": 2}, (5, 10, 20)),
    "MRS SDE-2 (noise)": ("mrs", {"solver": "sde", "solver_order": 2, "algorithm_type": "noise"}, (5, 10, 20)),
    "Euler-Maruyama": ("mrs", {"solver": "euler-maruyama", "solver_order": 1}, (10, 20, 100)),
    "IR-SDE posterior (DDPM)": ("ddpm", {}, (100,)),
    # the ordinary VP solvers run on the MR process through its VP form z = (x - mu) / lambda (MODELS.md's table)
    "DDIM": ("ddim", {}, (5, 10, 20, 50)),
    "DPM-Solver++ 2M": ("dpm-solver++", {}, (5, 10, 20, 50)),
    "UniPC-2": ("unipc", {}, (5, 10, 20, 50)),
}
#: what runs without --cells (the MRS study of the README)
DEFAULT_CELLS = [label for label, (name, _, _) in CELLS.items() if name in ("mrs", "ddpm")]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=count(1), default=300, help="held-out digits restored (default 300)")
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, choices=list(CELLS),
                        help="which samplers (default: the MRS study; DDIM, DPM-Solver++ 2M, UniPC-2: MODELS.md)")
    parser.add_argument("--seed", type=count(0), default=0, help="seed of the erased boxes and the noise")
    parser.add_argument("--out", type=output_file, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    pipe = load_default("digits-mr", sampler=None)
    model_config = pipe.scheduler.config
    classifier = load_default("digits-classifier")
    clean, labels = load_digits_images(pipe.unet.config.sample_size, "test")
    clean, labels = clean[: args.num_images], torch.as_tensor(labels[: args.num_images])
    mu = box_inpainting(clean, generator=torch.Generator().manual_seed(args.seed))
    target = to_unit_range(clean).double()
    _, logits = classifier_features(classifier, to_unit_range(mu))
    rows = [{
        "sampler": "degraded input", "nfe": 0, "psnr": psnr(to_unit_range(mu).double(), target).mean().item(),
        "ssim": ssim(to_unit_range(mu).double(), target).mean().item(),
        "accuracy": (logits.argmax(1) == labels).float().mean().item(), "seconds": 0.0,
    }]
    jobs = [(label, nfe) for label in args.cells for nfe in CELLS[label][2]]
    for label, nfe in tqdm(jobs, desc="mrs bench"):
        name, options, _ = CELLS[label]
        pipe.scheduler = DDPMScheduler.from_config(model_config)  # the model's own: no options leak between cells
        if name != "ddpm":
            swap_sampler(pipe, name, **options)
        start = time.perf_counter()
        out = pipe(mu, num_inference_steps=nfe, generator=torch.Generator().manual_seed(args.seed + 1),
                   output_type="pt").images.double()
        seconds = time.perf_counter() - start
        _, logits = classifier_features(classifier, out.float())
        row = {"sampler": label, "nfe": nfe, "psnr": psnr(out, target).mean().item(),
               "ssim": ssim(out, target).mean().item(),
               "accuracy": (logits.argmax(1) == labels).float().mean().item(), "seconds": seconds}
        rows.append(row)
        tqdm.write(json.dumps(row))
    print("| sampler | NFE | PSNR (dB) | SSIM | accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sampler']} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {100 * r['accuracy']:.1f}% |")
    if args.out:
        text = json.dumps(rows, indent=1) + "\n"  # atomic: a failed write keeps an existing file, leaves no partial one
        atomic_write(args.out, lambda p: p.write_text(text))


if __name__ == "__main__":
    main()
