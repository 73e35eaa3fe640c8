"""What a user sees when swapping samplers and loading models: no diffusers warning about fewstep's own options on a
fewstep -> fewstep swap, every multistep ``solver_type`` read by UniPC, and diffusers 0.42's ``dtype`` name."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from _helpers import SD15_PNDM
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.utils import logging as diffusers_logging

import fewstep
from fewstep import samplers


@pytest.fixture
def diffusers_log():
    """The diffusers library logger's output (it does not propagate to the root logger, so caplog misses it)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = diffusers_logging.get_logger("diffusers")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("source", "options"), [
    ("hb", {"momentum_order": 3.8}),
    ("ghvb", {"momentum_order": 2.5}),
    ("unipc", {"time_grid": "uniform_lambda"}),
    ("dpm-solver++", {"solver_type": "taylor"}),
])  # fmt: skip
@pytest.mark.parametrize("target", ["unipc", "dpm-solver++", "ddim", "hb"])
def test_a_swap_between_fewstep_samplers_does_not_warn_about_fewstep_options(diffusers_log, source, options, target):
    """diffusers' ``from_config`` warns "The config attributes {...} were passed to X, but are not expected" for keys
    of no compatible class; it looks ``_compatibles`` up in its own namespace only, so fewstep's own options
    (``momentum_order``, ``time_grid``) were reported on every fewstep -> fewstep swap. They are still kept in the
    config (a swap back restores them), as diffusers keeps a compatible class's keys."""
    config = samplers.from_config(source, SD15_PNDM, **options).config
    swapped = samplers.get(target).from_config(config)
    assert "not expected" not in diffusers_log.getvalue(), diffusers_log.getvalue()
    back = samplers.get(source).from_config(swapped.config)
    kept = {k: v for k, v in options.items() if k not in samplers.options(target)}  # the target's own ones it maps
    assert {k: back.config[k] for k in kept} == kept


def test_the_compatibles_list_names_fewstep_samplers_and_diffusers_ones():
    """``scheduler.compatibles`` (what diffusers users list to pick a swap) holds diffusers' schedulers and the other
    registered fewstep samplers."""
    names = {c.__name__ for c in samplers.get("unipc")().compatibles}
    assert {"UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "FewstepDDIMScheduler",
            "FewstepHeavyBallScheduler"} <= names  # fmt: skip


def test_a_foreign_diffusers_key_still_warns(diffusers_log):
    """Only compatible classes' keys are silenced: a key of no scheduler at all is reported as diffusers does."""
    samplers.get("unipc").from_config({**SD15_PNDM, "no_such_option": 1})
    assert "no_such_option" in diffusers_log.getvalue()


@pytest.mark.parametrize("solver_type", ["midpoint", "heun", "taylor"])
def test_unipc_reads_every_dpm_solver_type_as_bh2(solver_type):
    """A DPM-Solver config's ``solver_type`` becomes ``bh2`` in UniPC, as diffusers' UniPC maps midpoint/heun; fewstep's
    own ``taylor`` was refused ("solver_type must be one of ['bh1', 'bh2']") although dc-solver maps it."""
    config = samplers.from_config("dpm-solver++", SD15_PNDM, solver_type=solver_type).config
    assert samplers.get("unipc").from_config(config).config.solver_type == "bh2"
    if solver_type != "taylor":  # the diffusers behaviour this follows
        assert UniPCMultistepScheduler.from_config(dict(config, _class_name="DPMSolverMultistepScheduler")
                                                   ).config.solver_type == "bh2"  # fmt: skip


def test_unipc_still_refuses_an_unknown_solver_type():
    with pytest.raises(ValueError, match="solver_type"):
        samplers.get("unipc")(solver_type="rk4")


def test_load_default_takes_diffusers_dtype_name():
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype``; ``load_default`` takes both (one option)."""
    clf = fewstep.load_default("digits-classifier", sampler=None, dtype=torch.bfloat16)
    assert next(clf.parameters()).dtype == torch.bfloat16
    same = fewstep.load_default("digits-classifier", sampler=None, dtype=torch.bfloat16, torch_dtype=torch.bfloat16)
    assert next(same.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"`dtype` torch.float16 and `torch_dtype` torch.bfloat16 disagree"):
        fewstep.load_default("digits-classifier", sampler=None, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"`dtype` must be a floating torch.dtype .* got 'float16'"):
        fewstep.load_default("digits-classifier", sampler=None, dtype="float16")


@pytest.mark.parametrize(("source", "solver_type"), [("dpm-solver++", "taylor"), ("dpm-solver++", "midpoint"),
                                                     ("unipc", "bh1")])  # fmt: skip
@pytest.mark.parametrize("target", ["dpm-solver++", "unipc", "dc-solver"])
def test_a_momentum_sampler_that_dropped_a_solver_type_swaps_on(source, solver_type, target):
    """hb (base plms) ignores a copied ``solver_type`` and stored None; a DPM-Solver++/UniPC/dc-solver built from its
    config then got that None and refused it ("`solver_type` must be one of [...], got None"). The ignored key is
    listed as a default now, so the next sampler takes its own default."""
    momentum = samplers.from_config("hb", samplers.from_config(source, SD15_PNDM, solver_type=solver_type).config)
    assert momentum.config.solver_type is None
    built = samplers.get(target).from_config(momentum.config)
    assert built.config.solver_type == samplers.get(target)().config.solver_type
    # diffusers' own schedulers too (they do not go through fewstep's from_config, which drops such nulls)
    for cls in (UniPCMultistepScheduler, DPMSolverMultistepScheduler):
        assert cls.from_config(momentum.config).config.solver_type == cls().config.solver_type


@pytest.mark.parametrize("base", ["plms", "dpm-solver++", "unipc"])
@pytest.mark.parametrize("target", ["dpm-solver++", "unipc", "dc-solver"])
def test_a_saved_momentum_sampler_swaps_on_after_reloading(tmp_path, base, target):
    """hb writes ``solver_order``/``solver_type`` None ("the base's own"); ``save_pretrained`` does not keep diffusers'
    list of default-valued keys, so the reloaded config carried explicit nulls and a sampler built from it refused
    them ("`solver_order` must be an integer in [1, 5], got None"). Such nulls now mean the target's own default."""
    samplers.from_config("hb", SD15_PNDM, base=base).save_pretrained(tmp_path)
    reloaded = samplers.get("hb").from_pretrained(tmp_path)
    assert reloaded.config.solver_order is None
    built = samplers.get(target).from_config(reloaded.config)
    fresh = samplers.get(target)()
    assert (built.config.solver_order, built.config.solver_type) == (fresh.config.solver_order,
                                                                     fresh.config.solver_type)  # fmt: skip
    explicit = samplers.get(target).from_config(reloaded.config, solver_order=1)
    assert explicit.config.solver_order == 1
