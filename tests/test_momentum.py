"""Heavy-ball / GHVB momentum: coefficients, beta = 1 parity with the bases, order, stability, schedulers."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from _helpers import REAL_CONFIGS, TinyDenoiser

from fewstep import samplers
from fewstep.bench.analytic import GaussianMixture, exact_endpoint
from fewstep.solvers import compile_plan, sample_loop
from fewstep.solvers.engine import EngineState
from fewstep.solvers.grids import TimeGrid
from fewstep.solvers.methods import ddim_decisions
from fewstep.solvers.momentum import (
    adams_bashforth_coefficients,
    compile_momentum,
    ghvb_coefficients,
    split_fractional_order,
)

HB = samplers.get("hb")
GHVB = samplers.get("ghvb")


# ----------------------------------------------------------------------------------------------------
# coefficients
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_adams_bashforth_integrates_polynomials_exactly(k):
    # sum_j b_j p(-j) = int_0^1 p(s) ds for every polynomial of degree < k
    b = adams_bashforth_coefficients(k)
    for m in range(k):
        quad = sum(bj * (-j) ** m for j, bj in enumerate(b))
        assert quad == pytest.approx(1.0 / (m + 1), abs=1e-12)
    # ... and not for degree k (it is exactly order k)
    assert sum(bj * (-j) ** k for j, bj in enumerate(b)) != pytest.approx(1.0 / (k + 1), abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8, 1.0])
def test_ghvb_rows_are_consistent_and_reduce_to_adams_bashforth(k, beta):
    g = ghvb_coefficients(k, beta)
    assert len(g) == k
    assert sum(g) == pytest.approx(1.0, abs=1e-12)
    if beta == 1.0:
        assert g == pytest.approx(adams_bashforth_coefficients(k), abs=1e-12)


@pytest.mark.parametrize(
    "r, expected", [(3.8, (4, 0.8)), (1.5, (2, 0.5)), (2.5, (3, 0.5)), (0.5, (1, 0.5)), (4, (4, 1.0)), (5.0, (5, 1.0))]
)
def test_fractional_order_convention(r, expected):
    k, beta = split_fractional_order(r)
    assert k == expected[0]
    assert beta == pytest.approx(expected[1])


@pytest.mark.parametrize("bad", [0.0, -1.0, 5.5, 6, float("nan"), "3.8", True])
def test_fractional_order_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="fractional order"):
        split_fractional_order(bad)


@pytest.mark.parametrize("beta", [0.0, -0.1, 1.5, float("nan"), True])
def test_beta_outside_unit_interval_is_rejected(beta):
    with pytest.raises(ValueError, match=r"`beta` must be a finite number in \(0, 1\]"):
        ghvb_coefficients(2, beta)


def test_beta_accepts_numpy_floats():
    assert ghvb_coefficients(2, np.float32(0.5)) == ghvb_coefficients(2, 0.5)


# ----------------------------------------------------------------------------------------------------
# helpers: grids uniform in rho = sigma/alpha (the DDIM-space step the methods assume)
def _rho_grid(rhos) -> TimeGrid:
    r = np.asarray(rhos, dtype=np.float64)
    a = 1.0 / np.sqrt(1.0 + r**2)
    return TimeGrid(np.arange(r.size - 1, dtype=np.float64), a, r * a)


def _plan(grid, mode, k, beta, **kw):
    plan = compile_plan(grid, ddim_decisions(grid.num_steps, "noise"))
    plan.momentum = compile_momentum(grid, mode, k, beta, "noise", **kw)
    return plan


def _plms_reference(grid, pair, x, k):
    """Textbook PLMS-k in DDIM space, written independently of the engine."""
    eps_hist = []
    y = x / grid.alphas[0]
    for i in range(grid.num_steps):
        _, eps = pair(y * grid.alphas[i], i)
        eps_hist.append(eps)
        b = adams_bashforth_coefficients(min(k, len(eps_hist)))
        e = sum(bj * eps_hist[-1 - j] for j, bj in enumerate(b))
        y = y + (grid.rhos[i + 1] - grid.rhos[i]) * e
    return y * grid.alphas[-1]


SMOOTH_MIXTURE = GaussianMixture(
    torch.tensor([[1.0, 0.5, 0.0, 0.0], [-1.0, 0.0, 0.5, 0.0]], dtype=torch.float64),
    torch.tensor([0.6, 0.8], dtype=torch.float64),
)


def _mixture_pair(grid):
    return lambda x, i: SMOOTH_MIXTURE.denoise(x, grid.alphas[i], grid.sigmas[i])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_beta_one_is_plms_and_both_modes_agree(k):
    grid = _rho_grid(np.geomspace(40.0, 0.05, 13).tolist() + [0.0])
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * grid.alphas[0] * 40
    pair = _mixture_pair(grid)
    expected = _plms_reference(grid, pair, x, k)
    for mode in ("hb", "ghvb"):
        out = sample_loop(pair, x, _plan(grid, mode, k, 1.0))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [1e-3, 1e-7, 1e-12])
def test_ghvb_small_beta_keeps_float32_precision(beta):
    """GHVB's weights grow like 1/beta while the velocities they combine differ by O(beta): summed directly, a
    float32 run at beta = 1e-7 ended 11 units off its float64 twin (found by a math audit). Written in velocity
    increments it stays at float32 rounding for any beta, and the float64 result has a limit as beta -> 0."""
    grid = _rho_grid(np.geomspace(40.0, 0.05, 11).tolist() + [0.0])
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * grid.alphas[0] * 40
    pair = _mixture_pair(grid)
    out64 = sample_loop(pair, x, _plan(grid, "ghvb", 4, beta))
    pair32 = lambda x, i: tuple(v.float() for v in pair(x.double(), i))  # noqa: E731
    out32 = sample_loop(pair32, x.float(), _plan(grid, "ghvb", 4, beta))
    assert (out32.double() - out64).abs().max() < 1e-4
    smaller = sample_loop(pair, x, _plan(grid, "ghvb", 4, beta / 10))
    assert (smaller - out64).abs().max() < 100 * beta


# ----------------------------------------------------------------------------------------------------
# order on the analytic reference
RHO_HI, RHO_LO, PRIME = 3.0, 0.3, 40


def _primed_error(mode: str, k: int, beta: float, n: int) -> float:
    """Error at ``RHO_LO`` after ``n`` uniform DDIM-space steps, started from an exact history.

    Every multistep method needs accurate starting values to show its order (the warm-up at lower order
    otherwise caps the global rate at 2): ``PRIME`` extra steps above ``RHO_HI`` run the method but have
    their results replaced by the exact solution, which fills the direction/velocity history exactly.
    """
    h = (RHO_HI - RHO_LO) / n
    rhos = RHO_LO + h * np.arange(n + PRIME, -1, -1)
    y_far = 50.0 * torch.randn(24, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = [exact_endpoint(SMOOTH_MIXTURE, y_far, 50.0, rhos[0])]
    for j in range(PRIME):
        exact.append(exact_endpoint(SMOOTH_MIXTURE, exact[-1], rhos[j], rhos[j + 1]))
    reference = exact_endpoint(SMOOTH_MIXTURE, exact[-1], rhos[PRIME], RHO_LO)
    grid = _rho_grid(rhos)
    state = EngineState(_plan(grid, mode, k, beta))
    pair = _mixture_pair(grid)
    x = exact[0] * grid.alphas[0]
    for i in range(grid.num_steps):
        x0, eps = pair(x, i)
        x = state.advance(i, x, x0, eps)
        if i + 1 <= PRIME:
            x = exact[i + 1] * grid.alphas[i + 1]
    return (x / grid.alphas[-1] - reference).pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    "mode, k, beta, order",
    [
        ("hb", 4, 0.8, 1),  # heavy ball is first order for beta < 1 (paper, Thm. 1) ...
        ("hb", 2, 0.5, 1),
        ("hb", 4, 1.0, 4),  # ... and beta = 1 is PLMS-4
        ("ghvb", 2, 0.5, 2),  # GHVB-k keeps order k for every beta
        ("ghvb", 3, 0.5, 3),
        ("ghvb", 4, 0.8, 4),
        ("ghvb", 5, 0.8, 5),
    ],
)
def test_convergence_order_on_the_analytic_reference(mode, k, beta, order):
    steps = (20, 40, 80)
    errors = [_primed_error(mode, k, beta, n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    last = math.log(errors[-2] / errors[-1]) / math.log(2)
    if order == 1:
        assert 0.8 < slope < 1.2 and 0.85 < last < 1.15, (errors, slope)
    else:
        assert last > order - 0.4 and slope > order - 0.8, (errors, slope, last)


# ----------------------------------------------------------------------------------------------------
# stability on a stiff linear problem
def _stiff_final(mode, k, beta, kappa, n=80):
    """``dy/drho = kappa y`` (``eps = kappa x / alpha``) on a grid with unit steps in rho: ``h lambda = -kappa``."""
    grid = _rho_grid(np.linspace(n, 0, n + 1))

    def pair(x, i):
        eps = kappa * x / grid.alphas[i]
        return (x - grid.sigmas[i] * eps) / grid.alphas[i], eps

    x = torch.ones(1, dtype=torch.float64) * grid.alphas[0]
    return sample_loop(pair, x, _plan(grid, mode, k, beta)).abs().item()


def test_plms4_diverges_where_heavy_ball_and_ghvb_stay_stable():
    # Real-axis stability: AB4 |h lambda| <= 0.30; HB 0.8 widens it by (2 - beta)/beta to ~0.45; GHVB-4 at
    # beta = 0.5 to ~0.43 (notes, sec. 1.6). At h lambda = -0.4 the true solution decays like e^{-0.4 n}.
    assert _stiff_final("hb", 4, 1.0, 0.4) > 1e3  # PLMS-4 blows up
    assert _stiff_final("hb", 4, 0.8, 0.4) < 1e-3  # HB 3.8 decays
    assert _stiff_final("ghvb", 4, 0.5, 0.4) < 1e-2  # GHVB 3.5 decays
    assert _stiff_final("hb", 4, 0.8, 0.5) > 1.0  # ... and HB 3.8 has a boundary too (~0.45)


# ----------------------------------------------------------------------------------------------------
# schedulers
def _loop(scheduler, steps=8, seed=0, pair_transform=None):
    model = TinyDenoiser(2 * 4 * 4)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for t in scheduler.timesteps:
        out = model(x, t)
        if pair_transform is None:
            x = scheduler.step(out, t, x).prev_sample
        else:
            i = scheduler.step_index if scheduler.step_index is not None else 0
            x0, eps = scheduler.convert_model_output(out, x, i)
            x = scheduler.step_pair(*pair_transform(x0, eps), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [6, 20])
@pytest.mark.parametrize(
    "base, kwargs, other",
    [
        ("dpm-solver++", {"solver_order": 2}, "dpm-solver++"),
        ("dpm-solver++", {"solver_order": 3, "solver_type": "taylor"}, "dpm-solver++"),
        ("unipc", {"solver_order": 2}, "unipc"),
        ("unipc", {"solver_order": 3, "solver_type": "bh1"}, "unipc"),
    ],
)
def test_beta_one_reproduces_the_base_scheduler(base, kwargs, other, steps):
    hb = HB(base=base, beta=1.0, **kwargs)
    expected = _loop(samplers.get(other)(**kwargs), steps)
    torch.testing.assert_close(_loop(hb, steps), expected, rtol=1e-10, atol=1e-10)
    # ... and beta < 1 really changes the trajectory
    assert (_loop(HB(base=base, beta=0.8, **kwargs), steps) - expected).abs().max() > 1e-4


# the base's own options (a probe found hb dropping them: beta = 1 was 1.7-3.2% off the base on the same config)
BASE_OPTIONS = [
    ("dpm-solver++", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpm-solver++", {"algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("dpm-solver++", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"disable_corrector": [0, 1, 2]}),
]


@pytest.mark.parametrize("steps", [6, 20])
@pytest.mark.parametrize("base, options", BASE_OPTIONS)
def test_beta_one_reproduces_the_base_with_its_own_options(base, options, steps):
    config = samplers.get(base)(**options).config
    expected = _loop(samplers.get(base).from_config(config), steps)
    hb = samplers.from_config("hb", config, base=base, beta=1.0)
    torch.testing.assert_close(_loop(hb, steps), expected, rtol=1e-10, atol=1e-10)
    if steps == 20:  # (euler_at_final changes nothing below 15 steps, where the last step is first order anyway)
        without = {k: v for k, v in options.items() if k in ("final_sigmas_type", "solver_order")}
        assert (_loop(samplers.get(base)(**without), steps) - expected).abs().max() > 1e-6  # the option matters
    moved = _loop(samplers.from_config("hb", config, base=base, beta=0.8), steps)
    assert torch.isfinite(moved).all() and (moved - expected).abs().max() > 1e-4


def test_momentum_of_a_noise_form_base_lives_in_ddim_space():
    sched = HB(base="dpm-solver++", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    sched.set_timesteps(6)
    step = next(m for m in sched.plan.momentum if m is not None)
    i = sched.plan.momentum.index(step)
    grid = sched.plan.grid
    assert step.c_s == pytest.approx(1 / grid.alphas[i])  # y = x / alpha, as PLMS's (noise) momentum
    data = HB(base="dpm-solver++")
    data.set_timesteps(6)
    assert data.plan.momentum[i].c_s == pytest.approx(1 / data.plan.grid.sigmas[i])  # y = x / sigma


@pytest.mark.parametrize("name, base_key", [("hb", "base"), ("dc-solver", "dc_base")])
@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_sde_algorithm_types_are_refused_naming_the_key(name, base_key, algorithm):
    with pytest.raises(ValueError, match=rf"`algorithm_type`='{re.escape(algorithm)}': .*allowed with {base_key}="
                                         r"'dpm-solver\+\+': \['dpmsolver\+\+', 'dpmsolver'\]"):
        samplers.from_config(name, {}, **{base_key: "dpm-solver++"}, algorithm_type=algorithm,
                             final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match=r"`algorithm_type` must be one of \['dpmsolver\+\+', 'dpmsolver'\], got 'x'"):
        samplers.from_config(name, {}, algorithm_type="x")


def test_solver_order_default_fits_the_base():
    """Found by a probe: ``from_config("hb", cfg, base="dpm-solver++")`` failed with "`solver_order` must be an
    integer in [1, 3], got 4": PLMS's default order, which the user never set."""
    from diffusers import DDPMScheduler

    cfg = DDPMScheduler().config
    for base, order in (("plms", 4), ("dpm-solver++", 2), ("unipc", 2)):
        sched = samplers.from_config("hb", cfg, base=base)
        assert sched.config.solver_order is None and sched._order() == (order, 0.8)
    expected = _loop(samplers.get("dpm-solver++").from_config(cfg))
    got = _loop(samplers.from_config("hb", cfg, base="dpm-solver++", beta=1.0))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # an order the user did set is still checked against the base
    with pytest.raises(ValueError, match=r"`solver_order` must be an integer in \[1, 3\], got 4"):
        samplers.from_config("hb", cfg, base="dpm-solver++", solver_order=4)
    # a saved PLMS heavy ball swaps to another base
    samplers.from_config("hb", HB(beta=0.5).config, base="unipc").set_timesteps(5)


