"""Gaps a mutation probe of the S^3 code found: result-changing edits the rest of the suite let through.

* a solver schedule's explicit derivative ``points`` and a ``final`` model time, against the exponential-integrator
  step written out by hand;
* the analytic objective's RMSE reduction, its analytic-first-step start and its data mean (the mixture's prior mean,
  read off the denoiser at vanishing signal); the digits objectives' MSE and Frechet/accuracy reductions (scipy);
* the search operators by brute force: every mutation gene and the time jitter / delete-and-add, crossover's
  per-step genes and points, the AFS switch (a point midway in lambda), warm start's widest/narrowest gap rule,
  the random phase's quarter of the budget, one evaluation per distinct schedule, the predictor's ranking;
* the hand-designed seeds: DPM-Solver++ 2M as the dedicated sampler runs it, on diffusers' linspace timesteps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from fewstep import samplers
from fewstep.search import SearchSpace, s3_search, search
from fewstep.search.objectives import AnalyticObjective
from fewstep.search.s3_search import _key, crossover, mutate, random_schedule, seed_schedules, warm_start
from fewstep.solvers.engine import StepDecision, sample_loop
from fewstep.solvers.s3 import SolverSchedule
from fewstep.solvers.schedules import VPSchedule

VP = VPSchedule.from_config(DDPMScheduler().config)


@pytest.fixture(scope="module")
def objective():
    return AnalyticObjective(num_samples=64)


def _lam(times) -> np.ndarray:
    alpha, sigma = VP.alpha_sigma(np.asarray(times, dtype=np.float64))
    return np.log(np.asarray(alpha) / np.asarray(sigma))


def _hand_data_solver(mixture, x, times, target, steps):
    """Data-prediction exponential integrator written from the formula (DPM-Solver++, Lu et al. 2022b, eq. 9):
    ``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s + alpha_t (h - 1 + e^{-h}) (x0_j - x0_s)/(lam_j - lam_s)``
    with ``h = lam_t - lam_s`` and the derivative point ``j`` (``steps[i]`` = its buffer offset, or None: first
    order). ``target``: ``(alpha, sigma)`` of the end point (``sigma = 0``: the step returns ``x0_s``)."""
    alpha, sigma = (np.asarray(v, dtype=np.float64) for v in VP.alpha_sigma(np.asarray(times, dtype=np.float64)))
    alpha, sigma = [*alpha, target[0]], [*sigma, target[1]]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    x0s = []
    for i, point in enumerate(steps):
        x0, _ = mixture.denoise(x, alpha[i], sigma[i])
        x0s.append(x0)
        if sigma[i + 1] == 0:
            x = x0
            continue
        h = lam[i + 1] - lam[i]
        new = sigma[i + 1] / sigma[i] * x + alpha[i + 1] * (1 - math.exp(-h)) * x0
        if point is not None:
            j = i - point
            new = new + alpha[i + 1] * (h - 1 + math.exp(-h)) * (x0s[j] - x0) / (lam[j] - lam[i])
        x = new
    return x


# ----------------------------------------------------------------------------------------------------------------
# USF step execution
def test_explicit_derivative_points_use_the_named_buffered_evaluation(objective):
    """``points=(p,)`` estimates the first derivative from the evaluation ``p`` steps back, not the previous one."""
    times = [999.0, 700.0, 450.0, 250.0, 100.0]
    points = [None, 1, 2, 3, None]
    decisions = [StepDecision("data", 1 if p is None else 2, points=None if p is None else (p,)) for p in points]
    plan = SolverSchedule(times, decisions).plan(VP)
    x = objective.x_start
    got = sample_loop(lambda y, i: objective.mixture.denoise(y, plan.grid.alphas[i], plan.grid.sigmas[i]), x, plan)
    want = _hand_data_solver(objective.mixture, x, times, (1.0, 0.0), points)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)  # float64 throughout: rounding only


def _exact_step(x_s, alpha_t, sigma_t, sigma_s, lam_s, lam_t, f_s, points):
    """Data-form step with ``x0(lam) = f_s + g1 u + g2 u^2 / 2`` (u = lam - lam_s) integrated exactly:
    ``alpha_t [(1 - e^-h) f_s + (h - 1 + e^-h) g1 + ((h^2 - 2h + 2)/2 - e^-h) g2]``; ``g1``, ``g2`` by Newton
    divided differences on ``[s, *points]`` in the given order (pseudo-order: g1 from the first point only)."""
    h = lam_t - lam_s
    out = sigma_t / sigma_s * x_s + alpha_t * (1 - math.exp(-h)) * f_s
    (l1, f1), *rest = points
    d01 = (f1 - f_s) / (l1 - lam_s)
    out = out + alpha_t * (h - 1 + math.exp(-h)) * d01
    if rest:
        (l2, f2), = rest
        d012 = ((f2 - f1) / (l2 - l1) - d01) / (l2 - lam_s)
        out = out + alpha_t * ((h * h - 2 * h + 2) / 2 - math.exp(-h)) * 2 * d012
    return out


def test_pseudo_order_predictor_and_corrector_use_newton_divided_differences(objective):
    """``pseudo=True`` (order 3) / ``corrector_pseudo=True``: the k-th derivative from the k + 1 nearest points
    (DPM-Solver-v3 sec. 3.4), here on data-prediction steps, against the exact integral of that polynomial."""
    times = [999.0, 750.0, 500.0, 300.0, 150.0]
    decisions = [StepDecision("data", 1), StepDecision("data", 2, corrector="unic", corrector_pseudo=True),
                 StepDecision("data", 3, pseudo=True), StepDecision("data", 2), StepDecision("data", 1)]
    plan = SolverSchedule(times, decisions).plan(VP)
    mix = objective.mixture
    got = sample_loop(lambda y, i: mix.denoise(y, plan.grid.alphas[i], plan.grid.sigmas[i]), objective.x_start, plan)
    a, s = (np.asarray(v, dtype=np.float64) for v in VP.alpha_sigma(np.asarray(times)))
    a, s = [*a, 1.0], [*s, 0.0]
    lam = [math.log(a[i] / s[i]) for i in range(5)]

    def step(x, i, pts):  # from point i to i + 1, derivative points by grid index
        return _exact_step(x, a[i + 1], s[i + 1], s[i], lam[i], lam[i + 1], f[i], [(lam[j], f[j]) for j in pts])

    f = {}
    x = objective.x_start
    f[0] = mix.denoise(x, a[0], s[0])[0]
    x1 = s[1] / s[0] * x + a[1] * (1 - math.exp(-(lam[1] - lam[0]))) * f[0]
    f[1] = mix.denoise(x1, a[1], s[1])[0]
    x2_pred = step(x1, 1, [0])
    f[2] = mix.denoise(x2_pred, a[2], s[2])[0]
    x2 = step(x1, 1, [2, 0])  # the corrector: the new point first (pseudo: g1 from it alone)
    x3 = step(x2, 2, [1, 0])  # pseudo order 3: g1 from the previous point alone
    f[3] = mix.denoise(x3, a[3], s[3])[0]
    x4 = step(x3, 3, [2])
    want = mix.denoise(x4, a[4], s[4])[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)  # float64; divided differences lose ~1e-12


def test_a_final_model_time_ends_at_that_times_noise_level(objective):
    """``final=100.0`` ends the schedule at ``(alpha, sigma)`` of model time 100, not at clean data."""
    times, final = [999.0, 600.0, 300.0], 100.0
    points = [None, 1, 1]
    decisions = [StepDecision("data", 1), StepDecision("data", 2), StepDecision("data", 2)]
    plan = SolverSchedule(times, decisions, final=final).plan(VP)
    x = objective.x_start
    got = sample_loop(lambda y, i: objective.mixture.denoise(y, plan.grid.alphas[i], plan.grid.sigmas[i]), x, plan)
    a, s = VP.alpha_sigma(np.asarray([final]))
    want = _hand_data_solver(objective.mixture, x, times, (float(a[0]), float(s[0])), points)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_final_must_lie_strictly_below_the_last_timestep():
    """README: ``final`` is ``"zero"`` or a model time *below* the last timestep (equal: a zero-length step)."""
    decisions = [StepDecision("data", 1)] * 2
    with pytest.raises(ValueError, match="`final` must be 'zero' or a model time below the last timestep"):
        SolverSchedule([999.0, 300.0], decisions, final=300.0)
    assert SolverSchedule([999.0, 300.0], decisions, final=299.5).final == 299.5


def test_times_below_the_models_range_are_a_clear_error():
    decisions = [StepDecision("data", 1)] * 2
    with pytest.raises(ValueError, match="lie outside the model's range"):
        SolverSchedule([999.0, -5.0], decisions).plan(VP)


def test_from_grid_refuses_timesteps_slightly_off_their_noise_levels():
    """A grid whose model timesteps are 0.05 off the times of its noise levels (a 1e-4 log-SNR gap) is another
    sampler than the schedule of those timesteps: refused like a Karras grid, not only when the gap is large."""
    from fewstep.solvers.grids import TimeGrid

    times = np.array([999.0, 700.0, 400.0, 100.0])
    exact = TimeGrid.from_times(VP, times, (1.0, 0.0))
    shifted = TimeGrid(times + np.array([0.0, 0.05, 0.05, 0.05]), exact.alphas, exact.sigmas)
    gap = np.max(np.abs(TimeGrid.from_times(VP, shifted.timesteps, (1.0, 0.0)).lambdas[:-1] - exact.lambdas[:-1]))
    assert 1e-6 < gap < 1e-3  # not a rounding error, far from a Karras grid's offsets
    decisions = [StepDecision("data", 1)] * 4
    with pytest.raises(ValueError, match="this grid's noise levels are not those of its model timesteps"):
        SolverSchedule.from_grid(shifted, decisions, schedule=VP)
    SolverSchedule.from_grid(exact, decisions, schedule=VP)


# ----------------------------------------------------------------------------------------------------------------
# objectives
def test_analytic_objective_is_the_rmse_to_the_reference_with_and_without_afs(objective):
    """The objective is ``sqrt(mean((x - reference)^2))``; with ``afs="zero_x0"`` the run starts from
    ``x_1 = (sigma_1 / sigma_0) x_0`` (x0 = 0 at ``t_max``), here a hand-written first-order loop."""
    times = [999.0, 500.0, 200.0]
    steps = [None, None, None]
    plain = SolverSchedule(times, [StepDecision("data", 1)] * 3)
    x = _hand_data_solver(objective.mixture, objective.x_start, times, (1.0, 0.0), steps)
    want = (x - objective.reference).pow(2).mean().sqrt().item()
    assert objective(plain) == pytest.approx(want, rel=1e-9)
    afs = SolverSchedule(times, [StepDecision("data", 1)] * 3, afs="zero_x0")
    _, sigma = VP.alpha_sigma(np.asarray(times[:2]))
    x1 = objective.x_start * float(sigma[1] / sigma[0])
    x = _hand_data_solver(objective.mixture, x1, times[1:], (1.0, 0.0), steps[1:])
    want_afs = (x - objective.reference).pow(2).mean().sqrt().item()
    assert objective(afs) == pytest.approx(want_afs, rel=1e-9)
    assert abs(want_afs - want) > 1e-3  # the two runs differ: the check above sees the start


def test_analytic_data_mean_is_the_mixtures_prior_mean(objective):
    """At vanishing signal (alpha -> 0) the posterior mean of x0 is the prior mean: the denoiser's answer."""
    x = torch.zeros(1, objective.mixture.dim, dtype=torch.float64)
    prior_mean, _ = objective.mixture.denoise(x, 1e-9, 1.0)
    np.testing.assert_allclose(objective.data_mean(), prior_mean[0].numpy(), atol=1e-6)  # O(alpha) bias


