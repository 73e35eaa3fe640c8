"""S3 / USF solver schedules: oracle schedules reproduce the dedicated solvers; files; bad input; search."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
import torch
from _helpers import REAL_CONFIGS, TinyDenoiser

from fewstep import samplers
from fewstep.solvers.engine import StepDecision
from fewstep.solvers.s3 import SolverSchedule

S3 = samplers.get("s3")


def _run(sched, steps=8, seed=0):
    model = TinyDenoiser(32)
    sched.set_timesteps(steps)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


ORACLES = [
    ("dpm-solver++", {"solver_order": 2}),
    ("dpm-solver++", {"solver_order": 3}),
    ("dpm-solver++", {"solver_order": 3, "solver_type": "taylor"}),
    ("unipc", {"solver_order": 2, "solver_type": "bh1"}),
    ("unipc", {"solver_order": 2, "solver_type": "bh2"}),
    ("unipc", {"solver_order": 3, "solver_type": "bh2"}),
    ("ddim", {}),
]


@pytest.mark.parametrize("steps", [5, 8, 20])
@pytest.mark.parametrize("name, kwargs", ORACLES)
def test_oracle_schedules_reproduce_the_dedicated_solvers(name, kwargs, steps, tmp_path):
    base = samplers.get(name)(**kwargs, **({"clip_sample": False} if name == "ddim" else {}))
    expected = _run(base, steps)
    schedule = SolverSchedule.from_grid(base.plan.grid, base.plan.decisions)
    torch.testing.assert_close(_run(S3(s3_schedule=schedule.to_dict()), steps), expected, rtol=1e-12, atol=1e-12)
    path = schedule.save(tmp_path / "schedule.json")  # and through a file
    torch.testing.assert_close(_run(S3(s3_schedule=str(path)), steps), expected, rtol=1e-12, atol=1e-12)


def test_schedule_round_trips_through_json_and_config(tmp_path):
    decisions = [StepDecision("data", 1, corrector="unic"), StepDecision("noise", 2, relaxation=0.1),
                 StepDecision("data", 2, points=(2,), coefficients="bh1")]
    schedule = SolverSchedule([999.0, 620.5, 250.25], decisions, final=3.0, metadata={"model": "x"})
    again = SolverSchedule.from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert again.to_dict() == schedule.to_dict()
    sched = S3(s3_schedule=schedule.to_dict())
    sched.save_pretrained(tmp_path)
    loaded = S3.from_pretrained(tmp_path)
    assert _run(loaded, 3).equal(_run(sched, 3))


def test_from_real_configs_with_a_schedule():
    base = samplers.get("unipc").from_config(REAL_CONFIGS["sdxl"])
    base.set_timesteps(6)
    schedule = SolverSchedule.from_grid(base.plan.grid, base.plan.decisions)
    sched = S3.from_config(REAL_CONFIGS["sdxl"], s3_schedule=schedule.to_dict())
    sched.set_timesteps(6)
    assert sched.timesteps.tolist() == base.timesteps.tolist()


@pytest.mark.parametrize(
    "timesteps, decisions, final, match",
    [
        ([500.0, 700.0], [StepDecision(), StepDecision()], "zero", "`timesteps` must be strictly decreasing"),
        ([900.0, 500.0], [StepDecision()], "zero", "need one decision per timestep"),
        ([900.0, 500.0], [StepDecision(), StepDecision()], 600.0, "below the last timestep"),
        ([900.0, 500.0], [StepDecision(), StepDecision()], "one", "`final` must be 'zero'"),
    ],
)
def test_bad_schedules(timesteps, decisions, final, match):
    with pytest.raises(ValueError, match=match):
        SolverSchedule(timesteps, decisions, final)


def test_bad_schedule_contents_and_mismatches(tmp_path):
    good = SolverSchedule([900.0, 500.0], [StepDecision(), StepDecision()]).to_dict()
    too_high = dict(good, decisions=[{"order": 1}, {"order": 3}])
    with pytest.raises(ValueError, match="order 3 needs 2 previous evaluations, only 1 exist"):
        S3(s3_schedule=too_high).set_timesteps(2)
    with pytest.raises(ValueError, match=r"step 1: unknown decision keys \['skip'\]"):
        S3(s3_schedule=dict(good, decisions=[{}, {"skip": 1}]))
    with pytest.raises(ValueError, match=r"step 0: `prediction` must be one of \['data', 'noise', 'ems'\], got 'v3'"):
        S3(s3_schedule=dict(good, decisions=[{"prediction": "v3"}, {}]))
    with pytest.raises(ValueError, match="the solver schedule has NFE 2, but num_inference_steps=3"):
        S3(s3_schedule=good).set_timesteps(3)
    with pytest.raises(ValueError, match="was made for noise schedule 'vp-1000-0000'"):
        S3(s3_schedule=dict(good, metadata={"noise_schedule": "vp-1000-0000"}))
    with pytest.raises(ValueError, match="searched for model 'digits-eps', not 'other'"):
        S3(s3_schedule=dict(good, metadata={"model": "digits-eps"}), s3_model="other")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S3(s3_schedule=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="`s3_schedule` is not set"):
        S3().set_timesteps(4)
    with pytest.raises(ValueError, match="takes its time points from the schedule"):
        S3(s3_schedule=good).set_timesteps(timesteps=[900, 500])
    # hand-edited values of the wrong type are refused, not coerced (points 1.7 ran as 1, order true as 1)
    for edit, match in (
        ({"decisions": [{}, {"order": 2, "points": [1.7]}]}, r"`points` must be integer buffer offsets, got \(1.7,\)"),
        ({"decisions": [{}, {"order": 2, "points": ["1"]}]}, r"`points` must be integer buffer offsets"),
        ({"decisions": [{}, {"order": True}]}, r"`order` must be an integer in \[1, 5\], got True"),
        ({"final": True}, r"`final` must be 'zero' or a model time"),
        ({"timesteps": "999"}, r"`timesteps` must be a list of numbers \(model times\), got '999'"),
        ({"timesteps": [900.0, "500"]}, r"`timesteps` must be a list of numbers"),
        ({"metadata": [1, 2]}, r"`metadata` must be a JSON object, got \[1, 2\]"),
        # found by probing: a self-contradicting nfe message, a bare TypeError, a nested list flattened, true as 1.0
        ({"nfe": "2"}, r"`nfe` must be an integer \(the number of model evaluations\), got '2'"),
        ({"decisions": None}, r"`decisions` must be a list of per-step decisions, got NoneType"),
        ({"timesteps": [[900.0, 500.0]]}, r"`timesteps` must be a list of numbers"),
        ({"decisions": [{}, {"relaxation": True}]}, r"step 1: `relaxation` must be a number, got True"),
        ({"decisions": [{}, {"relaxation": "a"}]}, r"step 1: `relaxation` must be a number, got 'a'"),
    ):
        with pytest.raises(ValueError, match=match):
            S3(s3_schedule=dict(good, **edit))


# ----------------------------------------------------------------------------------------------------
# analytical first step (AFS)
AFS_DECISIONS = [StepDecision("data", 1), StepDecision("noise", 2, corrector="unic"), StepDecision("data", 3),
                 StepDecision("data", 2, points=(2,), coefficients="bh2"), StepDecision("data", 1)]
AFS_TIMES = [999.0, 720.0, 431.0, 180.0, 45.0]


@pytest.mark.parametrize("first", ["data", "noise"])
def test_afs_equals_the_full_schedule_with_x0_zero_at_the_first_point(first):
    """The oracle: an AFS schedule run in a diffusers loop (noise scaled by init_noise_sigma, NFE = points - 1)
    equals the same schedule without AFS whose model returns exactly ``x0 = 0`` at the first time point --
    including a second-order step and a corrector that use that analytic point."""
    decisions = [StepDecision(first, 1), *AFS_DECISIONS[1:]]
    model = TinyDenoiser(32)
    full = S3(s3_schedule=SolverSchedule(AFS_TIMES, decisions).to_dict())
    full.set_timesteps(5)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = noise.clone()
    sigma0 = float(full.noise_schedule.alpha_sigma(np.asarray([AFS_TIMES[0]]))[1][0])
    for k, t in enumerate(full.timesteps):
        out = x / sigma0 if k == 0 else model(x, t)  # eps-prediction of x0 = 0 at the first point
        x = full.step(out, t, x).prev_sample
    schedule = SolverSchedule(AFS_TIMES, decisions, afs="zero_x0")
    assert schedule.nfe == 4
    afs = S3(s3_schedule=schedule.to_dict())
    afs.set_timesteps(4)
    assert afs.timesteps.tolist() == [720, 431, 180, 45] and afs.init_noise_sigma < 1.0
    y = noise * afs.init_noise_sigma  # what a diffusers pipeline's prepare_latents does
    calls = 0
    for t in afs.timesteps:
        y = afs.step(model(y, t), t, y).prev_sample
        calls += 1
    assert calls == 4
    torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
    # without the analytic point in the buffer (plain truncation) the second-order step differs
    truncated = SolverSchedule(AFS_TIMES[1:], [StepDecision("noise", 1, corrector="unic"), StepDecision("data", 2),
                                                *decisions[3:]])
    z = noise * afs.init_noise_sigma
    trunc = S3(s3_schedule=truncated.to_dict())
    trunc.set_timesteps(4)
    for t in trunc.timesteps:
        z = trunc.step(model(z, t), t, z).prev_sample
    assert (z - x).abs().max() > 1e-4


def test_afs_schedule_round_trips_and_runs_in_the_functional_loop(tmp_path):
    from fewstep.search.objectives import AnalyticObjective
    from fewstep.solvers.engine import sample_loop

    schedule = SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="zero_x0", metadata={"model": "analytic"})
    again = SolverSchedule.load(schedule.save(tmp_path / "afs.json"))
    assert again.to_dict() == schedule.to_dict() and again.afs == "zero_x0" and again.nfe == 4
    objective = AnalyticObjective(num_samples=50)
    plan = schedule.plan(objective.noise_schedule)
    assert plan.nfe == 4 and plan.analytic_start is not None
    grid = plan.grid
    calls = []

    def pair_fn(x, i):
        calls.append(i)
        return objective.mixture.denoise(x, grid.alphas[i], grid.sigmas[i])

    out = sample_loop(pair_fn, objective.x_start * plan.analytic_start.scale, plan)
    assert calls == [0, 1, 2, 3]
    rmse = float((out - objective.reference).pow(2).mean().sqrt())
    assert objective(schedule) == pytest.approx(rmse, rel=1e-12)  # the objective scales the start itself
    unscaled = sample_loop(pair_fn, objective.x_start, plan)
    assert float((unscaled - objective.reference).pow(2).mean().sqrt()) != pytest.approx(rmse, rel=1e-6)


@pytest.mark.parametrize(
    "afs, decisions, timesteps, match",
    [
        ("half_x0", AFS_DECISIONS, AFS_TIMES, r"`afs` must be None or one of \['zero_x0', 'average_x0'\]"),
        ("zero_x0", [StepDecision("data", 1)], [999.0], "needs at least 2 timesteps"),
        ("zero_x0", [StepDecision("ems", 1), StepDecision()], [999.0, 500.0], "first-order 'data' or 'noise' ODE"),
        ("zero_x0", [StepDecision("data", 1, stochastic=True), StepDecision()], [999.0, 500.0], "stochastic=True"),
    ],
)
def test_bad_afs_schedules(afs, decisions, timesteps, match):
    with pytest.raises(ValueError, match=match):
        SolverSchedule(timesteps, decisions, afs=afs)


def test_afs_schedules_refuse_graph_mode_and_nfe_mismatch():
    from fewstep.solvers.static import check_static_plan

    schedule = SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="zero_x0")
    sched = S3(s3_schedule=schedule.to_dict())
    with pytest.raises(ValueError, match="the solver schedule has NFE 4, but num_inference_steps=5"):
        sched.set_timesteps(5)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="analytical first step .* the static step does not model"):
        check_static_plan(sched.plan)
    with pytest.raises(ValueError, match="`begin_index` 2: this solver schedule starts with an analytical first"):
        sched.set_begin_index(2)
    sched.set_begin_index(0)
    data = dict(schedule.to_dict(), nfe=5)
    with pytest.raises(ValueError, match="schedule says nfe=5 but its 5 timesteps make 4 model evaluations"):
        SolverSchedule.from_dict(data)


# ----------------------------------------------------------------------------------------------------
# the search
@pytest.fixture(scope="module")
def analytic_objective():
    from fewstep.search.objectives import AnalyticObjective

    return AnalyticObjective(num_samples=200)


@pytest.mark.parametrize("use_predictor", [True, False])
def test_search_beats_the_hand_designed_seeds(analytic_objective, use_predictor, tmp_path):
    from fewstep.search import SearchSpace, search
    from fewstep.search.s3_search import seed_schedules

    space = SearchSpace(analytic_objective.noise_schedule, 5)
    seeds = [analytic_objective(s) for s in seed_schedules(space)]
    result = search(analytic_objective, space, 30, seed=1, use_predictor=use_predictor, progress=False,
                    state_path=tmp_path / "state.json")
    best, value = result.best
    assert value < 0.8 * min(seeds), (value, seeds)
    assert result.best_so_far()[-1] == value and len(result.evaluated) == 30
    # the best schedule runs through the s3 scheduler on the same model and gives the same metric
    assert analytic_objective(SolverSchedule.from_dict(best.to_dict())) == pytest.approx(value, rel=1e-12)


def test_interrupted_search_resumes_to_the_uninterrupted_result(analytic_objective, tmp_path):
    """The state carries the generator's state and the round's remaining candidates: a search killed after any
    evaluation and resumed evaluates exactly the schedules of an uninterrupted run, in the same order."""
    from fewstep.search import SearchSpace, search

    space = SearchSpace(analytic_objective.noise_schedule, 4)
    whole = search(analytic_objective, space, 16, seed=3, state_path=tmp_path / "whole.json", progress=False)
    for stop in (9, 11):  # inside the random phase's end and inside a round of 4
        calls = []

        def dying(schedule, calls=calls, stop=stop):
            if len(calls) == stop:
                raise KeyboardInterrupt
            calls.append(schedule)
            return analytic_objective(schedule)

        state = tmp_path / f"cut{stop}.json"
        with pytest.raises(KeyboardInterrupt):
            search(dying, space, 16, seed=3, state_path=state, progress=False)
        resumed = search(analytic_objective, space, 16, seed=3, state_path=state, progress=False)
        assert [v for _, v in resumed.evaluated] == [v for _, v in whole.evaluated]


def test_search_state_files_that_are_not_states_are_clear_errors(analytic_objective, tmp_path):
    from fewstep.search import SearchSpace, search

    space = SearchSpace(analytic_objective.noise_schedule, 4)
    for text, match in (("{", "is not a readable JSON state file"), ("[1, 2]", "is not a fewstep search state"),
                        ('{"version": 2, "rng": {}}', r"has state format version 2 \(this fewstep reads 3: another "
                                                      r"fewstep wrote it\), so it cannot be resumed; delete it"),
                        ('{"nfe": 4, "evaluated": []}', "is not a fewstep search state")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=rf"search state '.*bad.json' {match}"):
            search(analytic_objective, space, 4, state_path=bad, progress=False)


def test_search_resumes_from_its_state(analytic_objective, tmp_path):
    from fewstep.search import SearchSpace, search

    space = SearchSpace(analytic_objective.noise_schedule, 4)
    state = tmp_path / "state.json"
    first = search(analytic_objective, space, 10, state_path=state, progress=False, identity={"model": "analytic"})
    calls = []

    def counting(schedule):
        calls.append(schedule)
        return analytic_objective(schedule)

    more = search(counting, space, 14, state_path=state, progress=False, identity={"model": "analytic"})
    assert len(calls) == 4 and len(more.evaluated) == 14
    assert [v for _, v in more.evaluated[:10]] == [v for _, v in first.evaluated]
    with pytest.raises(ValueError, match=r"belongs to another search \(nfe: 4 there, 5 here\)"):
        search(analytic_objective, SearchSpace(analytic_objective.noise_schedule, 5), 12, state_path=state,
               progress=False, identity={"model": "analytic"})
    with pytest.raises(ValueError, match=r"belongs to another search \(model: 'analytic' there, 'digits-eps' here; "
                                         r"seed: 0 there, 9 here\)"):
        search(analytic_objective, space, 12, seed=9, state_path=state, progress=False,
               identity={"model": "digits-eps"})
    with pytest.raises(ValueError, match="`budget` must be an integer >= 1, got 0"):
        search(analytic_objective, space, 0, progress=False)
    with pytest.raises(ValueError, match="`nfe` must be an integer >= 2, got 1"):
        SearchSpace(analytic_objective.noise_schedule, 1)


@pytest.mark.parametrize("kind", ["zero_x0", "average_x0"])
def test_afs_search_space_keeps_the_nfe_through_every_operator(analytic_objective, kind):
    """With ``afs=True`` random schedules, seeds, mutation (which switches AFS on and off), crossover of
    parents with and without AFS, and warm starts all give valid schedules of the space's NFE, and the
    predictor's encoding has one length for both kinds. With ``afs_mean`` every AFS candidate is ``average_x0``
    and carries the mean."""
    from fewstep.search import SearchSpace
    from fewstep.search.s3_search import crossover, encode, mutate, random_schedule, seed_schedules, warm_start

    mean = analytic_objective.data_mean() if kind == "average_x0" else None
    space = SearchSpace(analytic_objective.noise_schedule, 5, afs=True, afs_mean=mean)
    assert space.afs_kind == kind
    rng = np.random.default_rng(0)
    pool = seed_schedules(space) + [random_schedule(space, rng) for _ in range(20)]
    assert {s.afs for s in pool} == {None, kind}
    for _ in range(200):
        a, b = pool[rng.integers(len(pool))], pool[rng.integers(len(pool))]
        pool.append(mutate(space, a, rng) if rng.random() < 0.5 else crossover(space, a, b, rng))
    with_afs = SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="zero_x0")  # NFE 4, fitted to 5
    pool += warm_start(space, with_afs) + warm_start(space, SolverSchedule.from_dict(pool[0].to_dict()))
    lengths = {encode(space, s).size for s in pool}
    assert len(lengths) == 1
    for schedule in pool:
        assert schedule.nfe == 5, schedule.to_dict()
        if schedule.afs:
            assert len(schedule.timesteps) == 6 and schedule.decisions[0].order == 1
            assert schedule.decisions[0].prediction == "data"
        assert schedule.timesteps[0] == pytest.approx(space.t_max)
        plan = schedule.plan(space.schedule)  # compiles: orders fit the buffer, AFS step first order
        assert plan.nfe == 5 and (plan.analytic_start is not None) == (schedule.afs is not None)
        assert schedule.afs in (None, kind) and (schedule.afs_mean == mean if schedule.afs else True)
    assert sum(s.afs is not None for s in pool) > 20 and sum(s.afs is None for s in pool) > 20
    plain = SearchSpace(analytic_objective.noise_schedule, 5)  # without AFS: never produced, dropped by warm start
    assert all(s.afs is None for s in warm_start(plain, with_afs) + [random_schedule(plain, rng) for _ in range(20)])
    assert all(s.nfe == 5 for s in warm_start(plain, with_afs))
    with pytest.raises(ValueError, match="`afs` must be True or False, got 'yes'"):
        SearchSpace(analytic_objective.noise_schedule, 5, afs="yes")
    with pytest.raises(ValueError, match=r"`afs_mean` \(average_x0\) needs afs=True"):
        SearchSpace(analytic_objective.noise_schedule, 5, afs_mean=[0.0, 0.0])


def test_warm_start_fits_a_schedule_of_another_nfe_into_the_space(analytic_objective):
    from fewstep.search import SearchSpace
    from fewstep.search.s3_search import seed_schedules, warm_start

    src = seed_schedules(SearchSpace(analytic_objective.noise_schedule, 4))[0]  # DPM-Solver++ 2M, 4 steps
    same = warm_start(SearchSpace(analytic_objective.noise_schedule, 4), src)
    assert len(same) == 1 and same[0].timesteps == src.timesteps and same[0].decisions == src.decisions
    longer = warm_start(SearchSpace(analytic_objective.noise_schedule, 5), src)
    assert len(longer) == 4  # one candidate per step that can be split
    for k, cand in enumerate(longer):
        assert cand.nfe == 5 and set(src.timesteps) < set(cand.timesteps)  # every old point kept, one new one
        new = sorted(set(cand.timesteps) - set(src.timesteps))[0]
        lam = analytic_objective.noise_schedule.lambda_(np.asarray([*src.timesteps, new]))
        bounds = [*lam[:-1], SearchSpace(analytic_objective.noise_schedule, 5).lambda_end]
        assert lam[-1] == pytest.approx(0.5 * (bounds[k] + bounds[k + 1]), abs=1e-6)  # midway in lambda
        assert cand.decisions[-1].order == 1  # still a valid schedule: first-order final step
    shorter = warm_start(SearchSpace(analytic_objective.noise_schedule, 3), src)
    assert len(shorter) == 3 and all(c.nfe == 3 and set(c.timesteps) < set(src.timesteps) for c in shorter)
    two_less = warm_start(SearchSpace(analytic_objective.noise_schedule, 2), src)
    assert all(c.nfe == 2 for c in two_less)
    for cand in longer + shorter:  # every candidate runs
        assert np.isfinite(analytic_objective(cand))
    with pytest.raises(TypeError, match="`schedule` must be a SolverSchedule, got dict"):
        warm_start(SearchSpace(analytic_objective.noise_schedule, 4), src.to_dict())


def test_search_evaluates_the_warm_start_candidates_first(analytic_objective):
    from fewstep.search import SearchSpace, search
    from fewstep.search.s3_search import seed_schedules, warm_start

    noise = analytic_objective.noise_schedule
    space4, space5 = SearchSpace(noise, 4), SearchSpace(noise, 5)
    best4 = search(analytic_objective, space4, 16, seed=0, progress=False).best[0]
    n_seeds = len(seed_schedules(space5))
    result = search(analytic_objective, space5, n_seeds + 6, seed=0, progress=False, initial=[best4])
    started = [s.to_dict() for s, _ in result.evaluated[n_seeds:n_seeds + 4]]
    assert started == [c.to_dict() for c in warm_start(space5, best4)]


def _analytic_data_mean() -> list:
    from fewstep.search.objectives import AnalyticObjective

    return AnalyticObjective(num_samples=8).data_mean()


def test_cli_search_writes_a_schedule_the_s3_scheduler_runs(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "best.json"
    assert main(["search", "--model", "analytic", "--nfe", "4", "--budget", "8", "--quiet", "--out", str(out)]) == 0
    schedule = SolverSchedule.load(out)
    assert schedule.nfe == 4 and schedule.metadata["model"] == "analytic"
    assert main(["search", "--model", "sd15", "--nfe", "4", "--out", str(tmp_path / "x.json")]) == 2
    assert "not searchable here" in capsys.readouterr().err
    avg = tmp_path / "avg.json"  # AFS with the data mean (the mixture's) allowed: the seeds include AFS schedules
    assert main(["search", "--model", "analytic", "--nfe", "4", "--budget", "8", "--quiet", "--afs", "average_x0",
                 "--out", str(avg)]) == 0
    state = json.loads((tmp_path / "avg.json.state.json").read_text())
    kinds = {(s["afs"], tuple(np.ravel(s.get("afs_mean") or []))) for s, _ in state["evaluated"]}
    assert (None, ()) in kinds and ("average_x0", tuple(np.ravel(_analytic_data_mean()))) in kinds
    assert main(["search", "--model", "analytic", "--nfe", "4", "--afs", "mean_x0", "--out",
                 str(tmp_path / "w.json")]) == 2
    assert main(["search", "--model", "analytic", "--nfe", "4", "--ems", "x.safetensors", "--out",
                 str(tmp_path / "y.json")]) == 2
    assert "--ems FILE is for --model digits-eps" in capsys.readouterr().err
    warm = tmp_path / "warm.json"
    assert main(["search", "--model", "analytic", "--nfe", "5", "--budget", "14", "--quiet", "--init", str(out),
                 "--out", str(warm)]) == 0
    warmed = SolverSchedule.load(warm)
    assert warmed.nfe == 5 and warmed.metadata["init"] == ["best.json"] and warmed.metadata["seed"] == 0
    assert main(["search", "--model", "analytic", "--nfe", "5", "--init", str(tmp_path / "none.json"), "--out",
                 str(tmp_path / "z.json")]) == 2
    assert re.search(r"--init '.*none.json': solver schedule .* does not exist", capsys.readouterr().err)
    other = SolverSchedule.load(out)
    other.metadata["noise_schedule"] = "vp-1000-0000"
    other.save(tmp_path / "other.json")
    assert main(["search", "--model", "analytic", "--nfe", "5", "--init", str(tmp_path / "other.json"), "--out",
                 str(tmp_path / "z.json")]) == 2
    assert "was searched for another model (noise schedule vp-1000-0000" in capsys.readouterr().err
    assert not (tmp_path / "z.json").exists()
    # the default state file of an earlier run with the same --out belongs to another search: refused, not reused
    assert main(["search", "--model", "analytic", "--nfe", "4", "--budget", "8", "--quiet", "--afs", "--out",
                 str(out)]) == 2
    assert "belongs to another search (afs: False there, True here)" in capsys.readouterr().err
    assert main(["search", "--model", "analytic", "--nfe", "4", "--state", str(out), "--out", str(out)]) == 2
    assert "is the --out file; the state needs a file of its own" in capsys.readouterr().err
    sched = S3(s3_schedule=str(out), s3_model="analytic")
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="searched for model 'analytic', not 'digits-eps'"):
        S3(s3_schedule=str(out), s3_model="digits-eps")


def test_digits_mse_objective_is_zero_for_the_reference_solver_itself():
    from fewstep.search.objectives import DigitsMSEObjective

    objective = DigitsMSEObjective(classes=(0, 1), num_per_class=1, reference_steps=12)
    ref = samplers.from_config("dpm-solver++", objective.model_config)
    ref.set_timesteps(12)
    same = SolverSchedule.from_grid(ref.plan.grid, ref.plan.decisions)
    assert objective(same) < 1e-10
    fewer = samplers.from_config("dpm-solver++", objective.model_config)
    fewer.set_timesteps(4)
    assert objective(SolverSchedule.from_grid(fewer.plan.grid, fewer.plan.decisions)) > 1e-5
    assert objective.metadata()["reference"] == "dpm-solver++:12"


# ----------------------------------------------------------------------------------------------------
# DPM-Solver-v3 (EMS) steps in schedules
def _digits_config():
    from fewstep.pipelines import load_default

    return dict(load_default("digits-eps", sampler=None).scheduler.config)


@pytest.fixture(scope="module")
def digits_config():
    return _digits_config()


def _run_digits(sched, steps, seed=0):
    model = TinyDenoiser(256, seed=3)
    sched.set_timesteps(steps)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [4, 5, 8])
@pytest.mark.parametrize("kwargs", [{}, {"solver_order": 3, "predictor_pseudo": True},
                                    {"corrector_pseudo": False, "time_grid": "uniform_lambda"}])
def test_a_schedule_of_v3_decisions_reproduces_dpm_solver_v3(digits_config, steps, kwargs):
    from fewstep.pipelines.defaults import default_sampler_options

    opts = {**default_sampler_options("digits-eps", "dpm-solver-v3"), **kwargs}
    v3 = samplers.from_config("dpm-solver-v3", digits_config, **opts)
    expected = _run_digits(v3, steps)
    schedule = SolverSchedule.from_grid(v3.plan.grid, v3.plan.decisions)
    assert schedule.ems_steps == list(range(steps - 1))  # every step but the final data step onto clean data
    s3 = samplers.from_config("s3", digits_config, s3_schedule=schedule.to_dict(),
                              **default_sampler_options("digits-eps", "s3"))
    torch.testing.assert_close(_run_digits(s3, steps), expected, rtol=1e-10, atol=1e-10)
    assert s3.plan.grid.timesteps.tolist() == pytest.approx(v3.plan.grid.timesteps.tolist(), rel=1e-12)
    # and through SolverSchedule.plan with the tables (what the search objectives use)
    plan = schedule.plan(s3.noise_schedule, s3.ems)
    assert [type(st.predictor).__name__ for st in plan.steps][:-1] == ["EMSTransition"] * (steps - 1)


def test_ems_schedules_need_ems_and_say_so(digits_config, tmp_path):
    ems_schedule = SolverSchedule([999.0, 500.0, 100.0], [StepDecision("ems", 1, corrector="unic"),
                                                          StepDecision("ems", 2), StepDecision("data", 1)])
    msg = r"uses prediction='ems' \(DPM-Solver-v3\) at steps \[0, 1\] and needs empirical model statistics"
    with pytest.raises(ValueError, match=msg):
        samplers.from_config("s3", digits_config, s3_schedule=ems_schedule.to_dict())
    path = ems_schedule.save(tmp_path / "ems.json")
    with pytest.raises(ValueError, match=msg):
        samplers.from_config("s3", digits_config, s3_schedule=str(path))
    with pytest.raises(ValueError, match=msg):
        ems_schedule.plan(S3().noise_schedule)
    with pytest.raises(TypeError, match="`ems` must be fewstep.solvers.ems.EMS tables or None, got str"):
        ems_schedule.plan(S3().noise_schedule, "digits-eps")
    with pytest.raises(ValueError, match="`ems_model` must be a model name"):
        samplers.from_config("s3", digits_config, ems_model=3)
    with pytest.raises(ValueError, match="was estimated for model 'digits-eps', not 'other'"):
        samplers.from_config("s3", digits_config, ems_file="digits-eps", ems_model="other")
    # a final EMS step onto clean data leaves the EMS grid: a clear error when compiling
    bad = SolverSchedule([999.0, 500.0], [StepDecision("data", 1), StepDecision("ems", 1)])
    sched = samplers.from_config("s3", digits_config, s3_schedule=bad.to_dict(), ems_file="digits-eps")
    with pytest.raises(ValueError, match="not on the EMS grid"):
        sched.set_timesteps(2)
    # schedules without EMS steps ignore the tables: same result with and without them, times not snapped
    plain = SolverSchedule([999.0, 500.0, 100.0], [StepDecision("data", 1, corrector="unic"),
                                                   StepDecision("noise", 2), StepDecision("data", 1)])
    with_ems = samplers.from_config("s3", digits_config, s3_schedule=plain.to_dict(), ems_file="digits-eps")
    without = samplers.from_config("s3", digits_config, s3_schedule=plain.to_dict())
    assert _run_digits(with_ems, 3).equal(_run_digits(without, 3))
    assert with_ems.timesteps.tolist() == [999, 500, 100]


def test_mixed_ems_schedule_runs_snapped_to_the_ems_grid(digits_config):
    decisions = [StepDecision("ems", 1, corrector="unic", corrector_pseudo=True), StepDecision("data", 2),
                 StepDecision("ems", 2, corrector="unic"), StepDecision("noise", 2), StepDecision("data", 1)]
    schedule = SolverSchedule([999.0, 700.0, 420.0, 150.0, 30.0], decisions)
    s3 = samplers.from_config("s3", digits_config, s3_schedule=schedule.to_dict(), ems_file="digits-eps")
    out = _run_digits(s3, 5)
    assert torch.isfinite(out).all()
    ems = s3.ems
    lam = s3.plan.grid.lambdas[:-1]
    np.testing.assert_allclose(lam, ems.lambdas[ems.snap(lam)], atol=1e-9)  # every evaluation on the EMS grid
    assert s3.timesteps.tolist() != [999, 700, 420, 150, 30]


def test_pipeline_s3_with_a_v3_schedule_matches_the_dpm_solver_v3_pipeline():
    """The embedded digits-eps pipeline: the s3 sampler gets the shipped EMS from default_sampler_options."""
    from fewstep.pipelines import load_default

    pipe = load_default("digits-eps", sampler="dpm-solver-v3")
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = pipe([1, 7], num_inference_steps=5, latents=noise.clone(), output_type="pt").images
    pipe.scheduler.set_timesteps(5)
    schedule = SolverSchedule.from_grid(pipe.scheduler.plan.grid, pipe.scheduler.plan.decisions)
    from fewstep.pipelines.defaults import default_sampler_options
    from fewstep.pipelines.swap import swap_sampler

    assert default_sampler_options("digits-eps", "s3") == {"ems_file": "digits-eps", "ems_model": "digits-eps"}
    swap_sampler(pipe, "s3", s3_schedule=schedule.to_dict(), **default_sampler_options("digits-eps", "s3"))
    got = pipe([1, 7], num_inference_steps=5, latents=noise.clone(), output_type="pt").images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_search_space_with_ems_mutates_into_ems_steps_that_run(digits_config):
    from fewstep.search import SearchSpace
    from fewstep.search.s3_search import crossover, mutate, random_schedule, seed_schedules

    s3 = samplers.from_config("s3", digits_config, ems_file="digits-eps")
    with_ems = SearchSpace(s3.noise_schedule, 5, ems=s3.ems)
    without = SearchSpace(s3.noise_schedule, 5)
    rng = np.random.default_rng(0)
    seeds = seed_schedules(with_ems)
    assert len(seeds) == len(seed_schedules(without)) + 3
    v3_seed = seeds[len(seed_schedules(without))]
    assert v3_seed.ems_steps == [0, 1, 2, 3] and v3_seed.decisions[-1].prediction == "data"
    made = []
    for _ in range(40):
        a = random_schedule(with_ems, rng)
        made += [a, mutate(with_ems, a, rng), crossover(with_ems, a, seeds[-1], rng)]
    assert sum(bool(s.ems_steps) for s in made) > 20
    assert all(s.decisions[-1].prediction != "ems" for s in made)
    for s in made:  # every candidate compiles on its (snapped) grid, and its stored times are the ones it runs at
        plan = s.plan(s3.noise_schedule, s3.ems)
        np.testing.assert_allclose(plan.grid.timesteps, s.timesteps, rtol=1e-9, atol=1e-9)
    plain = [mutate(without, random_schedule(without, rng), rng) for _ in range(40)]
    assert not any(s.ems_steps for s in plain)
    with pytest.raises(ValueError, match="`ems` must be fewstep.solvers.ems.EMS tables or None, got str"):
        SearchSpace(s3.noise_schedule, 5, ems="digits-eps")
    narrow = type(s3.ems)(s3.ems.lambdas[10:], s3.ems.l[10:], s3.ems.s[10:], s3.ems.b[10:])
    with pytest.raises(ValueError, match=r"the EMS cover lambda in \[-3.5\d+, 4.6\d+\] but the search spans"):
        SearchSpace(s3.noise_schedule, 5, ems=narrow)
    # a shorter search range keeps EMS candidates inside it
    short = SearchSpace(s3.noise_schedule, 5, ems=s3.ems, lambda_end=2.0)
    for _ in range(20):
        cand = random_schedule(short, rng)
        assert np.all(short.positions(cand) <= 1.0 + 1e-12)


@pytest.mark.parametrize("nfe", [4, 5, 6, 8, 10])
def test_shipped_digits_schedules_run_with_the_shipped_ems(digits_config, nfe):
    from fewstep.pipelines.defaults import default_sampler_options
    from fewstep.samplers.s3 import shipped_schedule_path

    schedule = SolverSchedule.load(shipped_schedule_path("digits-eps", nfe))
    s3 = samplers.from_config("s3", digits_config, s3_schedule="digits-eps",
                              **default_sampler_options("digits-eps", "s3"))
    assert torch.isfinite(_run_digits(s3, nfe)).all()
    if schedule.ems_steps:  # without the tables: the error names the EMS steps
        bare = samplers.from_config("s3", digits_config, s3_schedule="digits-eps")
        with pytest.raises(ValueError, match=re.escape(f"at steps {schedule.ems_steps}")):
            bare.set_timesteps(nfe)


def test_a_schedule_searched_with_other_ems_tables_is_refused(digits_config, tmp_path):
    """Schedules record the digest of the EMS tables they were searched with (``metadata["ems_digest"]``); running
    their EMS steps on other tables is an error naming both digests, and the shipped NFE-4 schedule records the
    shipped tables."""
    import dataclasses

    from fewstep.samplers.s3 import shipped_schedule_path
    from fewstep.solvers.ems import save_ems

    shipped = samplers.from_config("s3", digits_config, ems_file="digits-eps").ems
    schedule = SolverSchedule.load(shipped_schedule_path("digits-eps", 4))
    assert schedule.ems_steps and schedule.metadata["ems_digest"] == shipped.digest
    other = dataclasses.replace(shipped, l=shipped.l * 1.01)
    assert other.digest != shipped.digest and other.digest == dataclasses.replace(shipped, l=shipped.l * 1.01).digest
    path = tmp_path / "other.safetensors"
    save_ems(path, other)
    s3 = samplers.from_config("s3", digits_config, s3_schedule="digits-eps", ems_file=str(path))
    with pytest.raises(ValueError, match=f"searched with EMS tables '{shipped.digest}' .* are '{other.digest}'"):
        s3.set_timesteps(4)
    schedule.check_ems(shipped)  # the tables it was searched with pass


def test_digits_objective_records_the_ems_digest():
    from fewstep.search.objectives import DigitsObjective

    objective = DigitsObjective(classes=(0, 1), num_per_class=1)
    meta = objective.metadata()
    assert meta["ems"] == "digits-eps" and meta["ems_digest"] == objective.ems.digest
    assert "ems_digest" not in DigitsObjective(classes=(0, 1), num_per_class=1, ems=None).metadata()


def test_generate_with_s3_on_the_default_model_picks_the_shipped_schedule(tmp_path, capsys):
    """`fewstep generate --sampler s3` needs no options on a model with shipped schedules; an NFE without one is
    a usage error listing the shipped NFEs."""
    from fewstep.cli import main
    from fewstep.pipelines.defaults import default_sampler_options

    assert default_sampler_options("digits-eps", "s3", with_schedule=True)["s3_schedule"] == "digits-eps"
    assert default_sampler_options("analytic", "s3", with_schedule=True) == {"s3_schedule": "analytic"}
    assert "s3_schedule" not in default_sampler_options("digits-eps", "s3")  # callers that pass their own
    assert "s3_schedule" not in default_sampler_options("digits-eps", "dpm-solver-v3", with_schedule=True)
    out = tmp_path / "s.png"
    assert main(["generate", "--sampler", "s3", "--steps", "4", "--num-images", "2", "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
    assert main(["generate", "--sampler", "s3", "--steps", "7", "--out", str(tmp_path / "t.png"), "--quiet"]) == 2
    assert "no shipped 'digits-eps' schedule for NFE 7; shipped NFEs: [4, 5, 6, 8, 10]" in capsys.readouterr().err


_SEARCH_ARGS = ["search", "--model", "digits-eps", "--nfe", "3", "--budget", "3", "--num-per-class", "3", "--quiet"]

_FAILURE_BODY = """
import torch
from fewstep._dist import split_samples, is_main_process

