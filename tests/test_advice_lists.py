"""Error messages that offer alternatives offer only ones that work on the config at hand.

Found by following the advice literally: the hint for diffusers' ``use_exponential_sigmas``/``use_beta_sigmas``
listed every time grid for every sampler (dpm-solver-v3 refuses ``karras``; on a flow config every sampler but v3
takes ``spacing`` only), ``use_lu_lambdas`` on a flow config pointed to ``time_grid='uniform_lambda'`` (refused
there), and graph mode's "use one of" listed ``flow-euler`` for an SD (VP) pipeline and ``dpm-solver-v3``/``s3``
without the artifacts they need. Each test triggers the error, reads the alternatives off the message and runs
every one of them on the same config.
"""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import torch
from _helpers import SD3_FLOW, SD15_PNDM, TinyDenoiser
from test_hub_configs import _embeds
from test_pipeline_interop import _sd, _sd3

from fewstep import samplers
from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.graph_step import check_graph_scheduler, graph_samplers
from fewstep.solvers.s3 import SolverSchedule

CONFIGS = {"vp": SD15_PNDM, "flow": SD3_FLOW}
#: samplers that run from the config alone (dpm-solver-v3 without an EMS file: degenerated=True)
GRID_SAMPLERS = {
    "vp": ["ddim", "dpm-solver++", "unipc", "dpm-solver-v3", "hb", "ghvb", "dc-solver"],
    "flow": ["ddim", "dpm-solver++", "unipc", "dpm-solver-v3", "hb", "ghvb", "dc-solver", "flow-euler"],
}
CASES = [(kind, name) for kind, names in GRID_SAMPLERS.items() for name in names]


def _extra(name: str) -> dict:
    return {"degenerated": True} if name == "dpm-solver-v3" else {}


def _runs(name: str, config: dict, steps: int = 6, **extra) -> None:
    """Build ``name`` from ``config`` and sample a few steps with a stand-in model: finite latents."""
    sched = samplers.from_config(name, config, **_extra(name), **extra)
    sched.set_timesteps(steps)
    model = TinyDenoiser(64)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    assert torch.isfinite(x).all()


def _listed_grids(message: str) -> list[str]:
    found = re.search(r"time_grid in (\[[^\]]*\])", message)
    assert found, message
    return ast.literal_eval(found.group(1))