def test_digits_mse_is_the_mean_squared_error():
    from fewstep.search.objectives import DigitsMSEObjective

    obj = DigitsMSEObjective.__new__(DigitsMSEObjective)  # the reduction only: no model, no reference solve
    g = torch.Generator().manual_seed(0)
    obj.reference = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    images = torch.rand(3, 1, 4, 4, generator=g)
    want = np.mean((images.double().numpy() - obj.reference.numpy()) ** 2)
    assert obj.mse(images) == pytest.approx(want, rel=1e-12)


def test_digits_score_is_scipy_frechet_and_per_sample_accuracy():
    """``score`` = (Frechet distance of the classifier features to the reference statistics, written with
    scipy.linalg.sqrtm; the share of samples classified as their own label, labels in ``self.labels`` order)."""
    import scipy.linalg

    from fewstep.bench.digits_eval import classifier_features
    from fewstep.datasets import load_digits_images, to_unit_range
    from fewstep.pipelines import load_default
    from fewstep.search.objectives import DigitsObjective

    images, labels = load_digits_images(16, "test")
    pick = torch.cat([torch.nonzero(labels == c)[:6, 0] for c in (7, 2, 5)])
    images, labels = to_unit_range(images[pick]), labels[pick].tolist()
    obj = DigitsObjective.__new__(DigitsObjective)
    obj.classifier = load_default("digits-classifier")
    obj.labels = labels
    ref = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    ref_feats = classifier_features(obj.classifier, to_unit_range(ref))[0].double().numpy()
    obj.reference_stats = (ref_feats.mean(0), np.cov(ref_feats, rowvar=False))
    fd, accuracy = obj.score(images)
    feats, logits = (v.double().numpy() for v in classifier_features(obj.classifier, images))
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov @ obj.reference_stats[1]).real
    want = np.sum((mu - obj.reference_stats[0]) ** 2) + np.trace(cov + obj.reference_stats[1] - 2 * covmean)
    assert fd == pytest.approx(want, rel=1e-5, abs=1e-6)  # sqrtm vs eigen-based trace: ~1e-8 relative
    assert accuracy == pytest.approx(np.mean(logits.argmax(1) == np.asarray(labels)))
    assert accuracy > 0.5  # real test digits: the labels line up with the images (not a vacuous 0 == 0)


