"""DC-Solver ratio search (Zhao et al. 2024, sec. 3.3): greedy per-step fit against a many-step reference.

For a seeded set of ~10 datapoints (initial noise + class label / prompt) the reference trajectory is
computed once: either a many-step solve (``"ddim:200"``, ``"ddim:999"``, ``"dpm-solver++:100"``) on a fine
grid that contains the few-step grid's points, so the reference is available exactly at every ``t_i``,
or, for the analytic Gaussian mixture, the exact PF-ODE solution. Then, step by step along the few-step
trajectory (``rho_i = 1`` for ``i < K``):

    rho_i = argmin_rho  MSE( C_{i+1}( P_i( x_i ; m_hat_i(rho) ) ),  x_ref(t_{i+1}) )

where ``P_i`` is the step's predictor with the compensated buffer and ``C_{i+1}`` the next UniC
corrector, which needs a model evaluation at the predicted point -- the gradient w.r.t. ``rho`` flows
through the model. Predictor-only bases (DDIM, DPM-Solver++) and the last step have no corrector in the
loss. The optimizer is Adam from ``rho = 1`` (lr 0.1, 40 iterations as in the paper, cosine-annealed); the
best iterate seen is kept, then ``rho_i`` is fixed and applied and the search moves on.

Everything runs the engine (``EngineState``, ``DynamicCompensation``) that the ``dc-solver`` scheduler runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .._checks import check_int, check_number
from ..solvers.dc import DynamicCompensation, dc_step
from ..solvers.dc_artifacts import RatioEntry
from ..solvers.engine import EngineState, Evaluation, Plan, apply_transition, compile_plan
from ..solvers.grids import TimeGrid
from ..solvers.methods import ddim_decisions, dpm_solver_decisions
from ..solvers.parameterization import compute_dtype, to_pair
from ..solvers.schedules import NoiseSchedule

__all__ = [
    "ModelFn",
    "REFERENCE_METHODS",
    "parse_reference",
    "fine_grid",
    "reference_states",
    "exact_reference_states",
    "search_ratios",
    "class_conditional_model_fn",
    "digits_datapoints",
    "SearchResult",
]

#: ``model_fn(x, t) -> raw model output`` at model timestep ``t`` (a float), guidance already applied.
ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
REFERENCE_METHODS = ("ddim", "dpm-solver++")
#: search losses: the paper's next-point loss, or the end point of the rest of the trajectory.
OBJECTIVES = ("next", "final")


def parse_reference(spec: str) -> tuple[str, int]:
    """``"ddim:200"`` -> ``("ddim", 200)``; ``"exact"`` -> ``("exact", 0)`` (analytic models only)."""
    if spec == "exact":
        return "exact", 0
    m = re.fullmatch(r"([a-z+\-]+):(\d+)", spec) if isinstance(spec, str) else None
    if m is None or m.group(1) not in REFERENCE_METHODS or int(m.group(2)) < 2:
        raise ValueError(
            f"`reference` must be 'exact' or METHOD:STEPS with METHOD in {list(REFERENCE_METHODS)} and STEPS >= 2 "
            f"(e.g. 'ddim:200'), got {spec!r}"
        )
    return m.group(1), int(m.group(2))


def fine_grid(schedule: NoiseSchedule, grid: TimeGrid, steps: int) -> tuple[TimeGrid, list[int]]:
    """A grid of about ``steps`` steps, uniform in ``t`` inside each interval of ``grid``, that contains
    every point of ``grid``; returns it and the fine index of each coarse point ``1..N``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < grid.num_steps:
        raise ValueError(f"`steps` must be an integer >= the coarse grid's {grid.num_steps} steps, got {steps!r}")
    n = grid.num_steps
    per = max(1, math.ceil(steps / n))
    ts = np.asarray(grid.timesteps, dtype=np.float64)
    times: list[float] = []
    index: list[int] = []
    for i in range(n - 1):
        times.extend(np.linspace(ts[i], ts[i + 1], per + 1)[:-1].tolist())
        index.append(len(times))
    a_end, s_end = float(grid.alphas[n]), float(grid.sigmas[n])
    if s_end == 0.0:  # clean target: refine down to the schedule's smallest time, then one step to sigma = 0
        last = np.linspace(ts[n - 1], schedule.t_min, per + 1)[:-1] if ts[n - 1] > schedule.t_min else ts[n - 1 :]
    else:
        t_end = float(schedule.t_of_lambda(math.log(a_end / s_end)))
        last = np.linspace(ts[n - 1], t_end, per + 1)[:-1]
    times.extend(np.asarray(last).tolist())
    index.append(len(times))
    alphas, sigmas = schedule.alpha_sigma(np.asarray(times))
    fine = TimeGrid(np.asarray(times), np.append(alphas, a_end), np.append(sigmas, s_end))
    return fine, index