def make(indices):
    if _state.process_index == 1:
        raise ValueError("share failed")
    return torch.zeros(len(indices), 2)

caught = []
for attempt in range(2):  # the processes stay in step: a second split works on both
    try:
        split_samples(4, make if attempt == 0 else (lambda idx: torch.ones(len(idx), 2)))
    except ValueError as exc:
        caught.append(str(exc))
print(f"CAUGHT {_state.process_index} {caught}", flush=True)
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Both two-process scenarios below in ONE launch of two CPU processes (torchrun; a launch is ~30 s of start-up
    and imports): `fewstep search` (its schedule written to ``two.json`` in the returned folder), then the failing
    split, in the same processes; each scenario's shares are checked (both processes ran and made their share).
    The folder and each scenario's stdout."""
    from _helpers import CLI_BODY, launch_two_cpu_processes_each

    root = tmp_path_factory.mktemp("two_processes")
    bodies = {"search": (CLI_BODY, *_SEARCH_ARGS, "--out", root / "two.json"), "failure": (_FAILURE_BODY,)}
    return root, launch_two_cpu_processes_each(bodies, root)


def test_search_under_two_processes_matches_one(two_processes, tmp_path):
    """`torchrun --nproc_per_node 2 -m fewstep.cli search`: every process runs the same search, each evaluation's
    samples are split across the processes (checked: both ran, each made its share) and gathered, one process
    writes; the evaluated schedules and their Frechet distances equal a one-process run's (per-sample seeds)."""
    from fewstep.cli import main

    root, stdout = two_processes
    two = root / "two.json"
    assert stdout["search"].count("wrote ") == 1  # one writer
    one = tmp_path / "one.json"
    assert main([*_SEARCH_ARGS, "--out", str(one)]) == 0
    runs = [json.loads(pathlib.Path(f"{p}.state.json").read_text())["evaluated"] for p in (two, one)]
    assert [s for s, _ in runs[0]] == [s for s, _ in runs[1]]
    assert [v for _, v in runs[0]] == pytest.approx([v for _, v in runs[1]], rel=1e-4)
    assert SolverSchedule.load(two).to_dict()["decisions"] == SolverSchedule.load(one).to_dict()["decisions"]


