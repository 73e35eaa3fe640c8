"""Every process of a distributed launch must be given the same run: ``fewstep._dist.check_same_on_all_processes``
(and ``search``, which uses it) refuse processes started with other settings on every process, instead of mixing
their samples into wrong results or drifting into a hang. The EMS checkpoint message names what differs."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep._dist import check_same_on_all_processes


def test_single_process_is_a_no_op_and_bad_descriptions_are_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert check_same_on_all_processes({"seed": 0, "cells": ["a", "b"]}, "bench settings") is None
    assert check_same_on_all_processes([1, 2.5, None, "x"]) is None
    with pytest.raises(ValueError, match=r"`description` must be a JSON-able object.*set"):
        check_same_on_all_processes({"cells": {1, 2}})
    with pytest.raises(ValueError, match=r"`description` must be a JSON-able object.*key 3 is not a string"):
        check_same_on_all_processes({3: "x"})
    with pytest.raises(ValueError, match=r"`what` must be a non-empty string.*got ''"):
        check_same_on_all_processes({}, "")


_HELPER_BODY = """
import json
import pathlib
import torch
from fewstep._dist import check_same_on_all_processes, split_samples

rank = _state.process_index
seen = {}
cases = {
    "dict": {"seed": rank, "steps": [2, 3, 4] if rank == 0 else [3, 4], "classes": [0, 1]},
    "list": ["unipc|2", "unipc|3"][rank:],
    "extra key": {"seed": 0, **({"guidance_scale": 1.0} if rank else {})},
    "same": {"seed": 0, "cells": ["unipc|2", "unipc|3"]},
}
for name, description in cases.items():
    try:
        check_same_on_all_processes(description, "bench settings")
        seen[name] = "passed"
    except ValueError as exc:
        seen[name] = str(exc)
# the processes are still in step: a split after the refusals gathers both shares
out, _ = split_samples(4, lambda idx: torch.tensor(idx, dtype=torch.float64)[:, None])
seen["gathered"] = out.flatten().tolist()
pathlib.Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(seen))  # (one stdout: lines may interleave)
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The four two-process scenarios of this file run one after the other in ONE launch of two real CPU processes
    (torchrun, gloo; a launch is ~30 s of start-up and imports, the scenarios a fraction of a second): each writes
    into its own folder, returned by name. Every scenario ends with a split, so each also checks that the previous
    ones left the processes in step; each scenario's shares are checked as `launch_two_cpu_processes` does."""
    from _helpers import launch_two_cpu_processes_each

    root = tmp_path_factory.mktemp("two_processes")
    prefix = "import json\nimport torch\nfrom fewstep._dist import split_samples\n"
    bodies = {"descriptions": _HELPER_BODY, "search": prefix + _SEARCH_BODY, "search_cli": prefix + _SEARCH_CLI_BODY,
              "bench_cli": prefix + _BENCH_CLI_BODY}
    for name in bodies:
        (root / name).mkdir()
    launch_two_cpu_processes_each({name: (body, root / name) for name, body in bodies.items()}, root)
    return {name: root / name for name in bodies}


def test_processes_with_different_descriptions_are_refused_on_every_process(two_processes):
    """Two real CPU processes (torchrun, gloo): a description differing on process 1 raises the same ValueError on
    both, naming process 1 against process 0 and, for a dict, each differing key with both values; equal
    descriptions pass; afterwards the processes still split and gather in step (no hang)."""
    tmp_path = two_processes["descriptions"]
    cases, other = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert cases == other  # the same outcome, and the same message, on both processes
    assert set(cases) == {"dict", "list", "extra key", "same", "gathered"}
    message = cases["dict"]
    assert message.startswith("the 2 processes of this distributed launch were given different bench settings: "
                              "process 1 differs from process 0 in ")
    assert "'seed': 0 on process 0, 1 on process 1" in message
    assert "'steps': [2, 3, 4] on process 0, [3, 4] on process 1" in message
    assert "classes" not in message
    assert message.endswith("start every process with the same arguments")
    assert ('process 1 differs from process 0 (["unipc|2", "unipc|3"] on process 0, ["unipc|3"] on process 1)'
            in cases["list"])
    assert "'guidance_scale': absent on process 0, 1.0 on process 1" in cases["extra key"]
    assert cases["same"] == "passed"
    assert cases["gathered"] == [0.0, 1.0, 2.0, 3.0]


