"""Mutation-gap tests for the measuring code: the exact Gaussian-mixture reference (``fewstep.bench.analytic``),
the analytic bench table, the Frechet distance / RMSE metrics and the flow-matching grids.

Every expected value comes from an independent reference: ``torch.distributions`` log-densities differentiated by
autograd (Tweedie), closed-form Gaussian PF-ODE solutions, scipy (``linalg.sqrtm``), numpy brute force, and
diffusers' own schedulers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from fewstep.bench.analytic import GaussianMixture, exact_solution

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uneven_mixture() -> GaussianMixture:
    """Unequal stds (per dimension) and weights: every normalising term of the posterior matters."""
    means = [[-1.0, 0.5], [1.5, -0.5], [0.2, 1.2]]
    stds = [[0.3, 0.9], [1.1, 0.5], [0.6, 0.6]]
    return GaussianMixture(means, stds, weights=[0.15, 0.6, 0.25])


def _noisy_log_density(gm: GaussianMixture, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """log p_t(x) of ``x = alpha x0 + sigma eps`` written with torch.distributions (independent of the module)."""
    scale = torch.sqrt(alpha**2 * gm.stds.square() + sigma**2)
    comp = D.Independent(D.Normal(alpha * gm.means, scale), 1)
    return D.MixtureSameFamily(D.Categorical(probs=gm.weights), comp).log_prob(x)


def _tweedie_eps(gm: GaussianMixture, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """E[eps | x] = -sigma grad_x log p_t(x) (Tweedie), by autograd."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_noisy_log_density(gm, x, alpha, sigma).sum(), x)
    return -sigma * grad


# ------------------------------------------------------------------------------------------ analytic reference
@pytest.mark.parametrize("alpha, sigma", [(0.8, 0.6), (0.3, 1.7), (1.0, 0.05)])
def test_eps_differentiable_matches_tweedie_of_the_noisy_density(alpha, sigma):
    """``eps_differentiable`` (DPM-Solver-v3's EMS estimation uses it) is the exact E[eps | x]: it must equal Tweedie's
    formula on an independently written density, for components of unequal widths and weights (the ``log var`` and
    ``log w`` terms of the responsibilities). float64 autograd vs closed form: agreement to ~1e-12."""
    gm = _uneven_mixture()
    x = 1.5 * torch.randn(40, 2, dtype=F64, generator=_gen(0))
    got = gm.eps_differentiable(x, torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64))
    torch.testing.assert_close(got, _tweedie_eps(gm, x, alpha, sigma), rtol=1e-9, atol=1e-11)
    # and it is differentiable in x: its Jacobian is the Hessian-based one of the reference
    xr = x[:3].clone().requires_grad_(True)
    jac = torch.autograd.grad(gm.eps_differentiable(xr, torch.tensor(alpha, dtype=F64),
                                                    torch.tensor(sigma, dtype=F64)).sum(), xr)[0]
    xr2 = x[:3].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_noisy_log_density(gm, xr2, alpha, sigma).sum(), xr2, create_graph=True)
    (ref,) = torch.autograd.grad((-sigma * g).sum(), xr2)
    torch.testing.assert_close(jac, ref, rtol=1e-8, atol=1e-10)


class _PureNoiseStart:
    """A schedule whose start point is pure noise of std 2 (alpha = 0, sigma = 2), e.g. a scaled flow."""

    def alpha_sigma(self, t):
        return np.asarray([0.0]), np.asarray([2.0])


@pytest.mark.parametrize("end", [(1.0, 0.0), (0.6, 0.3)])
def test_exact_solution_from_pure_noise_of_any_scale(end):
    """From alpha = 0 the PF-ODE of one Gaussian ``N(mu, diag(s^2))`` keeps the standardised variable
    ``(x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)`` constant, so ``x_end = a_e mu + sqrt(a_e^2 s^2 + s_e^2) x_T / 2``
    for a start of std 2 (the angle form must rescale by ``hypot(alpha, sigma)``). Solver tolerance 1e-10: 1e-7."""
    mu = torch.tensor([[1.0, -0.5]], dtype=F64)
    s = torch.tensor([[0.7, 1.2]], dtype=F64)
    gm = GaussianMixture(mu, s)
    x_T = 2.0 * torch.randn(12, 2, dtype=F64, generator=_gen(1))
    a_e, s_e = end
    expected = a_e * mu + torch.sqrt(a_e**2 * s**2 + s_e**2) * x_T / 2.0
    got = exact_solution(gm, _PureNoiseStart(), x_T, 0.0, alpha_sigma_end=end)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------ analytic bench table
