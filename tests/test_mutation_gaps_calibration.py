"""Tests that close gaps found by mutation testing of the calibration code: DC-Solver's predictor-only DDIM base,
its ratio artifacts and search, and DPM-Solver-v3's EMS estimation.

Every expected value comes from an independent reference: the DC-Solver / DPM-Solver-v3 equations written out here
(research notes sec. 1.2-1.3 and 2.2-2.5), numpy least squares, closed-form statistics of a model built for it,
diffusers' own schedule tables, or the raw safetensors contents of a saved file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers import TinyDenoiser
from diffusers import DDPMScheduler

from fewstep import samplers

DC = samplers.get("dc-solver")


# ------------------------------------------------------------------------------------------------ DC on DDIM
def _lagrange(nodes: list[float], values: list[torch.Tensor], tau: float) -> torch.Tensor:
    """sum_k m_k prod_{l != k} (tau - v_l) / (v_k - v_l) (DC-Solver's compensation, research notes sec. 2.2)."""
    out = torch.zeros_like(values[0])
    for k, (vk, mk) in enumerate(zip(nodes, values)):
        w = 1.0
        for m, vm in enumerate(nodes):
            if m != k:
                w *= (tau - vm) / (vk - vm)
        out = out + w * mk
    return out


def _dc_ddim_by_hand(x: torch.Tensor, model, ratios: list[float], data_form: bool, variable: str) -> torch.Tensor:
    """DC-Solver's predictor-only plug-in on DDIM (sec. 2.5), written from the paper's equations: the model is
    evaluated at x_i, its output m_i (x0 in data form, eps in noise form) is replaced, for i >= K = 2, by the Lagrange
    interpolation of the last three (already compensated) buffered outputs at tau_i = v_{i-1} + rho_i (v_i - v_{i-1})
    and overwrites the buffer; then one DDIM step with the compensated m_i. Grid: diffusers' "linspace" timesteps
    (round(linspace(0, 999, n)) reversed) with alpha_t^2 = DDPM's alphas_cumprod, ending at the clean point."""
    n = len(ratios)
    ts = np.linspace(0, 999, n).round()[::-1].astype(int)
    ac = DDPMScheduler().alphas_cumprod.double()
    alphas = [float(ac[t].sqrt()) for t in ts] + [1.0]
    sigmas = [float((1 - ac[t]).sqrt()) for t in ts] + [0.0]
    v = [float(t) for t in ts] if variable == "t" else [float(np.log(a / s)) for a, s in zip(alphas[:n], sigmas[:n])]
    buffer: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        a, s, a_next, s_next = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        eps = model(x, int(t))
        buffer.append((x - s * eps) / a if data_form else eps)
        if i >= 2:
            tau = v[i - 1] + ratios[i] * (v[i] - v[i - 1])
            buffer[i] = _lagrange([v[i], v[i - 1], v[i - 2]], [buffer[i], buffer[i - 1], buffer[i - 2]], tau)
        m = buffer[i]
        if data_form:  # x_t = alpha_t x0 + sigma_t (x_s - alpha_s x0) / sigma_s
            x = a_next * m + s_next * (x - a * m) / s
        else:  # x_t = alpha_t (x_s - sigma_s eps) / alpha_s + sigma_t eps
            x = a_next * (x - s * m) / a + s_next * m
    return x


@pytest.mark.parametrize("variable", ["t", "lambda"])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_dc_on_ddim_compensates_the_field_of_its_form(predict_x0, variable):
    """dc_base='ddim' with predict_x0=False interpolates eps (noise form), with True x0: at ratios != 1 the two
    differ, and each is the hand-written DC-DDIM step of its form (the noise form was indistinguishable before:
    dropping predict_x0 there, so that it interpolated x0, went unnoticed)."""
    n = 6
    ratios = [1.0, 1.0, 1.25, 0.8, 1.15, 1.3]
    model = TinyDenoiser(2 * 3 * 3)
    x_start = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sched = DC(dc_base="ddim", dc_ratios=ratios, predict_x0=predict_x0, dc_variable=variable)
    sched.set_timesteps(n)
    x = x_start
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    expected = _dc_ddim_by_hand(x_start, model, ratios, predict_x0, variable)
    other = _dc_ddim_by_hand(x_start, model, ratios, not predict_x0, variable)
    # float64 throughout: the two computations differ by rounding only (the sample is O(1))
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)
    assert float((expected - other).abs().max()) > 1e-4  # the forms really differ here


