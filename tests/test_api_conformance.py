"""diffusers API conformance of the scheduler base class, found by probing: flow configs whose flow settings are all
defaults, the forward process (``add_noise`` / ``scale_noise``) on bad input, model outputs of the wrong shape, and
img2img begin indices on schedules with implicit correctors."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import SD15_PNDM, TinyDenoiser
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep import samplers

FLOW_CAPABLE = ["ddim", "unipc", "dpm-solver++", "hb", "ghvb", "dc-solver", "dpm-solver-v3", "s3"]
EXTRA = {"dpm-solver-v3": {"ems_file": "digits-flow"}}  # a flow model's shipped statistics


def _default_flow_configs() -> dict:
    """Flow configs whose every flow setting is a default (diffusers lists them in ``_use_default_values``)."""
    return {
        "FlowMatchEuler()": FlowMatchEulerDiscreteScheduler().config,
        "hub json without shift": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000},
        "flow-euler()": samplers.get("flow-euler")().config,
        "flowchef()": samplers.get("flowchef")().config,
    }


def _loop(scheduler, model, steps: int = 8) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- flow configs with default flow settings ---------------------------------------------------------------------
@pytest.mark.parametrize("name", FLOW_CAPABLE)
def test_flow_configs_with_default_shift_build_flow_schedulers(name):
    """diffusers' ``from_config`` drops ``_class_name`` and every default-valued key before ``__init__``: a FlowMatch
    config with the default shift (or a default flow-euler config) reached fewstep with no flow marker and built a
    VP (DDPM linear-beta) scheduler."""
    for label, config in _default_flow_configs().items():
        sched = samplers.get(name).from_config(config, **EXTRA.get(name, {}))
        assert sched.is_flow, f"{name} from {label}"
        cfg = sched.config  # the default shift, stated as FlowMatch's `shift` or as UniPC's `flow_shift` (with
        # `use_flow_sigmas` on multistep grids; not on FlowMatch-Euler ones: tests/test_hub_configs.py)
        flowmatch_grid = sched.flow_grid_style == "flowmatch"
        assert cfg.shift == 1.0 or (cfg.shift is None and cfg.flow_shift == 1.0
                                    and bool(cfg.use_flow_sigmas) != flowmatch_grid), dict(cfg)


@pytest.mark.parametrize("name", ["ddim", "unipc", "dpm-solver++", "hb", "ghvb", "dc-solver"])
def test_default_flow_config_samples_as_its_explicit_form(name):
    model = TinyDenoiser(32)
    reference = FlowMatchEulerDiscreteScheduler()
    explicit = {**dict(reference.config), "_use_default_values": []}  # every key stated: always worked
    expected = _loop(samplers.get(name).from_config(explicit), model)
    for label, config in _default_flow_configs().items():
        got = _loop(samplers.get(name).from_config(config), model)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{name} from {label}")


@pytest.mark.parametrize("name", ["ddim", "flow-euler"])
def test_default_flow_config_is_flow_match_euler(name):
    model = TinyDenoiser(32)
    expected = _loop(FlowMatchEulerDiscreteScheduler(), model)
    for label, config in _default_flow_configs().items():
        assert _rel(_loop(samplers.get(name).from_config(config), model), expected) < 1e-6, label


def test_flow_marker_handling_leaves_other_configs_alone():
    assert not samplers.get("unipc").from_config(DDPMScheduler().config).is_flow
    assert not samplers.get("unipc").from_config(SD15_PNDM).is_flow
    # an explicit keyword still wins over the source's defaults
    assert samplers.get("unipc").from_config(FlowMatchEulerDiscreteScheduler().config, shift=3.0).config.shift == 3.0
    # mrs refuses flow configs: the default-shift one too (it used to be taken for a VP config)
    with pytest.raises(ValueError, match="a flow-matching config, which these samplers integrate: .*flow-euler"):
        samplers.get("mrs").from_config(FlowMatchEulerDiscreteScheduler().config)


# -- add_noise / scale_noise -------------------------------------------------------------------------------------
def test_add_noise_refuses_integer_tensors():
    """Integer samples were noised in their own dtype: alpha and sigma truncated to 0, an all-zero result."""
    sched = samplers.get("dpm-solver++")()
    sched.set_timesteps(10)
    image = torch.full((1, 1, 2, 2), 100, dtype=torch.uint8)
    noise = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"`original_samples` must be a floating tensor .*got uint8"):
        sched.add_noise(image, noise, sched.timesteps[5:6])
    with pytest.raises(ValueError, match=r"`noise` must be a floating tensor .*got int64"):
        sched.add_noise(noise, noise.long(), sched.timesteps[5:6])
    flow = samplers.get("flow-euler")(shift=3.0)
    flow.set_timesteps(4)
    with pytest.raises(ValueError, match=r"`sample` must be a floating tensor .*got uint8"):
        flow.scale_noise(image, flow.timesteps[1], noise)


def test_add_noise_timestep_count_and_shapes():
    sched = samplers.get("dpm-solver++")()
    sched.set_timesteps(10)
    x, eps = torch.ones(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    with pytest.raises(ValueError, match=r"`timesteps` \(2 timesteps\), `original_samples` \(4, 1, 2, 2\) and "
                                         r"`noise` \(4, 1, 2, 2\) do not broadcast together"):
        sched.add_noise(x, eps, sched.timesteps[:2])
    with pytest.raises(ValueError, match=r"`timesteps` \(0 timesteps\)"):
        sched.add_noise(x, eps, torch.tensor([]))
    with pytest.raises(ValueError, match=r"`noise` \(3, 1, 2, 2\) do not broadcast together"):
        sched.add_noise(x, eps[:3], sched.timesteps[:1])
    flow = samplers.get("flow-euler")(shift=3.0)
    flow.set_timesteps(4)
    with pytest.raises(ValueError, match=r"`timestep` \(3 timesteps\), `sample` \(4, 1, 2, 2\)"):
        flow.scale_noise(x, flow.timesteps[:3], eps)
    # broadcasting as diffusers does (found by a review: refused for a day): one image, a batch of noise and levels
    from diffusers import DDPMScheduler as Stock

    one, noise3 = torch.randn(1, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t3 = torch.tensor([10, 500, 900])
    ours = samplers.get("ddim").from_config(Stock().config)
    torch.testing.assert_close(ours.add_noise(one, noise3, t3), Stock().add_noise(one, noise3, t3))
    # what stays allowed: one timestep for the batch, one per sample
    assert sched.add_noise(x, eps, sched.timesteps[:1]).shape == x.shape
    assert sched.add_noise(x, eps, sched.timesteps[:4]).shape == x.shape


def test_add_noise_takes_a_timestep_that_requires_grad():
    """``Can't call numpy() on Tensor that requires grad`` before."""
    sched = samplers.get("ddim")()
    x, eps = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([500.0], requires_grad=True)
    torch.testing.assert_close(sched.add_noise(x, eps, t), sched.add_noise(x, eps, torch.tensor([500.0])))