def _pair(model_fn: ModelFn, prediction_type: str, x: torch.Tensor, t: float, alpha: float, sigma: float):
    return to_pair(model_fn(x, t), x, alpha, sigma, prediction_type)


@torch.no_grad()
def reference_states(
    model_fn: ModelFn,
    prediction_type: str,
    schedule: NoiseSchedule,
    grid: TimeGrid,
    x_start: torch.Tensor,
    reference: str = "ddim:200",
    progress: bool = False,
) -> list[torch.Tensor]:
    """The reference solution at the coarse points ``1..N`` of ``grid`` from a many-step solve."""
    method, steps = parse_reference(reference)
    if method == "exact":
        raise ValueError("`reference`='exact' needs the analytic mixture: use `exact_reference_states`")
    fine, index = fine_grid(schedule, grid, steps)
    m = fine.num_steps
    if method == "ddim":
        decisions = ddim_decisions(m)
    else:
        decisions = dpm_solver_decisions(m, 2, final_is_clean=fine.clean_end)
    plan = compile_plan(fine, decisions)
    state = EngineState(plan)
    wanted = {f: k for k, f in enumerate(index)}
    out: list[torch.Tensor | None] = [None] * len(index)
    x = x_start
    for f in tqdm(range(m), desc=f"reference {reference}", disable=not progress, leave=False):
        x0, eps = _pair(
            model_fn, prediction_type, x, float(fine.timesteps[f]), float(fine.alphas[f]), float(fine.sigmas[f])
        )
        x = state.advance(f, x, x0, eps)
        if f + 1 in wanted:
            out[wanted[f + 1]] = x.detach().clone()
    return out  # type: ignore[return-value]


def exact_reference_states(
    mixture, schedule: NoiseSchedule, grid: TimeGrid, x_start: torch.Tensor
) -> list[torch.Tensor]:
    """The exact PF-ODE solution (analytic Gaussian mixture) at the coarse points ``1..N`` of ``grid``."""
    from ..bench.analytic import exact_solution

    t0 = float(grid.timesteps[0])
    return [
        exact_solution(
            mixture, schedule, x_start.to(torch.float64), t0, (float(grid.alphas[i]), float(grid.sigmas[i]))
        ).to(x_start.dtype)
        for i in range(1, grid.num_steps + 1)
    ]


@dataclass
class SearchResult:
    """Searched ratios and per-step losses at ``rho = 1`` and at the chosen ``rho`` (``None``: not searched)."""

    ratios: list[float]
    step_loss_base: list[float | None]
    step_loss_dc: list[float | None]

    def info(self) -> dict:
        return {"step_loss_base": self.step_loss_base, "step_loss_dc": self.step_loss_dc}


def _fork(state: EngineState, hooks) -> EngineState:
    trial = EngineState(state.plan, hooks)
    trial.buffer = list(state.buffer)
    trial.last_sample = state.last_sample
    return trial


