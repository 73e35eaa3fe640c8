#!/usr/bin/env python
"""Divergence artifacts vs NFE at high CFG on ``digits-eps``: PLMS-4, DPM-Solver++ 2M, UniPC, HB and GHVB.

For each sampler and NFE, generates ``--num-per-class`` samples of each digit with per-sample seeds and
reports (Wizadwongsa et al. 2024, sec. 5 -- the pixel-space analogue of their latent "magnitude score"):

* ``saturated``: fraction of pixels of the final sample outside the data range, ``|x| > 1.05``;
* ``divergence``: ``|x|`` max-pooled 2x2, values below 1 (inside the data range) zeroed, averaged --
  how much and how widely samples blow past the data range;
* ``fd``: Frechet distance to the test digits in the shipped classifier's features, ``acc``: its accuracy.

    python scripts/bench_momentum.py --guidance-scale 10 --steps 6 8 10 15 20 --out bench_momentum.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script
from tqdm import tqdm

from fewstep import samplers
from fewstep._io import atomic_write
from fewstep.bench.digits_eval import classifier_features, per_sample_noise
from fewstep.bench.metrics import feature_statistics, frechet_distance
from fewstep.datasets import NUM_CLASSES, load_digits_images, to_unit_range
from fewstep.pipelines import load_default

SAMPLERS = {
    "PLMS-4": ("hb", {"solver_order": 4, "beta": 1.0}),
    "DPM-Solver++ 2M": ("dpm-solver++", {"solver_order": 2}),
    "UniPC-2": ("unipc", {"solver_order": 2}),
    "HB 3.8 (PLMS-4, beta 0.8)": ("hb", {"momentum_order": 3.8}),
    "HB 3.9 (PLMS-4, beta 0.9)": ("hb", {"momentum_order": 3.9}),
    "DPM-Solver++ 2M + HB 0.8": ("hb", {"base": "dpm-solver++", "solver_order": 2, "beta": 0.8}),
    "GHVB 3.8": ("ghvb", {"momentum_order": 3.8}),
    "GHVB 2.5": ("ghvb", {"momentum_order": 2.5}),
}


def divergence_scores(x: torch.Tensor) -> tuple[float, float]:
    """``(saturated, divergence)`` of raw final samples in model space (data range [-1, 1])."""
    mag = x.abs().amax(dim=1, keepdim=True)
    pooled = F.max_pool2d(mag, 2)
    divergence = torch.where(pooled < 1.0, torch.zeros_like(pooled), pooled).mean().item()
    saturated = (x.abs() > 1.05).float().mean().item()
    return saturated, divergence


@torch.no_grad()
def run_cell(pipe, base_config, classifier, test_stats, name, kwargs, steps: int, scale: float, per_class: int):
    pipe.scheduler = samplers.from_config(name, base_config, **kwargs)
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    cfg = pipe.unet.config
    noise = per_sample_noise((cfg.in_channels, cfg.sample_size, cfg.sample_size), list(range(len(labels))))
    start = time.perf_counter()
    # the raw final sample in model space (not clipped to the data range): what the divergence scores read
    raw = pipe(labels, num_inference_steps=steps, guidance_scale=scale, latents=noise, output_type="latent",
               check_finite=False).images.float()
    seconds = time.perf_counter() - start
    finite = torch.isfinite(raw).all(dim=(1, 2, 3))
    saturated, divergence = divergence_scores(torch.nan_to_num(raw, nan=1e3, posinf=1e3, neginf=-1e3))
    feats, logits = classifier_features(classifier, to_unit_range(torch.nan_to_num(raw)))
    acc = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    mu, cov = feature_statistics(feats.double())
    fd = frechet_distance(mu, cov, *test_stats)
    return {
        "steps": steps, "guidance_scale": scale, "saturated": saturated, "divergence": divergence, "fd": fd,
        "accuracy": acc, "nonfinite": int((~finite).sum()), "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[10.0], help="CFG scales (default 10)")
    parser.add_argument("--steps", type=count(1), nargs="+", default=[6, 8, 10, 15, 20],
                        help="NFEs (default 6 8 10 15 20)")
    parser.add_argument("--num-per-class", type=count(1), default=40, help="samples per digit class (default 40)")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS),
                        help="sampler cells to run (default all)")
    parser.add_argument("--out", type=output_file, default=None, help="write all rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = load_default("digits-eps")
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config  # the model's own config: options never leak from one cell to the next
    classifier = load_default("digits-classifier")
    test_images, _ = load_digits_images(pipe.unet.config.sample_size, "test")
    test_feats, _ = classifier_features(classifier, to_unit_range(test_images))
    test_stats = feature_statistics(test_feats.double())
    rows = []
    cells = [(s, n, g) for g in args.guidance_scale for s in args.samplers for n in args.steps]
    for label, steps, scale in tqdm(cells, desc="momentum bench"):
        name, kwargs = SAMPLERS[label]
        row = {"sampler": label, **run_cell(pipe, base_config, classifier, test_stats, name, kwargs, steps, scale,
                                            args.num_per_class)}
        rows.append(row)
        tqdm.write(json.dumps(row))
    print("| sampler | CFG | NFE | saturated | divergence | FD | acc |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sampler']} | {r['guidance_scale']:g} | {r['steps']} | {r['saturated']:.4f} | "
              f"{r['divergence']:.4f} | {r['fd']:.2f} | {r['accuracy']:.3f} |")
    if args.out:
        text = json.dumps(rows, indent=1) + "\n"  # atomic: a failed write keeps an existing file, leaves no partial one
        atomic_write(args.out, lambda p: p.write_text(text))


if __name__ == "__main__":
    main()
