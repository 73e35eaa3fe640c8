"""DPM-Solver-v3: EMS math, the v3 step against exact solutions and DPM-Solver++, the estimator, the scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep import samplers
from fewstep.bench.analytic import AnalyticModel, GaussianMixture, default_mixture, exact_solution
from fewstep.solvers.ems import EMS, derivative_matrix, ems_transition, load_ems, save_ems
from fewstep.solvers.ems_estimate import EMSAccumulator, _alpha_sigma_of_lambda, ems_lambdas, estimate_ems
from fewstep.solvers.engine import StepDecision, compile_plan, sample_loop
from fewstep.solvers.methods import dpm_solver_v3_decisions
from fewstep.solvers.schedules import VPSchedule

CFG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
SCHED = VPSchedule.from_config(CFG)


class _Start:
    def __init__(self, alpha, sigma):
        self.a, self.s = alpha, sigma

    def alpha_sigma(self, t):
        return self.a, self.s


def _run(sched, mixture, x, n, **kw):
    sched.set_timesteps(n, **kw)
    model = AnalyticModel(mixture, sched.noise_schedule, "epsilon")
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


def _exact(mixture, grid, x):
    return exact_solution(mixture, _Start(float(grid.alphas[0]), float(grid.sigmas[0])), x, 0.0, (1.0, 0.0))


def _x_T(n=300, dim=2, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ math
def test_derivative_matrix_is_exact_on_polynomials():
    deltas = [-0.4, -0.9, -1.5]
    m, mp = derivative_matrix(deltas), derivative_matrix(deltas, pseudo=True)
    d = np.asarray(deltas)
    # g = c1 r + c2 r^2/2 + c3 r^3/6: the Taylor fit recovers (c1, c2, c3) exactly
    c = np.array([0.7, -1.3, 2.1])
    g = c[0] * d + c[1] * d**2 / 2 + c[2] * d**3 / 6
    np.testing.assert_allclose(m @ g, c, rtol=1e-12)
    # pseudo: the k-th derivative from the first k+1 points is exact for polynomials of degree k
    np.testing.assert_allclose((mp @ (0.7 * d))[0], 0.7, rtol=1e-12)
    np.testing.assert_allclose((mp @ (0.7 * d + 0.3 * d**2))[1], 0.6, rtol=1e-12)
    assert not np.allclose(mp[0], m[0])  # pseudo's first derivative ignores the far points


def test_v3_first_order_step_is_exact_for_a_gaussian_with_its_exact_ems(monkeypatch):
    """Single Gaussian per element (x0_i ~ N(mu_i, v)): l = 1/(1 + v e^{2 lambda}) makes f = -mu/(1 + v e^{2 lambda})
    independent of x, so with s = 0, b = df/dlambda the function g is constant and v3's first-order step is exact
    (up to quadrature): 3 steps land on the exact PF-ODE solution, where DPM-Solver++ is far off."""
    mu = torch.tensor([[0.8, -0.5, 1.7]], dtype=torch.float64)
    v = 0.3**2
    mixture = GaussianMixture(mu, [0.3], [1.0])
    lam = ems_lambdas(SCHED, 4000)
    ev = v * np.exp(2 * lam)[:, None]
    l = np.broadcast_to(1.0 / (1.0 + ev), (lam.size, 3)).copy()  # noqa: E741
    b = 2.0 * mu.numpy() * ev / (1.0 + ev) ** 2
    ems = EMS(lam, l, np.zeros_like(l), b)
    x = _x_T(200, 3)
    grid_sched = samplers.get("dpm-solver-v3")(**CFG, solver_order=1, use_corrector=False,
                                                   final_sigmas_type="sigma_min", degenerated=True)
    monkeypatch.setattr(grid_sched, "_tables", lambda grid=None: ems)  # the exact tables, on its grid
    out = _run(grid_sched, mixture, x, 3)
    grid = grid_sched.plan.grid
    ref = exact_solution(mixture, _Start(float(grid.alphas[0]), float(grid.sigmas[0])), x, 0.0,
                         (float(grid.alphas[-1]), float(grid.sigmas[-1])))
    err_v3 = (out - ref).abs().max().item()
    assert err_v3 < 1e-5
    dpm = samplers.get("dpm-solver++")(**CFG, solver_order=1, solver_type="taylor", final_sigmas_type="sigma_min")
    dpm.set_timesteps(timesteps=grid.timesteps.tolist())
    assert grid.sigmas[-1] > 0
    err_dpm = (_run_custom(dpm, mixture, x) - ref).abs().max().item()
    assert err_dpm > 100 * err_v3


def _run_custom(sched, mixture, x):
    model = AnalyticModel(mixture, sched.noise_schedule, sched.config.prediction_type)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n", [5, 8, 12])
def test_degenerated_v3_equals_dpm_solver_pp(order, n):
    mixture = default_mixture(dim=2)
    x = _x_T()
    v3 = samplers.get("dpm-solver-v3")(**CFG, degenerated=True, use_corrector=False, solver_order=order)
    a = _run(v3, mixture, x, n)
    dpm = samplers.get("dpm-solver++")(**CFG, solver_order=order, solver_type="taylor")
    dpm.set_timesteps(timesteps=v3.plan.grid.timesteps.tolist())
    b = _run_custom(dpm, mixture, x)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kw", [{"solver_order": 2}, {"solver_order": 3, "corrector_pseudo": False},
                                {"solver_order": 3, "predictor_pseudo": True}])
def test_degenerated_v3_with_corrector_equals_the_scalar_engine(kw):
    """The per-element EMS transitions with l=1, s=b=0 are the scalar data-prediction transitions, corrector and
    pseudo-order included."""
    mixture = default_mixture(dim=2)
    x = _x_T()
    v3 = samplers.get("dpm-solver-v3")(**CFG, degenerated=True, **kw)
    a = _run(v3, mixture, x, 7)
    decisions = [StepDecision(**{**d.__dict__, "prediction": "data"}) for d in v3.plan.decisions]
    assert any(d.corrector == "unic" for d in decisions)
    plan = compile_plan(v3.plan.grid, decisions)
    model = AnalyticModel(mixture, v3.noise_schedule, "epsilon")
    grid = v3.plan.grid

    def pair(xx, i):
        eps = model(xx, v3.timesteps[i])
        return (xx - grid.sigmas[i] * eps) / grid.alphas[i], eps

    torch.testing.assert_close(a, sample_loop(pair, x, plan), rtol=1e-11, atol=1e-11)


def _smooth_tables(lam):
    phase = np.array([0.3, 1.1, 2.0, 2.9])
    l = 0.5 + 0.4 * np.sin(lam[:, None] + phase)  # noqa: E741
    s = 0.8 * np.cos(1.3 * lam[:, None] + phase)
    b = 0.3 * np.sin(2 * lam[:, None] + phase)
    return l, s, b


def _alpha_sigma(lam):
    return math.sqrt(1 / (1 + math.exp(-2 * lam))), math.sqrt(1 / (1 + math.exp(2 * lam)))


def _brute_force_coefficients(lam_s, lam_t):
    """``A``, ``P`` and ``Q`` of eq. 11 by the trapezoid rule on 20001 points of the smooth tables."""
    fine = np.linspace(lam_s, lam_t, 20001)
    l, s, b = _smooth_tables(fine)  # noqa: E741

    def cum(v):
        out = np.zeros_like(v)
        out[1:] = np.cumsum(0.5 * np.diff(fine)[:, None] * (v[1:] + v[:-1]), axis=0)
        return out

    L, S = cum(l), cum(s)
    p_int, q_int = cum(np.exp(L + S))[-1], cum(np.exp(L + S) * cum(np.exp(-S) * b))[-1]
    (a_s, _), (a_t, _) = _alpha_sigma(lam_s), _alpha_sigma(lam_t)
    return a_t / a_s * np.exp(-L[-1]), a_t * np.exp(-L[-1]) * p_int, a_t * np.exp(-L[-1]) * q_int, l[0]


def test_v3_transition_quadrature_converges_at_second_order():
    """``ems_transition``'s coefficients (exponential quadrature on the EMS grid) converge to brute-force integrals
    of the underlying smooth ``l, s, b`` like ``dlambda^2``: 4x finer grid -> >= 8x smaller error."""
    lam_s, lam_t = -3.0, 0.5
    lin_x, p_x, q_x, l_s = _brute_force_coefficients(lam_s, lam_t)
    a_s, s_s = _alpha_sigma(lam_s)
    want_x0, want_eps = lin_x * a_s + p_x * l_s, lin_x * s_s - p_x * (1 - l_s) * s_s / a_s
    errors = []
    for n in (40, 160):
        lam = np.linspace(-4.0, 1.0, n + 1)
        ems = EMS(lam, *_smooth_tables(lam))
        i_s, i_t = (int(ems.snap([v])[0]) for v in (lam_s, lam_t))
        alphas = {i: _alpha_sigma(lam[i])[0] for i in (i_s, i_t)}
        sigmas = {i: _alpha_sigma(lam[i])[1] for i in (i_s, i_t)}
        tr = ems_transition(ems, i_s, i_t, [], alphas, sigmas, {i_s: 0})
        (_, cx0, ceps), = tr.terms
        errors.append(max(np.abs(tr.lin - lin_x).max(), np.abs(cx0 - want_x0).max(),
                          np.abs(ceps - want_eps).max(), np.abs(tr.const + q_x).max()))
    assert errors[1] < errors[0] / 8 and errors[1] < 0.01, errors


# ------------------------------------------------------------------------------------------------ estimator
def _eps_fn(mixture):
    def eps_fn(x, lam, dl):
        a, s = _alpha_sigma_of_lambda(SCHED, torch.tensor(lam, dtype=x.dtype) + dl)
        return mixture.eps_differentiable(x, a, s)

    return eps_fn


def test_estimator_is_exact_for_a_gaussian():
    """For a diagonal Gaussian the Jacobian is diagonal (Rademacher probes have zero variance) and f is constant:
    l = 1/(1 + v e^{2 lambda}) exactly, s = 0 and b = df/dlambda in closed form."""
    mu = torch.tensor([[0.8, -0.5]], dtype=torch.float64)
    v = 0.3**2
    mixture = GaussianMixture(mu, [0.3], [1.0])
    data = mixture.sample(64, generator=torch.Generator().manual_seed(0))
    ems = estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=400, batch_size=64, progress=False)
    ev = v * np.exp(2 * ems.lambdas)[:, None]
    np.testing.assert_allclose(ems.l, np.broadcast_to(1 / (1 + ev), ems.l.shape), atol=1e-10)
    np.testing.assert_allclose(ems.s, 0.0, atol=1e-6)
    b_exact = 2.0 * mu.numpy() * ev / (1 + ev) ** 2
    np.testing.assert_allclose(ems.b, b_exact, atol=2e-4)  # l's finite-difference derivative: O(dlambda^2)


def test_difference_time_derivative_is_second_order_at_the_grid_ends_too():
    """Found by probing: the 'difference' time derivative was one-sided first order at the two ends of the EMS
    grid (b off by 25% at the first point on a Gaussian); with the three-point end rule the error at every point,
    ends included, falls ~4x when the grid spacing halves, and matches the JVP estimate's tables closely."""
    mu = torch.tensor([[0.8, -0.5]], dtype=torch.float64)
    mixture = GaussianMixture(mu, [0.3], [1.0])
    data = mixture.sample(64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in (10, 20):
        tables = {td: estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=n, batch_size=64, progress=False,
                                   time_derivative=td) for td in ("jvp", "difference")}
        gap = np.abs(tables["difference"].b - tables["jvp"].b).max(axis=1)
        errors.append((gap[0], gap[-1], gap[1:-1].max()))
    for coarse, fine in zip(*errors):
        assert fine < coarse / 3, errors