def search_ratios(
    plan: Plan,
    model_fn: ModelFn,
    prediction_type: str,
    x_start: torch.Tensor,
    targets: Sequence[torch.Tensor],
    order: int = 2,
    variable: str = "t",
    iters: int = 40,
    lr: float = 0.1,
    progress: bool = True,
    desc: str = "dc search",
    objective: str = "next",
) -> SearchResult:
    """Greedy per-step ratio search (see the module docstring) for a plan compiled with ``compile_dc_plan``.

    ``targets[i]`` is the reference at grid point ``i + 1``; ``model_fn`` must be differentiable in its input.
    ``objective="next"`` is the paper's loss (the corrected sample at ``t_{i+1}``); ``"final"`` instead runs the
    rest of the trajectory (later ratios 1) and compares the end point -- it costs ``N - i`` model evaluations
    per iteration instead of one, and avoids ratios that help ``t_{i+1}`` but not the result.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {list(OBJECTIVES)}, got {objective!r}")
    n = plan.num_steps
    if len(targets) != n:
        raise ValueError(f"`targets` must hold one reference state per step ({n}), got {len(targets)}")
    check_int("iters", iters, 1, numpy_ok=False)
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"`lr` must be a number > 0, got {lr!r}")
    if plan.buffer_size < order + 1:
        raise ValueError(f"the plan buffers {plan.buffer_size} outputs, order K={order} needs {order + 1}")
    grid = plan.grid

    def pair_at(x: torch.Tensor, i: int):
        return _pair(
            model_fn, prediction_type, x, float(grid.timesteps[i]), float(grid.alphas[i]), float(grid.sigmas[i])
        )

    hook = DynamicCompensation([None] * n)
    state = EngineState(plan, [hook])
    ratios = [1.0] * n
    loss_base: list[float | None] = [None] * n
    loss_dc: list[float | None] = [None] * n
    x = x_start
    bar = tqdm(total=n * iters, desc=desc, disable=not progress, leave=False)
    for i in range(n):
        with torch.no_grad():
            x0, eps = pair_at(x, i)
        target = targets[-1] if objective == "final" else targets[i]
        corrector = plan.steps[i + 1].corrector if i + 1 < n else None
        if i >= order:
            param = torch.zeros((), dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([param], lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
            best = (math.inf, 1.0)
            for it in range(iters):
                rho = 1.0 + param
                trial_hook = DynamicCompensation([None] * n)
                trial_hook.table[i] = dc_step(grid, plan.decisions[i], i, rho, order, variable)
                trial = _fork(state, [trial_hook])
                with torch.enable_grad():
                    out = trial.advance(i, x, x0, eps)
                    if objective == "final":
                        for j in range(i + 1, n):
                            out = trial.advance(j, out, *pair_at(out, j))
                    elif corrector is not None:
                        x0n, epsn = pair_at(out, i + 1)
                        out = apply_transition(
                            corrector, trial.last_sample, trial.buffer + [Evaluation(out, x0n, epsn)]
                        )
                    loss = torch.mean((out - target) ** 2)
                value = float(loss.detach())
                if it == 0:
                    loss_base[i] = value
                candidate = float(rho.detach())
                if value < best[0] and candidate > 0:  # rho <= 0 is no compensation (check_ratios refuses it)
                    best = (value, candidate)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
            loss_dc[i], ratios[i] = best
            hook.table[i] = dc_step(grid, plan.decisions[i], i, ratios[i], order, variable)
        else:
            bar.update(iters)
        with torch.no_grad():
            x = state.advance(i, x, x0, eps)
    bar.close()
    return SearchResult(ratios, loss_base, loss_dc)


# ------------------------------------------------------------------------------------------ models / data
def _cfg_model_fn(unet, guidance_scale: float, cond: dict, uncond: dict) -> ModelFn:
    """CFG around one UNet call per step on ``[x, x]``: ``cond``/``uncond`` are the UNet's conditioning keyword
    arguments of the two halves (concatenated along the batch when guided). The UNet sees its own dtype; the
    output and the guidance combination come back in ``x``'s (the solver's float32 for a half-precision UNet)."""
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}")
    guided = guidance_scale != 1.0
    kwargs = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()} if guided else cond

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        model_in = torch.cat([x, x]) if guided else x
        tt = torch.full((model_in.shape[0],), float(t), device=x.device, dtype=torch.float32)
        out = unet(model_in.to(unet.dtype), tt, **kwargs).sample.to(x.dtype)
        if guided:
            c, u = out.chunk(2)
            out = u + guidance_scale * (c - u)
        return out

    return fn


def class_conditional_model_fn(unet, labels: torch.Tensor, guidance_scale: float, null_class: int) -> ModelFn:
    """CFG on a class-conditional ``UNet2DModel`` exactly as ``ClassConditionalPipeline`` does it."""
    return _cfg_model_fn(unet, guidance_scale, {"class_labels": labels},
                         {"class_labels": torch.full_like(labels, null_class)})


def digits_datapoints(
    num: int = 10, seed: int = 0, num_classes: int = 10, size: int = 16, channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` seeded datapoints: class labels cycling ``0..num_classes-1`` and per-sample noise (seed + k)."""
    check_int("num", num, 1, numpy_ok=False, what="datapoints")
    labels = torch.tensor([k % num_classes for k in range(num)])
    noise = torch.stack(
        [torch.randn(channels, size, size, generator=torch.Generator().manual_seed(seed + k)) for k in range(num)]
    )
    return labels, noise