# ------------------------------------------------------------------------------------------------ DC artifacts
def test_ratio_table_file_holds_every_field_and_finds_each_entry(tmp_path):
    """The saved file, read back with safetensors alone: float64 ratios under their keys, and the model, scheduler
    key, entries (NFE, CFG, info) and extra in the JSON header. CFG 7.5 and 8 of one NFE are two entries, each
    found by its own (NFE, CFG) -- also when a larger NFE is listed first."""
    from safetensors import safe_open

    from fewstep.samplers.dc_solver import dc_scheduler_key
    from fewstep.solvers.dc_artifacts import RatioEntry, load_ratio_table, load_ratios, save_ratio_table

    key = dc_scheduler_key(DC().config)
    rows = [(6, 7.5, [1.0, 1.0, 1.0123456789012345, 0.97, 1.2, 1.05], {"step_loss_dc": [None, 0.25]}),
            (5, 7.5, [1.0, 1.0, 1.1, 0.9, 1.3], {"seed": 3}),
            (5, 8.0, [1.0, 1.0, 0.85, 1.15, 1.01], {})]
    entries = [RatioEntry(n, g, r, info) for n, g, r, info in rows]
    path = save_ratio_table(tmp_path / "r.safetensors", entries, "toy", key, extra={"note": "x", "n": 2})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "fewstep.dc.ratios" and meta["version"] == "1" and meta["model"] == "toy"
    assert json.loads(meta["scheduler"]) == json.loads(json.dumps(key))
    assert json.loads(meta["extra"]) == {"note": "x", "n": 2}
    index = json.loads(meta["entries"])
    assert [(e["nfe"], e["guidance_scale"], e["info"]) for e in index] == [(n, g, info) for n, g, _, info in rows]
    assert len(set(tensors)) == 3
    for e, (_, _, ratios, _) in zip(index, rows):
        assert tensors[e["key"]].dtype == torch.float64 and tensors[e["key"]].tolist() == ratios  # bit for bit
    loaded, info = load_ratio_table(path)
    assert [(e.nfe, e.guidance_scale, e.ratios, e.info) for e in loaded] == rows
    assert info == {"model": "toy", "scheduler": json.loads(json.dumps(key)), "extra": {"note": "x", "n": 2}}
    for n, g, ratios, _ in rows:
        assert load_ratios(path, "toy", key, n, g) == ratios



def test_ratio_table_entries_with_early_ratios_are_refused_at_load(tmp_path):
    """With dc_order K the first K ratios must be 1 (fewer than K + 1 buffered outputs, research notes sec. 2.3);
    a file whose second ratio is not 1 loads for K = 1 and is refused, naming the file, for K = 2."""
    from fewstep.solvers.dc_artifacts import RatioEntry, load_ratios, save_ratio_table

    ratios = [1.0, 1.2, 1.1, 0.9, 1.0]
    path = save_ratio_table(tmp_path / "early.safetensors", [RatioEntry(5, 3.0, ratios)], "toy", {"dc_order": 2})
    with pytest.raises(ValueError, match=r"early\.safetensors: entry 'nfe5_cfg3' .* the first 2 must be 1"):
        load_ratios(path, "toy", {"dc_order": 2}, 5, 3.0)
    path1 = save_ratio_table(tmp_path / "k1.safetensors", [RatioEntry(5, 3.0, ratios)], "toy", {"dc_order": 1})
    assert load_ratios(path1, "toy", {"dc_order": 1}, 5, 3.0) == ratios