def _exact_product_ems(comps, lam):
    """Exact l, s, b of a product of 1-D Gaussian mixtures (one per element) by quadrature over x."""
    acc = EMSAccumulator(lam, (len(comps),))
    xs = torch.linspace(-12, 12, 6001, dtype=torch.float64)
    for i, lm in enumerate(lam):
        for e, (means, std, weights) in enumerate(comps):
            m = torch.tensor(means, dtype=torch.float64)
            w = torch.tensor(weights, dtype=torch.float64)

            def eps1(x, lam_t, m=m, w=w, std=std):
                a, s = torch.sigmoid(2 * lam_t).sqrt(), torch.sigmoid(-2 * lam_t).sqrt()
                var = a**2 * std**2 + s**2
                logp = -0.5 * (x[:, None] - a * m) ** 2 / var - 0.5 * torch.log(var) + torch.log(w)
                r = torch.softmax(logp, -1)
                return (r * s * (x[:, None] - a * m) / var).sum(-1), torch.logsumexp(logp, -1)

            lt = torch.tensor(float(lm), dtype=torch.float64)
            a, s = float(torch.sigmoid(2 * lt).sqrt()), float(torch.sigmoid(-2 * lt).sqrt())
            x = xs.clone().requires_grad_(True)
            eps, logp = eps1(x, lt)
            dx_eps, = torch.autograd.grad(eps.sum(), x)  # points are independent: the sum's gradient is the diagonal
            # d eps/d lambda per point (forward mode: one tangent for all points)
            dl_eps = torch.autograd.functional.jvp(lambda lt_: eps1(xs, lt_)[0], lt, torch.ones(()))[1]
            eps, logp, dx_eps = eps.detach(), logp.detach(), dx_eps.detach()
            dens = torch.exp(logp - 0.5 * math.log(2 * math.pi))
            dxdl = s * s * xs - s * eps
            deps = dl_eps + dx_eps * dxdl
            u, y, wv = math.exp(-lm) * eps, xs / a, math.exp(-lm) * deps
            jd = s * dx_eps
            parts = [jd, u, y, wv, u * u, u * y, y * y, u * wv, y * wv]
            for j, p in enumerate(parts):
                acc.sums[i, j, e] = torch.trapezoid(p * dens, xs)
        acc.counts[i] = 1
    return acc.finalize(), acc.means()