def test_a_failure_on_one_process_is_raised_on_every_process(two_processes):
    """A metric failing on one process only (its share) was scored there alone: the processes' collectives drifted
    out of step and mixed evaluations. Now the failure is gathered and raised on every process."""
    _, stdout = two_processes
    for rank in (0, 1):
        assert f"CAUGHT {rank} ['process 1 of 2: ValueError: share failed']" in stdout["failure"]


# ----------------------------------------------------------------------------------------------------
# implicit corrector (+1 NFE)
def _mixture_objective():
    from fewstep.search.objectives import AnalyticObjective

    return AnalyticObjective(num_samples=64)


def test_implicit_corrector_equals_a_hand_written_pece_step():
    """Oracle, written out from the exponential-integrator formulas (not the engine): step 0 is DDIM (data form)
    from t0 to t1; the model is called at the predicted x1; the second-order data-form corrector (x0 linear in
    lambda through both evaluations) gives x1c; the model is called again at x1c and that evaluation -- not the
    predicted one -- is the base and the newest point of step 1, a second-order step from t1 to t2 whose
    derivative uses the evaluation at t0."""
    from fewstep.solvers.engine import sample_loop

    obj = _mixture_objective()
    times = [900.0, 500.0]
    decisions = [StepDecision("data", 1, corrector="implicit"), StepDecision("data", 2)]
    schedule = SolverSchedule(times, decisions, final=150.0)
    assert schedule.nfe == 3
    plan = schedule.plan(obj.noise_schedule)
    assert plan.nfe == 3 and plan.calls == [(0, False), (1, False), (1, True)]
    g = plan.grid
    a, s, lam = g.alphas, g.sigmas, g.lambdas
    den = obj.mixture.denoise
    seen = []

    def pair_fn(x, i):
        seen.append((i, x.clone()))
        return den(x, a[i], s[i])

    x = obj.x_start.double()
    out = sample_loop(pair_fn, x, plan)

    d0 = den(x, a[0], s[0])[0]
    h1 = lam[1] - lam[0]
    x1p = s[1] / s[0] * x + a[1] * -np.expm1(-h1) * d0
    d1p = den(x1p, a[1], s[1])[0]
    x1c = x1p + a[1] * (h1 - 1 + np.exp(-h1)) / h1 * (d1p - d0)  # + the second-order term of the same step
    d1c = den(x1c, a[1], s[1])[0]
    h2 = lam[2] - lam[1]
    r = (lam[0] - lam[1]) / h2
    slope = (d0 - d1c) / r  # D1 = h dx0/dlambda from the points at t1 (re-evaluated) and t0
    x2 = s[2] / s[1] * x1c + a[2] * -np.expm1(-h2) * d1c + a[2] * (h2 - 1 + np.exp(-h2)) / h2 * slope
    torch.testing.assert_close(seen[1][1], x1p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen[2][1], x1c, rtol=1e-12, atol=1e-12)
    assert [i for i, _ in seen] == [0, 1, 1]
    torch.testing.assert_close(out, x2, rtol=1e-10, atol=1e-10)
    # the pseudo corrector of the same schedule keeps the predicted evaluation: a different endpoint
    pseudo = SolverSchedule(times, [StepDecision("data", 1, corrector="unic"), decisions[1]], final=150.0)
    assert pseudo.nfe == 2
    assert (sample_loop(lambda x, i: den(x, a[i], s[i]), x, pseudo.plan(obj.noise_schedule)) - x2).abs().max() > 1e-6