def test_cpr_file_holds_every_field(tmp_path):
    """save_cpr / load_cpr round trip of an order-3 fit on fractional CFG values, checked in the raw file too."""
    from safetensors import safe_open

    from fewstep.solvers.dc_artifacts import RatioEntry, fit_cpr, load_cpr, save_cpr

    rng = np.random.default_rng(7)
    entries = [RatioEntry(n, g, [1.0] * 3 + (1 + 0.1 * rng.normal(size=n - 3)).tolist())
               for n, g in ((6, 2.5), (8, 4.25), (10, 7.5), (7, 3.0))]
    cpr = fit_cpr(entries, order=3)
    assert cpr.order == 3 and cpr.nfe_range == (6, 10) and cpr.guidance_range == (2.5, 7.5)
    assert cpr.predict(8, 4.0, warn=False)[:3] == [1.0, 1.0, 1.0]
    path = save_cpr(tmp_path / "c.safetensors", cpr, "toy", {"dc_order": 3})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        coefficients = f.get_tensor("coefficients")
    assert meta["order"] == "3" and json.loads(meta["nfe_range"]) == [6, 10]
    assert json.loads(meta["guidance_range"]) == [2.5, 7.5]
    assert json.loads(meta["fitted_on"]) == [[6, 2.5], [8, 4.25], [10, 7.5], [7, 3.0]]
    assert coefficients.dtype == torch.float64 and np.array_equal(coefficients.numpy(), cpr.coefficients)
    loaded = load_cpr(path, "toy", {"dc_order": 3})
    assert (loaded.order, loaded.nfe_range, loaded.guidance_range) == (3, (6, 10), (2.5, 7.5))
    assert loaded.fitted_on == [(6, 2.5), (8, 4.25), (10, 7.5), (7, 3.0)]
    assert np.array_equal(loaded.coefficients, cpr.coefficients)


def test_cpr_ridge_is_the_penalty_ridge_times_the_squared_norm():
    """fit_cpr(ridge=r) minimises ||A c - rho||^2 + r ||c||^2: numpy's solution of (A^T A + r I) c = A^T rho, with A
    the documented features x^k g^p n^q (x = j/N, g = CFG/12, n = N/50) of the steps j > K."""
    from fewstep.solvers.dc_artifacts import RatioEntry, fit_cpr

    rng = np.random.default_rng(8)
    entries = [RatioEntry(n, g, [1.0, 1.0] + (1 + 0.2 * rng.normal(size=n - 2)).tolist())
               for n, g in ((5, 1.0), (7, 3.0), (9, 7.5))]
    rows, targets = [], []
    for e in entries:
        for j in range(3, e.nfe + 1):
            x, g, n = j / e.nfe, e.guidance_scale / 12, e.nfe / 50
            rows.append([x**k * g**p * n**q for k in range(4) for p in range(3) for q in range(3)])
            targets.append(e.ratios[j - 1])
    a, b = np.array(rows), np.array(targets)
    ridge = 0.05  # strong enough that sqrt(r) and r as the row weight give clearly different fits
    expected = np.linalg.solve(a.T @ a + ridge * np.eye(36), a.T @ b)
    got = fit_cpr(entries, order=2, ridge=ridge).coefficients.reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)  # two exact solvers of a well-posed system


# ------------------------------------------------------------------------------------------------ DC search
def _analytic_setup(nfe: int = 5):
    from fewstep.bench.analytic import AnalyticModel, default_mixture

    mixture = default_mixture(dim=2, seed=0)
    config = dict(DDPMScheduler(timestep_spacing="trailing").config)
    sched = DC.from_config(config, dc_ratios=[1.0] * nfe)
    sched.set_timesteps(nfe)
    model = AnalyticModel(mixture, sched.noise_schedule)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return mixture, config, sched, model, x