# -- model output shapes -----------------------------------------------------------------------------------------
def test_step_refuses_outputs_of_another_shape():
    """A CFG loop that forgot ``noise_pred.chunk(2)`` was broadcast silently (batch 1 came back as 2); a
    learned-variance model's 2C-channel output failed inside torch."""
    sched = samplers.get("unipc")()
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match=r"`model_output` must have the shape of `sample` \(1, 4, 8, 8\), got "
                                         r"\(2, 4, 8, 8\): it holds twice the sample's batch.*chunk\(2\)"):
        sched.step(torch.randn(2, 4, 8, 8), t, x)
    with pytest.raises(ValueError, match=r"twice the sample's channels \(8 vs 4\): a learned-variance model.*"
                                         r"model_output\[:, :4\]"):
        sched.step(torch.randn(1, 8, 8, 8), t, x)
    with pytest.raises(ValueError, match=r"`model_output` must have the shape of `sample`"):
        sched.step(torch.randn(1, 4, 8, 1), t, x)
    with pytest.raises(ValueError, match=r"`eps` must have the shape of `sample` \(1, 4, 8, 8\), got \(2, 4, 8, 8\)"):
        sched.step_pair(torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8), t, x)
    assert sched.step_index is None  # refused before anything ran: the loop can go on
    assert sched.step(torch.randn(1, 4, 8, 8), t, x).prev_sample.shape == x.shape


