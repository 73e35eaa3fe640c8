"""True metrics for the S^3 search: analytic RMSE to the exact solution, or Frechet distance on digits.

Each objective maps a :class:`~fewstep.solvers.s3.SolverSchedule` to a number (lower is better) with
everything random fixed (initial noise, classes), so candidates are compared on equal terms; the held-out
versions use other seeds (and, for digits, classes the search did not see).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..solvers.s3 import SolverSchedule, schedule_fingerprint

__all__ = ["AnalyticObjective", "DigitsObjective", "DigitsMSEObjective", "DIGITS_MODELS", "HELD_OUT_SEED",
           "SEARCH_CLASSES"]

#: the embedded models the digits objectives (and ``fewstep bench``) evaluate
DIGITS_MODELS = ("digits-eps", "digits-flow")
#: the digits classes a search sees by default (the held-out evaluation adds 7-9)
SEARCH_CLASSES = tuple(range(7))
#: first per-sample seed of the held-out evaluations (``scripts/bench_s3.py``); a search's seeds stay below it
HELD_OUT_SEED = 10_000


class AnalyticObjective:
    """RMSE of the schedule's endpoint to the exact PF-ODE solution on the Gaussian-mixture reference."""

    name = "analytic"

    def __init__(self, num_samples: int = 500, dim: int = 2, seed: int = 0, ems=None):
        """``ems``: DPM-Solver-v3 tables for the mixture (e.g. from ``solvers.ems_estimate``), needed by schedules
        with ``"ems"`` steps."""
        from diffusers import DDPMScheduler

        from ..bench.analytic import default_mixture, exact_solution
        from ..solvers.schedules import VPSchedule

        self.mixture = default_mixture(dim=dim, seed=0)
        self.noise_schedule = VPSchedule.from_config(DDPMScheduler().config)
        g = torch.Generator().manual_seed(seed)
        self.x_start = torch.randn(num_samples, dim, generator=g, dtype=torch.float64)
        t_max = float(self.noise_schedule.t_max)
        self.reference = exact_solution(self.mixture, self.noise_schedule, self.x_start, t_max, (1.0, 0.0))
        self.ems = ems

    def metadata(self) -> dict:
        return {"model": "analytic", "noise_schedule": schedule_fingerprint(self.noise_schedule)}

    def data_mean(self) -> list:
        """The mixture's mean (``average_x0``'s ``x0``)."""
        return (self.mixture.weights @ self.mixture.means).tolist()

    def __call__(self, schedule: SolverSchedule) -> float:
        from ..solvers.engine import sample_loop

        plan = schedule.plan(self.noise_schedule, self.ems)
        grid = plan.grid
        start = self.x_start if plan.analytic_start is None else plan.analytic_start.start(self.x_start)
        out = sample_loop(lambda x, i: self.mixture.denoise(x, grid.alphas[i], grid.sigmas[i]), start, plan)
        return (out - self.reference).pow(2).mean().sqrt().item()