def test_implicit_schedule_in_a_diffusers_loop_equals_the_functional_loop(tmp_path):
    """The s3 scheduler runs an implicit schedule as a diffusers pipeline would: one timestep per model call
    (the corrected point's timestep repeated), ``len(timesteps) == nfe``; it equals ``sample_loop`` to float64
    rounding, also after an analytical first step whose corrector is implicit, and round-trips through JSON."""
    from diffusers import DDPMScheduler

    from fewstep.solvers.engine import sample_loop

    obj = _mixture_objective()
    decisions = [StepDecision("data", 1, corrector="implicit"), StepDecision("noise", 2, corrector="implicit"),
                 StepDecision("data", 3, corrector="unic"), StepDecision("data", 2), StepDecision("data", 1)]
    for afs in (None, "zero_x0"):
        schedule = SolverSchedule(AFS_TIMES, decisions, afs=afs, metadata={"model": "analytic"})
        assert schedule.nfe == 5 + 2 - (afs is not None)
        again = SolverSchedule.load(schedule.save(tmp_path / f"implicit-{afs}.json"))
        assert again.to_dict() == schedule.to_dict()
        sched = S3.from_config(DDPMScheduler().config, s3_schedule=again.to_dict())  # the objective's schedule
        sched.set_timesteps(schedule.nfe)
        plan = sched.plan
        ts = [int(t) for t in sched.timesteps]
        assert len(ts) == schedule.nfe and len(ts) == len(set(ts)) + 2  # AFS or not: two points called twice
        g = plan.grid
        start = obj.x_start.double() * sched.init_noise_sigma
        ref = sample_loop(lambda x, i, g=g: obj.mixture.denoise(x, g.alphas[i], g.sigmas[i]), start, plan)
        x = start
        for k, t in enumerate(sched.timesteps):
            i = plan.calls[k][0]
            x0, eps = obj.mixture.denoise(x, g.alphas[i], g.sigmas[i])
            x = sched.step(eps, t, x).prev_sample
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match="all 7 steps have run|all 6 steps have run"):
            sched.step(eps, sched.timesteps[-1], x)