# ----------------------------------------------------------------------------------------------------------------
# search operators, brute force
def _parent(space: SearchSpace) -> SolverSchedule:
    """A valid NFE-5 schedule that differs from its neighbours in every gene."""
    decisions = [StepDecision("data", 1, corrector="unic"),
                 StepDecision("noise", 2, coefficients="bh1", relaxation=0.05),
                 StepDecision("data", 1, coefficients="bh2", corrector="unic"),
                 StepDecision("data", 2),
                 StepDecision("data", 1)]
    return SolverSchedule(space.times(np.array([0.2, 0.4, 0.6, 0.8])), decisions)


def test_mutation_changes_every_gene_and_keeps_schedules_valid():
    space = SearchSpace(VP, 5)
    parent = _parent(space)
    p_pos = space.positions(parent)
    kids = [mutate(space, parent, np.random.default_rng(seed)) for seed in range(300)]
    for kid in kids:
        assert kid.nfe == 5 and kid.timesteps[0] == pytest.approx(space.t_max)
        for i, d in enumerate(kid.decisions):
            assert d.order <= min(i + 1, space.max_order)
        assert kid.decisions[-1].order == 1 and kid.decisions[-1].corrector == "none"
    at = [[kid.decisions[i] for kid in kids] for i in range(5)]
    assert {d.order for d in at[2]} == {1, 2} and {d.order for d in at[3]} == {1, 2, 3}  # up and down
    assert {d.corrector for d in at[0]} == {"unic", "none"} and {d.corrector for d in at[1]} == {"unic", "none"}
    assert {d.coefficients for d in at[1]} == {"taylor", "bh1", "bh2"}
    assert len({d.relaxation for d in at[1]}) > 10
    assert {d.prediction for d in at[1]} == {"data", "noise"}
    new_points = [np.sum(np.min(np.abs(space.positions(k)[:, None] - p_pos[None]), axis=1) > 1e-9) for k in kids]
    assert 1 in new_points  # delete-and-add alone: one point moved, the rest kept
    assert 4 in new_points  # jitter: every point moved
    assert 0 in new_points  # neither