def test_nesterov_differs_from_plain_heavy_ball():
    plain = _loop(HB(beta=0.7))
    nesterov = _loop(HB(beta=0.7, nesterov=True))
    assert (plain - nesterov).abs().max() > 1e-5
    torch.testing.assert_close(_loop(HB(beta=1.0, nesterov=True)), _loop(HB(beta=1.0)), rtol=1e-12, atol=1e-12)


def test_momentum_state_is_reset_between_runs():
    for cls in (HB, GHVB):
        sched = cls(beta=0.6)
        first = _loop(sched, seed=0)
        _loop(sched, seed=5)  # another image in between
        torch.testing.assert_close(_loop(sched, seed=0), first, rtol=0, atol=0)
        # an aborted run leaves nothing behind either
        sched.set_timesteps(8)
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        sched.step(torch.ones_like(x), sched.timesteps[0], x)
        torch.testing.assert_close(_loop(sched, seed=0), first, rtol=0, atol=0)


def test_step_pair_with_consistent_pair_equals_step_and_cfgpp_pairs_work():
    for cls in (HB, GHVB):
        torch.testing.assert_close(_loop(cls(), pair_transform=lambda a, b: (a, b)), _loop(cls()))
    # CFG++ hands an inconsistent pair (guided x0, unconditional eps). With beta = 1 and order 1 the momentum
    # wrapper must treat it exactly as DDIM does.
    def cfgpp(x0, eps):
        return 1.3 * x0 - 0.1, eps

    ddim = samplers.get("dpm-solver++")(solver_order=1)  # DDIM on the same (multistep) time grid
    expected = _loop(ddim, pair_transform=cfgpp)
    for cls in (HB, GHVB):
        out = _loop(cls(solver_order=1, beta=1.0), pair_transform=cfgpp)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        assert torch.isfinite(_loop(cls(), pair_transform=cfgpp)).all()