def test_estimator_converges_to_the_exact_ems_of_a_mixture():
    """Product of two 1-D mixtures: exact l, s, b by quadrature; the streamed Monte-Carlo estimate (Rademacher
    probes, JVPs) approaches them like 1/sqrt(K): 16x the samples must cut the error by more than 2x (4x
    expected). ``s, b`` are judged by what they are for, predicting ``f'``: the RMS error of ``s f + b`` under the
    exact distribution, relative to the spread of ``f'`` (where Var f vanishes ``s`` itself is ill-determined and
    irrelevant)."""
    comps = [([-1.0, 1.0], 0.4, [0.3, 0.7]), ([-0.5, 1.5], 0.4, [0.5, 0.5])]
    means = torch.tensor([[a, b] for a in comps[0][0] for b in comps[1][0]], dtype=torch.float64)
    weights = [wa * wb for wa in comps[0][2] for wb in comps[1][2]]
    mixture = GaussianMixture(means, [0.4] * 4, weights)
    lam = ems_lambdas(SCHED, 12, t_start=900.0, t_end=50.0)
    exact, e = _exact_product_ems(comps, lam)
    l = exact.l  # noqa: E741
    ef = e["u"] - l * e["y"]
    ef2 = e["uu"] - 2 * l * e["uy"] + l * l * e["yy"]
    spread = np.abs(exact.b + exact.s * ef) + 1e-3  # |E f'|, floored
    errs = []
    for k in (1024, 16384):
        data = mixture.sample(k, generator=torch.Generator().manual_seed(k))
        est = estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=12, t_start=900.0, t_end=50.0,
                           batch_size=k, seed=1, progress=False)
        ds, db = est.s - exact.s, est.b - exact.b
        pred = np.sqrt(np.maximum(ds * ds * ef2 + 2 * ds * db * ef + db * db, 0.0)) / spread
        errs.append({"l": np.abs(est.l - l).max(), "pred": pred.max()})
    for n in ("l", "pred"):
        assert errs[1][n] < errs[0][n] / 2, (n, errs)
    assert errs[1]["l"] < 0.01 and errs[1]["pred"] < 0.5, errs


def test_estimator_resumes_from_a_checkpoint(tmp_path):
    mixture = default_mixture(dim=2)
    data = mixture.sample(96, generator=torch.Generator().manual_seed(0))
    ck = tmp_path / "ck.safetensors"
    full = estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=6, batch_size=32, progress=False)
    # interrupt after the first grid points: simulate by running with a failing eps_fn midway
    calls = {"n": 0}

    def flaky(x, lam, dl):
        calls["n"] += 1
        if calls["n"] > 2 * 3 * 3:  # 3 grid points x 3 batches x 2 JVPs
            raise KeyboardInterrupt
        return _eps_fn(mixture)(x, lam, dl)

    with pytest.raises(KeyboardInterrupt):
        estimate_ems(flaky, data, SCHED, num_intervals=6, batch_size=32, checkpoint=ck, progress=False)
    assert ck.is_file() and EMSAccumulator.load(ck).batches.tolist()[:3] == [3, 3, 3]
    resumed = estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=6, batch_size=32, checkpoint=ck,
                           progress=False)
    for n in ("l", "s", "b"):
        np.testing.assert_allclose(getattr(resumed, n), getattr(full, n), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="other settings"):
        estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=6, batch_size=48, checkpoint=ck, progress=False)
    # another model (the caller's weights digest) or other data: refused, not resumed into the wrong tables
    with pytest.raises(ValueError, match="other settings"):
        estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=6, batch_size=32, checkpoint=ck, progress=False,
                     meta={"model_digest": "another-model"})
    with pytest.raises(ValueError, match="other settings"):
        estimate_ems(_eps_fn(mixture), data * 2, SCHED, num_intervals=6, batch_size=32, checkpoint=ck, progress=False)
    from fewstep.solvers.ems_estimate import weights_digest

    net = torch.nn.Linear(3, 2)
    before = weights_digest(net)
    with torch.no_grad():
        net.weight.mul_(0.5)
    assert weights_digest(net) != before