def test_random_schedules_respect_max_order():
    space = SearchSpace(VP, 6, max_order=2)
    rng = np.random.default_rng(0)
    orders = {d.order for _ in range(60) for d in random_schedule(space, rng).decisions}
    assert orders == {1, 2}


def test_crossover_takes_each_step_from_a_parent_and_points_from_one_or_their_mean():
    space = SearchSpace(VP, 5)
    a = _parent(space)
    b = SolverSchedule(space.times(np.array([0.1, 0.3, 0.5, 0.7])),
                       [StepDecision("noise", 1), StepDecision("data", 2, coefficients="bh2"),
                        StepDecision("noise", 3, relaxation=-0.02), StepDecision("data", 1, corrector="unic"),
                        StepDecision("data", 1)])
    pa, pb = space.positions(a), space.positions(b)
    kinds, mixed = set(), False
    for seed in range(60):
        kid = crossover(space, a, b, np.random.default_rng(seed))
        from_a = [d == da for d, da in zip(kid.decisions, a.decisions)]
        from_b = [d == db for d, db in zip(kid.decisions, b.decisions)]
        assert all(x or y for x, y in zip(from_a, from_b)), kid.decisions
        mixed |= not all(from_a[:4]) and not all(from_b[:4])
        pos = space.positions(kid)
        match = [name for name, ref in (("a", pa), ("b", pb), ("mean", 0.5 * (pa + pb))) if np.allclose(pos, ref)]
        assert match, pos
        kinds.add(match[0])
    assert mixed and kinds == {"a", "b", "mean"}
    # parents with and without an analytical first step: the points and the AFS choice come from one parent
    afs_space = SearchSpace(VP, 5, afs=True)
    c = SolverSchedule(afs_space.times(np.array([0.1, 0.3, 0.5, 0.7, 0.9])), [StepDecision("data", 1)] + b.decisions,
                       afs="zero_x0")
    sources = set()
    for seed in range(40):
        kid = crossover(afs_space, a, c, np.random.default_rng(seed))
        source = c if kid.afs else a
        np.testing.assert_allclose(kid.timesteps, source.timesteps, atol=1e-9)
        sources.add(kid.afs)
    assert sources == {None, "zero_x0"}