# ------------------------------------------------------------------------------ foreign diffusers grid options
@pytest.mark.parametrize("key", ["use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize(("kind", "name"), CASES)
def test_sigma_grid_hint_lists_only_grids_this_sampler_runs_on_this_config(kind, name, key):
    config = CONFIGS[kind]
    cls = samplers.get(name).__name__
    with pytest.raises(ValueError, match=rf"{cls} does not implement diffusers' `{key}`=True .*; {cls} on a "
                                         rf"{'flow' if kind == 'flow' else 'VP'} schedule supports time_grid in \["):
        samplers.from_config(name, {**config, key: True}, **_extra(name))
    with pytest.raises(ValueError) as info:
        samplers.from_config(name, {**config, key: True}, **_extra(name))
    grids = _listed_grids(str(info.value))
    assert grids and "spacing" in grids
    for grid in grids:
        _runs(name, {**config, "time_grid": grid})


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_lu_lambdas_hint_offers_a_log_snr_grid_only_where_one_runs(kind, name):
    config = {**CONFIGS[kind], "use_lu_lambdas": True}
    with pytest.raises(ValueError, match=r"does not implement diffusers' `use_lu_lambdas`=True") as info:
        samplers.from_config(name, config, **_extra(name))
    message = str(info.value)
    base = CONFIGS[kind]
    if kind == "vp" or name == "dpm-solver-v3":
        assert "use time_grid='uniform_lambda'" in message
        _runs(name, {**base, "time_grid": "uniform_lambda"})
        return
    # every other sampler on a flow config: no log-SNR grid, said plainly; what it and dpm-solver-v3 offer runs
    cls = samplers.get(name).__name__
    assert re.search(rf"{cls} has no grid uniform in log-SNR on a flow schedule \(it supports time_grid in "
                     r"\['spacing'\]\); dpm-solver-v3 has one: time_grid='uniform_lambda' with ems_file= or "
                     r"degenerated=True", message), message
    assert "use time_grid='uniform_lambda'" not in message
    for grid in _listed_grids(message):
        _runs(name, {**base, "time_grid": grid})
    _runs("dpm-solver-v3", {**base, "time_grid": "uniform_lambda"})


# ------------------------------------------------------------------------------ graph mode's sampler list
def _advertised(message: str) -> dict[str, str | None]:
    """The samplers after "use one of: ", with their parenthesised requirement (None: none)."""
    listed = message.split("use one of: ", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"([\w+-]+)(?: \(([^)]*)\))?(?:, |$)", listed)}


def _graph_scheduler(pipe, name: str, note: str | None, steps: int):
    """``name`` built from the pipeline's config, with the artifact its note asks for."""
    config = pipe.scheduler.config
    if name == "dpm-solver-v3":
        assert note is not None and "degenerated=True" in note
        return samplers.from_config(name, config, degenerated=True)
    if name == "s3":
        assert note is not None and "s3_schedule" in note and "afs" in note
        base = samplers.from_config("unipc", config)
        base.set_timesteps(steps)
        schedule = SolverSchedule.from_grid(base.plan.grid, base.plan.decisions)
        return samplers.from_config(name, config, s3_schedule=schedule.to_dict())
    assert note is None, (name, note)
    return samplers.from_config(name, config)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_graph_mode_offers_only_samplers_that_replay_on_this_pipeline(kind):
    pipe = _sd() if kind == "vp" else _sd3()
    diffusers_own = type(pipe.scheduler).__name__
    with pytest.raises(ValueError, match=rf"cuda_graph=True needs a fewstep scheduler: {diffusers_own} \(diffusers' "
                                         r"own\) .*; use one of: ddim, dpm-solver\+\+, unipc, dpm-solver-v3 \(with "
                                         r"ems_file or degenerated=True\), s3 \(with an s3_schedule") as info:
        FewstepPipeline.from_pipe(pipe, cuda_graph=True)
    advertised = _advertised(str(info.value))
    with pytest.raises(ValueError, match=r"cuda_graph=True cannot replay FewstepHeavyBallScheduler .*; use one of: "
                                         r"ddim, ") as other:
        FewstepPipeline.from_pipe(pipe, scheduler="hb", cuda_graph=True)
    assert _advertised(str(other.value)) == advertised
    assert set(advertised) == set(graph_samplers(pipe.scheduler.config))
    assert ("flow-euler" in advertised) == (kind == "flow")  # flow-euler refuses VP configs
    assert {n for n, note in advertised.items() if note} == {"dpm-solver-v3", "s3"}
    steps = 3
    for name, note in advertised.items():
        scheduler = _graph_scheduler(pipe, name, note, steps)
        check_graph_scheduler(scheduler)
        fp = FewstepPipeline.from_pipe(pipe, scheduler=scheduler, guidance="cfg", guidance_scale=3.0)
        fp._loop_mode = "static"  # the step cuda_graph=True captures, run uncaptured on the CPU
        out = fp(**_embeds(kind == "flow"), num_inference_steps=steps, output_type="latent",
                 generator=torch.Generator().manual_seed(1)).images
        assert np.isfinite(out.float().numpy()).all(), name


def test_graph_samplers_without_a_config_keeps_listing_every_replayable_sampler():
    assert set(graph_samplers()) == {"ddim", "dpm-solver++", "unipc", "dpm-solver-v3", "flow-euler", "s3"}
    assert "flow-euler" not in graph_samplers(SD15_PNDM)
    assert "flow-euler" in graph_samplers(SD3_FLOW)