def test_implicit_corrector_is_more_accurate_per_step_and_keeps_second_order():
    """On the exact mixture reference: UniPC-2 style steps (first-order predictor + second-order corrector) with
    the implicit corrector beat the pseudo corrector at the same number of time points (at +1 NFE per corrector),
    and keep the corrector's higher convergence order."""
    obj = _mixture_objective()
    t_max = float(obj.noise_schedule.t_max)

    def error(n, corrector):
        times = np.linspace(t_max, t_max / n, n).tolist()
        decisions = [StepDecision("data", 1, corrector=corrector)] * (n - 1) + [StepDecision("data", 1)]
        return obj(SolverSchedule(times, decisions))

    def orders(errors):
        return np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))

    implicit = [error(n, "implicit") for n in (10, 20, 40)]
    pseudo = [error(n, "unic") for n in (10, 20, 40)]
    plain = [error(n, "none") for n in (10, 20, 40)]  # DDIM: first order
    assert all(e_i < 0.7 * e_p for e_i, e_p in zip(implicit, pseudo))  # measured 0.65x
    # measured 1.53-1.56 (the pseudo corrector 1.50-1.56, DDIM 0.95-0.97): the last step onto sigma = 0 and
    # the grid's end, t_max / n, moving with n keep both below 2
    assert np.all(orders(implicit) > 1.4) and np.all(orders(plain) < 1.1), (orders(implicit), orders(plain))