def entry_from_search(nfe: int, guidance_scale: float, result: SearchResult, settings: dict) -> RatioEntry:
    """Package a search result (and the settings that produced it) as an artifact entry."""
    return RatioEntry(nfe, guidance_scale, result.ratios, {**result.info(), **settings})


def _check_grid_args(nfes: Sequence[int], guidance_scales: Sequence[float], reference: str) -> tuple[list, list]:
    for name, values, kind in (("nfes", nfes, "integers >= 1"), ("guidance_scales", guidance_scales,
                                                                   "finite numbers >= 0")):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"`{name}` must be a non-empty list of {kind}, got {values!r}")
    nfes = [check_int(f"nfes[{i}]", n, 1) for i, n in enumerate(nfes)]
    scales = [check_number(f"guidance_scales[{i}]", g, 0) for i, g in enumerate(guidance_scales)]
    parse_reference(reference)
    if reference == "exact":
        raise ValueError("`reference`='exact' is only available for the analytic mixture")
    return nfes, scales


def _calibrate_grid(
    scheduler_config,
    unet,
    model_fn_for: Callable[[float], ModelFn],
    noise: torch.Tensor,
    nfes: list[int],
    scales: list[float],
    settings: dict,
    scheduler_overrides: dict | None,
    progress: bool,
) -> tuple[list[RatioEntry], dict]:
    """The ratio search over every ``(nfe, guidance_scale)``: the part shared by all model families."""
    from ..samplers.dc_solver import FewstepDCSolverScheduler, dc_scheduler_key

    overrides = {k: v for k, v in (scheduler_overrides or {}).items() if not k.startswith("dc_ratio")}
    overrides.update(dc_ratios_file=None, dc_cpr=None)
    entries: list[RatioEntry] = []
    key: dict | None = None
    was = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)  # gradients flow to rho through the model's input only
    try:
        for g in scales:
            model_fn = model_fn_for(g)
            for n in nfes:
                sched = FewstepDCSolverScheduler.from_config(scheduler_config, **{**overrides, "dc_ratios": [1.0] * n})
                sched.set_timesteps(n)
                key = dc_scheduler_key(sched.config)
                c = sched.config
                targets = reference_states(
                    model_fn, sched.prediction_type, sched.noise_schedule, sched.plan.grid, noise,
                    settings["reference"], progress,
                )
                result = search_ratios(
                    sched.plan, model_fn, sched.prediction_type, noise, targets, c.dc_order, c.dc_variable,
                    settings["iters"], settings["lr"], progress, desc=f"dc search NFE {n} CFG {g:g}",
                    objective=settings["objective"],
                )
                entries.append(entry_from_search(n, g, result, settings))
    finally:
        for p, r in zip(unet.parameters(), was):
            p.requires_grad_(r)
    return entries, key or {}


