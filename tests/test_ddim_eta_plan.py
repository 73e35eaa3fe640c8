"""``solvers.methods.ddim_eta_plan``: DDIM's stochastic coefficients as a function of the deterministic plan."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.solvers.engine import compile_plan
from fewstep.solvers.grids import spacing_grid
from fewstep.solvers.methods import ddim_decisions, ddim_eta_plan
from fewstep.solvers.schedules import schedule_from_config


def _plan(steps=6):
    schedule = schedule_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    grid = spacing_grid(schedule, steps, "trailing")
    return compile_plan(grid, ddim_decisions(steps))


def test_eta_one_is_first_order_sde_dpm_solver_pp():
    """At eta = 1 the step is ``x_t = alpha_t x0 + sigma_t e^{-h} (eps + (x - x_eval)/sigma_s) + sigma_t
    sqrt(1 - e^{-2h}) z`` (SDE-DPM-Solver++ 1): written here from the grid's lambdas, not from the function's
    ratio of sigma/alpha."""
    plan = _plan()
    noisy = ddim_eta_plan(plan, 1.0)
    g = plan.grid
    h = np.diff(g.lambdas)
    for i, step in enumerate(noisy.steps):
        s_t = g.sigmas[i + 1]
        expected_noise = s_t * np.sqrt(-np.expm1(-2 * h[i])) if s_t > 0 else 0.0
        assert step.predictor.noise == pytest.approx(expected_noise, rel=1e-12, abs=1e-15)
        assert step.predictor.sigma_t == pytest.approx(s_t * np.exp(-h[i]) if s_t > 0 else 0.0, rel=1e-12, abs=1e-15)
        assert step.predictor.lin == pytest.approx(step.predictor.sigma_t / g.sigmas[i], rel=1e-12)
    assert ddim_eta_plan(plan, 0.0) is plan and ddim_eta_plan(plan, 0) is plan


def test_sample_loop_runs_an_eta_plan_like_the_scheduler():
    """Found in review: ``sample_loop`` drew noise only for stochastic decisions, and a DDIM eta plan keeps DDIM's
    deterministic decisions (its predictors carry the noise): it was refused as "pass noise"."""
    import torch

    from fewstep import samplers
    from fewstep.solvers import sample_loop

    sched = samplers.get("ddim")(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 clip_sample=False)  # (the scheduler's x0 clipping is no part of the plan)
    sched.set_timesteps(5)
    plan = ddim_eta_plan(sched.plan, 0.5)

    def pair(x, i):
        g = plan.grid
        x0 = 0.5 * x
        return x0, (x - float(g.alphas[i]) * x0) / float(g.sigmas[i])

    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_loop(pair, x_T, plan, generator=torch.Generator().manual_seed(1))
    gen, x = torch.Generator().manual_seed(1), x_T
    for k, t in enumerate(sched.timesteps):
        x0, eps = pair(x, sched.plan.calls[k][0])
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).double()
        x = sched.step(eps, t, x, eta=0.5, variance_noise=noise).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    assert ddim_eta_plan(sched.plan, np.float32(0.5)).steps[0].predictor.noise > 0


def test_eta_plan_needs_a_ddim_plan():
    from fewstep import samplers

    unipc = samplers.get("unipc")()
    unipc.set_timesteps(5)
    with pytest.raises(ValueError, match=r"`plan` must be a DDIM plan"):
        ddim_eta_plan(unipc.plan, 0.5)


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), "1", True, None])
def test_eta_out_of_range_is_refused(eta):
    with pytest.raises(ValueError, match=r"`eta` must be a number in \[0, 1\] \(DDIM's noise weight\), got "):
        ddim_eta_plan(_plan(), eta)
