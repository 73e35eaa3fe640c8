"""Tests for fewstep.bench.analytic (exact Gaussian-mixture denoiser and PF-ODE solutions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.bench.analytic import (
    AnalyticModel,
    GaussianMixture,
    _exact_endpoint_angle,
    default_mixture,
    exact_endpoint,
    exact_solution,
)


class LinearVPSchedule:
    """VP schedule from linear betas; log(alpha) linearly interpolated between integer timesteps."""

    num_train_timesteps = 1000

    def __init__(self) -> None:
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        self.log_alpha = 0.5 * np.cumsum(np.log1p(-betas))

    def alpha_sigma(self, t):
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 999.0)
        i = np.clip(np.floor(t).astype(np.int64), 0, 998)
        frac = t - i
        la = (1.0 - frac) * self.log_alpha[i] + frac * self.log_alpha[i + 1]
        return np.exp(la), np.sqrt(-np.expm1(2.0 * la))


class FlowSchedule:
    """Rectified flow: alpha = 1 - t/1000, sigma = t/1000."""

    num_train_timesteps = 1000

    def alpha_sigma(self, t):
        s = np.asarray(t, dtype=np.float64) / 1000.0
        return 1.0 - s, s


SCHEDULES = {"vp": LinearVPSchedule(), "flow": FlowSchedule()}


def _diag_mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.5, 0.0], [1.5, -0.5, 1.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    stds = torch.tensor([[0.6, 0.9, 0.7], [0.8, 0.5, 1.0], [0.7, 0.7, 0.6]], dtype=torch.float64)
    return GaussianMixture(means, stds, weights=[0.2, 0.5, 0.3])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- construction / moments
def test_defaults_and_moments():
    gm = default_mixture(dim=3, seed=1)
    assert gm.num_components == 4 and gm.dim == 3
    assert gm.means.dtype == torch.float64
    torch.testing.assert_close(gm.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert float(gm.stds.min()) >= 0.5 and float(gm.stds.max()) <= 1.0
    # deterministic in the seed
    torch.testing.assert_close(default_mixture(dim=3, seed=1).means, gm.means, rtol=0, atol=0)
    assert not torch.equal(default_mixture(dim=3, seed=2).means, gm.means)
    torch.testing.assert_close(GaussianMixture.default(dim=3, seed=1).means, gm.means, rtol=0, atol=0)
    # uniform default weights
    torch.testing.assert_close(
        GaussianMixture([[0.0], [1.0]], [1.0, 2.0]).weights, torch.tensor([0.5, 0.5], dtype=torch.float64)
    )

    gm = _diag_mixture()
    x = gm.sample(200_000, generator=_gen(0))
    assert x.shape == (200_000, 3) and x.dtype == torch.float64
    torch.testing.assert_close(x.mean(0), gm.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(), atol=0.03, rtol=0)
    # reproducible with a generator
    torch.testing.assert_close(
        gm.sample(5, generator=_gen(3)), gm.sample(5, generator=_gen(3)), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"means": [0.0, 1.0], "stds": [1.0, 1.0]}, r"means must be a 2-D \[K, D\].*shape \(2,\)"),
        ({"means": [[0.0, 1.0]], "stds": [0.0]}, r"stds must be finite and > 0.*0\.0"),
        ({"means": [[0.0, 1.0]], "stds": [-1.0]}, r"stds must be finite and > 0.*-1\.0"),
        (
            {"means": [[0.0, 1.0], [1.0, 0.0]], "stds": [1.0, 1.0, 1.0]},
            r"stds must have shape \[K\]=\[2\].*\[K, D\]=\[2, 2\].*got shape \(3,\)",
        ),
        (
            {"means": [[0.0, 1.0], [1.0, 0.0]], "stds": [1.0, 1.0], "weights": [1.0]},
            r"weights must have shape \[K\]=\[2\].*got shape \(1,\)",
        ),
        (
            {"means": [[0.0, 1.0], [1.0, 0.0]], "stds": [1.0, 1.0], "weights": [1.0, -0.5]},
            r"weights must be finite, >= 0 and have a positive sum.*-0\.5",
        ),
        (
            {"means": [[0.0, 1.0], [1.0, 0.0]], "stds": [1.0, 1.0], "weights": [0.0, 0.0]},
            r"weights must be .*positive sum",
        ),
        ({"means": [[float("nan"), 1.0]], "stds": [1.0]}, r"means must be finite"),
    ],
)
def test_mixture_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_posterior_bad_inputs():
    gm = _diag_mixture()
    y = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"y must have shape \[N, D\] with D=3; got shape \(4, 2\)"):
        gm.posterior(torch.zeros(4, 2, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"rho must be >= 0"):
        gm.posterior(y, -0.1)
    with pytest.raises(ValueError, match=r"rho must be a scalar or a 1-D tensor of length N=4"):
        gm.posterior(y, torch.ones(3))
    with pytest.raises(ValueError, match=r"not both be 0"):
        gm.denoise(y, 0.0, 0.0)


# --------------------------------------------------------------------------- posterior
def test_single_gaussian_posterior_closed_form():
    mu = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    s = torch.tensor([[0.7, 1.3]], dtype=torch.float64)
    gm = GaussianMixture(mu, s)
    y = torch.randn(50, 2, dtype=torch.float64, generator=_gen(0)) * 3.0
    rho = torch.rand(50, dtype=torch.float64, generator=_gen(1)) * 5.0
    x0_hat, eps_hat = gm.posterior(y, rho)
    r2 = rho[:, None] ** 2
    torch.testing.assert_close(x0_hat, mu + s**2 / (s**2 + r2) * (y - mu), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_hat, rho[:, None] / (s**2 + r2) * (y - mu), rtol=1e-12, atol=1e-12)
    # rho = 0: clean data, no noise
    x0_hat, eps_hat = gm.posterior(y, 0.0)
    torch.testing.assert_close(x0_hat, y, rtol=1e-14, atol=1e-14)
    assert torch.count_nonzero(eps_hat) == 0


@pytest.mark.parametrize("gm", [_diag_mixture(), default_mixture(dim=2, seed=0)], ids=["diag", "default"])
def test_mixture_identities(gm):
    n = 64
    x = gm.sample(n, generator=_gen(0))
    alpha = torch.rand(n, dtype=torch.float64, generator=_gen(1)) * 0.99 + 0.01
    sigma = torch.rand(n, dtype=torch.float64, generator=_gen(2)) * 2.0
    xt = alpha[:, None] * x + sigma[:, None] * torch.randn(n, gm.dim, dtype=torch.float64, generator=_gen(3))
    x0_hat, eps_hat = gm.denoise(xt, alpha, sigma)
    torch.testing.assert_close(alpha[:, None] * x0_hat + sigma[:, None] * eps_hat, xt, rtol=1e-12, atol=1e-12)
    # denoise == posterior in y-space
    rho = sigma / alpha
    y = xt / alpha[:, None]
    x0_y, eps_y = gm.posterior(y, rho)
    torch.testing.assert_close(x0_y, x0_hat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_y, eps_hat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, x0_y + rho[:, None] * eps_y, rtol=1e-12, atol=1e-12)
    # responsibilities
    resp = gm.responsibilities(y, rho)
    assert resp.shape == (n, gm.num_components)
    assert bool((resp >= 0).all())
    torch.testing.assert_close(resp.sum(-1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-13)
    # pure noise (alpha = 0): x0_hat is the data mean, eps_hat = x / sigma
    x0_hat, eps_hat = gm.denoise(xt, 0.0, 1.0)
    torch.testing.assert_close(x0_hat, gm.mean().expand(n, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_hat, xt, rtol=1e-14, atol=1e-14)


def test_tweedie_score():
    """eps_hat = -rho * grad_y log p_rho(y)."""
    gm = _diag_mixture()
    y = (torch.randn(20, 3, dtype=torch.float64, generator=_gen(0)) * 2.0).requires_grad_(True)
    rho = torch.linspace(0.05, 4.0, 20, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gm.log_prob(y, rho).sum(), y)
    _, eps_hat = gm.posterior(y.detach(), rho)
    torch.testing.assert_close(eps_hat, -rho[:, None] * grad, rtol=1e-10, atol=1e-12)
    # log_prob at rho=0 integrates to 1 (1-D mixture, trapezoid)
    gm1 = GaussianMixture([[-1.0], [2.0]], [0.5, 1.0], [0.3, 0.7])
    grid = torch.linspace(-10, 14, 20001, dtype=torch.float64)[:, None]
    total = torch.trapezoid(gm1.log_prob(grid).exp(), grid[:, 0])
    assert abs(total.item() - 1.0) < 1e-9


def test_denoiser_vs_monte_carlo():
    """E[x0 | y] by self-normalised importance weighting of data samples with the Gaussian kernel."""
    gm = default_mixture(dim=2, seed=0)
    x0 = gm.sample(400_000, generator=_gen(0))
    rho = 0.8
    y = gm.sample(6, generator=_gen(1)) + rho * torch.randn(6, 2, dtype=torch.float64, generator=_gen(2))
    logw = -0.5 * torch.cdist(y, x0).square() / rho**2  # [6, M]
    w = torch.softmax(logw, dim=-1)
    x0_mc = w @ x0
    eps_mc = (y - x0_mc) / rho
    x0_hat, eps_hat = gm.posterior(y, rho)
    torch.testing.assert_close(x0_hat, x0_mc, rtol=0, atol=0.03)
    torch.testing.assert_close(eps_hat, eps_mc, rtol=0, atol=0.04)
    # and the orthogonality property of the conditional mean: E[(eps - eps_hat) * eps_hat] = 0
    n = 200_000
    eps = torch.randn(n, 2, dtype=torch.float64, generator=_gen(3))
    x0 = x0[:n]
    _, eps_hat = gm.posterior(x0 + rho * eps, rho)
    lhs = ((eps - eps_hat) * eps_hat).sum(-1).mean()
    assert abs(lhs.item()) < 0.01
    # E[eps_hat . eps] = E[|eps_hat|^2] < E[|eps|^2] = D
    assert 0 < (eps_hat * eps).sum(-1).mean().item() < 2.0


# --------------------------------------------------------------------------- exact PF-ODE
def test_exact_endpoint_single_gaussian_closed_form():
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    s = torch.tensor([[0.6, 1.1, 0.9]], dtype=torch.float64)
    gm = GaussianMixture(mu, s)
    rho0 = 12.0
    y0 = mu + rho0 * torch.randn(32, 3, dtype=torch.float64, generator=_gen(0))
    for rho1 in (0.0, 0.3, 2.5):
        y1 = exact_endpoint(gm, y0, rho0, rho1)
        expected = mu + (y0 - mu) * torch.sqrt((s**2 + rho1**2) / (s**2 + rho0**2))
        torch.testing.assert_close(y1, expected, rtol=0, atol=1e-8)
    # isotropic component, [N, C, H, W] input shape is preserved
    gm = GaussianMixture(torch.full((1, 4), 0.25, dtype=torch.float64), [0.8])
    y0 = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=_gen(1)) * 5.0
    y1 = exact_endpoint(gm, y0, 5.0)
    assert y1.shape == y0.shape
    expected = 0.25 + (y0 - 0.25) * math.sqrt(0.64 / (0.64 + 25.0))
    torch.testing.assert_close(y1, expected, rtol=0, atol=1e-8)


def test_exact_endpoint_validation():
    gm = _diag_mixture()
    y = torch.zeros(2, 3, dtype=torch.float64)
    for r0, r1 in [(1.0, 1.0), (1.0, 2.0), (1.0, -0.1), (float("inf"), 0.0)]:
        with pytest.raises(ValueError, match=r"rho_start > rho_end >= 0"):
            exact_endpoint(gm, y, r0, r1)
    with pytest.raises(ValueError, match=r"x_start .* the mixture has D=3"):
        exact_endpoint(gm, torch.zeros(2, 4, dtype=torch.float64), 1.0)
    # a NaN tolerance made scipy loop forever; a tiny one is silently raised by scipy
    for kw, match in (({"rtol": float("nan")}, r"`rtol` must be a finite number in \[1e-13, 1"),
                      ({"rtol": -1.0}, r"`rtol` must be .* got -1.0"), ({"atol": 0.0}, r"`atol` must be .* > 0")):
        with pytest.raises(ValueError, match=match):
            exact_endpoint(gm, y, 1.0, **kw)


def test_exact_endpoint_pushes_noisy_marginal_to_data():
    """Samples of p_rho pushed through the exact PF-ODE are distributed as the data."""
    gm = default_mixture(dim=2, seed=0)
    n, rho0 = 4000, 20.0
    y0 = gm.sample(n, generator=_gen(0)) + rho0 * torch.randn(n, 2, dtype=torch.float64, generator=_gen(1))
    x = exact_endpoint(gm, y0, rho0, rtol=1e-8, atol=1e-8)
    cov = gm.covariance()
    se = torch.sqrt(torch.diagonal(cov) / n)
    assert bool(((x.mean(0) - gm.mean()).abs() < 4 * se).all()), (x.mean(0), gm.mean())
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.1, atol=0.1)
    # the map is deterministic and distinct starting points stay distinct (a flow, not a projection)
    assert torch.unique(x, dim=0).shape[0] == n


def test_angle_form_agrees_with_rho_form():
    gm = _diag_mixture()
    a0, s0 = 0.3, math.sqrt(1 - 0.09)
    x = a0 * gm.sample(16, generator=_gen(0)) + s0 * torch.randn(
        16, 3, dtype=torch.float64, generator=_gen(1)
    )
    via_angle = _exact_endpoint_angle(gm, x, (a0, s0), (0.9, 0.2))
    via_rho = 0.9 * exact_endpoint(gm, x / a0, s0 / a0, 0.2 / 0.9)
    torch.testing.assert_close(via_angle, via_rho, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["vp", "flow"])
def test_exact_solution_single_gaussian(name):
    sched = SCHEDULES[name]
    mu = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    s = torch.tensor([[0.7, 1.2]], dtype=torch.float64)
    gm = GaussianMixture(mu, s)
    x_T = torch.randn(16, 2, dtype=torch.float64, generator=_gen(0))
    for t_start, end in [(999.0, (1.0, 0.0)), (700.5, (1.0, 0.0)), (999.0, (0.8, 0.3))]:
        a, sg = (float(v) for v in sched.alpha_sigma(t_start))
        y0, rho0 = x_T / a, sg / a
        rho1 = end[1] / end[0]
        expected = end[0] * (mu + (y0 - mu) * torch.sqrt((s**2 + rho1**2) / (s**2 + rho0**2)))
        got = exact_solution(gm, sched, x_T, t_start, alpha_sigma_end=end)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


def test_exact_solution_from_pure_noise():
    """Flow schedule at t=T has alpha=0 (rho=inf): y(rho) = mu + z sqrt(s^2+rho^2) with z = x_T/sigma_T."""
    sched = FlowSchedule()
    mu = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    s = torch.tensor([[0.7, 1.2]], dtype=torch.float64)
    gm = GaussianMixture(mu, s)
    z = torch.randn(16, 2, dtype=torch.float64, generator=_gen(0))
    torch.testing.assert_close(exact_solution(gm, sched, z, 1000.0), mu + z * s, rtol=0, atol=1e-8)
    got = exact_solution(gm, sched, z, torch.tensor(1000.0), alpha_sigma_end=(0.5, 0.5))
    torch.testing.assert_close(got, 0.5 * (mu + z * torch.sqrt(s**2 + 1.0)), rtol=0, atol=1e-8)

    # mixture: semigroup property, T -> t_mid -> 0 equals T -> 0
    gm = default_mixture(dim=2, seed=0)
    direct = exact_solution(gm, sched, z, 1000.0)
    a_m, s_m = (float(v) for v in sched.alpha_sigma(400.0))
    mid = exact_solution(gm, sched, z, 1000.0, alpha_sigma_end=(a_m, s_m))
    torch.testing.assert_close(exact_solution(gm, sched, mid, 400.0), direct, rtol=0, atol=1e-7)


def test_exact_solution_validation():
    gm = _diag_mixture()
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"start must be noisier than the end"):
        exact_solution(gm, FlowSchedule(), x, 100.0, alpha_sigma_end=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"alpha_end > 0"):
        exact_solution(gm, FlowSchedule(), x, 500.0, alpha_sigma_end=(0.0, 1.0))


# --------------------------------------------------------------------------- AnalyticModel
def _to_x0_eps(kind, out, x, a, s):
    if kind == "epsilon":
        return (x - s * out) / a, out
    if kind == "sample":
        return out, (x - a * out) / s
    if kind == "v_prediction":
        n2 = a**2 + s**2
        return (a * x - s * out) / n2, (s * x + a * out) / n2
    # flow: u = eps - x0
    return (x - s * out) / (a + s), (x + a * out) / (a + s)


@pytest.mark.parametrize("sched_name", ["vp", "flow"])
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow", "flow_prediction"])
def test_analytic_model_outputs(kind, sched_name):
    sched = SCHEDULES[sched_name]
    gm = default_mixture(dim=8, seed=3)
    model = AnalyticModel(gm, sched, prediction_type=kind)
    canonical = "flow" if kind == "flow_prediction" else kind
    assert model.config.prediction_type == canonical == model.config["prediction_type"]
    assert model.config.num_train_timesteps == 1000
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")

    n = 6
    x = torch.randn(n, 8, dtype=torch.float64, generator=_gen(0)) * 1.5
    t_vec = torch.tensor([1.0, 50.0, 250.5, 500.0, 800.25, 990.0], dtype=torch.float64)
    for timestep in (t_vec, 321.5, torch.tensor(321.5), torch.tensor([321])):
        out = model(x, timestep)
        assert out.shape == x.shape and out.dtype == torch.float64
        t_np = np.broadcast_to(np.asarray(timestep, dtype=np.float64).reshape(-1), (n,))
        a_np, s_np = sched.alpha_sigma(t_np)
        a = torch.from_numpy(np.asarray(a_np, dtype=np.float64))[:, None]
        s = torch.from_numpy(np.asarray(s_np, dtype=np.float64))[:, None]
        x0_ref, eps_ref = gm.denoise(x, a[:, 0], s[:, 0])
        x0, eps = _to_x0_eps(canonical, out, x, a, s)
        torch.testing.assert_close(x0, x0_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps, eps_ref, rtol=1e-9, atol=1e-9)

    # image-shaped float32 input: same values, input dtype and shape preserved
    img = x.to(torch.float32).reshape(n, 2, 2, 2)
    out_img = model(img, t_vec.to(torch.float32))
    assert out_img.shape == img.shape and out_img.dtype == torch.float32
    ref = model(img.to(torch.float64).reshape(n, 8), t_vec.to(torch.float32))
    torch.testing.assert_close(out_img.reshape(n, 8), ref.to(torch.float32))


def test_analytic_model_errors():
    gm = default_mixture(dim=2)
    with pytest.raises(
        ValueError, match=r"prediction_type 'x0_typo' is not supported.*epsilon.*v_prediction"
    ):
        AnalyticModel(gm, FlowSchedule(), prediction_type="x0_typo")
    model = AnalyticModel(gm, FlowSchedule())
    with pytest.raises(ValueError, match=r"flattens to 3 features.*D=2"):
        model(torch.zeros(4, 3), 10)
    with pytest.raises(ValueError, match=r"`timestep` must be a scalar or a 1-D tensor of length N=4"):
        model(torch.zeros(4, 2), torch.ones(3))
    assert isinstance(model, torch.nn.Module)


def test_empty_batches_give_empty_results():
    """Found by probing: exact_solution and AnalyticModel crashed on an empty batch with torch's "cannot reshape
    tensor of 0 elements" (exact_endpoint's N = 0 return was never reached)."""
    from fewstep.bench.analytic import exact_mean_reverting_solution

    gm = default_mixture(dim=2)
    for name, t in (("vp", 999), ("flow", 1000)):  # the flow start is pure noise: the angle form
        out = exact_solution(gm, SCHEDULES[name], torch.zeros(0, 2), t)
        assert out.shape == (0, 2) and out.dtype == torch.float64
    assert exact_solution(gm, SCHEDULES["vp"], torch.zeros(0, 1, 2), 500).shape == (0, 1, 2)
    assert exact_endpoint(gm, torch.zeros(0, 2), 5.0).shape == (0, 2)
    assert exact_mean_reverting_solution(gm, torch.zeros(0, 2), torch.zeros(0, 2), 1.0, 0.2, 0.9).shape == (0, 2)
    model = AnalyticModel(gm, SCHEDULES["vp"])
    for shape in ((0, 2), (0, 1, 2, 1)):
        out = model(torch.zeros(shape, dtype=torch.float32), 500)
        assert out.shape == shape and out.dtype == torch.float32