def test_switching_afs_adds_or_drops_the_point_midway_in_lambda():
    """On: ``t_max`` turns analytic and a new evaluation sits midway (in lambda) before the next point. Off: the
    first model evaluation is dropped."""
    space = SearchSpace(VP, 5, afs=True)
    parent = _parent(space)
    lam_max, lam_1 = _lam([parent.timesteps[0], parent.timesteps[1]])
    on = off = 0
    for seed in range(400):
        kid = mutate(space, parent, np.random.default_rng(seed))
        if kid.afs and np.allclose(kid.timesteps[2:], parent.timesteps[1:], rtol=0, atol=1e-9):
            on += 1
            assert _lam([kid.timesteps[1]])[0] == pytest.approx(0.5 * (lam_max + lam_1), abs=1e-6)
    afs_parent = SolverSchedule(space.times(np.array([0.1, 0.3, 0.5, 0.7, 0.9])),
                                [StepDecision("data", 1)] + parent.decisions, afs="zero_x0")
    for seed in range(200):
        kid = mutate(space, afs_parent, np.random.default_rng(seed))
        if not kid.afs and np.allclose(kid.timesteps[1:], afs_parent.timesteps[2:], rtol=0, atol=1e-9):
            off += 1
    assert on >= 3 and off >= 3