# -- img2img begin index on s3 schedules with implicit correctors ------------------------------------------------
_TIMES = [999.0, 800.0, 600.0, 400.0, 200.0, 50.0]
_DECISIONS = [{"order": 1, "corrector": "implicit"}, {"order": 2, "corrector": "unic"},
              {"order": 2, "corrector": "implicit"}, {"order": 2}, {"order": 2}, {"order": 1}]


def _s3(decisions):
    schedule = {"version": 1, "timesteps": _TIMES, "final": "zero", "decisions": decisions}
    sched = samplers.get("s3").from_config(SD15_PNDM, s3_schedule=schedule)
    sched.set_timesteps(sched._loaded.nfe)
    return sched


def _img2img(sched, begin: int) -> tuple[torch.Tensor, int]:
    """What a diffusers img2img pipeline does: slice ``timesteps[begin:]``, set_begin_index, one step per entry."""
    timesteps = sched.timesteps[begin:]
    sched.set_begin_index(begin)
    x = torch.linspace(-2, 2, 32, dtype=torch.float64).reshape(2, 1, 4, 4)
    calls = 0
    for t in timesteps:
        x = sched.step(torch.tanh(x) * (0.5 + float(t) / 1000), t, x).prev_sample
        calls += 1
    return x, calls


def test_s3_img2img_begins_at_either_call_of_an_implicitly_corrected_step():
    """calls: (0) (1, 1') (2) (3, 3') (4) (5); points 1 and 3 are corrected implicitly. A pipeline sets only
    ``strength``, so it may begin at a second call (2 or 5): that was refused. Begun at a first call (1 or 4), the
    engine skipped the corrector (nothing ran before) and predicted, and the second call then stepped on from the
    wrong point (10% off). Either way the run now equals a fresh start at that grid point."""
    sched = _s3(_DECISIONS)
    assert sched.plan.calls == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True), (4, False),
                                (5, False)]
    for begin, point in ((1, 1), (2, 1), (4, 3), (5, 3)):
        plain = copy.deepcopy(_DECISIONS)
        plain[point - 1]["corrector"] = "none"  # the same run from `point`, without the (void) implicit corrector
        reference = _s3(plain)
        ref_begin = [i for i, _ in reference.plan.calls].index(point)
        expected, _ = _img2img(reference, ref_begin)
        sched = _s3(_DECISIONS)
        got, calls = _img2img(sched, begin)
        assert calls == 8 - begin and sched.step_index == 8  # one step per timestep left, all of them run
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"begin_index {begin}")


def test_begin_index_past_the_end_names_strength():
    sched = samplers.get("dpm-solver++").from_config(SD15_PNDM)
    sched.set_timesteps(8)
    with pytest.raises(ValueError, match=r"`begin_index` must be below the number of timesteps \(8\), got 8 "
                                         r"\(allowed: 0 to 7\).*`strength` is too small for `num_inference_steps`"):
        sched.set_begin_index(8)


