"""The engine's contracts: pair form, corrector bookkeeping, plan validation, state reset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from fewstep import samplers
from fewstep.solvers import StepDecision, VPSchedule, compile_plan, grids, sample_loop
from fewstep.solvers.engine import derivative_weights
from fewstep.solvers.methods import ddim_decisions, dpm_solver_decisions, unipc_decisions
from fewstep.solvers.phi import hphi


@pytest.fixture(scope="module")
def grid():
    return grids.spacing_grid(VPSchedule.from_config(DDPMScheduler().config), 8)


def _pairs(seed: int, n: int, shape=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64))
            for _ in range(n)]


def test_ddim_pair_form_uses_both_terms_explicitly(grid):
    """An inconsistent pair (CFG++: guided x0, unconditional eps) gives alpha_t x0 + sigma_t eps."""
    plan = compile_plan(grid, ddim_decisions(grid.num_steps))
    pairs = _pairs(0, grid.num_steps)
    x = torch.randn(2, 5, dtype=torch.float64)
    out = sample_loop(lambda x, i: pairs[i], x, plan)
    x0_last, eps_last = pairs[-1]
    torch.testing.assert_close(out, grid.alphas[-1] * x0_last + grid.sigmas[-1] * eps_last)


def test_data_and_noise_first_order_steps_agree_for_consistent_pairs(grid):
    mixture_like = lambda x, i: ((x * 0.3), (x - grid.alphas[i] * x * 0.3) / grid.sigmas[i])  # noqa: E731
    x = torch.randn(3, 4, dtype=torch.float64)
    a = sample_loop(mixture_like, x, compile_plan(grid, ddim_decisions(8, "data")))
    b = sample_loop(mixture_like, x, compile_plan(grid, ddim_decisions(8, "noise")))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_derivative_weights_are_exact_for_polynomials():
    """Taylor weights integrate F(lambda) = polynomial of degree m exactly: compare with quadrature."""
    from scipy.integrate import quad

    h, r = 0.7, [-0.8, -1.9]
    coeffs = [0.3, -1.2, 0.5]  # F(u) = sum c_k (u/h)^k with u = lambda - lambda_s
    poly = lambda u: sum(c * (u / h) ** k for k, c in enumerate(coeffs))  # noqa: E731
    w = derivative_weights(r, -h, 1.0)
    estimate = sum(wj * (poly(rj * h) - poly(0.0)) for wj, rj in zip(w, r))
    # exact data-prediction integral of the non-constant part: int_0^h e^{-(h-u)} (F(u) - F(0)) du
    exact, _ = quad(lambda u: math.exp(-(h - u)) * (poly(u) - poly(0.0)), 0, h)
    assert abs(estimate - exact) < 1e-12


def test_hphi_limit_and_first_order_final_step_only():
    assert hphi(1, -math.inf) == -1.0
    sched = VPSchedule.from_config(DDPMScheduler().config)
    grid = grids.spacing_grid(sched, 5)  # ends at sigma = 0
    bad = [StepDecision(order=min(i + 1, 2)) for i in range(5)]
    with pytest.raises(ValueError, match="sigma = 0"):
        compile_plan(grid, bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prediction": "velocity"}, "prediction"),
        ({"order": 0}, "order"),
        ({"order": 7}, "order"),
        ({"coefficients": "rk4"}, "coefficients"),
        ({"corrector": "pece"}, "corrector"),
        ({"order": 3, "points": (1,)}, "points"),
        ({"order": 2, "points": (0,)}, "points"),
        ({"relaxation": float("nan")}, "relaxation"),
    ],
)
def test_bad_decisions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepDecision(**kwargs)


def test_plan_validation(grid):
    with pytest.raises(ValueError, match="one decision per step"):
        compile_plan(grid, ddim_decisions(3))
    with pytest.raises(ValueError, match="previous evaluations"):
        compile_plan(grid, [StepDecision(order=2)] + ddim_decisions(7))
    with pytest.raises(ValueError, match="last step cannot have a corrector"):
        compile_plan(grid, ddim_decisions(7) + [StepDecision(corrector="unic")])
    with pytest.raises(TypeError, match="StepDecision"):
        compile_plan(grid, ["ddim"] * 8)
    with pytest.raises(TypeError, match="`grid` must be a TimeGrid .* got NoneType"):
        compile_plan(None, ddim_decisions(8))
    with pytest.raises(TypeError, match="`ems` must be an EMSGrid or None, got dict"):
        compile_plan(grid, ddim_decisions(8), ems={})
    with pytest.raises(TypeError, match="`plan` must be a Plan .* got list"):
        sample_loop(lambda x, i: (x, x), torch.zeros(2, 5), ddim_decisions(8))


def test_unipc_buffer_keeps_uncorrected_evaluation_and_corrects_sample(grid):
    """UniC moves the sample but the buffer keeps x^eval: the next predictor sees the pair where it was taken."""
    plan = compile_plan(grid, unipc_decisions(8, 2))
    assert plan.steps[0].corrector is None and plan.steps[1].corrector is not None
    assert plan.buffer_size >= 2
    x = torch.randn(2, 3, dtype=torch.float64)
    seen = []

    def pair(x, i):
        seen.append(x.clone())
        return x * 0.5, x * 0.1

    sample_loop(pair, x, plan)
    no_corrector = compile_plan(grid, unipc_decisions(8, 2, disable_corrector=range(8)))
    seen_plain = []
    sample_loop(lambda x, i: (seen_plain.append(x.clone()), (x * 0.5, x * 0.1))[1], x, no_corrector)
    assert torch.equal(seen[1], seen_plain[1])  # first evaluation after step 0 is identical ...
    assert not torch.allclose(seen[2], seen_plain[2])  # ... the corrector changes what follows


def test_relaxation_zero_is_identity_and_nonzero_changes_result(grid):
    base = dpm_solver_decisions(8, 2, solver_type="taylor")
    relaxed = [StepDecision(order=d.order, coefficients="taylor", relaxation=0.3) for d in base]
    x = torch.randn(2, 3, dtype=torch.float64)
    fn = lambda x, i: (torch.sin(x) * 0.5, torch.cos(x) * 0.2)  # noqa: E731
    a = sample_loop(fn, x, compile_plan(grid, base))
    b = sample_loop(fn, x, compile_plan(grid, relaxed))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", samplers.names("diffusion", standalone=True))
def test_state_is_reset_by_set_timesteps(name, tiny_denoiser):
    """Sampling two batches in a row gives the same result as two fresh schedulers (no leaked buffer)."""
    sched = samplers.get(name)()

    def run(s, seed):
        s.set_timesteps(7)
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for t in s.timesteps:
            x = s.step(tiny_denoiser(x, t), t, x).prev_sample
        return x

    first, second = run(sched, 0), run(sched, 1)
    torch.testing.assert_close(first, run(samplers.get(name)(), 0), rtol=0, atol=0)
    torch.testing.assert_close(second, run(samplers.get(name)(), 1), rtol=0, atol=0)


@pytest.mark.parametrize("name", samplers.names("diffusion", standalone=True))
def test_save_and_load_round_trip(name, tmp_path, tiny_denoiser):
    sched = samplers.get(name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.save_pretrained(tmp_path)
    loaded = samplers.get(name).from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(sched.config)
    for s in (sched, loaded):
        s.set_timesteps(6)
    assert torch.equal(sched.timesteps, loaded.timesteps)
    np.testing.assert_array_equal(sched.plan.grid.lambdas, loaded.plan.grid.lambdas)


def test_solvers_do_not_import_diffusers():
    """DESIGN: the math in fewstep.solvers (and the analytic reference) is pure torch + numpy/scipy."""
    import subprocess
    import sys

    code = ("import sys, fewstep.solvers, fewstep.solvers.methods, fewstep.bench.analytic; "
            "sys.exit(1 if 'diffusers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
