"""DC ratios are > 0 everywhere a ratio is made or stored: the search, ``RatioEntry`` and the ratio-table file."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

from fewstep.bench.analytic import AnalyticModel, default_mixture
from fewstep.calibrate.dc import search_ratios
from fewstep.samplers import get
from fewstep.solvers.dc import DynamicCompensation, dc_step
from fewstep.solvers.dc_artifacts import RatioEntry, load_ratio_table, save_ratio_table
from fewstep.solvers.engine import EngineState
from fewstep.solvers.parameterization import to_pair


def test_search_never_returns_a_nonpositive_ratio():
    """Targets made by a trajectory compensated with rho = -0.8 at step 2 pull the unconstrained search below 0;
    the ratio it returns must still be one the sampler accepts."""
    mixture = default_mixture(dim=4, seed=0)
    sched = get("dc-solver").from_config(DDPMScheduler(timestep_spacing="trailing").config, dc_ratios=[1.0] * 5)
    sched.set_timesteps(5)
    plan, grid = sched.plan, sched.plan.grid
    model = AnalyticModel(mixture, sched.noise_schedule)
    x = x_start = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hook = DynamicCompensation([None] * 5)
    hook.table[2] = dc_step(grid, plan.decisions[2], 2, -0.8, 2, "t")
    state, targets = EngineState(plan, [hook]), []
    with torch.no_grad():
        for i in range(5):
            x0, eps = to_pair(model(x, float(grid.timesteps[i])), x, float(grid.alphas[i]), float(grid.sigmas[i]),
                              "epsilon")
            x = state.advance(i, x, x0, eps)
            targets.append(x)
    result = search_ratios(plan, lambda x, t: model(x, t), "epsilon", x_start, targets, progress=False, iters=40,
                           lr=0.1)
    assert all(r > 0 for r in result.ratios), result.ratios
    assert result.ratios[2] < 0.5  # the search did move toward its (refused) optimum
    RatioEntry(5, 1.0, result.ratios)  # and the result can be stored


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_ratio_entries_refuse_what_the_sampler_refuses(bad):
    with pytest.raises(ValueError, match=r"`ratios`"):
        RatioEntry(4, 3.0, [1.0, 1.0, bad, 1.1])


def test_ratio_files_with_nonpositive_ratios_are_refused_naming_the_file_and_entry(tmp_path):
    good = save_ratio_table(tmp_path / "good.safetensors", [RatioEntry(4, 3.0, [1.0, 1.0, 0.5, 1.1])], "toy",
                            {"dc_order": 2})
    with safe_open(str(good), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    assert json.loads(meta["entries"])[0]["key"] == "nfe4_cfg3"
    tensors["nfe4_cfg3"][2] = 0.0
    bad = tmp_path / "r.ratios.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"DC-Solver ratio table '.*r\.ratios\.safetensors': entry 0 \('nfe4_cfg3'\): "
                                         r"`ratios`\[2\] = 0\.0: ratios must be > 0"):
        load_ratio_table(bad)