def test_reference_states_are_the_ode_solution_at_the_coarse_points(monkeypatch):
    """The many-step reference at grid points 1..N against the exact PF-ODE solution of the analytic mixture: a
    40-step DPM-Solver++(2M) is within 1.5e-2 at grid points 2 and 4 (measured 8e-3; the last step to sigma = 0
    dominates), DDIM's first order is clearly worse (measured 0.11), one grid point off is off by > 0.1. The exact
    reference asks the ODE solution at grid points 1..N, in order (a stand-in solver records the requests)."""
    import fewstep.bench.analytic as analytic
    from fewstep.calibrate.dc import exact_reference_states, reference_states

    mixture, _, sched, model, x = _analytic_setup(4)
    x = x[:3]
    grid, schedule = sched.plan.grid, sched.noise_schedule
    points = (2, 4)  # an intermediate point and the clean end
    exact = [analytic.exact_solution(mixture, schedule, x, float(grid.timesteps[0]),
                                     (float(grid.alphas[i]), float(grid.sigmas[i])), rtol=1e-6, atol=1e-6)
             for i in points]  # ODE error ~1e-6, far below the tolerances used here
    errors = {}
    for ref in ("dpm-solver++:40", "ddim:40"):
        states = reference_states(lambda z, t: model(z, t), "epsilon", schedule, grid, x, ref)
        assert len(states) == 4
        errors[ref] = max(float((states[i - 1] - e).abs().max()) for i, e in zip(points, exact))
    assert errors["dpm-solver++:40"] < 1.5e-2
    assert errors["dpm-solver++:40"] < errors["ddim:40"] / 5

    asked = []

    def fake(mix, sch, x_t, t0, end):
        asked.append((t0, end))
        return x_t + end[1]

    monkeypatch.setattr(analytic, "exact_solution", fake)
    out = exact_reference_states(mixture, schedule, grid, x)
    assert asked == [(float(grid.timesteps[0]), (float(grid.alphas[i]), float(grid.sigmas[i]))) for i in range(1, 5)]
    assert [float((o - x)[0, 0]) for o in out] == pytest.approx([float(grid.sigmas[i]) for i in range(1, 5)])


def test_search_losses_are_the_unipc_corrector_error_and_the_final_error():
    """loss_base[i] at the first searched step (i = K = 2, nothing compensated before) is the MSE of UniC(P(x_2))
    -- diffusers' UniPC scheduler's corrected sample at step 3 -- against the reference at grid point 3; at the
    last step (no corrector) loss_dc is the MSE of the sampler's end point with all searched ratios applied."""
    from diffusers import UniPCMultistepScheduler

    from fewstep.calibrate.dc import reference_states, search_ratios

    _, config, sched, model, x = _analytic_setup(5)
    fn = lambda z, t: model(z, t)  # noqa: E731
    # any targets do for the identity checked here: a cheap 10-step reference
    targets = reference_states(fn, "epsilon", sched.noise_schedule, sched.plan.grid, x, "ddim:10")
    result = search_ratios(sched.plan, fn, "epsilon", x, targets, iters=3, progress=False)
    assert result.ratios[:2] == [1.0, 1.0] and result.step_loss_base[:2] == [None, None]
    unipc = UniPCMultistepScheduler.from_config(config)
    unipc.set_timesteps(5)
    z = x
    for t in unipc.timesteps[:4]:
        z = unipc.step(model(z, t), t, z).prev_sample
    corrected = unipc.last_sample  # the corrector's output at step 3, before its predictor
    # diffusers keeps its alphas in float32: the two MSEs agree to ~5e-5 relative
    assert result.step_loss_base[2] == pytest.approx(float(((corrected - targets[2]) ** 2).mean()), rel=1e-3)
    final = DC.from_config(config, dc_ratios=result.ratios)
    final.set_timesteps(5)
    z = x
    for t in final.timesteps:
        z = final.step(model(z, t), t, z).prev_sample
    assert result.step_loss_dc[4] == pytest.approx(float(((z - targets[4]) ** 2).mean()), rel=1e-9)