def test_bad_implicit_schedules():
    obj = _mixture_objective()
    last = SolverSchedule([900.0, 400.0], [StepDecision("data", 1), StepDecision("data", 1, corrector="implicit")])
    with pytest.raises(ValueError, match="the last step cannot have a corrector"):
        last.plan(obj.noise_schedule)
    with pytest.raises(ValueError, match="a stochastic .SDE. step cannot have a corrector"):
        StepDecision("data", 1, stochastic=True, corrector="implicit")
    with pytest.raises(ValueError, match=r"`corrector` must be one of \['none', 'unic', 'implicit'\], got 'pece'"):
        StepDecision("data", 1, corrector="pece")


def test_implicit_schedules_refuse_graph_mode_and_the_search_maps_them_to_pseudo():
    from fewstep.search.s3_search import SearchSpace, warm_start
    from fewstep.solvers.static import check_static_plan

    obj = _mixture_objective()
    schedule = SolverSchedule([900.0, 600.0, 300.0], [StepDecision("data", 1, corrector="implicit"),
                                                     StepDecision("data", 2), StepDecision("data", 1)])
    with pytest.raises(ValueError, match="implicit corrector .* static step does not model"):
        check_static_plan(schedule.plan(obj.noise_schedule))
    space = SearchSpace(obj.noise_schedule, 3)
    for candidate in warm_start(space, schedule):
        assert candidate.nfe == 3 and all(d.corrector != "implicit" for d in candidate.decisions)