@pytest.mark.parametrize("diffusers_name", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler"])
def test_a_flow_config_swaps_back_into_diffusers(diffusers_name, tmp_path):
    """A flow config that went through a fewstep scheduler must sample a flow model correctly when diffusers'
    UniPC/DPM-Solver is built back from it (in memory or saved): fewstep wrote ``prediction_type="flow"``, which
    they refuse; then ``flow_prediction`` without ``use_flow_sigmas``/``flow_shift`` (VP sigmas with flow
    prediction: thousands off, silently), and in memory ``prediction_type`` stayed listed as a default, which
    ``from_config`` drops (an epsilon sampler). Checked on the exact velocity model of a point mass: the swapped-back
    scheduler lands where diffusers' own flow-configured one does."""
    import diffusers

    cls = getattr(diffusers, diffusers_name)
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2))

    def final(sched):
        sched.set_timesteps(6)
        x = noise.clone()
        for t in sched.timesteps:
            x = sched.step((x - x0) / (float(t) / 1000), t, x).prev_sample
        return x

    want = final(cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"))
    assert (want - x0).abs().max() < 1e-2  # (diffusers' flow-sigma grid stops short of s = 0)
    sources = {"diffusers flow config": cls(use_flow_sigmas=True, flow_shift=3.0,
                                            prediction_type="flow_prediction").config,
               "FlowMatch (SD3)": FlowMatchEulerDiscreteScheduler(shift=3.0).config}
    for label, config in sources.items():
        for name in ("unipc", "dpm-solver++"):
            ours = samplers.get(name).from_config(config)
            assert ours.is_flow and ours.prediction_type == "flow", (label, name)
            assert ours.config.prediction_type == "flow_prediction"
            ours.save_pretrained(tmp_path / name)
            for back in (cls.from_config(ours.config), cls.from_pretrained(tmp_path / name)):
                torch.testing.assert_close(final(back), want, rtol=1e-5, atol=1e-5, msg=f"{label} -> {name}")
    direct = samplers.get("unipc")(use_flow_sigmas=True, flow_shift=3.0)  # built directly, in memory
    torch.testing.assert_close(final(cls.from_config(direct.config)), want, rtol=1e-5, atol=1e-5)


def test_get_velocity_matches_diffusers():
    """diffusers' schedulers have ``get_velocity`` (the v-prediction training target); fewstep's had none
    (AttributeError). VP: equal to diffusers' DDPM at the same timesteps; flow: refused, naming
    the flow target."""
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 500, 999])
    for name in ("ddim", "dpm-solver++", "unipc"):
        ours = samplers.get(name).from_config(SD15_PNDM)
        want = DDPMScheduler.from_config(SD15_PNDM).get_velocity(x, n, t)
        torch.testing.assert_close(ours.get_velocity(x, n, t), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="flow-matching schedule here, whose velocity target is noise - sample"):
        samplers.get("ddim").from_config(FlowMatchEulerDiscreteScheduler().config).get_velocity(x, n, t)
    with pytest.raises(ValueError, match=r"`timesteps` \(2 timesteps\), `sample` \(3, 2, 4, 4\) and `noise`"):
        samplers.get("ddim").from_config(SD15_PNDM).get_velocity(x, n, torch.tensor([1, 2]))
    # a sampling grid set on the scheduler does not move the target's level (a Karras grid's timesteps are rounded)
    karras = samplers.get("dpm-solver++").from_config(SD15_PNDM, use_karras_sigmas=True)
    karras.set_timesteps(10)
    t = karras.timesteps[[2, 7]]
    torch.testing.assert_close(karras.get_velocity(x[:2], n[:2], t),
                               DDPMScheduler.from_config(SD15_PNDM).get_velocity(x[:2], n[:2], t), rtol=1e-5, atol=1e-6)


def test_ddim_step_takes_ddim_pipelines_none_for_use_clipped_model_output():
    """diffusers' DDIMPipeline always passes ``use_clipped_model_output=None`` (its default, read as False): the
    new DDIM options refused it for a day (found by a review)."""
    sched = samplers.get("ddim").from_config(SD15_PNDM)
    sched.set_timesteps(3)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    got = sched.step(out, sched.timesteps[0], x, eta=0.0, use_clipped_model_output=None).prev_sample
    ref = samplers.get("ddim").from_config(SD15_PNDM)
    ref.set_timesteps(3)
    assert torch.equal(got, ref.step(out, ref.timesteps[0], x).prev_sample)