def test_a_checkpoint_of_an_earlier_estimator_is_not_resumed(tmp_path):
    """Found by a compatibility probe: a checkpoint written before the ``"difference"`` derivative's end rule changed
    had the same settings, so it was resumed into tables mixing the two estimators (row 0 25% off). Checkpoints now
    record the estimator's version; one from another version, or from before versions (none recorded), is refused."""
    from fewstep.solvers import ems_estimate

    mixture = default_mixture(dim=2)
    data = mixture.sample(32, generator=torch.Generator().manual_seed(0))
    kw = dict(num_intervals=4, batch_size=32, progress=False, time_derivative="difference")
    ck = tmp_path / "ck.safetensors"

    def interrupted(x, lam, dl):  # stopped once the first grid point is checkpointed
        if ck.is_file():
            raise KeyboardInterrupt
        return _eps_fn(mixture)(x, lam, dl)

    with pytest.raises(KeyboardInterrupt):
        estimate_ems(interrupted, data, SCHED, checkpoint=ck, **kw)
    acc = EMSAccumulator.load(ck)
    assert acc.meta["settings"]["estimator_version"] == ems_estimate.ESTIMATOR_VERSION
    acc.meta["settings"]["estimator_version"] = ems_estimate.ESTIMATOR_VERSION - 1
    acc.save(ck)
    with pytest.raises(ValueError, match=rf"other settings \(estimator_version: {ems_estimate.ESTIMATOR_VERSION - 1} "
                                         rf"there, {ems_estimate.ESTIMATOR_VERSION} in this run\); delete it"):
        estimate_ems(_eps_fn(mixture), data, SCHED, checkpoint=ck, **kw)
    del acc.meta["settings"]["estimator_version"]  # as every checkpoint written before the version was recorded
    acc.save(ck)
    with pytest.raises(ValueError, match=r"other settings \(estimator_version: absent there, 2 in this run\)"):
        estimate_ems(_eps_fn(mixture), data, SCHED, checkpoint=ck, **kw)


def test_estimator_rejects_bad_input():
    eps = _eps_fn(default_mixture(dim=2))
    with pytest.raises(ValueError, match="`data` must be a tensor"):
        estimate_ems(eps, torch.zeros(1, 2), SCHED, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        estimate_ems(eps, torch.full((4, 2), float("nan")), SCHED, progress=False)
    with pytest.raises(ValueError, match="`num_intervals` must be an integer >= 2"):
        estimate_ems(eps, torch.zeros(4, 2), SCHED, num_intervals=1, progress=False)
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        estimate_ems(eps, torch.zeros(4, 2), SCHED, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="t_end < t_start"):
        estimate_ems(eps, torch.zeros(4, 2), SCHED, t_start=10.0, t_end=20.0, progress=False)


# ------------------------------------------------------------------------------------------------ scheduler
@pytest.fixture(scope="module")
def analytic_ems(tmp_path_factory):
    mixture = default_mixture(dim=2)
    data = mixture.sample(4096, generator=torch.Generator().manual_seed(1))
    ems = estimate_ems(_eps_fn(mixture), data, SCHED, num_intervals=300, batch_size=4096, progress=False,
                       meta={"model": "analytic", "noise_schedule": __import__(
                           "fewstep.solvers.s3", fromlist=["x"]).schedule_fingerprint(SCHED),
                           "prediction_type": "epsilon"})
    path = tmp_path_factory.mktemp("ems") / "analytic.safetensors"
    save_ems(path, ems)
    return path


def test_v3_beats_dpm_solver_pp_and_unipc_on_the_exact_reference(analytic_ems):
    """The paper's claim in miniature: at NFE 5-8 v3 has a smaller error than DPM-Solver++ and UniPC at 1.3x the
    NFE (measured: 2-5x smaller errors at equal NFE; see scripts/bench_v3.py)."""
    mixture = default_mixture(dim=2)
    x = _x_T(400)
    for n in (5, 6, 8):
        v3 = samplers.get("dpm-solver-v3")(**CFG, ems_file=str(analytic_ems), time_grid="uniform_lambda")
        err_v3 = (_run(v3, mixture, x, n) - _exact(mixture, v3.plan.grid, x)).pow(2).mean().sqrt()
        m = math.ceil(1.3 * n)
        for name in ("dpm-solver++", "unipc"):
            base = samplers.get(name)(**CFG)
            err = (_run(base, mixture, x, m) - _exact(mixture, base.plan.grid, x)).pow(2).mean().sqrt()
            assert err_v3 < err, (n, name, float(err_v3), float(err))


def test_ems_round_trip_and_metadata_checks(analytic_ems, tmp_path):
    ems = load_ems(analytic_ems)
    assert ems.meta["model"] == "analytic" and ems.num_points == 301
    p = tmp_path / "copy.safetensors"
    save_ems(p, ems)
    again = load_ems(p)
    np.testing.assert_array_equal(again.s, ems.s)
    with pytest.raises(ValueError, match="was estimated for model 'analytic', not 'digits-eps'"):
        samplers.get("dpm-solver-v3")(**CFG, ems_file=str(analytic_ems), ems_model="digits-eps")
    with pytest.raises(ValueError, match="noise schedule"):
        samplers.get("dpm-solver-v3")(**{**CFG, "beta_schedule": "scaled_linear"}, ems_file=str(analytic_ems))
    with pytest.raises(ValueError, match="prediction_type"):
        samplers.get("dpm-solver-v3")(**{**CFG, "prediction_type": "v_prediction"}, ems_file=str(analytic_ems))


def test_ems_shape_mismatch_is_a_clear_error(analytic_ems):
    sched = samplers.get("dpm-solver-v3")(**CFG, ems_file=str(analytic_ems))
    sched.set_timesteps(5)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"EMS are for samples of shape \(2,\), got a batch of shape \(2, 3\)"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x)


