"""MRS on the exact mean-reverting reference; SDE steps against diffusers; the mrs scheduler's contract."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _helpers import REAL_CONFIGS, TinyDenoiser
from diffusers import DPMSolverMultistepScheduler

from fewstep import samplers
from fewstep.bench.analytic import GaussianMixture, exact_mean_reverting_solution, mean_reverting_denoise

MRS = samplers.get("mrs")
LAM = 0.5
MIXTURE = GaussianMixture(
    torch.tensor([[1.0, 0.5, 0.0], [-1.0, 0.0, 0.5]], dtype=torch.float64),
    torch.tensor([0.3, 0.4], dtype=torch.float64),
)


def _problem(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)  # the "degraded images"
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return mu, noise


def _mr_model(prediction_type: str):
    """The exact MR denoiser as a model output in the given parameterization (MRS sec. 3.3 conventions)."""

    def model(x, a, mu):
        x0, eps = mean_reverting_denoise(MIXTURE, x, mu, a, LAM)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        s = LAM * math.sqrt(1 - a * a)
        return LAM * a * eps - (s / LAM) * (x0 - mu)

    return model


def _sample(sched, steps, mu, noise, prediction_type="epsilon", seed=0):
    sched.set_timesteps(steps)
    grid = sched.plan.grid
    model = _mr_model(prediction_type)
    x = mu + LAM * noise  # the MR prior x_T = mu + lam z (IR-SDE)
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model(x, float(grid.alphas[i]), mu), t, x, mu=mu, generator=g).prev_sample
    return x, grid


def _exact(mu, noise, grid):
    return exact_mean_reverting_solution(
        MIXTURE, mu + LAM * noise, mu, LAM, float(grid.alphas[0]), float(grid.alphas[-1])
    )


def _rmse(a, b):
    return (a - b).pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------------------------------
# the reduction to the VP engine is the paper's update
def test_first_order_steps_are_the_papers_mr_formulas():
    """MRS eqs. for ODE-1/SDE-1 in noise and data form, written out in x with the explicit mu-terms."""
    mu, noise = _problem(8)
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for solver in ("ode", "sde"):
        for algorithm in ("data", "noise"):
            sched = MRS(stationary_std=LAM, solver=solver, algorithm_type=algorithm, solver_order=1)
            sched.set_timesteps(10)
            grid = sched.plan.grid
            a_s, a_t = grid.alphas[3], grid.alphas[4]
            s_s, s_t = LAM * grid.sigmas[3], LAM * grid.sigmas[4]
            h = grid.lambdas[4] - grid.lambdas[3]
            x = mu + LAM * noise * 0.7
            x0, eps = mean_reverting_denoise(MIXTURE, x, mu, a_s, LAM)
            if algorithm == "noise" and solver == "ode":
                expected = (a_t / a_s) * x - s_t * math.expm1(h) * eps + mu * (1 - a_t / a_s)
            elif algorithm == "data" and solver == "ode":
                expected = (s_t / s_s) * x + a_t * -math.expm1(-h) * x0 + mu * (1 - s_t / s_s + s_t / s_s * a_s - a_t)
            elif algorithm == "noise":
                expected = (a_t / a_s) * x - 2 * s_t * math.expm1(h) * eps + s_t * math.sqrt(math.expm1(2 * h)) * z
                expected = expected + mu * (1 - a_t / a_s)
            else:
                e2 = math.exp(-2 * h)
                expected = (s_t / s_s) * math.exp(-h) * x + a_t * (1 - e2) * x0 + s_t * math.sqrt(1 - e2) * z
                expected = expected + mu * (1 - (a_t / a_s) * e2 - a_t * (1 - e2))
            state = sched._state
            zz = (x - mu) / LAM
            out = state.plan.steps[3].predictor
            from fewstep.solvers.engine import Evaluation, apply_transition

            got = mu + LAM * apply_transition(out, zz, [Evaluation(zz, (x0 - mu) / LAM, eps)], z)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# convergence on the exact MR reference
@pytest.mark.parametrize(
    "algorithm, order, expected",
    [("data", 1, 1), ("data", 2, 2), ("data", 3, 3), ("noise", 1, 1), ("noise", 2, 2), ("noise", 3, 3)],
)
def test_ode_orders_on_the_exact_mr_reference(algorithm, order, expected):
    mu, noise = _problem()
    errors = []
    steps = (20, 40, 80)  # noise prediction reaches its asymptotic rate later than data prediction
    for n in steps:
        sched = MRS(
            stationary_std=LAM, algorithm_type=algorithm, solver_order=order, lower_order_final=False,
            time_grid="uniform_lambda",
        )
        x, grid = _sample(sched, n, mu, noise)
        errors.append(_rmse(x, _exact(mu, noise, grid)))
    slope = math.log(errors[-2] / errors[-1]) / math.log(2)
    assert abs(slope - expected) < 0.35, (errors, slope)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_model_parameterizations_give_the_same_sampler(prediction_type):
    mu, noise = _problem(16)
    ref, _ = _sample(MRS(stationary_std=LAM), 8, mu, noise, "epsilon")
    got, _ = _sample(MRS(stationary_std=LAM, prediction_type=prediction_type), 8, mu, noise, prediction_type)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_sde_samplers_reach_the_data_distribution_and_beat_euler_maruyama_at_low_nfe():
    """SDE solvers sample p(x0 | mu) = p(x0) here: compare moments with the mixture's over 4000 paths.

    Measured (mean + covariance error; sampling noise alone ~0.03): SDE-2 0.14 / 0.30 / 0.23 / 0.03 at
    5 / 10 / 20 / 50 steps, Euler-Maruyama 1.37 / 0.14 / 0.09 / 0.07 -- the exponential integrator wins at
    5 steps and converges faster, but on this schedule (the IR-SDE cosine, whose last index step spans
    2.7 in lambda) it is over-dispersed at 10-20 steps.
    """
    mu, noise = _problem(4000, seed=1)
    mu = mu * 0  # one measurement for all paths so that moments are comparable
    target_mean, target_cov = MIXTURE.mean(), MIXTURE.covariance()

    def moment_error(solver, order, steps):
        x, _ = _sample(MRS(stationary_std=LAM, solver=solver, solver_order=order), steps, mu, noise, seed=2)
        return (x.mean(0) - target_mean).norm().item() + (torch.cov(x.T) - target_cov).norm().item()

    sde2_5, sde2_50 = moment_error("sde", 2, 5), moment_error("sde", 2, 50)
    em_5, em_50 = moment_error("euler-maruyama", 1, 5), moment_error("euler-maruyama", 1, 50)
    assert sde2_50 < 0.06 and sde2_50 < em_50, (sde2_50, em_50)
    assert em_5 > 4 * sde2_5, (em_5, sde2_5)
    sde1_50, sde1_100 = moment_error("sde", 1, 50), moment_error("sde", 1, 100)
    assert sde1_100 < 0.7 * sde1_50, (sde1_50, sde1_100)  # weak first order


# ----------------------------------------------------------------------------------------------------
# SDE steps = diffusers' SDE variants
@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
@pytest.mark.parametrize("order", [1, 2])
def test_sde_dpm_solver_matches_diffusers_with_the_same_generator(algorithm, order):
    final = "zero" if algorithm.endswith("++") else "sigma_min"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = DPMSolverMultistepScheduler(algorithm_type=algorithm, solver_order=order, final_sigmas_type=final)
    ours = samplers.get("dpm-solver++").from_config(ref.config)
    model = TinyDenoiser(32)
    results = []
    for sched in (ref, ours):
        sched.set_timesteps(12)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x, generator=g).prev_sample
        results.append(x)
    scale = results[0].abs().max()
    assert ((results[0] - results[1]).abs().max() / scale).item() < 2e-6


# ----------------------------------------------------------------------------------------------------
# the scheduler's contract
def test_from_the_shipped_mr_model_config_and_round_trip(tmp_path):
    from fewstep.pipelines.defaults import default_model_path

    cfg = DPMSolverMultistepScheduler.load_config(default_model_path("digits-mr") / "scheduler")
    sched = MRS.from_config(cfg, stationary_std=0.4, solver="sde")
    # the shipped model's own levels (its config's trained_betas), not the default mr_cosine: the model was trained
    # on a cosine grid one point shorter than the released IR-SDE one, within 1.2% of it in a_t
    np.testing.assert_allclose(
        sched.noise_schedule.alphas_cumprod, np.cumprod(1 - np.asarray(cfg["trained_betas"])), rtol=1e-6
    )
    default = MRS(stationary_std=0.4).noise_schedule.alphas_cumprod
    assert not np.allclose(sched.noise_schedule.alphas_cumprod, default, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(sched.noise_schedule.alphas_cumprod), np.sqrt(default), rtol=1.2e-2)
    sched.save_pretrained(tmp_path)
    again = MRS.from_pretrained(tmp_path)
    assert (again.config.stationary_std, again.config.solver) == (0.4, "sde")


def test_sde_runs_are_reproducible_with_a_generator_and_differ_without():
    mu, noise = _problem(8)
    a, _ = _sample(MRS(stationary_std=LAM, solver="sde"), 6, mu, noise, seed=4)
    b, _ = _sample(MRS(stationary_std=LAM, solver="sde"), 6, mu, noise, seed=4)
    c, _ = _sample(MRS(stationary_std=LAM, solver="sde"), 6, mu, noise, seed=5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, r"`stationary_std` \(the MR-SDE's stationary std lambda\) is required"),
        ({"stationary_std": 0.0}, r"`stationary_std` .* must be a finite number > 0, got 0.0"),
        ({"stationary_std": -1.0}, r"must be a finite number > 0, got -1.0"),
        ({"stationary_std": 0.4, "solver": "heun"}, r"`solver` must be one of \['ode', 'sde', 'euler-maruyama'\]"),
        ({"stationary_std": 0.4, "solver": "sde", "solver_order": 3},
         r"`solver_order` for solver='sde' must be an integer in \[1, 2\], got 3"),
        ({"stationary_std": 0.4, "solver_order": 4}, r"solver='ode' must be an integer in \[1, 3\], got 4"),
        ({"stationary_std": 0.4, "algorithm_type": "velocity"}, r"`algorithm_type` must be one of \['data', 'noise'\]"),
        ({"stationary_std": 0.4, "prediction_type": "score"}, r"`prediction_type` must be one of \[.epsilon., "),
        ({"stationary_std": 0.4, "solver": "euler-maruyama", "solver_order": 1, "final_sigmas_type": "zero"},
         r"euler-maruyama' cannot step to sigma = 0"),
        ({"stationary_std": 0.4, "num_train_timesteps": 2},
         r"`num_train_timesteps` \(of beta_schedule='mr_cosine'\) must be an integer >= 3, got 2"),
    ],
)
def test_bad_mrs_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MRS(**kwargs)


def test_solver_order_default_fits_the_solver():
    """Found by a probe: ``swap_sampler(pipe, "mrs", solver="euler-maruyama")`` failed with "`solver_order` for
    solver='euler-maruyama' must be an integer in [1, 1], got 2" -- the ODE default, which the user never set."""
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 101, "clip_sample": False,  # an MR pipeline's
           "trained_betas": MRS(stationary_std=LAM).config.trained_betas}
    for solver, order in (("ode", 2), ("sde", 2), ("euler-maruyama", 1)):
        sched = samplers.from_config("mrs", cfg, stationary_std=LAM, solver=solver)
        assert sched.config.solver_order is None
        explicit = samplers.from_config("mrs", cfg, stationary_std=LAM, solver=solver, solver_order=order)
        sched.set_timesteps(6)
        explicit.set_timesteps(6)
        assert sched.plan.decisions == explicit.plan.decisions  # the solver's own default order
    with pytest.raises(ValueError, match=r"`solver_order` for solver='euler-maruyama' must be an integer in "
                                         r"\[1, 1\], got 2"):
        samplers.from_config("mrs", cfg, stationary_std=LAM, solver="euler-maruyama", solver_order=2)
    # a saved ODE sampler swaps to another solver
    samplers.from_config("mrs", MRS(stationary_std=LAM).config, solver="euler-maruyama").set_timesteps(5)