def test_guided_model_fn_and_datapoints_follow_the_documented_formulas():
    """CFG: u + w (c - u) with the null class as the unconditional half (a fake UNet that returns its labels);
    datapoints: labels cycling 0..C-1 and noise of sample k drawn with seed + k."""
    from types import SimpleNamespace

    from fewstep.calibrate.dc import class_conditional_model_fn, digits_datapoints

    class Fake(torch.nn.Module):
        dtype = torch.float64

        def forward(self, x, t, class_labels):
            return SimpleNamespace(sample=x * 0 + class_labels.reshape(-1, 1).to(x.dtype) + t.reshape(-1, 1) / 1000)

    labels = torch.tensor([2, 5])
    fn = class_conditional_model_fn(Fake(), labels, 3.0, null_class=10)
    out = fn(torch.zeros(2, 4, dtype=torch.float64), 250.0)
    cond, uncond = labels.double().reshape(-1, 1) + 0.25, 10.0 + 0.25
    torch.testing.assert_close(out, (uncond + 3.0 * (cond - uncond)).expand(2, 4))
    got_labels, noise = digits_datapoints(4, seed=7, num_classes=3, size=2, channels=1)
    assert got_labels.tolist() == [0, 1, 2, 0]
    for k in range(4):
        assert torch.equal(noise[k], torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(7 + k)))


