"""S3 / USF solver schedules: oracle schedules reproduce the dedicated solvers; files; bad input; search."""

from __future__ import annotations

import json

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
        ([500.0, 700.0], [StepDecision(), StepDecision()], "zero", "must strictly decrease"),
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


def test_search_resumes_from_its_state(analytic_objective, tmp_path):
    from fewstep.search import SearchSpace, search

    space = SearchSpace(analytic_objective.noise_schedule, 4)
    state = tmp_path / "state.json"
    first = search(analytic_objective, space, 10, state_path=state, progress=False)
    calls = []

    def counting(schedule):
        calls.append(schedule)
        return analytic_objective(schedule)

    more = search(counting, space, 14, state_path=state, progress=False)
    assert len(calls) == 4 and len(more.evaluated) == 14
    assert [v for _, v in more.evaluated[:10]] == [v for _, v in first.evaluated]
    with pytest.raises(ValueError, match="is for NFE 4, not 5"):
        search(analytic_objective, SearchSpace(analytic_objective.noise_schedule, 5), 12, state_path=state,
               progress=False)
    with pytest.raises(ValueError, match="`budget` must be an integer >= 1, got 0"):
        search(analytic_objective, space, 0, progress=False)
    with pytest.raises(ValueError, match="`nfe` must be an integer >= 2, got 1"):
        SearchSpace(analytic_objective.noise_schedule, 1)


def test_cli_search_writes_a_schedule_the_s3_scheduler_runs(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "best.json"
    assert main(["search", "--model", "analytic", "--nfe", "4", "--budget", "8", "--quiet", "--out", str(out)]) == 0
    schedule = SolverSchedule.load(out)
    assert schedule.nfe == 4 and schedule.metadata["model"] == "analytic"
    assert main(["search", "--model", "sd15", "--nfe", "4", "--out", str(tmp_path / "x.json")]) == 2
    assert "not searchable here" in capsys.readouterr().err
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