def _tagged(space: SearchSpace, positions: list[float]) -> SolverSchedule:
    """Step ``k`` tagged by relaxation ``0.01 (k + 1)`` (kept by the repair), orders within the buffer."""
    n = len(positions) + 1
    decisions = [StepDecision("data", 1 if k in (0, n - 1) else 2, relaxation=0.01 * (k + 1)) for k in range(n)]
    return SolverSchedule(space.times(np.asarray(positions)), decisions)


def _reference_fit(positions, tags, n):
    """Brute-force warm start (README/docstring): one variant per first edit, then widest gaps split (the new step
    repeats the split step) or narrowest gaps' end points dropped (with the step starting there)."""
    m = len(tags)
    if m < n:
        firsts = [("ins", k) for k in range(m)]
    else:
        firsts = [("del", j) for j in range(1, m)]
    out = []
    for kind, k in firsts:
        pos, tag = list(positions), list(tags)
        while True:
            if kind == "ins":
                bounds = [0.0, *pos, 1.0]
                pos.insert(k, 0.5 * (bounds[k] + bounds[k + 1]))
                tag.insert(k + 1, tag[k])
            else:
                del pos[k - 1], tag[k]
            if len(tag) == n:
                break
            if len(tag) < n:
                kind, k = "ins", int(np.argmax(np.diff([0.0, *pos, 1.0])))
            else:
                kind, k = "del", int(np.argmin(np.diff([0.0, *pos]))) + 1
        if (pos, tag) not in out:
            out.append((pos, tag))
    return out


@pytest.mark.parametrize("src_positions, nfe", [([0.1, 0.15, 0.4, 0.6, 0.65], 3), ([0.3, 0.45], 6)])
def test_warm_start_splits_the_widest_and_drops_the_narrowest_gaps(src_positions, nfe):
    src_space = SearchSpace(VP, len(src_positions) + 1)
    src = _tagged(src_space, src_positions)
    space = SearchSpace(VP, nfe)
    got = warm_start(space, src)
    tags = [d.relaxation for d in src.decisions]
    want = _reference_fit(src_positions, tags, nfe)
    assert len(got) == len(want)
    for cand, (pos, tag) in zip(got, want):
        np.testing.assert_allclose(space.positions(cand), pos, atol=1e-9)
        assert [d.relaxation for d in cand.decisions][1:-1] == tag[1:-1]  # (first/last steps: order 1 either way)


def test_schedules_a_fraction_of_a_timestep_apart_are_distinct():
    decisions = [StepDecision("data", 1)] * 3
    a, b = SolverSchedule([999.0, 500.0, 200.0], decisions), SolverSchedule([999.0, 500.3, 200.0], decisions)
    assert _key(a) != _key(b)


def _toy_metric(schedule: SolverSchedule) -> float:
    """Cheap: each noise step and each low order costs."""
    noise = sum(d.prediction == "noise" for d in schedule.decisions)
    orders = sum(d.order for d in schedule.decisions)
    return math.exp(0.7 * noise - 0.2 * orders + 0.1 * schedule.timesteps[1] / 1000)


def test_search_budget_random_phase_and_one_evaluation_per_schedule(monkeypatch):
    space = SearchSpace(VP, 4)
    calls, randoms = [], []
    real_random = s3_search.random_schedule

    def counting_random(*args):
        randoms.append(1)
        return real_random(*args)

    def metric(schedule):
        calls.append(_key(schedule))
        if schedule.decisions[1].prediction == "noise":
            raise ValueError("diverged")  # a failed evaluation scores 1e6 and the search goes on
        return _toy_metric(schedule)

    monkeypatch.setattr(s3_search, "random_schedule", counting_random)
    budget = 40
    result = search(metric, space, budget, seed=2, use_predictor=False, candidates_per_round=16, progress=False)
    starts = len(seed_schedules(space))
    assert len(calls) == len(result.evaluated) == budget and len(set(calls)) == budget
    assert len(randoms) == budget // 4 - starts  # "plus random schedules (a quarter of the budget at most)"
    failed = [v for s, v in result.evaluated if s.decisions[1].prediction == "noise"]
    assert failed and all(v == 1e6 for v in failed)