def _fd_scipy(samples: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> float:
    """Frechet distance of the samples' (unbiased) Gaussian fit to N(mu, cov), with scipy's general sqrtm."""
    from scipy import linalg

    m, c = samples.mean(0), np.cov(samples, rowvar=False)
    covmean = linalg.sqrtm(c @ cov).real
    return float(((m - mu) ** 2).sum() + np.trace(c) + np.trace(cov) - 2 * np.trace(covmean))


def _gaussian_flow_map(x_T, mu, s, start, end=(1.0, 0.0)):
    """Closed-form PF-ODE map of one Gaussian N(mu, diag(s^2)): the standardised variable is constant."""
    (a0, s0), (a1, s1) = start, end
    return a1 * mu + np.sqrt(a1**2 * s**2 + s1**2) * (x_T - a0 * mu) / np.sqrt(a0**2 * s**2 + s0**2)


def test_analytic_bench_vp_row_and_floor_match_an_independent_recomputation():
    """RMSE to the exact endpoint *from the sampler's first grid point* and FD to the data, recomputed with numpy /
    scipy for one Gaussian (closed-form PF-ODE, DDPM's alphas_cumprod from diffusers), and the exact floor from model
    time T - 1. Tolerances: the bench's exact solve runs at 1e-10 (DOP853), the sampler is identical: 1e-6 relative."""
    from diffusers import DDPMScheduler

    from fewstep import samplers as sampler_registry
    from fewstep.bench.analytic import AnalyticModel
    from fewstep.bench.analytic_bench import SCHEDULE_CONFIGS, format_table, run_analytic_bench

    mu, s = np.array([0.5, -1.0]), np.array([0.7, 0.7])
    gm = GaussianMixture(mu[None], [0.7])
    rows, meta = run_analytic_bench(samplers=["ddim"], steps=[3], schedule="vp", num_samples=64, mixture=gm,
                                    seed=3, progress=False)
    (row,) = rows
    x_T = torch.randn(64, 2, generator=_gen(3), dtype=F64)  # the documented noise: seeded by `seed`
    sched = sampler_registry.get("ddim").from_config(SCHEDULE_CONFIGS["vp"])
    sched.set_timesteps(3)
    model = AnalyticModel(gm, sched.noise_schedule, "epsilon")
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    x = x.numpy()
    acp = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double().numpy()
    t0 = int(sched.timesteps[0])
    ref = _gaussian_flow_map(x_T.numpy(), mu, s, (math.sqrt(acp[t0]), math.sqrt(1 - acp[t0])))
    assert (row.steps, row.nfe) == (3, 3)
    assert row.rmse == pytest.approx(float(np.sqrt(((x - ref) ** 2).mean())), rel=1e-6)
    assert row.fd == pytest.approx(_fd_scipy(x, mu, np.diag(s**2)), rel=1e-6)
    exact = _gaussian_flow_map(x_T.numpy(), mu, s, (math.sqrt(acp[999]), math.sqrt(1 - acp[999])))
    assert meta["exact_start_t"] == 999.0
    assert meta["exact_fd"] == pytest.approx(_fd_scipy(exact, mu, np.diag(s**2)), rel=1e-6)
    # the Markdown table puts each number under its own header
    lines = format_table(rows, meta).splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert float(cells[header.index("RMSE to exact")]) == pytest.approx(row.rmse, rel=1e-3)
    assert float(cells[header.index("FD to data")]) == pytest.approx(row.fd, rel=1e-3)


def test_analytic_bench_flow_world_is_sd3_flow_match_euler():
    """The flow table's world is SD3's flow (shift 3): flow-euler's row equals diffusers'
    FlowMatchEulerDiscreteScheduler(shift=3) run on the exact flow model, scored against the closed-form Gaussian map
    from pure noise. Tolerance: diffusers steps in float32 and fewstep nudges s = 1 to 1 - 1e-6: 1e-4 relative."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.bench.analytic import AnalyticModel
    from fewstep.bench.analytic_bench import run_analytic_bench
    from fewstep.solvers.schedules import FlowSchedule

    mu, s = np.array([0.5, -1.0]), np.array([0.7, 0.7])
    gm = GaussianMixture(mu[None], [0.7])
    (row,), _ = run_analytic_bench(samplers=["flow-euler"], steps=[4], schedule="flow", num_samples=64, mixture=gm,
                                   seed=5, progress=False)
    x_T = torch.randn(64, 2, generator=_gen(5), dtype=F64)
    ds = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ds.set_timesteps(4)
    model = AnalyticModel(gm, FlowSchedule(1000), "flow")
    x = x_T.clone()
    for t in ds.timesteps:
        x = ds.step(model(x, t), t, x).prev_sample
    x = x.numpy()
    ref = mu + s * x_T.numpy()  # pure noise (alpha = 0, sigma = 1) -> data
    assert row.rmse == pytest.approx(float(np.sqrt(((x - ref) ** 2).mean())), rel=1e-4)
    assert row.fd == pytest.approx(_fd_scipy(x, mu, np.diag(s**2)), rel=1e-4)


# ------------------------------------------------------------------------------------------ mean-reverting reference
def test_mean_reverting_denoise_is_tweedie_of_the_mr_marginal():
    """``x_t = a x0 + (1 - a) mu + lam sqrt(1 - a^2) eps``: given ``mu``, ``x_t`` is a mixture of
    ``N(a mu_k + (1 - a) mu, a^2 s_k^2 + S^2)`` with ``S = lam sqrt(1 - a^2)``, so ``E[eps | x_t] = -S grad log p``
    and ``E[x0 | x_t] = (x_t - (1 - a) mu - S eps_hat) / a``. float64 autograd: 1e-10."""
    from fewstep.bench.analytic import mean_reverting_denoise

    gm = _uneven_mixture()
    a, lam = 0.55, 0.8
    S = lam * math.sqrt(1 - a * a)
    mu = torch.randn(30, 2, dtype=F64, generator=_gen(4))
    x = a * gm.sample(30, generator=_gen(5)) + (1 - a) * mu + S * torch.randn(30, 2, dtype=F64, generator=_gen(6))
    xr = x.clone().requires_grad_(True)
    scale = torch.sqrt(a**2 * gm.stds.square() + S**2)
    comp = D.Independent(D.Normal(a * gm.means[None] + (1 - a) * mu[:, None], scale[None]), 1)
    logp = torch.logsumexp(comp.log_prob(xr[:, None]) + gm.weights.log(), dim=-1)
    (grad,) = torch.autograd.grad(logp.sum(), xr)
    eps_ref = -S * grad
    x0_ref = (x - (1 - a) * mu - S * eps_ref) / a
    x0_hat, eps_hat = mean_reverting_denoise(gm, x, mu, a, lam)
    torch.testing.assert_close(eps_hat, eps_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x0_hat, x0_ref, rtol=1e-9, atol=1e-10)


def test_exact_mean_reverting_solution_single_gaussian_closed_form():
    """For one Gaussian ``N(m, diag(s^2))`` the MR PF-ODE keeps ``(x - (1 - a) mu - a m) / sqrt(a^2 s^2 + S_a^2)``
    constant (``S_a = lam sqrt(1 - a^2)``), which gives the endpoint in closed form. Solver at 1e-10: 1e-7."""
    from fewstep.bench.analytic import exact_mean_reverting_solution

    m = torch.tensor([[0.4, -0.8]], dtype=F64)
    s = torch.tensor([[0.6, 1.1]], dtype=F64)
    gm = GaussianMixture(m, s)
    lam, a0, a1 = 0.9, 0.2, 0.85
    mu = torch.randn(10, 2, dtype=F64, generator=_gen(7))
    x0 = torch.randn(10, 2, dtype=F64, generator=_gen(8))

    def spread(a):
        return torch.sqrt(a**2 * s**2 + lam**2 * (1 - a * a))

    expected = (1 - a1) * mu + a1 * m + spread(a1) * (x0 - (1 - a0) * mu - a0 * m) / spread(a0)
    got = exact_mean_reverting_solution(gm, x0, mu, lam, a0, a1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------ metrics
def test_feature_statistics_and_rmse_match_brute_force_loops():
    """Mean and *unbiased* (N - 1) covariance by explicit Python loops, RMSE by its definition (all elements)."""
    from fewstep.bench.metrics import feature_statistics, rmse

    g = np.random.default_rng(0)
    feats = g.normal(size=(7, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.0]
    n, d = feats.shape
    mean = [sum(feats[i, j] for i in range(n)) / n for j in range(d)]
    cov = [[sum((feats[i, j] - mean[j]) * (feats[i, k] - mean[k]) for i in range(n)) / (n - 1) for k in range(d)]
           for j in range(d)]
    m, c = feature_statistics(feats)
    np.testing.assert_allclose(m, mean, rtol=1e-13)
    np.testing.assert_allclose(c, cov, rtol=1e-12, atol=1e-14)
    a, b = torch.tensor(g.normal(size=(4, 5))), torch.tensor(g.normal(size=(4, 5)))
    brute = math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel())
    assert rmse(a, b) == pytest.approx(brute, rel=1e-13)


# ------------------------------------------------------------------------------------------ reference images (FD)
def test_folder_statistics_are_the_statistics_of_the_pixels_in_unit_range(tmp_path):
    """With the identity as feature extractor the reference statistics are the mean / unbiased covariance of the
    pixels scaled by 1/255 (8-bit), every image counted once whatever the batch size, in NCHW order for a
    non-square size. Images reach the extractor as float32: 1e-6."""
    from PIL import Image

    from fewstep.bench.fid import FeatureExtractor, folder_statistics

    g = np.random.default_rng(0)
    imgs = [g.integers(0, 256, size=(2, 3, 3), dtype=np.uint8) for _ in range(3)]  # H = 2, W = 3, RGB
    for i, a in enumerate(imgs):
        Image.fromarray(a, "RGB").save(tmp_path / f"{i}.png")
    extractor = FeatureExtractor(lambda x: x.flatten(1), "pixels", batch_size=2)
    mean, cov = folder_statistics(tmp_path, extractor, size=(2, 3))
    feats = np.stack([a.transpose(2, 0, 1).reshape(-1) / 255.0 for a in imgs])
    np.testing.assert_allclose(mean, feats.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), rtol=0, atol=1e-6)
    # greyscale batches (the digits) are repeated over RGB before the extractor sees them
    grey = torch.rand(3, 1, 2, 2, generator=_gen(0))
    torch.testing.assert_close(extractor(grey), grey.expand(-1, 3, -1, -1).flatten(1).double())


def test_default_mixture_draws_follow_its_documented_distributions():
    """``default_mixture``: means ~ N(0, 1.5^2), isotropic stds uniform in [0.5, 1], weights uniform in [0.5, 1]
    before normalisation. Over 200 seeds x 8 means the sample std of the means is within ~5% of 1.5 (3 standard
    errors), which separates it from any other scale such as 1."""
    mixtures = [GaussianMixture.default(dim=2, seed=k) for k in range(200)]
    means = torch.cat([m.means.flatten() for m in mixtures])
    assert abs(means.std().item() - 1.5) < 0.08
    stds = torch.cat([m.stds for m in mixtures])
    assert 0.5 <= stds.min().item() and stds.max().item() <= 1.0
    assert bool((stds == stds[:, :1]).all())  # isotropic
    ratios = torch.stack([m.weights.max() / m.weights.min() for m in mixtures])
    assert ratios.max().item() <= 2.0 + 1e-12  # weights within [0.5, 1] before normalising


def test_frechet_distance_refuses_a_covariance_negative_beyond_rounding():
    """A covariance is positive semi-definite up to rounding (``1e-6`` of its largest eigenvalue); an eigenvalue of
    -1e-4 of the largest is no rounding: the distance refuses it rather than computing with it."""
    from fewstep.bench.metrics import frechet_distance

    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1e-4]), np.zeros(2), np.eye(2))
    # -1e-9 is rounding: taken as 0, so FD = (sqrt(1) - sqrt(1))^2 + (sqrt(0) - sqrt(1))^2 = 1
    assert frechet_distance(np.zeros(2), np.diag([1.0, -1e-9]), np.zeros(2), np.eye(2)) == pytest.approx(1.0, abs=1e-8)
    # and a covariance is symmetric up to rounding (1e-6 relative): an asymmetry of 1e-3 is refused
    with pytest.raises(ValueError, match="symmetric covariance"):
        frechet_distance(np.zeros(2), [[1.0, 1e-3], [0.0, 1.0]], np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------ grid runner rows
def test_analytic_grid_rows_report_wall_time_per_image(monkeypatch):
    """A results row's ``seconds_per_image`` is the cell's wall time divided by its number of samples; its
    metrics are the analytic table's (run_analytic_bench replaced by a fixed row: no sampling)."""
    from fewstep.bench import analytic_bench, runner

    row = analytic_bench.AnalyticRow("ddim", 3, 3, 0.25, 0.5, 2.0)
    monkeypatch.setattr(analytic_bench, "run_analytic_bench", lambda **kw: ([row], {}))
    config = runner.BenchConfig(models=["analytic"], samplers=["ddim"], steps=[3], num_samples=40)
    out = runner._run_analytic(runner.Cell("analytic", "ddim", 3), config)
    assert out["seconds_per_image"] == pytest.approx(2.0 / 40, rel=1e-12)
    assert (out["nfe"], out["rmse"], out["fd"], out["mse"], out["num_samples"]) == (3, 0.25, 0.5, None, 40)


# ------------------------------------------------------------------------------------------ grid end points
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_clean_end_and_finite_lambdas_against_ddpm_alphas_cumprod(final):
    """``clean_end``: the target is clean data (sigma = 0) -- not a small ``sigma_min`` (0.01 on DDPM's linear
    schedule); ``finite_lambdas``: the N evaluation points' lambdas, plus the target's unless it is clean.
    lambda = 0.5 log(acp / (1 - acp)) from diffusers' float32 alphas_cumprod: 1e-6 relative."""
    from diffusers import DDPMScheduler

    from fewstep.solvers import grids
    from fewstep.solvers.schedules import VPSchedule

    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    acp = ddpm.alphas_cumprod.double().numpy()
    grid = grids.spacing_grid(VPSchedule.from_config(ddpm.config), 5, final_sigmas_type=final)
    lam = 0.5 * np.log(acp / (1 - acp))
    expected = lam[grid.timesteps.astype(int)]
    if final == "sigma_min":
        expected = np.append(expected, lam[0])
    assert grid.clean_end is (final == "zero")
    assert grid.finite_lambdas.shape == expected.shape and np.all(np.isfinite(grid.finite_lambdas))
    np.testing.assert_allclose(grid.finite_lambdas, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------ image metrics
def test_ssim_of_colour_images_is_the_mean_over_channels_of_scikit_image():
    """Per image, SSIM averages its channels: scikit-image's ``structural_similarity`` per channel (uniform 7x7
    window, sample covariance: the module's documented defaults), averaged. float64 both sides: 1e-10."""
    metrics = pytest.importorskip("skimage.metrics")
    from fewstep.bench.image_metrics import ssim

    x = torch.rand(2, 3, 12, 12, dtype=F64, generator=_gen(0))
    y = (x + 0.2 * torch.rand(2, 3, 12, 12, dtype=F64, generator=_gen(1))).clamp(0, 1)
    y[:, 1] = 1 - y[:, 1]  # channels of very different similarity
    got = ssim(x, y)
    for i in range(2):
        ref = np.mean([metrics.structural_similarity(x[i, c].numpy(), y[i, c].numpy(), data_range=1.0)
                       for c in range(3)])
        assert got[i].item() == pytest.approx(ref, abs=1e-10)


# ------------------------------------------------------------------------------------------ flow grid defaults
def test_flow_grid_defaults_unshifted_and_lambda_grid_default_range():
    """``flow_grid`` without a shift is diffusers' unshifted FlowMatchEuler grid (shift 1; diffusers' float32 sigmas,
    fewstep's nudge of s = 1 to 1 - 1e-6: 1.5e-6 relative); a grid uniform in lambda on a flow schedule defaults to
    model times ``T - 1`` down to ``1`` (lambda = log((1 - s) / s) finite at both ends), evenly spaced in lambda."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.solvers import grids
    from fewstep.solvers.schedules import FlowSchedule

    ds = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ds.set_timesteps(6)
    grid = grids.flow_grid(FlowSchedule(1000), 6)
    np.testing.assert_allclose(grid.sigmas, ds.sigmas.double().numpy(), rtol=1.5e-6, atol=0)
    lam = grids.uniform_lambda_grid(FlowSchedule(1000), 4)
    assert lam.timesteps[0] == 999.0 and lam.sigmas[-1] == pytest.approx(1e-3, rel=1e-12)
    ends = math.log(0.001 / 0.999), math.log(0.999 / 0.001)
    np.testing.assert_allclose(lam.lambdas, np.linspace(*ends, 5), rtol=0, atol=1e-9)