def calibrate_class_conditional(
    pipe,
    nfes: Sequence[int],
    guidance_scales: Sequence[float],
    datapoints: int = 10,
    seed: int = 0,
    reference: str = "ddim:200",
    scheduler_overrides: dict | None = None,
    iters: int = 40,
    lr: float = 0.1,
    progress: bool = True,
    objective: str = "next",
) -> tuple[list[RatioEntry], dict]:
    """Search ratios for every ``(nfe, guidance_scale)`` on a class-conditional pipeline (e.g. ``digits-eps``).

    The ``dc-solver`` scheduler is built from the pipeline's scheduler config plus ``scheduler_overrides``
    (``dc_base``, ``dc_order``, ``dc_variable``, ``solver_order``, ...). Returns the entries and the scheduler
    key to store with them (see ``fewstep.solvers.dc_artifacts``).
    """
    nfes, scales = _check_grid_args(nfes, guidance_scales, reference)
    unet = pipe.unet
    cfg = unet.config
    labels, noise = digits_datapoints(datapoints, seed, int(cfg.num_class_embeds) - 1, cfg.sample_size, cfg.in_channels)
    # the reference solves and the ratio search run in float32 for a half-precision UNet (as a scheduler's step)
    labels, noise = labels.to(unet.device), noise.to(device=unet.device, dtype=compute_dtype(unet.dtype))
    null_class = int(cfg.num_class_embeds) - 1
    settings = {"datapoints": datapoints, "seed": seed, "reference": reference, "iters": iters, "lr": lr,
                "objective": objective}
    return _calibrate_grid(
        pipe.scheduler.config, unet, lambda g: class_conditional_model_fn(unet, labels, g, null_class), noise,
        nfes, scales, settings, scheduler_overrides, progress,
    )


def text_conditional_model_fn(
    unet, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, guidance_scale: float
) -> ModelFn:
    """CFG on a text-conditional ``UNet2DConditionModel`` (SD 1.x/2.x) as diffusers' pipeline does it."""
    return _cfg_model_fn(unet, guidance_scale, {"encoder_hidden_states": prompt_embeds},
                         {"encoder_hidden_states": negative_embeds})


def calibrate_text_to_image(
    pipe,
    prompts: Sequence[str],
    nfes: Sequence[int],
    guidance_scales: Sequence[float],
    datapoints: int = 10,
    seed: int = 0,
    reference: str = "ddim:200",
    scheduler_overrides: dict | None = None,
    iters: int = 40,
    lr: float = 0.1,
    progress: bool = True,
    objective: str = "next",
    negative_prompt: str = "",
) -> tuple[list[RatioEntry], dict]:
    """The same search on an SD 1.x/2.x text-to-image pipeline: ``datapoints`` (noise, prompt) pairs with the
    prompts cycled and per-sample latent noise (seed + k), as the paper calibrates Stable Diffusion."""
    nfes, scales = _check_grid_args(nfes, guidance_scales, reference)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("`prompts` must hold at least one prompt")
    if not hasattr(pipe, "encode_prompt") or not hasattr(getattr(pipe, "unet", None), "config"):
        raise ValueError(f"`pipe` must be an SD 1.x/2.x text-to-image pipeline, got {type(pipe).__name__}")
    if getattr(pipe.unet.config, "addition_embed_type", None) is not None:
        raise ValueError("SDXL-style UNets (added conditions) are not supported by the DC calibration yet")
    check_int("datapoints", datapoints, 1, numpy_ok=False)
    unet = pipe.unet
    chosen = [prompts[k % len(prompts)] for k in range(datapoints)]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(chosen, unet.device, 1, True, [negative_prompt] * datapoints)
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + k))
                         for k in range(datapoints)]).to(device=unet.device, dtype=compute_dtype(unet.dtype))
    settings = {"datapoints": datapoints, "seed": seed, "reference": reference, "iters": iters, "lr": lr,
                "objective": objective, "prompts": len(prompts)}
    return _calibrate_grid(
        pipe.scheduler.config, unet, lambda g: text_conditional_model_fn(unet, cond, uncond, g), noise,
        nfes, scales, settings, scheduler_overrides, progress,
    )