# ----------------------------------------------------------------------------------------------------
# average_x0 analytical first step
def _mean_image() -> list:
    return (0.3 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).tolist()


@pytest.mark.parametrize("guided", [False, True])
def test_average_x0_afs_equals_the_full_schedule_with_x0_mean_at_the_first_point(guided):
    """The oracle of ``zero_x0`` with ``x0 =`` the mean image: a diffusers loop (noise scaled by init_noise_sigma,
    ``scale_model_input`` before the model, NFE = points - 1) equals the full schedule whose model returns
    exactly ``x0 = mean`` at the first time point; also through ``guided_step`` (CFG at scale 1)."""
    from fewstep.guidance import CFG, guided_step

    mean = _mean_image()
    m = torch.tensor(mean, dtype=torch.float64)
    model = TinyDenoiser(32)
    full = S3(s3_schedule=SolverSchedule(AFS_TIMES, AFS_DECISIONS).to_dict())
    full.set_timesteps(5)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha0, sigma0 = (float(v[0]) for v in full.noise_schedule.alpha_sigma(np.asarray([AFS_TIMES[0]])))
    x = noise.clone()
    for k, t in enumerate(full.timesteps):
        out = (x - alpha0 * m) / sigma0 if k == 0 else model(x, t)  # eps of the pair (mean, ...) at t_0
        x = full.step(out, t, x).prev_sample
    schedule = SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="average_x0", afs_mean=mean)
    assert schedule.nfe == 4
    afs = S3(s3_schedule=schedule.to_dict())
    afs.set_timesteps(4)
    y = noise * afs.init_noise_sigma  # what a diffusers pipeline's prepare_latents does
    for t in afs.timesteps:
        model_in = afs.scale_model_input(y, t)
        if guided:
            out = model(model_in, t)
            y = guided_step(afs, CFG(1.0), out, out, t, y, afs.step_index or 0)
        else:
            y = afs.step(model(model_in, t), t, y).prev_sample
    torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
    # the zero_x0 start differs: the mean matters
    zero = S3(s3_schedule=SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="zero_x0").to_dict())
    zero.set_timesteps(4)
    z = noise * zero.init_noise_sigma
    for t in zero.timesteps:
        z = zero.step(model(zero.scale_model_input(z, t), t), t, z).prev_sample
    assert (z - x).abs().max() > 1e-3


def test_average_x0_schedule_round_trips_and_matches_the_functional_loop(tmp_path):
    from fewstep.search.objectives import AnalyticObjective

    obj = AnalyticObjective(num_samples=64)
    mean = [0.4, -0.2]  # the mixture is 2-D
    schedule = SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="average_x0", afs_mean=mean)
    again = SolverSchedule.load(schedule.save(tmp_path / "avg.json"))
    assert again.to_dict() == schedule.to_dict() and again.afs_mean == mean
    plan = again.plan(obj.noise_schedule)
    start = plan.analytic_start
    assert start.offset != 0.0 and torch.equal(start.mean, torch.tensor(mean, dtype=torch.float64))
    x1 = start.start(obj.x_start)
    alpha1, sigma1 = plan.grid.alphas[0], plan.grid.sigmas[0]
    # the first-order step from the pair (mean, (x - alpha_0 mean) / sigma_0): x_1 = alpha_1 mean + sigma_1 eps
    eps = (obj.x_start - start.alpha * start.mean) / start.sigma
    torch.testing.assert_close(x1, alpha1 * start.mean + sigma1 * eps, rtol=1e-12, atol=1e-12)
    assert obj(again) != pytest.approx(obj(SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="zero_x0")), rel=1e-6)


@pytest.mark.parametrize(
    "afs, mean, match",
    [
        ("average_x0", None, "`afs_mean` .* goes with afs='average_x0' and only with it"),
        ("zero_x0", [0.0, 1.0], "`afs_mean` .* goes with afs='average_x0' and only with it"),
        (None, [0.0, 1.0], "`afs_mean` .* goes with afs='average_x0' and only with it"),
        ("average_x0", [0.0, float("nan")], "`afs_mean` must be a non-empty array of finite numbers"),
        ("average_x0", [[0.0, 1.0], [2.0]], "`afs_mean` must be nested lists of numbers shaped like one sample"),
    ],
)
def test_bad_average_x0_schedules(afs, mean, match):
    with pytest.raises(ValueError, match=match):
        SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs=afs, afs_mean=mean)


def test_average_x0_mean_must_match_the_samples():
    schedule = SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="average_x0", afs_mean=[[1.0, 2.0, 3.0]])
    sched = S3(s3_schedule=schedule.to_dict())
    sched.set_timesteps(4)
    x = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mean image \(average_x0\) has shape \(1, 3\), which does not match"):
        sched.scale_model_input(x, sched.timesteps[0])
    # a mean that would broadcast (one row over an image, one channel over RGB) is refused too
    for mean, shape in (([0.5] * 4, (2, 1, 4, 4)), ([[0.5] * 4] * 4, (2, 3, 4, 4))):
        sched = S3(s3_schedule=SolverSchedule(AFS_TIMES, AFS_DECISIONS, afs="average_x0", afs_mean=mean).to_dict())
        sched.set_timesteps(4)
        with pytest.raises(ValueError, match=r"it must be one sample's shape"):
            sched.scale_model_input(torch.zeros(*shape, dtype=torch.float64), sched.timesteps[0])


