"""``fewstep bench --model analytic``: error versus NFE of every sampler against the exact PF-ODE solution.

For Gaussian-mixture data the denoiser and the PF-ODE endpoint are exact (``fewstep.bench.analytic``),
so each sampler's error has no model error in it: RMSE to the exact endpoint from the same initial
noise, and the Frechet distance between the samples and the data distribution (closed-form moments).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import samplers as sampler_registry
from .._checks import check_int, repeated_values
from .analytic import AnalyticModel, GaussianMixture, default_mixture, exact_solution
from .metrics import feature_statistics, frechet_distance, rmse

__all__ = ["AnalyticRow", "run_analytic_bench", "format_table", "SCHEDULE_CONFIGS"]

#: Scheduler configs of the two analytic worlds: DDPM's linear VP schedule (epsilon model) and SD3's flow.
SCHEDULE_CONFIGS: dict[str, dict[str, Any]] = {
    "vp": {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False},
    "flow": {"num_train_timesteps": 1000, "shift": 3.0},
}


@dataclass
class AnalyticRow:
    sampler: str
    steps: int
    nfe: int
    rmse: float
    fd: float
    seconds: float


class _GridStart:
    """A schedule shim giving the scheduler's own first grid point to ``exact_solution``."""

    def __init__(self, alpha: float, sigma: float):
        self.alpha, self.sigma = alpha, sigma

    def alpha_sigma(self, t):
        return self.alpha, self.sigma


def _check_list(name: str, values, allowed=None) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"`{name}` must not be empty")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"`{name}` has unknown values {bad}; available: {', '.join(allowed)}")
    repeated = repeated_values(values)
    if repeated:
        raise ValueError(f"`{name}` repeats {repeated}; give each value once")
    return values


def run_analytic_bench(
    samplers: list[str] | None = None,
    steps: Sequence[int] = (5, 10, 20),
    schedule: str = "vp",
    num_samples: int = 2000,
    dim: int = 2,
    seed: int = 0,
    mixture: GaussianMixture | None = None,
    progress: bool = True,
) -> tuple[list[AnalyticRow], dict[str, Any]]:
    """Run every (sampler, steps) cell; returns the rows and the run's metadata (incl. the exact floor)."""
    available = sampler_registry.names("diffusion", standalone=True)
    if schedule == "flow":  # flow-only samplers (flow-euler; flowchef needs a cost) join on the flow schedule
        available = available + [n for n in sampler_registry.names("flow") if n != "flowchef"]
    flow_only = [n for n in (samplers or []) if n in sampler_registry.names("flow") and n not in available]
    if flow_only:
        raise ValueError(f"sampler(s) {flow_only} integrate flow models only: use schedule='flow' (--schedule flow)")
    # s3 runs the searched schedules shipped for this reference (VP, NFE 4/5/6/8/10); asked for by name only
    optional = ["s3"] if schedule == "vp" else []
    if "dpm-solver-v3" in (samplers or []):
        raise ValueError("`samplers`: dpm-solver-v3 needs EMS tables estimated for this mixture, which the table "
                         "does not build; scripts/bench_v3.py --analytic-only estimates them and runs it")
    names = _check_list("samplers", available if samplers is None else samplers, available + optional)
    steps = _check_list("steps", steps)
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`steps` must hold integers >= 1, got {n!r}")
    if schedule not in SCHEDULE_CONFIGS:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULE_CONFIGS)}, got {schedule!r}")
    check_int("num_samples", num_samples, 2, numpy_ok=False)
    check_int("seed", seed, 0, 2**63 - 1)
    mixture = mixture if mixture is not None else default_mixture(dim=dim, seed=seed)
    x_start = torch.randn(num_samples, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    data_mean, data_cov = mixture.mean(), mixture.covariance()
    references: dict[tuple[float, float], torch.Tensor] = {}

    def reference_for(alpha: float, sigma: float) -> torch.Tensor:
        key = (alpha, sigma)
        if key not in references:
            references[key] = exact_solution(mixture, _GridStart(alpha, sigma), x_start, 0.0, (1.0, 0.0))
        return references[key]

    rows = []
    cells = [(name, n) for name in names for n in steps]
    for name, n in tqdm(cells, desc="analytic bench", disable=not progress):
        options = {"s3_schedule": "analytic"} if name == "s3" else {}
        sched = sampler_registry.get(name).from_config(SCHEDULE_CONFIGS[schedule], **options)
        sched.set_timesteps(n)
        grid = sched.plan.grid
        if grid.sigmas[-1] != 0.0:
            raise ValueError(f"sampler {name!r} does not end at clean data; the analytic bench needs sigma_end = 0")
        model = AnalyticModel(mixture, sched.noise_schedule, sched.config.prediction_type)
        start = time.perf_counter()
        x = x_start * sched.init_noise_sigma  # != 1 after an analytical first step (s3 schedules)
        for t in sched.timesteps:
            x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
        seconds = time.perf_counter() - start
        first = sched.plan.analytic_start  # the ODE starts at the analytic point, before the first model call
        ref = reference_for(*((first.alpha, first.sigma) if first is not None else
                              (float(grid.alphas[0]), float(grid.sigmas[0]))))
        fd = frechet_distance(*feature_statistics(x), data_mean, data_cov)
        rows.append(AnalyticRow(name, n, len(sched.timesteps), rmse(x, ref), fd, seconds))
    # the floor: the exact solution's own FD, from one fixed start (model time T - 1) whatever samplers ran (it
    # was the minimum over the samplers' starts, so it moved with the sampler list)
    from ..solvers.schedules import schedule_from_config

    noise = schedule_from_config(SCHEDULE_CONFIGS[schedule])
    t_floor = float(noise.num_train_timesteps - 1)
    a_floor, s_floor = (float(np.asarray(v).reshape(-1)[0]) for v in noise.alpha_sigma(t_floor))
    exact = reference_for(a_floor, s_floor)
    meta = {
        "model": "analytic",
        "schedule": schedule,
        "num_samples": num_samples,
        "dim": mixture.dim,
        "seed": seed,
        "exact_fd": frechet_distance(*feature_statistics(exact), data_mean, data_cov),
        "exact_start_t": t_floor,
        "config": SCHEDULE_CONFIGS[schedule],
    }
    return rows, meta


def format_table(rows: list[AnalyticRow], meta: dict[str, Any]) -> str:
    """A Markdown table, one row per (sampler, steps), plus the exact-solution FD floor."""
    lines = [
        f"analytic Gaussian mixture ({meta['dim']}-D, {meta['num_samples']} samples, {meta['schedule']} schedule)",
        "",
        "| sampler | steps | NFE | RMSE to exact | FD to data |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r.sampler} | {r.steps} | {r.nfe} | {r.rmse:.3e} | {r.fd:.3e} |")
    if meta.get("exact_fd") is not None:
        start = f" from t = {meta['exact_start_t']:g}" if "exact_start_t" in meta else ""
        lines.append(f"| exact ODE solution{start} | - | - | 0 | {meta['exact_fd']:.3e} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[AnalyticRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