class DigitsObjective:
    """Frechet distance (shipped classifier's features) of ``digits-eps`` samples to the test digits of the
    same classes, at a fixed guidance scale, with per-sample seeds."""

    name = "digits-eps"

    def __init__(
        self,
        classes: Sequence[int] = SEARCH_CLASSES,
        num_per_class: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
        *,
        model: str = "digits-eps",
        guidance: str = "cfg",
        batch_size: int | None = None,
        reference_stats: tuple[np.ndarray, np.ndarray] | None = None,
        ems: str | None = "auto",
    ):
        """``model``: ``digits-eps`` or ``digits-flow``; ``guidance``: a rule name (``cfg``, ``cfg++``, ``apg``)
        built with ``guidance_scale``; ``batch_size``: samples per pipeline call (``None``: all at once; results
        do not depend on it); ``reference_stats``: precomputed ``(mean, cov)`` of the test digits' features
        (e.g. from a cache), computed here when ``None``; ``ems``: DPM-Solver-v3 tables that schedules with
        ``"ems"`` steps run on -- ``"auto"`` (the model's shipped EMS, if any), ``None`` (none) or an EMS file or
        shipped name; ``self.ems`` holds them for the search space."""
        from .. import guidance as guidance_rules
        from ..bench.digits_eval import classifier_features
        from ..bench.metrics import feature_statistics
        from ..datasets import NUM_CLASSES, load_digits_images, to_unit_range
        from ..pipelines import load_default

        if model not in DIGITS_MODELS:
            raise ValueError(f"`model` must be one of {list(DIGITS_MODELS)}, got {model!r}")
        classes = [int(c) for c in classes]
        if not classes or any(not 0 <= c < NUM_CLASSES for c in classes):
            raise ValueError(f"`classes` must be digits in [0, {NUM_CLASSES - 1}], got {classes}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"`batch_size` must be an integer >= 1 or None, got {batch_size!r}")
        guidance_rules.make(guidance, guidance_scale)  # validate the rule and its scale early
        self.model = model
        self.classes = classes
        self.guidance = guidance
        self.batch_size = batch_size
        self.pipe = load_default(model, sampler=None)
        self.model_config = dict(self.pipe.scheduler.config)
        self.classifier = load_default("digits-classifier")
        self.labels = [c for c in classes for _ in range(num_per_class)]
        self.seeds = [seed + k for k in range(len(self.labels))]
        self.guidance_scale = float(guidance_scale)
        if reference_stats is None:
            images, labels = load_digits_images(self.pipe.unet.config.sample_size, "test")
            keep = np.isin(np.asarray(labels), classes)
            feats, _ = classifier_features(self.classifier, to_unit_range(images[torch.from_numpy(keep)]))
            reference_stats = feature_statistics(feats.double())
        self.reference_stats = reference_stats
        from .. import samplers
        from ..pipelines.defaults import default_sampler_options

        if ems == "auto":
            self.scheduler_options = default_sampler_options(model, "s3")
        elif ems is None:
            self.scheduler_options = {}
        elif isinstance(ems, str):
            self.scheduler_options = {"ems_file": ems}
        else:
            raise ValueError(f"`ems` must be 'auto', None or an EMS file / shipped name, got {ems!r}")
        probe = samplers.get("s3").from_config(self.model_config, **self.scheduler_options)
        self.noise_schedule = probe.noise_schedule
        self.ems = probe.ems

    def data_mean(self) -> list:
        """The mean training digit in model space, ``[1, R, R]`` (``average_x0``'s ``x0``)."""
        from ..datasets import load_digits_images

        images, _ = load_digits_images(self.pipe.unet.config.sample_size, "train")
        return images.double().mean(0).tolist()

    def scheduler(self, schedule: SolverSchedule):
        """The ``s3`` scheduler running ``schedule`` on this model (with the objective's EMS)."""
        from .. import samplers

        return samplers.get("s3").from_config(self.model_config, s3_schedule=schedule.to_dict(),
                                              **self.scheduler_options)

    def metadata(self) -> dict:
        meta = {"model": self.model, "noise_schedule": schedule_fingerprint(self.noise_schedule),
                "guidance_scale": self.guidance_scale, "classes": list(self.classes), "num_samples": len(self.labels)}
        if self.ems is not None:
            meta["ems"] = str(self.scheduler_options["ems_file"])
            meta["ems_digest"] = self.ems.digest
        if self.guidance != "cfg":
            meta["guidance"] = self.guidance
        return meta

    @torch.no_grad()
    def images(self, scheduler, steps: int, progress: bool = False, indices: Sequence[int] | None = None
               ) -> torch.Tensor:
        """Samples in [0, 1] (NCHW) of ``scheduler`` at ``steps``, one fixed seed per sample, in batches of
        ``batch_size`` (NaN/Inf replaced by 0, so a diverging sampler scores badly instead of failing).
        ``indices``: generate only these samples (of ``self.labels``), e.g. one process's share."""
        from tqdm.auto import tqdm

        from .. import guidance as guidance_rules
        from ..bench.digits_eval import per_sample_noise

        self.pipe.scheduler = scheduler
        cfg = self.pipe.unet.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        picked = range(len(self.labels)) if indices is None else list(indices)
        labels, seeds = [self.labels[i] for i in picked], [self.seeds[i] for i in picked]
        size = self.batch_size or max(len(labels), 1)
        chunks = [torch.zeros(0, *shape)]
        for start in tqdm(range(0, len(labels), size), desc=f"{self.model} x{steps}", leave=False,
                          disable=not progress):
            noise = per_sample_noise(shape, seeds[start:start + size])
            rule = guidance_rules.make(self.guidance, self.guidance_scale)
            out = self.pipe(labels[start:start + size], num_inference_steps=steps, guidance=rule,
                            latents=noise, output_type="pt", check_finite=False)
            chunks.append(torch.nan_to_num(out.images, nan=0.0))
        return torch.cat(chunks)

    def frechet(self, images: torch.Tensor) -> float:
        """Frechet distance of ``images`` (NCHW in [0, 1]) to the test digits of the same classes."""
        return self.score(images)[0]

    def score(self, images: torch.Tensor) -> tuple[float, float]:
        """``(Frechet distance, class accuracy)`` of ``images`` (in the order of ``self.labels``)."""
        from ..bench.digits_eval import classifier_features
        from ..bench.metrics import feature_statistics, frechet_distance

        feats, logits = classifier_features(self.classifier, images)
        fd = frechet_distance(*feature_statistics(feats.double()), *self.reference_stats)
        accuracy = (logits.argmax(1).cpu() == torch.tensor(self.labels)).double().mean().item()
        return fd, accuracy

    def all_images(self, scheduler, steps: int) -> torch.Tensor:
        """``images`` of every sample; under ``accelerate launch`` each process makes its share and all
        processes get all of them (per-sample seeds: the same images as one process)."""
        from .._dist import split_samples

        return split_samples(len(self.labels), lambda idx: self.images(scheduler, steps, indices=idx))[0]

    def __call__(self, schedule: SolverSchedule) -> float:
        return self.frechet(self.all_images(self.scheduler(schedule), schedule.nfe))


class DigitsMSEObjective(DigitsObjective):
    """Mean squared error of ``digits-eps`` samples to a many-step reference solve from the same noise and
    classes (the metric DPM-Solver-v3 and DC-Solver report for Stable Diffusion). Unlike the Frechet
    distance on a few hundred digits -- which cannot tell a 5-step solve from a 25-step one on this model --
    it resolves solver accuracy sample by sample."""

    name = "digits-eps-mse"

    def __init__(self, classes: Sequence[int] = SEARCH_CLASSES, num_per_class: int = 10, guidance_scale: float = 3.0,
                 seed: int = 0, reference_steps: int = 200, ems: str | None = "auto"):
        super().__init__(classes, num_per_class, guidance_scale, seed, ems=ems)
        from .. import samplers

        reference = samplers.from_config("dpm-solver++", self.model_config)
        self.reference = self.all_images(reference, reference_steps).double()
        self.reference_steps = reference_steps

    def metadata(self) -> dict:
        return {**super().metadata(), "reference": f"dpm-solver++:{self.reference_steps}"}

    def __call__(self, schedule: SolverSchedule) -> float:
        return self.mse(self.all_images(self.scheduler(schedule), schedule.nfe))

    def mse(self, images: torch.Tensor) -> float:
        return (images.double() - self.reference).pow(2).mean().item()