def test_bad_ems_files_and_options(tmp_path):
    with pytest.raises(ValueError, match="fewstep calibrate ems"):
        samplers.get("dpm-solver-v3")(**CFG)
    with pytest.raises(FileNotFoundError, match="calibrate ems"):
        samplers.get("dpm-solver-v3")(**CFG, ems_file=str(tmp_path / "none.safetensors"))
    lam = np.linspace(-5, 4, 11)
    bad = np.ones((11, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"EMS `l` holds NaN/Inf at grid points \[3\]"):
        EMS(lam, bad, np.zeros((11, 2)), np.zeros((11, 2)))
    with pytest.raises(ValueError, match="must share one shape"):
        EMS(lam, np.ones((11, 2)), np.zeros((11, 3)), np.zeros((11, 2)))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_ems(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"`solver_order` must be an integer in \[1, 3\], got 4"):
        samplers.get("dpm-solver-v3")(**CFG, degenerated=True, solver_order=4)
    with pytest.raises(ValueError, match="`corrector_region` must be one of"):
        samplers.get("dpm-solver-v3")(**CFG, degenerated=True, corrector_region="half")
    with pytest.raises(ValueError, match="`corrector_split` must be a number in"):
        samplers.get("dpm-solver-v3")(**CFG, degenerated=True, corrector_split=1.5)
    with pytest.raises(ValueError, match="`time_grid` must be one of"):
        samplers.get("dpm-solver-v3")(**CFG, degenerated=True, time_grid="karras")


def test_grid_not_covering_the_time_range_is_a_clear_error(tmp_path):
    lam = ems_lambdas(SCHED, 50, t_start=600.0, t_end=100.0)
    save_ems(tmp_path / "narrow.safetensors", EMS(lam, np.ones((51, 2)), np.zeros((51, 2)), np.zeros((51, 2))))
    sched = samplers.get("dpm-solver-v3")(**CFG, ems_file=str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="outside the EMS grid"):
        sched.set_timesteps(timesteps=[999, 500, 200])
    lam = ems_lambdas(SCHED, 6)
    save_ems(tmp_path / "coarse.safetensors", EMS(lam, np.ones((7, 2)), np.zeros((7, 2)), np.zeros((7, 2))))
    sched = samplers.get("dpm-solver-v3")(**CFG, ems_file=str(tmp_path / "coarse.safetensors"))
    with pytest.raises(ValueError, match="snap to repeated EMS grid points"):
        sched.set_timesteps(10)


def test_half_corrector_region_is_a_parameter():
    """The paper's half-corrector runs the corrector at t <= 0.5; the released code's `half=True` at t > 0.5."""
    def flags(region):
        s = samplers.get("dpm-solver-v3")(**CFG, degenerated=True, corrector_region=region, time_grid="uniform_time")
        s.set_timesteps(10)
        frac = (s.plan.grid.timesteps + 1) / 1000
        return [d.corrector == "unic" for d in s.plan.decisions], frac

    low, frac = flags("low-noise")
    high, _ = flags("high-noise")
    full, _ = flags("all")
    for i in range(9):
        if full[i]:
            assert low[i] == (frac[i + 1] <= 0.5) and high[i] == (frac[i + 1] > 0.5)
    assert any(low) and any(high) and not any(a and b for a, b in zip(low, high))


def test_v3_decisions_follow_the_reference_loop():
    d = dpm_solver_v3_decisions(6, solver_order=3, predictor_pseudo=True, corrector_pseudo=False,
                                final_is_clean=False)
    assert [x.order for x in d] == [1, 2, 3, 3, 2, 1]
    assert [x.corrector_order for x in d] == [None, 2, 3, 3, 2, None]
    assert [x.pseudo for x in d] == [False, False, True, True, False, False]
    d = dpm_solver_v3_decisions(5, solver_order=2)
    assert d[-1].prediction == "data" and d[0].corrector_order == 2 and d[1].corrector_order == 3


def test_cfgpp_pairs_reach_v3_like_dpm_solver_pp():
    """An inconsistent (x0, eps) pair (CFG++) goes through v3's pair form: degenerate v3 equals DPM-Solver++."""
    mixture, other = default_mixture(dim=2, seed=0), default_mixture(dim=2, seed=3)
    x = _x_T(50)
    outs = []
    v3 = samplers.get("dpm-solver-v3")(**CFG, degenerated=True, use_corrector=False)
    v3.set_timesteps(6)
    dpm = samplers.get("dpm-solver++")(**CFG, solver_type="taylor")
    dpm.set_timesteps(timesteps=v3.plan.grid.timesteps.tolist())
    for sched in (v3, dpm):
        y = x
        grid = sched.plan.grid
        for i, t in enumerate(sched.timesteps):
            a, s = float(grid.alphas[i]), float(grid.sigmas[i])
            x0, _ = mixture.denoise(y, a, s)
            _, eps_u = other.denoise(y, a, s)
            y = sched.step_pair(x0, eps_u, t, y).prev_sample
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-11, atol=1e-11)