@pytest.mark.parametrize("config_name", ["sd15", "sdxl"])
def test_mrs_refuses_ordinary_diffusion_configs(config_name):
    with pytest.raises(ValueError, match="is this a mean-reverting model"):
        MRS.from_config(REAL_CONFIGS[config_name], stationary_std=0.4)
    with pytest.raises(ValueError, match="flow-matching config"):
        MRS.from_config(REAL_CONFIGS["sd3"], stationary_std=0.4)


def test_add_noise_is_the_mean_reverting_marginal_and_needs_mu():
    """IR-SDE's forward marginal x_t = a x0 + (1 - a) mu + lam sqrt(1 - a^2) eps (the state ``step`` works on), not
    the VP one."""
    sched = MRS(stationary_std=LAM)
    g = torch.Generator().manual_seed(0)
    x0, mu, eps = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([5, 40, 90])
    a = torch.as_tensor(np.sqrt(sched.noise_schedule.alphas_cumprod), dtype=torch.float64)[t].view(-1, 1, 1, 1)
    expected = a * x0 + (1 - a) * mu + LAM * torch.sqrt(1 - a * a) * eps
    torch.testing.assert_close(sched.add_noise(x0, eps, t, mu=mu), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="`mu` is required: the mean-reverting marginal"):
        sched.add_noise(x0, eps, t)
    with pytest.raises(ValueError, match=r"`mu` must have the sample's shape"):
        sched.add_noise(x0, eps, t, mu=mu[:1])