def test_s3_begin_index_restarts_the_schedule_part_way():
    """img2img on an s3 schedule: from call k the buffer is empty, so the steps there drop the derivative points
    that do not exist yet; it may also begin at the second call of an implicitly corrected step (the result:
    tests/test_api_conformance.py)."""
    from diffusers import DDPMScheduler

    decisions = [StepDecision("data", 1, corrector="implicit"), StepDecision("noise", 2, points=(1,)),
                 StepDecision("data", 3, corrector="unic"), StepDecision("data", 2), StepDecision("data", 1)]
    schedule = SolverSchedule(AFS_TIMES, decisions, metadata={"model": "analytic"})
    sched = S3.from_config(DDPMScheduler().config, s3_schedule=schedule.to_dict())
    sched.set_timesteps(schedule.nfe)
    assert sched.plan.calls[:4] == [(0, False), (1, False), (1, True), (2, False)]  # step 0 corrects at point 1
    sched.set_begin_index(2)  # the second call of an implicitly corrected step: a plain first step at point 1
    assert sched.begin_index == 2 and sched.plan.decisions[1].order == 1
    sched.set_begin_index(3)  # grid point 2: its order-3 predictor has nothing buffered yet
    assert [d.order for d in sched.plan.decisions[2:]] == [1, 2, 1]
    obj = _mixture_objective()
    g = sched.plan.grid
    x = obj.x_start.double()
    for t in sched.timesteps[3:]:
        i = sched.plan.calls[sched.step_index or 3][0]
        x0, eps = obj.mixture.denoise(x, g.alphas[i], g.sigmas[i])
        x = sched.step(eps, t, x).prev_sample
    assert torch.isfinite(x).all() and sched.step_index == schedule.nfe


def test_from_grid_refuses_karras_grids_it_cannot_store():
    """Found by probing: a Karras grid feeds rounded timesteps between exact noise levels; a schedule of times then
    ran another sampler (up to 1e-3 relative at 8 steps). With the noise schedule given, from_grid refuses it."""
    base = samplers.get("dpm-solver++")(use_karras_sigmas=True)
    base.set_timesteps(8)
    with pytest.raises(ValueError, match="this grid's noise levels are not those of its model timesteps"):
        SolverSchedule.from_grid(base.plan.grid, base.plan.decisions, schedule=base.noise_schedule)
    plain = samplers.get("dpm-solver++")()
    plain.set_timesteps(8)
    SolverSchedule.from_grid(plain.plan.grid, plain.plan.decisions, schedule=plain.noise_schedule)


def test_equivalent_schedules_share_one_key():
    """Found by probing: 8 of 40 evaluations of a digits search repeated earlier values bit for bit; the schedules
    differed only in genes that change nothing (a corrector order equal to its default, the rule of a first-order
    step without corrector). They now share a key, so the search evaluates them once."""
    from fewstep.search.s3_search import _key

    times = [900.0, 600.0, 300.0, 100.0]

    def schedule(first: StepDecision, corrector_order: int | None, last: StepDecision) -> SolverSchedule:
        middle = StepDecision("data", 2, corrector="unic", corrector_order=corrector_order)
        return SolverSchedule(times, [first, middle, StepDecision("data", 2), last])

    a = schedule(StepDecision("noise", 1, coefficients="bh1"), None, StepDecision("data", 1))
    b = schedule(StepDecision("noise", 1), 3, StepDecision("data", 1, relaxation=0.3))
    c = schedule(StepDecision("noise", 1), 2, StepDecision("data", 1))
    assert _key(a) == _key(b) != _key(c)
    from fewstep.search.objectives import AnalyticObjective

    objective = AnalyticObjective(num_samples=32)
    assert objective(a) == objective(b) != objective(c)


def test_search_state_of_another_search_is_refused_before_the_objective_is_built(tmp_path, capsys, monkeypatch):
    from fewstep.cli import main
    from fewstep.search import objectives

    out = tmp_path / "s.json"
    assert main(["search", "--model", "analytic", "--nfe", "3", "--budget", "3", "--quiet", "--out", str(out)]) == 0

    def never(*args, **kwargs):
        raise AssertionError("the objective was built before the state was checked")

    monkeypatch.setattr(objectives.AnalyticObjective, "__init__", never)
    assert main(["search", "--model", "analytic", "--nfe", "4", "--budget", "3", "--quiet", "--out", str(out)]) == 2
    assert "belongs to another search (nfe: 3 there, 4 here)" in capsys.readouterr().err


def test_search_state_with_a_malformed_generator_state_is_a_clear_error(tmp_path, analytic_objective):
    from fewstep.search import SearchSpace, search

    space = SearchSpace(analytic_objective.noise_schedule, 3)
    state = tmp_path / "state.json"
    search(analytic_objective, space, 3, state_path=state, progress=False)
    data = json.loads(state.read_text())
    data["rng"] = {"bit_generator": "PCG64"}
    state.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds a malformed random generator state"):
        search(analytic_objective, space, 6, state_path=state, progress=False)


@pytest.mark.parametrize("value", [float("-inf"), "-5", float("nan")])
def test_search_state_values_are_checked(tmp_path, analytic_objective, value):
    """Found by probing: a state whose value was -Infinity or "-5" resumed and became the best schedule; NaN crashed
    inside sklearn."""
    from fewstep.search import SearchSpace, search

    space = SearchSpace(analytic_objective.noise_schedule, 3)
    state = tmp_path / "state.json"
    search(analytic_objective, space, 3, state_path=state, progress=False)
    data = json.loads(state.read_text())
    data["evaluated"][0][1] = value
    state.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds a metric value .* \\(finite numbers only\\)"):
        search(analytic_objective, space, 6, state_path=state, progress=False)


def test_schedule_file_errors_name_the_file(tmp_path):
    """Found by probing: errors after JSON parsing did not say which file, a non-UTF-8 file was a bare
    UnicodeDecodeError, and unknown top-level keys were accepted silently."""
    good = SolverSchedule([900.0, 500.0], [StepDecision(), StepDecision()]).to_dict()
    assert set(good) == {"version", "nfe", "timesteps", "final", "afs", "decisions", "metadata"}
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=re.escape(f"solver schedule {str(binary)!r} is not UTF-8 JSON text")):
        SolverSchedule.load(binary)
    for name, edit, match in (
        ("extra.json", {"foo": 1}, r"unknown solver schedule keys \['foo'\]; allowed: \['afs', 'afs_mean', "),
        ("fnal.json", {"fnal": 3.0}, r"unknown solver schedule keys \['fnal'\]"),
        ("order.json", {"decisions": [{}, {"order": "2"}]}, r"step 1: `order` must be an integer in \[1, 5\], got '2'"),
        ("version.json", {"version": 2}, r"schedule format version 2 is not supported \(this fewstep reads 1\): "
                                         r"search the schedule again with this fewstep \(`fewstep search"),
        ("nan.json", {"timesteps": [900.0, float("nan")]}, r"`timesteps` must be finite \(no NaN/Inf\)"),
        ("metadata.json", {"metadata": [1]}, r"`metadata` must be a JSON object, got \[1\]"),
        ("fewer.json", {"decisions": [{}]}, r"need one decision per timestep: 2 timesteps, 1 decisions"),
    ):
        path = tmp_path / name
        path.write_text(json.dumps(dict(good, **edit)))
        with pytest.raises(ValueError, match=re.escape(f"solver schedule {str(path)!r}: ") + match):
            SolverSchedule.load(path)
        with pytest.raises(ValueError, match=match):
            S3(s3_schedule=str(path))
    with pytest.raises(ValueError, match=r"unknown solver schedule keys \['foo'\]"):  # a dict spec too
        S3(s3_schedule=dict(good, foo=1))
    # what to_dict writes (with afs_mean) still loads
    mean = SolverSchedule([900.0, 500.0], [StepDecision("data", 1), StepDecision()], afs="average_x0",
                          afs_mean=[[0.5, 0.25]])
    path = mean.save(tmp_path / "mean.json")
    assert SolverSchedule.load(path).to_dict() == mean.to_dict()