def test_v3_step_runs_on_the_meta_device(analytic_ems):
    """No host sync in step: the whole loop runs on meta tensors."""
    sched = samplers.get("dpm-solver-v3")(**CFG, ems_file=str(analytic_ems), solver_order=3)
    sched.set_timesteps(8, device="meta")
    x = torch.empty(3, 2, device="meta")
    for t in sched.timesteps:
        x = sched.step(torch.empty_like(x), t, x).prev_sample
    assert x.device.type == "meta" and sched.step_index == 8


def test_v3_from_real_pipeline_configs():
    from _helpers import SD15_PNDM, SD21_DDIM_V

    for cfg in (SD15_PNDM, SD21_DDIM_V):
        s = samplers.get("dpm-solver-v3").from_config(cfg, degenerated=True)
        s.set_timesteps(8)
        assert len(s.timesteps) == 8 and s.plan.grid.sigmas[-1] == 0


# ------------------------------------------------------------------------------------------------ calibrate + CLI
from test_real_pipeline import tiny_sd  # noqa: E402, F401 - the tiny SD pipeline directory fixture


def test_ems_of_a_text_to_image_pipeline_drive_v3_in_it(tiny_sd, tmp_path):  # noqa: F811
    """SD path end to end: the pipeline generates its own latents, EMS come from the empty-prompt branch, the file
    loads into a v3 scheduler made from the pipeline's config, and the pipeline samples with it."""
    from diffusers import StableDiffusionPipeline

    from fewstep.calibrate.ems import text_to_image_ems

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    ems = text_to_image_ems(pipe, str(tiny_sd), ["a red square", "a blue circle"], num_samples=4, num_intervals=8,
                            batch_size=2, sample_steps=2, progress=False)
    latent = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    assert ems.sample_shape == latent and ems.meta["branch"].startswith("unconditional")
    assert np.isfinite(ems.l).all() and ems.meta["seconds"] >= 0 and ems.meta["peak_memory_mib"] > 0
    path = tmp_path / "sd.safetensors"
    save_ems(path, ems)
    pipe.scheduler = samplers.from_config("dpm-solver-v3", pipe.scheduler.config, ems_file=str(path),
                                          ems_model=str(tiny_sd))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red square", num_inference_steps=4, guidance_scale=3.0, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape[1:] == latent and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="`prompts` must hold at least one prompt"):
        text_to_image_ems(pipe, "x", [], num_samples=2, progress=False)