def test_step_needs_mu_of_the_samples_shape():
    sched = MRS(stationary_std=LAM)
    sched.set_timesteps(4)
    x = torch.zeros(2, 3)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="`mu` is required"):
        sched.step(x, t, x)
    with pytest.raises(ValueError, match=r"`mu` must have the sample's shape \(2, 3\), got \(2, 4\)"):
        sched.step(x, t, x, mu=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="`mu` must be a torch.Tensor"):
        sched.step(x, t, x, mu=[[0.0] * 3] * 2)


# ----------------------------------------------------------------------------------------------------
# the restoration pipeline and the CLI
@pytest.fixture(scope="module")
def digits_mr():
    from fewstep.pipelines import load_default

    return load_default("digits-mr", sampler=None)


def _degraded(n=3):
    from fewstep.datasets import load_digits_images
    from fewstep.pipelines import box_inpainting

    images, _ = load_digits_images(16, "test")
    return images[:n], box_inpainting(images[:n], generator=torch.Generator().manual_seed(0))


def test_mrs_in_x_equals_dpm_solver_in_z_inside_the_pipeline(digits_mr):
    """The reduction end to end: MRS on x with mu == DPM-Solver++ on z = (x - mu)/lam, same grid and noise."""
    from fewstep.pipelines.swap import swap_sampler

    _, mu = _degraded()
    outs = []
    for name, opts in [("mrs", {}), ("dpm-solver++", {"final_sigmas_type": "sigma_min"})]:
        swap_sampler(digits_mr, name, solver_order=2, solver_type="midpoint", **opts)
        outs.append(digits_mr(mu, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                              output_type="pt").images)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_sde_restoration_uses_the_generator(digits_mr):
    from fewstep.pipelines.swap import swap_sampler

    _, mu = _degraded(2)
    swap_sampler(digits_mr, "mrs", solver="sde")
    runs = [digits_mr(mu, num_inference_steps=5, generator=torch.Generator().manual_seed(s), output_type="pt").images
            for s in (0, 0, 1)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert (runs[0] - runs[2]).abs().max() > 1e-3


def test_swap_sampler_checks_the_process(digits_mr):
    from fewstep.pipelines import load_default
    from fewstep.pipelines.swap import swap_sampler

    with pytest.raises(ValueError, match=r"sampler 'mrs' is for mean-reverting .* compatible samplers: ddim, "):
        swap_sampler(load_default("digits-eps"), "mrs")
    swap_sampler(digits_mr, "mrs", stationary_std=0.3)  # a mismatching lambda is caught at call time
    with pytest.raises(ValueError, match="`stationary_std` 0.3 differs from the model's 0.4"):
        digits_mr(_degraded(1)[1], num_inference_steps=2)


def test_cli_restores_held_out_digits_and_a_measurement_file(tmp_path, capsys):
    from PIL import Image

    from fewstep.cli import main

    out = tmp_path / "restored.png"
    base = ["generate", "--model", "digits-mr", "--sampler", "mrs", "--steps", "3", "--quiet"]
    assert main([*base, "--num-images", "2", "--out", str(out)]) == 0
    assert "2 restored images" in capsys.readouterr().out and out.is_file()
    _, mu = _degraded(2)
    strip = ((mu[:, 0] + 1) / 2 * 255).round().byte().numpy()
    Image.fromarray(np.concatenate(list(strip), axis=1)).save(tmp_path / "measured.png")
    assert main([*base, "--measurement", str(tmp_path / "measured.png"), "--out", str(tmp_path / "m.png")]) == 0
    Image.fromarray(np.zeros((10, 16), dtype=np.uint8)).save(tmp_path / "odd.png")
    bad = tmp_path / "bad.png"
    assert main([*base, "--measurement", str(tmp_path / "odd.png"), "--out", str(bad)]) == 2
    assert "is 16x10 pixels; the model restores 16x16 images" in capsys.readouterr().err
    assert main(["generate", "--model", "digits-eps", "--measurement", str(tmp_path / "measured.png"),
                 "--quiet", "--out", str(bad)]) == 2
    assert "--measurement without --task is for the restoration model digits-mr" in capsys.readouterr().err
    assert not bad.exists()
    # guidance flags would be ignored by a restoration model: refused
    assert main(["generate", "--model", "digits-mr", "--guidance-scale", "5", "--steps", "2", "--quiet", "--out",
                 str(bad)]) == 2
    assert "--guidance-scale: digits-mr is a restoration (mean-reverting) model" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.parametrize("time_grid", ["spacing", "uniform_lambda", "karras", "uniform_time"])
def test_every_time_grid_converges(time_grid):
    mu, noise = _problem(16)
    errors = []
    for n in (5, 20):
        x, grid = _sample(MRS(stationary_std=LAM, time_grid=time_grid), n, mu, noise)
        errors.append(_rmse(x, _exact(mu, noise, grid)))
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.05, errors


def test_final_denoise_returns_the_models_x0():
    mu, noise = _problem(8)
    sched = MRS(stationary_std=LAM, final_sigmas_type="zero")
    sched.set_timesteps(6)
    grid = sched.plan.grid
    assert grid.sigmas[-1] == 0.0
    model = _mr_model("epsilon")
    x = mu + LAM * noise
    for i, t in enumerate(sched.timesteps):
        out = sched.step(model(x, float(grid.alphas[i]), mu), t, x, mu=mu)
        x = out.prev_sample
    torch.testing.assert_close(x, out.pred_original_sample)