# ------------------------------------------------------------------------------------------------ EMS
def _sigmoid_pair(kind: str, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha, sigma of lambda = log(alpha / sigma): VP alpha^2 + sigma^2 = 1, flow alpha + sigma = 1."""
    if kind == "vp":
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()
    return torch.sigmoid(lam), torch.sigmoid(-lam)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_ems_of_an_elementwise_linear_model_are_its_closed_form(kind):
    """eps(x, lambda) = (l(lambda) / sigma) x + c(lambda) with l quadratic in lambda: its Jacobian is diagonal, so
    every Rademacher probe gives l exactly (v^2 = 1); f = (sigma eps - l x) / alpha = e^{-lambda} c does not depend
    on the sample, so s = 0 (Var f = 0) and b = E f' = d/dlambda (e^{-lambda} c) = e^{-lambda} (c' - c) exactly
    (the x terms of f' cancel when l' is exact: np.gradient is exact on a quadratic). The grid runs uniformly in
    lambda over the default range: VP t = 999 .. 0 (lambda = log(alpha/sigma) from diffusers' alphas_cumprod), flow
    t = T - 1 .. 1 (lambda = -+log(T - 1)). Two batches and two probes per point."""
    from fewstep.solvers.ems_estimate import estimate_ems
    from fewstep.solvers.schedules import FlowSchedule, VPSchedule

    p = torch.tensor([[0.5, 0.02, -0.01], [0.2, -0.05, 0.02], [0.8, 0.0, 0.005]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.1], [-0.2, 0.4], [0.05, -0.3]], dtype=torch.float64)

    def l_of(lam):
        return p[:, 0] + p[:, 1] * lam + p[:, 2] * lam**2

    def c_of(lam):
        return q[:, 0] * torch.sin(lam) + q[:, 1]

    def eps_fn(x, lam, dlam):
        lam_t = torch.tensor(lam, dtype=torch.float64) + dlam
        return l_of(lam_t) / _sigmoid_pair(kind, lam_t)[1] * x + c_of(lam_t)

    if kind == "vp":
        schedule = VPSchedule.from_config(DDPMScheduler().config)
        ac = DDPMScheduler().alphas_cumprod.double()
        ends = [0.5 * float(torch.log(ac[t] / (1 - ac[t]))) for t in (999, 0)]
    else:
        schedule = FlowSchedule(1000)
        ends = [-float(np.log(999.0)), float(np.log(999.0))]
    data = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 0.5
    ems = estimate_ems(eps_fn, data, schedule, num_intervals=6, batch_size=5, probes=2, progress=False)
    lam = np.linspace(ends[0], ends[1], 7)
    np.testing.assert_allclose(ems.lambdas, lam, rtol=0, atol=1e-6)  # float32 alphas_cumprod in the table
    lam_t = torch.from_numpy(np.asarray(ems.lambdas)).reshape(-1, 1)
    expected_b = torch.exp(-lam_t) * (q[:, 0] * torch.cos(lam_t) - c_of(lam_t))
    # float64 sums of O(1e3) terms that cancel: agreement to ~1e-10 relative is all rounding
    np.testing.assert_allclose(ems.l, l_of(lam_t).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ems.s, 0.0, atol=0)
    np.testing.assert_allclose(ems.b, expected_b.numpy(), rtol=1e-7, atol=1e-8)


def test_model_eps_fn_carries_the_lambda_derivative_of_time_and_conversion():
    """A v-prediction model smooth in t: the JVP of model_eps_fn in lambda equals the central difference of the
    hand-written eps(lambda) = alpha v(x, t(lambda)) + sigma x (diffusers' v -> eps) with t(lambda) the schedule's
    inverse, so both the model-time derivative and the conversion's are in it."""
    from fewstep.solvers.ems_estimate import model_eps_fn
    from fewstep.solvers.schedules import VPSchedule

    schedule = VPSchedule.from_config(DDPMScheduler().config)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def model(z, t):
        return torch.sin(t.reshape(-1, 1) / 150.0) * z + torch.cos(t.reshape(-1, 1) / 90.0)

    def by_hand(lam):
        a, s = _sigmoid_pair("vp", torch.tensor(lam, dtype=torch.float64))
        t = torch.tensor(float(schedule.t_of_lambda(lam)), dtype=torch.float64).expand(2)
        return a * model(x, t) + s * x

    eps_fn = model_eps_fn(model, schedule, "v_prediction")
    zero = torch.zeros((), dtype=torch.float64)
    for lam in (-2.0, 0.7):
        value, slope = torch.func.jvp(lambda dl, lam=lam: eps_fn(x, lam, dl), (zero,), (torch.ones_like(zero),))
        torch.testing.assert_close(value, by_hand(lam), rtol=1e-12, atol=1e-12)
        h = 1e-3  # t(lambda) is piecewise linear between training steps: a difference over ~0.1 step of t
        fd = (by_hand(lam + h) - by_hand(lam - h)) / (2 * h)
        torch.testing.assert_close(slope, fd, rtol=2e-3, atol=2e-3)


def test_class_conditional_ems_estimates_the_null_class_branch_of_a_flow_model(monkeypatch):
    """What `class_conditional_ems` hands the estimator for digits-flow: the first training images, and an eps_fn
    that is the null-class (10) velocity converted by hand -- x = (1 - s) x0 + s eps, v = eps - x0, so
    eps = x + alpha v with alpha = sigmoid(lambda) at model time t = T sigmoid(-lambda) -- plus the documented
    "difference" time derivative and the model's weight digest in the meta (a checkpoint of another model is
    refused)."""
    import fewstep
    from fewstep.calibrate import ems as ems_calibration
    from fewstep.datasets import load_digits_images

    pipe = fewstep.load_default("digits-flow", sampler=None)
    seen = {}

    def capture(eps_fn, data, schedule, **kwargs):
        seen.update(kwargs, data=data, eps_fn=eps_fn)
        raise KeyboardInterrupt  # the estimate itself is tested above

    monkeypatch.setattr(ems_calibration, "estimate_ems", capture)
    with pytest.raises(KeyboardInterrupt):
        ems_calibration.class_conditional_ems(pipe, "digits-flow", num_samples=3, num_intervals=4, progress=False)
    images, _ = load_digits_images(int(pipe.unet.config.sample_size), "train")
    assert torch.equal(seen["data"], images[:3].to(seen["data"].dtype))
    assert seen["time_derivative"] == "difference"
    assert seen["meta"]["model_digest"] and seen["meta"]["prediction_type"] == "flow"
    x = seen["data"][:2] * 0.6 + 0.3
    lam = 0.4
    with torch.no_grad():
        got = seen["eps_fn"](x, lam, torch.zeros((), dtype=x.dtype))
        alpha = float(torch.sigmoid(torch.tensor(lam)))
        t = torch.full((2,), 1000 * (1 - alpha))
        v = pipe.unet(x, t, class_labels=torch.full((2,), 10)).sample
    torch.testing.assert_close(got, x + alpha * v, rtol=1e-5, atol=1e-5)  # float32 model, same inputs



def test_ems_variance_floor_is_relative_to_the_moments_of_f():
    """s = Cov(f, f')/Var f wherever Var f exceeds 1e-9 of E[u^2] + l^2 E[y^2] (the moments it is formed from),
    else s = 0 and b = E f' (ems_estimate's documented floor). Element 0: f = u - l y with a large mean (Var f
    relative ~2.5e-7): numpy's least squares. Element 1: Var f ~1e-4 is large next to E[u^2] but ~4e-12 of
    l^2 E[y^2]: s = 0. l is constant (l' = 0), so f' = (l - 1) u + w - 0 * y."""
    from fewstep.solvers.ems_estimate import EMSAccumulator

    lam = np.linspace(-2.0, 2.0, 5)
    acc = EMSAccumulator(lam, (2,))
    rng = np.random.default_rng(9)
    l0, k = 0.5, 400
    s_ref, b_ref = [], []
    for i in range(lam.size):
        r = rng.normal(size=(k, 4))
        u = np.stack([1000 + 0.5 * r[:, 0], 1e-2 * r[:, 1]], 1)
        y = np.stack([r[:, 2], np.full(k, 1e4)], 1)
        w = 0.3 * u + 0.1 * r[:, 3:4]
        acc.add(i, torch.full((k, 2), l0, dtype=torch.float64), *(torch.from_numpy(a) for a in (u, y, w)))
        f, fp = u - l0 * y, (l0 - 1) * u + w
        slope, intercept = np.polyfit(f[:, 0], fp[:, 0], 1)
        s_ref.append([slope, 0.0])
        b_ref.append([intercept, fp[:, 1].mean()])
    ems = acc.finalize()
    # element 0: moments of size 1e6 differenced in float64 leave ~1e-10 relative in Var f (2.5e-1): 1e-5 is loose
    np.testing.assert_allclose(ems.s[:, 0], np.array(s_ref)[:, 0], rtol=1e-5)
    assert np.abs(np.array(s_ref)[:, 0]).min() > 0.01  # a real slope that a coarser floor would zero
    np.testing.assert_allclose(ems.b[:, 0], np.array(b_ref)[:, 0], rtol=1e-5, atol=1e-3)
    assert np.all(ems.s[:, 1] == 0.0)
    np.testing.assert_allclose(ems.b[:, 1], np.array(b_ref)[:, 1], rtol=1e-9, atol=1e-12)



def test_ems_checkpoint_with_a_partial_last_batch_holds_its_progress_and_resumes(tmp_path):
    """5 samples in batches of 2: every grid point finishes 3 batches and sums 5 samples (the last batch holds
    one). The checkpoint file says so field by field -- counts 5, batches 3, the grid, the per-element sums
    (the Jacobian-diagonal sum is 5 l for the elementwise linear model l/sigma x) -- and a rerun on it resumes
    to the same tables instead of refusing it as damaged."""
    from safetensors import safe_open

    from fewstep.solvers.ems_estimate import SUM_KEYS, estimate_ems
    from fewstep.solvers.schedules import VPSchedule

    schedule = VPSchedule.from_config(DDPMScheduler().config)
    slope = torch.tensor([0.3, 0.7], dtype=torch.float64)

    def eps_fn(x, lam, dlam):
        return slope / _sigmoid_pair("vp", torch.tensor(lam, dtype=torch.float64) + dlam)[1] * x

    data = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ck = tmp_path / "ems.ckpt.safetensors"
    first = estimate_ems(eps_fn, data, schedule, num_intervals=4, batch_size=2, checkpoint=ck, progress=False)
    with safe_open(str(ck), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in ("sums", "lambdas", "counts", "batches")}
    assert t["counts"].tolist() == [5] * 5 and t["batches"].tolist() == [3] * 5
    assert np.array_equal(t["lambdas"].numpy(), first.lambdas)
    assert tuple(t["sums"].shape) == (5, len(SUM_KEYS), 2)
    np.testing.assert_allclose(t["sums"][:, SUM_KEYS.index("jdiag")].numpy(), 5 * slope.expand(5, 2).numpy(),
                               rtol=1e-12)  # sigma * (slope / sigma) * v^2 summed over 5 samples
    again = estimate_ems(eps_fn, data, schedule, num_intervals=4, batch_size=2, checkpoint=ck, progress=False)
    for name in ("l", "s", "b"):
        assert np.array_equal(getattr(again, name), getattr(first, name))