def test_cli_calibrate_ems_and_generate_with_it(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "ems.safetensors"
    argv = ["calibrate", "ems", "--samples", "4", "--intervals", "24", "--batch-size", "4", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0 and out.is_file()
    ems = load_ems(out)
    assert ems.num_points == 25 and ems.meta["model"] == "digits-eps" and ems.sample_shape == (1, 16, 16)
    assert "peak memory" in capsys.readouterr().out
    png = tmp_path / "v3.png"
    argv = ["generate", "--sampler", "dpm-solver-v3", "--steps", "5", "--num-images", "2", "--sampler-option",
            f"ems_file={out}", "--out", str(png)]
    assert main(argv) == 0 and png.is_file()
    bad = tmp_path / "bad.safetensors"
    assert main(["calibrate", "ems", "--samples", "4", "--intervals", "1", "--out", str(bad), "--quiet"]) == 2
    assert "argument --intervals: expected an integer >= 2, got 1" in capsys.readouterr().err and not bad.exists()
    assert main(["calibrate", "ems", "--model", "digits-mr", "--out", str(bad), "--quiet"]) == 2
    capsys.readouterr()
    assert main(["calibrate", "ems", "--checkpoint", str(tmp_path / "nodir" / "c.safetensors"), "--out", str(bad),
                 "--quiet"]) == 2
    assert "`--checkpoint`" in capsys.readouterr().err and not bad.exists()
    assert main(["calibrate", "ems", "--checkpoint", str(bad), "--out", str(bad), "--quiet"]) == 2
    assert "is the --out file" in capsys.readouterr().err


def test_shipped_digits_ems_run_out_of_the_box():
    """`fewstep generate --sampler dpm-solver-v3` on digits-eps needs no EMS argument: the tables ship."""
    import fewstep
    from fewstep.samplers.dpm_solver_v3 import SHIPPED_EMS

    ems = load_ems(SHIPPED_EMS["digits-eps"])
    assert ems.meta["model"] == "digits-eps" and ems.sample_shape == (1, 16, 16)
    assert ems.meta["settings"]["num_samples"] == 1024 and ems.meta["branch"].startswith("unconditional")
    assert ems.meta["settings"]["time_derivative"] == "difference"
    pipe = fewstep.load_default("digits-eps", sampler="dpm-solver-v3")
    assert pipe.scheduler.config.ems_file == "digits-eps" and pipe.scheduler.config.time_grid == "time_quadratic"
    for guidance in ("cfg", "cfg++"):
        out = pipe([3, 7], num_inference_steps=6, guidance=guidance, output_type="latent",
                   latents=torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
        assert torch.isfinite(out.images).all() and out.images.abs().max() < 3
    flow = load_ems(SHIPPED_EMS["digits-flow"])
    assert flow.meta["model"] == "digits-flow" and flow.meta["prediction_type"] == "flow"
    pipe = fewstep.load_default("digits-flow", sampler="dpm-solver-v3")
    assert pipe.scheduler.is_flow and pipe.scheduler.config.ems_file == "digits-flow"
    out = pipe([1], num_inference_steps=6, output_type="latent")
    assert torch.isfinite(out.images).all()


def test_degenerated_v3_on_a_flow_config_equals_dpm_solver_pp():
    """Flow models (SD3's config): v3 integrates the flow process in lambda like every engine solver."""
    from _helpers import SD3_FLOW

    mixture = default_mixture(dim=2)
    x = _x_T(100)
    v3 = samplers.get("dpm-solver-v3").from_config(SD3_FLOW, degenerated=True, use_corrector=False)
    assert v3.is_flow
    v3.set_timesteps(8)
    model = AnalyticModel(mixture, v3.noise_schedule, v3.config.prediction_type)
    a = x
    for t in v3.timesteps:
        a = v3.step(model(a, t), t, a).prev_sample
    # user timesteps on a flow config are shifted as FlowMatchEuler does: shift 1 takes v3's (shifted) times as they are
    dpm = samplers.get("dpm-solver++").from_config({**SD3_FLOW, "shift": 1.0}, solver_type="taylor")
    dpm.set_timesteps(timesteps=v3.plan.grid.timesteps.tolist())
    b = _run_custom(dpm, mixture, x)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("extra", [{"degenerated": True}, {"ems_file": "digits-flow", "ems_model": "digits-flow"}])
def test_v3_time_grid_on_a_flow_config_follows_its_shift(extra):
    """Found by probing: v3's time grids ignored SD3's `shift` and Flux's `mu` (shift 1 and 3 gave one grid, a Flux
    config sampled without `mu`). The grid is warped as diffusers' flow schedulers warp theirs, the first point
    kept on the EMS grid's upper end; shift 1 leaves it unchanged."""
    from _helpers import FLUX_FLOW, SD3_FLOW

    from fewstep.solvers.schedules import FlowShift

    def grid(config, **kw):
        v3 = samplers.get("dpm-solver-v3").from_config(config, **extra)
        v3.set_timesteps(5, **kw)
        return v3.plan.grid

    plain = grid({**SD3_FLOW, "shift": 1.0})
    shifted = grid(SD3_FLOW)
    ems = samplers.get("dpm-solver-v3").from_config(SD3_FLOW, **extra).ems
    top = plain.sigmas[0]
    want = FlowShift(3.0).apply(plain.sigmas) * top / FlowShift(3.0).apply(np.array([top]))[0]
    # every point is snapped to the EMS grid (degenerate tables have one too): within one EMS cell of the warp
    cell = float(np.max(np.abs(np.diff(ems.lambdas))))
    inner = want[1:-1]
    np.testing.assert_allclose(shifted.lambdas[1:-1], np.log((1 - inner) / inner), atol=cell)
    assert shifted.sigmas[0] == pytest.approx(top) and np.all(shifted.sigmas[1:-1] > plain.sigmas[1:-1])
    # against diffusers' shifted flow grid (dpm-solver++ on the same config): the same warp
    dpm = samplers.from_config("dpm-solver++", SD3_FLOW)
    dpm.set_timesteps(5)
    np.testing.assert_allclose(shifted.sigmas[:-1], dpm.plan.grid.sigmas[:-1], rtol=0.05 if "ems_file" in extra
                               else 0.02)  # digits-flow's EMS grid is coarser and spans a narrower range
    with pytest.raises(ValueError, match="`mu` must be passed to set_timesteps"):
        grid(FLUX_FLOW)
    flux = grid(FLUX_FLOW, mu=1.15)
    assert np.all(flux.sigmas[1:-1] > plain.sigmas[1:-1])
    np.testing.assert_allclose(grid(FLUX_FLOW, mu=0.0).sigmas, plain.sigmas, rtol=1e-12)


@pytest.mark.parametrize("extra", [{"degenerated": True}, {"ems_file": "digits-flow", "ems_model": "digits-flow"}])
def test_v3_flow_grids_starting_at_pure_noise(extra):
    """Found by probing: a flow grid starting at s = 1 (time_grid='spacing', the Flux pipeline's `sigmas`) failed
    with "lambda -13.8 lies outside the EMS grid", even for degenerate tables. Its first point now moves to the
    EMS grid's upper end; the other points are those of the same grid on unipc."""
    from _helpers import SD3_FLOW

    v3 = samplers.get("dpm-solver-v3")
    top = 1.0 / (1.0 + math.exp(v3.from_config(SD3_FLOW, **extra).ems.lambdas[0]))
    sched = v3.from_config(SD3_FLOW, time_grid="spacing", **extra)
    sched.set_timesteps(6)
    ref = samplers.from_config("unipc", SD3_FLOW)  # the same flow grid style ("multistep")
    ref.set_timesteps(6)
    assert ref.plan.grid.sigmas[0] > top and sched.plan.grid.sigmas[0] == pytest.approx(top, rel=1e-9)
    cell = float(np.max(np.abs(np.diff(sched.ems.lambdas))))  # snapped to the EMS grid
    np.testing.assert_allclose(sched.plan.grid.lambdas[1:-1], ref.plan.grid.lambdas[1:-1], atol=cell)
    sched = v3.from_config(SD3_FLOW, **extra)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # as the Flux pipeline passes them
    assert sched.plan.grid.num_steps == 4 and sched.plan.grid.sigmas[0] == pytest.approx(top, rel=1e-9)
    with pytest.raises(ValueError, match="`shift_terminal`=0.1 is not supported by dpm-solver-v3's time grids"):
        v3.from_config({**SD3_FLOW, "shift_terminal": 0.1}, **extra).set_timesteps(5)


# ------------------------------------------------------------------------------------------ malformed EMS files
def _ems_file(path, tensors=None, header=None):
    """A copy of a small EMS file with some tensors or header fields replaced (``None`` values drop the field)."""
    from safetensors.torch import save_file

    lam = np.linspace(-5.0, 4.0, 11)
    base = {"lambdas": torch.tensor(lam), "l": torch.ones(11, 2, dtype=torch.float64),
            "s": torch.zeros(11, 2, dtype=torch.float64), "b": torch.zeros(11, 2, dtype=torch.float64)}
    meta = {"format": "fewstep.ems", "version": "1", "meta": '{"model": "toy"}'}
    base.update(tensors or {})
    meta.update(header or {})
    save_file({k: v.contiguous() for k, v in base.items()}, str(path), metadata={k: v for k, v in meta.items()
                                                                                  if v is not None})
    return path


@pytest.mark.parametrize(
    "tensors, header, match",
    [
        # found by probing: a bare JSONDecodeError / TypeError from the metadata
        (None, {"meta": "{not json"}, r"metadata field 'meta' is not valid JSON"),
        (None, {"meta": "[1, 2]"}, r"metadata field 'meta' must be a JSON object, got \[1, 2\]"),
        (None, {"meta": "null"}, r"metadata field 'meta' must be a JSON object, got None"),
        (None, {"meta": '"x"'}, r"metadata field 'meta' must be a JSON object, got 'x'"),
        # the version was never checked
        (None, {"version": "99"}, r"format version '99' is not supported \(this fewstep reads version '1'\)"),
        (None, {"version": None}, r"format version None is not supported"),
        # complex and bool tables were accepted (complex with a cast warning)
        ({"l": torch.ones(11, 2, dtype=torch.complex64)}, None, r"tensor 'l' has dtype complex64; it must hold "
         r"real floating-point numbers"),
        ({"s": torch.zeros(11, 2, dtype=torch.bool)}, None, r"tensor 's' has dtype bool"),
        ({"b": torch.zeros(11, 2, dtype=torch.int64)}, None, r"tensor 'b' has dtype int64"),
        ({"lambdas": torch.tensor(np.linspace(-5.0, 4.0, 12)).reshape(3, 4)}, None, r"'lambdas' must be 1-D"),
        # refused before, but without the file's name
        ({"b": torch.full((11, 2), float("nan"), dtype=torch.float64)}, None, r"EMS `b` holds NaN/Inf"),
        ({"lambdas": torch.tensor(np.linspace(4.0, -5.0, 11))}, None, r"`lambdas` must be finite and strictly"),
        ({"s": torch.zeros(11, 3, dtype=torch.float64)}, None, r"must share one shape"),
        ({k: torch.ones(1, 2, dtype=torch.float64) for k in "lsb"} | {"lambdas": torch.zeros(1, dtype=torch.float64)},
         None, r"at least 2 grid points"),
    ],
)
def test_malformed_ems_files_are_value_errors_naming_the_file(tmp_path, tensors, header, match):
    path = _ems_file(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=match) as info:
        load_ems(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=match):
        samplers.get("dpm-solver-v3")(**CFG, ems_file=str(path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ems_files_in_lower_precision_load_upcast(tmp_path, dtype):
    """Found by probing: bfloat16 tables were 'not a readable safetensors file: Got unsupported ScalarType'."""
    lam = torch.linspace(-5.0, 4.0, 11, dtype=torch.float64)
    ref = load_ems(_ems_file(tmp_path / "f64.safetensors", {"l": torch.full((11, 2), 0.75, dtype=torch.float64)}))
    low = {"lambdas": lam.to(dtype), "l": torch.full((11, 2), 0.75, dtype=dtype),
           "s": torch.zeros(11, 2, dtype=dtype), "b": torch.zeros(11, 2, dtype=dtype)}
    if dtype == torch.bfloat16:
        low["lambdas"] = lam.to(torch.float32)  # bf16 cannot hold 11 distinct evenly spaced lambdas exactly
    ems = load_ems(_ems_file(tmp_path / "low.safetensors", low))
    assert ems.l.dtype == np.float64 and ems.lambdas.dtype == np.float64
    np.testing.assert_allclose(ems.l, ref.l)
    assert ems.lambdas.tolist() == low["lambdas"].double().tolist()  # exact upcast of the stored values
    assert ref.num_points == ems.num_points


@pytest.mark.parametrize("model", [5, ""])
def test_ems_model_of_the_wrong_type_names_the_option(model):
    from fewstep import samplers

    with pytest.raises(ValueError, match="`ems_model` must be a model name"):
        samplers.get("dpm-solver-v3")(ems_file="digits-eps", ems_model=model).set_timesteps(5)


def test_ems_free_tables_refine_for_long_runs():
    """Found by a probe: ``degenerated=True`` without a file (= DPM-Solver++) refused 800+ steps on a zero-terminal-SNR
    schedule ("snap to repeated EMS grid points"): its 2000-point tables were too coarse where the steps crowd in
    lambda. They are rebuilt finer when a run needs it (and left as they were otherwise)."""
    zero_snr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # fmt: skip
    sched = samplers.get("dpm-solver-v3")(**zero_snr, degenerated=True)
    sched.set_timesteps(10)
    assert sched._tables().num_points == 2001  # a short run keeps the default tables
    short = sched.timesteps.clone()
    sched.set_timesteps(800)
    assert sched._tables().num_points > 2001 and len(sched.timesteps) == 800
    assert bool((sched.timesteps[1:] < sched.timesteps[:-1]).all())
    # a run never depends on an earlier one (review: the refined tables stayed for every later run)
    sched.set_timesteps(10)
    assert sched._tables().num_points == 2001 and torch.equal(sched.timesteps, short)


@pytest.mark.parametrize("given", [{"sigmas": [1.0]}, {"timesteps": [1000.0]}])
def test_a_one_point_flow_grid_at_pure_noise_moves_onto_the_ems_grid(given):
    """Found by a probe: a one-step flow grid starting at s = 1 was refused as "outside the EMS grid" (the move of the
    first point onto the EMS grid's upper end skipped grids of one step), though every longer one moves."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = samplers.get("dpm-solver-v3").from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                                                      degenerated=True)  # fmt: skip
    sched.set_timesteps(**given)
    assert len(sched.timesteps) == 1 and float(sched.timesteps[0]) < 1000.0
    x = torch.randn(1, 4)
    assert torch.isfinite(sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample).all()