_SEARCH_BODY = """
import pathlib
from fewstep.search import SearchSpace, search
from fewstep.search.objectives import AnalyticObjective

rank = _state.process_index
objective = AnalyticObjective(num_samples=16)
space = SearchSpace(objective.noise_schedule, 3)
outcome = []
for seed in (rank, 0):  # process 1 with another seed, then both with the same settings
    try:
        result = search(objective, space, 4, seed=seed, use_predictor=False, progress=False,
                        identity={"metric": "analytic"})
        outcome.append(f"evaluated {len(result.evaluated)}")
    except ValueError as exc:
        outcome.append(str(exc))
split_samples(2, lambda idx: torch.zeros(len(idx), 1))  # still in step
pathlib.Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(outcome))
"""


def test_search_refuses_processes_given_other_settings(two_processes):
    """`search` under two real processes, process 1 with another seed: every process raises the ValueError naming
    'seed' (the two processes' evaluations would have been mixed) before evaluating anything; then the same settings
    run on both."""
    tmp_path = two_processes["search"]
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1] == [
        "the 2 processes of this distributed launch were given different search settings: process 1 differs from "
        "process 0 in 'seed': 0 on process 0, 1 on process 1; start every process with the same arguments",
        "evaluated 4",
    ]


def test_ems_checkpoint_of_other_settings_names_what_differs(tmp_path):
    """A checkpoint written with other settings is refused with the differing keys, stored and this run's values
    (not only the stored settings)."""
    from fewstep.bench.analytic import default_mixture
    from fewstep.solvers.ems_estimate import _alpha_sigma_of_lambda, estimate_ems
    from fewstep.solvers.schedules import VPSchedule

    schedule = VPSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                       "beta_schedule": "linear", "prediction_type": "epsilon"})
    mixture = default_mixture(dim=2)
    data = mixture.sample(8, generator=torch.Generator().manual_seed(0))

    def eps_fn(x, lam, dl):
        alpha, sigma = _alpha_sigma_of_lambda(schedule, torch.tensor(lam, dtype=x.dtype) + dl)
        return mixture.eps_differentiable(x, alpha, sigma)

    ckpt = tmp_path / "ems.ckpt.safetensors"
    kwargs = dict(num_intervals=3, batch_size=4, checkpoint=ckpt, progress=False)
    estimate_ems(eps_fn, data, schedule, seed=0, **kwargs)
    with pytest.raises(ValueError) as info:
        estimate_ems(eps_fn, data, schedule, seed=1, **kwargs)
    message = str(info.value)
    assert f"checkpoint {str(ckpt)!r} was made with other settings (seed: 0 there, 1 in this run); delete it" in message
    with pytest.raises(ValueError) as info:  # other data and another model: each differing key, both values
        estimate_ems(eps_fn, data[:6], schedule, seed=0, meta={"model_digest": "another"}, **kwargs)
    message = str(info.value)
    assert "model_digest: None there, 'another' in this run" in message
    assert "num_samples: 8 there, 6 in this run" in message and "data_digest: '" in message
    assert "seed" not in message and "batch_size" not in message


_SEARCH_CLI_BODY = """
import contextlib
import io
import pathlib
from fewstep.cli import main

rank = _state.process_index
out = pathlib.Path(sys.argv[1], "schedule.json")
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["search", "--model", "analytic", "--nfe", "3", "--budget", "2", "--no-predictor", "--quiet",
                 "--seed", str(rank), "--out", str(out)])
split_samples(2, lambda idx: torch.zeros(len(idx), 1))  # still in step
pathlib.Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps([code, err.getvalue().strip()]))
"""


def test_search_cli_refuses_processes_given_other_arguments(two_processes):
    """`fewstep search` under two processes with different arguments stops on both (exit 2) before its objective
    is built -- the objective's setup already gathers samples across processes -- naming the argument; no file."""
    tmp_path = two_processes["search_cli"]
    for rank in (0, 1):
        code, err = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert code == 2 and "different search arguments" in err and "'seed': 0 on process 0, 1 on process 1" in err
    assert not (tmp_path / "schedule.json").exists()


_BENCH_CLI_BODY = """
import contextlib
import io
import pathlib
from fewstep.cli import main

rank = _state.process_index
out = pathlib.Path(sys.argv[1], "grid")
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["bench", "--model", "analytic", "--samplers", "unipc", "--steps", "3" if rank == 0 else "3,4",
                 "--num-samples", "20", "--plot", "none", "--quiet", "--out", str(out)])
split_samples(2, lambda idx: torch.zeros(len(idx), 1))  # still in step
pathlib.Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps([code, err.getvalue().strip()]))
"""


def test_bench_refuses_processes_given_other_grids(two_processes):
    """`fewstep bench` under two processes with different --steps mixed the processes' samples into wrong rows,
    then hung; now both stop (exit 2) naming the cells to run, before any folder is made."""
    tmp_path = two_processes["bench_cli"]
    for rank in (0, 1):
        code, err = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert code == 2 and "different bench settings" in err and "'cells to run'" in err, err
    assert not (tmp_path / "grid").exists()
