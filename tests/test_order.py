"""Convergence against the exact Gaussian-mixture PF-ODE solution: every backbone shows its order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from fewstep.bench.analytic import default_mixture, exact_solution
from fewstep.solvers import FlowSchedule, VPSchedule, compile_plan, grids, sample_loop
from fewstep.solvers.methods import ddim_decisions, dpm_solver_decisions, unipc_decisions

STEPS = (10, 20, 40, 80)
T_START, T_END = 999.0, 40.0


@pytest.fixture(scope="module")
def vp_problem():
    mixture = default_mixture(dim=4, seed=0)
    schedule = VPSchedule.from_config(DDPMScheduler().config)
    x_start = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha_end, sigma_end = schedule.alpha_sigma(T_END)
    reference = exact_solution(mixture, schedule, x_start, T_START, (float(alpha_end), float(sigma_end)))
    return mixture, schedule, x_start, reference


def _error(problem, decisions_for, steps: int, grid_fn=grids.uniform_lambda_grid) -> float:
    mixture, schedule, x_start, reference = problem
    grid = grid_fn(schedule, steps, T_START, T_END)
    plan = compile_plan(grid, decisions_for(steps))

    def pair(x, i):
        return mixture.denoise(x, grid.alphas[i], grid.sigmas[i])

    out = sample_loop(pair, x_start, plan)
    return (out - reference).pow(2).mean().sqrt().item()


def _observed_order(errors) -> float:
    """Least-squares slope of log(error) against log(steps)."""
    slope = np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    return -slope


def _keep_order(**kw):
    return dict(final_is_clean=False, lower_order_final=False, **kw)


SOLVERS = {
    "ddim": (lambda n: ddim_decisions(n), 1),
    "dpm-solver++ 2M midpoint": (lambda n: dpm_solver_decisions(n, 2, **_keep_order()), 2),
    "dpm-solver++ 2M heun": (lambda n: dpm_solver_decisions(n, 2, solver_type="heun", **_keep_order()), 2),
    "dpm-solver++ 3M taylor": (lambda n: dpm_solver_decisions(n, 3, solver_type="taylor", **_keep_order()), 3),
    "dpm-solver 3M taylor (noise)": (
        lambda n: dpm_solver_decisions(n, 3, prediction="noise", solver_type="taylor", **_keep_order()), 3),
    "unipc-1 (UniC makes it 2)": (lambda n: unipc_decisions(n, 1, **_keep_order()), 2),
    "unipc-2 bh1": (lambda n: unipc_decisions(n, 2, solver_type="bh1", **_keep_order()), 3),
    "unipc-2 bh2": (lambda n: unipc_decisions(n, 2, solver_type="bh2", **_keep_order()), 3),
    "unipc-3 bh2": (lambda n: unipc_decisions(n, 3, **_keep_order()), 4),
    "unipc-2 noise": (lambda n: unipc_decisions(n, 2, prediction="noise", **_keep_order()), 3),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_theoretical_order_of_convergence(vp_problem, name):
    decisions_for, order = SOLVERS[name]
    errors = [_error(vp_problem, decisions_for, n) for n in STEPS]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    observed = _observed_order(errors)
    assert order - 0.35 < observed < order + 0.9, (observed, errors)
    assert errors[-1] < 2 * errors[0] * (STEPS[0] / STEPS[-1]) ** order  # converges to the exact solution


def test_diffusers_third_order_weights_are_only_second_order(vp_problem):
    """diffusers' DPMSolverMultistep 3M weighs its second difference by half of the Taylor coefficient:
    the local error stays O(h^3), so it converges at order 2; the exact 'taylor' weights give order 3."""
    diffusers_3m = [_error(vp_problem, lambda n: dpm_solver_decisions(n, 3, **_keep_order()), n) for n in STEPS]
    taylor_3m = [_error(vp_problem, SOLVERS["dpm-solver++ 3M taylor"][0], n) for n in STEPS]
    late_slope = np.log2(diffusers_3m[-2] / diffusers_3m[-1])
    assert 1.7 < late_slope < 2.5
    assert taylor_3m[-1] < diffusers_3m[-1] / 3


@pytest.mark.parametrize("grid_fn", [grids.uniform_time_grid, grids.time_quadratic_grid])
def test_converges_on_other_grids(vp_problem, grid_fn):
    decisions_for = SOLVERS["unipc-2 bh2"][0]
    errors = [_error(vp_problem, decisions_for, n, grid_fn) for n in (10, 40)]
    assert errors[1] < errors[0] / 8


def test_flow_schedule_order_and_flow_euler_exactness():
    """On rectified flow, DDIM is flow-matching Euler (order 1) and DPM-Solver++ 2M is order 2."""
    mixture = default_mixture(dim=3, seed=1)
    schedule = FlowSchedule(1000)
    x_start = torch.randn(32, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t_start, t_end = 990.0, 20.0
    end = tuple(float(v) for v in schedule.alpha_sigma(t_end))
    reference = exact_solution(mixture, schedule, x_start, t_start, end)

    def run(decisions_for, n):
        grid = grids.uniform_lambda_grid(schedule, n, t_start, t_end)
        plan = compile_plan(grid, decisions_for(n))
        x = sample_loop(lambda x, i: mixture.denoise(x, grid.alphas[i], grid.sigmas[i]), x_start, plan)
        return (x - reference).pow(2).mean().sqrt().item(), grid

    for decisions_for, order in [(SOLVERS["ddim"][0], 1), (SOLVERS["dpm-solver++ 2M heun"][0], 2)]:
        errors = [run(decisions_for, n)[0] for n in (20, 40, 80)]
        assert abs(np.log2(errors[-2] / errors[-1]) - order) < 0.3, errors

    # Euler in s with the exact velocity v = eps - x0 is the same update as DDIM.
    _, grid = run(SOLVERS["ddim"][0], 7)
    plan = compile_plan(grid, ddim_decisions(7))
    x_engine = sample_loop(lambda x, i: mixture.denoise(x, grid.alphas[i], grid.sigmas[i]), x_start, plan)
    x = x_start
    for i in range(7):
        x0, eps = mixture.denoise(x, grid.alphas[i], grid.sigmas[i])
        x = x + (grid.sigmas[i + 1] - grid.sigmas[i]) * (eps - x0)
    torch.testing.assert_close(x_engine, x, rtol=1e-10, atol=1e-10)