class _OraclePredictor:
    """Stands in for the extra-trees regressor: records its training data; its two "trees" predict
    ``f(features) -+ u(features)`` (mean ``f``, spread ``u``), so the search's ranking is known exactly."""

    fits: list = []
    ranked: list = []

    def __init__(self, **kwargs):
        self.estimators_ = [self._Tree(-1.0), self._Tree(1.0)]

    def fit(self, x, y):
        _OraclePredictor.fits.append((np.array(x), np.array(y)))
        return self

    @staticmethod
    def f(feats):  # positions of the points (columns 3..5 for NFE 4) and a step type: continuous, no ties
        return feats[:, 3] * 1.7 - feats[:, 4] + 0.3 * feats[:, 6 + 10]

    @staticmethod
    def u(feats):
        return 2.0 * feats[:, 5]

    class _Tree:
        def __init__(self, sign):
            self.sign = sign

        def predict(self, feats):
            if self.sign < 0:
                _OraclePredictor.ranked.append(np.array(feats))
            return _OraclePredictor.f(feats) + self.sign * _OraclePredictor.u(feats)


def test_the_search_evaluates_the_best_predicted_candidates_first(monkeypatch):
    """Each round evaluates the children in the order of ``mean - 0.5 std`` over the trees (best first), the
    predictor trained on ``log(metric)`` of everything evaluated so far."""
    import sklearn.ensemble

    from fewstep.search.s3_search import encode

    monkeypatch.setattr(sklearn.ensemble, "ExtraTreesRegressor", _OraclePredictor)
    _OraclePredictor.fits, _OraclePredictor.ranked = [], []
    space = SearchSpace(VP, 4)
    evaluated: list = []

    def metric(schedule):
        evaluated.append(encode(space, schedule))
        return _toy_metric(schedule)

    result = search(metric, space, 23, seed=0, per_round=3, candidates_per_round=12, progress=False)
    fits, ranked = _OraclePredictor.fits, _OraclePredictor.ranked
    assert len(fits) == len(ranked) >= 3
    for x, y in fits:  # trained on every evaluation so far, target log(metric)
        k = len(y)
        np.testing.assert_allclose(x, np.stack(evaluated[:k]))
        np.testing.assert_allclose(y, np.log([v for _, v in result.evaluated[:k]]), rtol=1e-12)
    assert len(evaluated) == 23 == 8 + 3 * len(ranked)  # seeds, random phase to 8, then full rounds of 3
    for r, feats in enumerate(ranked):
        start = len(fits[r][1])
        stop = len(fits[r + 1][1]) if r + 1 < len(fits) else len(evaluated)
        score = _OraclePredictor.f(feats) - 0.5 * _OraclePredictor.u(feats)  # mean - 0.5 std of the two trees
        want = []
        for k in np.argsort(score)[:3]:  # the best per_round, duplicates evaluated once
            if not any(np.array_equal(feats[k], w) for w in want):
                want.append(feats[k])
        np.testing.assert_allclose(np.stack(evaluated[start:stop]), np.stack(want))


# ----------------------------------------------------------------------------------------------------------------
# seeds
def test_first_seed_is_the_dedicated_dpm_solver_pp_2m_on_diffusers_linspace_timesteps():
    n = 5
    space = SearchSpace(VP, n)
    seed = seed_schedules(space)[0]
    dedicated = samplers.get("dpm-solver++")(solver_order=2)
    dedicated.set_timesteps(n)
    assert seed.decisions == dedicated.plan.decisions
    # diffusers' "linspace" spacing rounds the same evenly spaced times to integers
    expected = np.linspace(0, 999, n + 1).round()[::-1][:-1]
    np.testing.assert_allclose(seed.timesteps, expected, atol=0.5)