def test_non_finite_points_and_bad_timesteps_are_named():
    """Found by probing: denoise(x = NaN) returned NaN silently, exact_solution with a NaN x_T raised scipy's "initial
    state y0 must be finite", and AnalyticModel reported timestep=None as "timesteps must be finite, got [nan nan]",
    a VP model at t = -5000 as "sigma must be finite" and a flow model at t = 2000 as "alpha must be >= 0"."""
    from fewstep.bench.analytic import exact_mean_reverting_solution, mean_reverting_denoise
    from fewstep.solvers.schedules import FlowSchedule as Flow
    from fewstep.solvers.schedules import VPSchedule

    gm = default_mixture(dim=2)
    nan = torch.tensor([[float("nan"), 0.0], [0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`x` must be finite; got 1 NaN/Inf entries of 4"):
        gm.denoise(nan, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"`y` must be finite"):
        gm.posterior(nan.abs() * math.inf, 1.0)
    with pytest.raises(ValueError, match=r"`x_T` must be finite"):
        exact_solution(gm, SCHEDULES["vp"], nan, 999)
    with pytest.raises(ValueError, match=r"`mu` must be finite"):
        mean_reverting_denoise(gm, torch.zeros(2, 2), nan, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"`x_start` must be finite"):
        exact_mean_reverting_solution(gm, nan, torch.zeros(2, 2), 1.0, 0.2, 0.9)
    with pytest.raises(ValueError, match=r"`t_start` must be a finite number, got None"):
        exact_solution(gm, SCHEDULES["vp"], torch.zeros(2, 2), None)
    vp = AnalyticModel(gm, VPSchedule.from_config({"num_train_timesteps": 1000}))
    flow = AnalyticModel(gm, Flow(), prediction_type="flow")
    x = torch.zeros(2, 2)
    for t in (None, float("nan"), "a"):
        with pytest.raises(ValueError, match=r"`timestep` must be a scalar or a 1-D tensor of length N=2, finite "
                                             r"timesteps in \[0, 999\]; got"):
            vp(x, t)
    with pytest.raises(ValueError, match=r"`timestep` -5000 is outside the schedule's range: .*sigma=nan.* give "
                                         r"timesteps in \[0, 999\]"):
        vp(x, -5000)
    with pytest.raises(ValueError, match=r"`timestep` 2000 is outside the schedule's range: .*alpha=-1\.0.* give "
                                         r"timesteps in \[0, 1000\]"):
        flow(x, torch.tensor([10.0, 2000.0]))
    with pytest.raises(ValueError, match=r"`timestep` 2000 .* give timesteps in \[0, 1000\]"):
        AnalyticModel(gm, SCHEDULES["flow"])(x, 2000)  # a schedule without t_min/t_max: [0, num_train_timesteps]
    assert torch.isfinite(vp(x, 999)).all() and torch.isfinite(flow(x, 1000)).all()
    with pytest.raises(ValueError, match=r"`sample` must be finite; got 1 NaN/Inf entries of 4"):
        vp(nan.float(), 500)