@pytest.mark.parametrize("config_name", ["sd15", "sdxl", "sd21", "sd3"])
@pytest.mark.parametrize("cls", [HB, GHVB])
def test_from_real_configs_and_config_round_trip(config_name, cls, tmp_path):
    sched = cls.from_config(REAL_CONFIGS[config_name], momentum_order=3.8)
    assert sched.config.momentum_order == 3.8
    sched.set_timesteps(10)
    assert sched.plan.momentum is not None and len(sched.plan.momentum) == 10
    sched.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert again.config.momentum_order == 3.8 and again.config.beta == sched.config.beta
    assert again.prediction_type == sched.prediction_type


def test_momentum_order_sets_order_and_beta():
    a = _loop(GHVB(momentum_order=2.5))
    b = _loop(GHVB(solver_order=3, beta=0.5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = _loop(HB(base="dpm-solver++", momentum_order=2.9))
    d = _loop(HB(base="dpm-solver++", solver_order=3, beta=0.9))
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_only_multistep_steps_of_dpm_solver_carry_momentum():
    sched = HB(base="dpm-solver++", solver_order=2)
    sched.set_timesteps(6)
    active = [m is not None for m in sched.plan.momentum]
    assert active == [False, True, True, True, True, False]  # first-order warm-up and final step run plain
    sched = HB(base="plms")
    sched.set_timesteps(6)
    assert all(m is not None for m in sched.plan.momentum)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (HB, {"beta": 0.0}, r"`beta` must be a finite number in \(0, 1\], got 0.0"),
        (HB, {"beta": 1.2}, r"`beta` must be a finite number in \(0, 1\], got 1.2"),
        (GHVB, {"beta": -0.5}, r"`beta` must be a finite number in \(0, 1\]"),
        (HB, {"solver_order": 5}, r"`solver_order` must be an integer in \[1, 4\], got 5"),
        (HB, {"base": "unipc", "solver_order": 4}, r"`solver_order` must be an integer in \[1, 3\], got 4"),
        (GHVB, {"solver_order": 6}, r"`solver_order` must be an integer in \[1, 5\], got 6"),
        (GHVB, {"solver_order": 0}, r"`solver_order` must be an integer in \[1, 5\], got 0"),
        (GHVB, {"momentum_order": 5.5}, r"`fractional order` must be a finite number in \(0, 5\]"),
        (HB, {"momentum_order": 4.2}, r"`momentum_order`=4.2 needs a base of order 5"),
        (HB, {"base": "dpm-solver++", "momentum_order": 3.5}, r"needs a base of order 4; this base supports"),
        (HB, {"base": "heun"}, r"`base` must be one of \['plms', 'dpm-solver\+\+', 'unipc'\], got 'heun'"),
        (HB, {"nesterov": "yes"}, r"`nesterov` must be a bool, got 'yes'"),
        (HB, {"base": "plms", "solver_type": "weird"}, r"`solver_type` for base 'plms' must be one of"),
    ],
)
def test_bad_momentum_parameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_compile_momentum_bad_input():
    grid = _rho_grid([4.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="`mode` must be one of"):
        compile_momentum(grid, "adam", 2, 0.5)
    with pytest.raises(ValueError, match="`space` must be one of"):
        compile_momentum(grid, "hb", 2, 0.5, space="x")
    with pytest.raises(ValueError, match="needs one flag per step"):
        compile_momentum(grid, "hb", 2, 0.5, active=[True])
    with pytest.raises(ValueError, match="nesterov=True` is defined for heavy ball"):
        compile_momentum(grid, "ghvb", 2, 0.5, nesterov=True)
    with pytest.raises(ValueError, match="momentum in 'data' space is undefined"):
        compile_momentum(grid, "hb", 1, 0.5, space="data")  # the last step ends at sigma = 0


# ----------------------------------------------------------------------------------------------------
# registry options and the CLI
def test_from_config_rejects_misspelt_options():
    with pytest.raises(ValueError, match=r"sampler 'hb' has no option\(s\) \['momentum_ordr'\]; its options are: "):
        samplers.from_config("hb", REAL_CONFIGS["sd15"], momentum_ordr=3.8)
    sched = samplers.from_config("ghvb", REAL_CONFIGS["sdxl"], momentum_order=2.5)
    assert (sched.config.momentum_order, sched.config.timestep_spacing) == (2.5, "leading")


def test_cli_sampler_options(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "hb.png"
    argv = ["generate", "--sampler", "hb", "--steps", "3", "--num-images", "2", "--quiet", "--out", str(out)]
    assert main([*argv, "--sampler-option", "momentum_order=3.8", "--sampler-option", "nesterov=true"]) == 0
    assert out.is_file()
    bad = tmp_path / "bad.png"
    argv[-1] = str(bad)
    assert main([*argv, "--sampler-option", "beta=1.5"]) == 2
    assert "`beta` must be a finite number in (0, 1], got 1.5" in capsys.readouterr().err
    assert main([*argv, "--sampler-option", "beta=0.5", "--sampler-option", "beta=0.6"]) == 2
    assert "--sampler-option beta given twice" in capsys.readouterr().err
    code = main([*argv, "--sampler-option", "beta"])  # a usage error: main returns 2 (argparse's too)
    assert code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not bad.exists()
