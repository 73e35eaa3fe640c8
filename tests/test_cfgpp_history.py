"""CFG++ with ``history="unconditional"``: the official multistep CFG++ samplers (the SD1.5 code's
``DPMpp2mCFGppSolver``, ComfyUI's ``dpmpp_2m_cfg_pp``) remember the *unconditional* ``x0`` of earlier steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import TinyDenoiser

from fewstep import guidance, samplers
from fewstep.guidance import CFGPlusPlus

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
        "clip_sample": False}
SHAPE = (3, 2, 4, 4)


@pytest.fixture(scope="module")
def models():
    numel = int(np.prod(SHAPE[1:]))
    return TinyDenoiser(numel, seed=1), TinyDenoiser(numel, seed=2)  # "conditional", "unconditional"


def _x_start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _fewstep(models, rule, steps, name="dpm-solver++", **options):
    scheduler = samplers.get(name).from_config(DDPM, **options)
    scheduler.set_timesteps(steps)
    x = _x_start()
    cond_model, uncond_model = models
    for i, t in enumerate(scheduler.timesteps):
        x = guidance.guided_step(scheduler, rule, cond_model(x, t), uncond_model(x, t), t, x, i)
    return x, scheduler


def _official_dpmpp_2m_cfgpp(models, scheduler, lam):
    """The official DPM++ 2M CFG++ step, transcribed from the method notes in k-diffusion's "VE-cast" coordinates
    (``y = x / alpha``, ``rho = sigma / alpha``, ``D = x0``): first step and the step to ``rho = 0`` are Euler CFG++
    ``y' = D_lam + (rho'/rho)(y - D_u)``; the others ``y' = D_lam + e^-h (y - D_u) + (1 - e^-h)/(2r) (D_lam - U)``
    with ``h = log(rho/rho')``, ``r = h_prev/h`` and ``U`` the previous step's *unconditional* ``D``."""
    grid = scheduler.plan.grid
    alphas, sigmas = np.asarray(grid.alphas, dtype=np.float64), np.asarray(grid.sigmas, dtype=np.float64)
    rhos = sigmas / alphas
    cond_model, uncond_model = models
    y = _x_start() / alphas[0]
    u_prev, h_prev = None, None
    for i, t in enumerate(scheduler.timesteps):
        x = alphas[i] * y
        d_c = (x - sigmas[i] * cond_model(x, t)) / alphas[i]
        d_u = (x - sigmas[i] * uncond_model(x, t)) / alphas[i]
        d_lam = d_u + lam * (d_c - d_u)
        if u_prev is None or rhos[i + 1] == 0:
            y = d_lam + (rhos[i + 1] / rhos[i]) * (y - d_u)
        else:
            h = math.log(rhos[i] / rhos[i + 1])
            r = h_prev / h
            y = d_lam + math.exp(-h) * (y - d_u) + (1 - math.exp(-h)) / (2 * r) * (d_lam - u_prev)
        h_prev = math.log(rhos[i] / rhos[i + 1]) if rhos[i + 1] > 0 else None
        u_prev = d_u
    return alphas[-1] * y


@pytest.mark.parametrize("steps", [5, 8, 20])
def test_unconditional_history_is_the_official_dpmpp_2m_cfgpp(models, steps):
    """DPM-Solver++ 2M with CFG++ ``history="unconditional"`` is the official/ComfyUI DPM++ 2M CFG++ to float64
    rounding; the default ``"guided"`` history is not (it differs on every multistep step)."""
    lam = 0.6
    got, scheduler = _fewstep(models, CFGPlusPlus(lam, history="unconditional"), steps, solver_order=2)
    want = _official_dpmpp_2m_cfgpp(models, scheduler, lam)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    guided, _ = _fewstep(models, CFGPlusPlus(lam), steps, solver_order=2)
    assert (guided - want).abs().max() > 1e-4


@pytest.mark.parametrize("name,options", [("ddim", {}), ("dpm-solver++", {"algorithm_type": "dpmsolver"}),
                                          ("unipc", {"predict_x0": False})])  # fmt: skip
def test_history_does_not_matter_where_nothing_past_is_read_as_x0(models, name, options):
    """First-order steps read no past point, and noise-prediction solvers buffer ``eps_u`` either way."""
    a, _ = _fewstep(models, CFGPlusPlus(0.5, history="unconditional"), 6, name, **options)
    b, _ = _fewstep(models, CFGPlusPlus(0.5), 6, name, **options)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["unipc", "dpm-solver-v3", "s3"])
def test_unconditional_history_runs_on_other_multistep_solvers(models, name):
    """UniPC (its corrector's base stays guided), DPM-Solver-v3 (EMS terms) and s3 schedules take it; it changes
    their result, and at lam = 0 both histories are unconditional sampling."""
    options = {"dpm-solver-v3": {"degenerated": True}, "s3": {"s3_schedule": "digits-eps"}}.get(name, {})
    a, _ = _fewstep(models, CFGPlusPlus(0.5, history="unconditional"), 6, name, **options)
    b, _ = _fewstep(models, CFGPlusPlus(0.5), 6, name, **options)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-6
    a0, _ = _fewstep(models, CFGPlusPlus(0.0, history="unconditional"), 6, name, **options)
    b0, _ = _fewstep(models, CFGPlusPlus(0.0), 6, name, **options)
    assert torch.equal(a0, b0)


def test_history_bad_input_hooks_and_graph_mode(models):
    with pytest.raises(ValueError, match=r"`history` must be one of \['guided', 'unconditional'\], got 'uncond'"):
        CFGPlusPlus(0.5, history="uncond")
    assert CFGPlusPlus(0.5).config() == {"guidance_scale": 0.5, "allow_extrapolation": False}  # earlier keys kept
    assert CFGPlusPlus(0.5, history="unconditional").with_scale(0.2).history == "unconditional"
    with pytest.raises(ValueError, match="`history` cannot be used with .*step hooks"):
        _fewstep(models, CFGPlusPlus(0.5, history="unconditional"), 4, "dc-solver")
    from fewstep.pipelines.graph_step import check_graph_rule

    check_graph_rule(CFGPlusPlus(0.5))
    with pytest.raises(ValueError, match="cuda_graph=True runs CFG\\+\\+ with history='guided' only"):
        check_graph_rule(CFGPlusPlus(0.5, history="unconditional"))
    scheduler = samplers.get("unipc").from_config(DDPM)
    scheduler.set_timesteps(4)
    x = _x_start()
    with pytest.raises(ValueError, match="`history_x0` must have the shape of `sample`"):
        scheduler.step_pair(x, x, scheduler.timesteps[0], x, history=(x[:1], x))
