#!/usr/bin/env python
"""FlowChef on ``digits-flow``: inverse problems (box inpainting, 2x super-resolution, Gaussian deblurring) and
classifier guidance, against an unsteered sampler and a DPS-style baseline (gradient through the model).

Inverse problems: held-out test digits (``load_digits_images(16, "test")``), seeded measurement (optional noise),
the same initial noise for every method, unconditional model (null class), flow-euler at ``--steps`` NFE.
Reported: PSNR / SSIM against the clean digit (images in [0, 1], whole image), wall time per image (one batch of
``--num-images``, one CPU thread) and the autograd memory per image: the bytes of tensors saved for backward in
one gradient evaluation (peak over the run; for FlowChef only the cost's graph, for DPS the model's activations),
counted with ``torch.autograd.graph.saved_tensors_hooks`` -- the forward pass itself is the same for all methods.
Classifier guidance: accuracy of the requested class (cycling 0-9) on an unconditional run, judged by the shipped
classifier (the one that guides: can be fooled) and by an independent judge (an RBF SVM on 8x8 average-pooled
digits, fitted on the training split).

    python scripts/bench_flowchef.py --num-images 100 --steps 20 --json bench_flowchef.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fewstep.bench.image_metrics import psnr, ssim
from fewstep.datasets import load_digits_images, to_unit_range
from fewstep.pipelines import load_default
from fewstep.pipelines.flowchef import DEFAULT_CONFIGS, DPS_STEP, INVERSE_TASKS, dps_sample, flowchef_sample, make_task


class GraphMemory:
    """Bytes saved for backward per gradient evaluation (distinct storages), peak over the run."""

    def __init__(self) -> None:
        self.current: dict[int, int] = {}
        self.peak = 0
        self._grad = torch.autograd.grad

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.current[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.current.values()))
        return t

    def __enter__(self) -> GraphMemory:
        def grad(*args, **kwargs):
            out = self._grad(*args, **kwargs)
            self.current = {}
            return out

        torch.autograd.grad = grad
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        torch.autograd.grad = self._grad


def run(fn, **kwargs):
    with GraphMemory() as mem:
        start = time.perf_counter()
        out = fn(**kwargs)
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak


def judge():
    from sklearn.svm import SVC

    train, labels = load_digits_images(16, "train")

    def feats(x):
        return torch.nn.functional.avg_pool2d(x.float().clamp(-1, 1), 2).flatten(1).numpy()

    svm = SVC(gamma="scale").fit(feats(train), labels.numpy())
    return lambda x: torch.from_numpy(svm.predict(feats(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--classifier-steps", default="20,30")
    parser.add_argument("--noise-std", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_default("digits-flow", sampler="flow-euler")
    n = args.num_images
    truth = load_digits_images(16, "test")[0][:n]
    latents = torch.randn(truth.shape, generator=torch.Generator().manual_seed(args.seed))
    rows = []

    def quality(x):
        a, b = to_unit_range(x.float()), to_unit_range(truth)
        return float(psnr(a, b).mean()), float(ssim(a, b).mean())

    for task_name in INVERSE_TASKS:
        task = make_task(task_name, truth, noise_std=args.noise_std,
                         generator=torch.Generator().manual_seed(args.seed + 1))
        common = dict(pipe=pipe, num_images=n, num_inference_steps=args.steps, latents=latents)
        cfg = DEFAULT_CONFIGS[task_name]
        cells = {
            "unsteered": (flowchef_sample, dict(cost=None)),
            f"FlowChef (GD eta {cfg.step_size:g}, M {cfg.inner_steps})": (flowchef_sample, dict(cost=task, config=cfg)),
            f"DPS (zeta {DPS_STEP[task_name]:g}, through the model)": (
                dps_sample, dict(operator=task.operator, measurement=task.measurement,
                                 step_size=DPS_STEP[task_name])),
        }
        for label, (fn, kw) in cells.items():
            x, seconds, mem = run(fn, **common, **kw)
            p, s = quality(x)
            rows.append({"task": task_name, "method": label, "nfe": args.steps, "psnr": p, "ssim": s,
                         "ms_per_image": 1000 * seconds / n, "autograd_kib_per_image": mem / n / 1024})
            print(f"{task_name:8s} {label:45s} PSNR {p:6.2f} SSIM {s:.3f} {1000 * seconds / n:7.2f} ms/img "
                  f"{mem / n / 1024:9.1f} KiB/img", flush=True)

    classifier = load_default("digits-classifier")
    svm = judge()
    labels = torch.arange(n) % 10
    task = make_task("classifier", labels=labels, classifier=classifier)
    for steps in [int(s) for s in args.classifier_steps.split(",")]:
        for label, cost in (("unconditional, unsteered", None), ("FlowChef classifier guidance", task)):
            cfg = DEFAULT_CONFIGS["classifier"]
            x, seconds, mem = run(flowchef_sample, pipe=pipe, cost=cost, num_images=n, num_inference_steps=steps,
                                  latents=latents, config=cfg)
            with torch.no_grad():
                acc = float((classifier(x.clamp(-1, 1)).argmax(1) == labels).float().mean())
            acc_judge = float((svm(x) == labels).float().mean())
            rows.append({"task": "classifier", "method": label, "nfe": steps, "accuracy": acc,
                         "accuracy_independent": acc_judge, "ms_per_image": 1000 * seconds / n,
                         "autograd_kib_per_image": mem / n / 1024})
            print(f"classifier NFE {steps} {label:32s} acc {acc:.3f} (independent judge {acc_judge:.3f}) "
                  f"{1000 * seconds / n:7.2f} ms/img {mem / n / 1024:9.1f} KiB/img", flush=True)
    if args.json:
        meta = {"num_images": n, "steps": args.steps, "noise_std": args.noise_std, "seed": args.seed,
                "threads": args.threads, "configs": {k: vars(v) if hasattr(v, "__dict__") else str(v)
                                                     for k, v in DEFAULT_CONFIGS.items()}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
