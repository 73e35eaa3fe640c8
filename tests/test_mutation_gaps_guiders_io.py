"""Gaps a mutation probe of the diffusers guider adapters, guided stepping, atomic writes and the sample split left
open. Every check is against an independent reference: diffusers' own guiders, the CFG/CFG++ formulas of the
papers (README guidance section), the file system's own view, or brute-force bookkeeping of sample indices."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.modular_pipelines.modular_pipeline import BlockState

from fewstep import _dist, guidance, samplers
from fewstep._io import atomic_write, check_creatable_dir, first_missing_dir
from fewstep.guidance.guiders import APGGuider, CFGPlusPlusGuider

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}


def _preds(n, seed, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(n)]


def _drive_block_state(guider, preds, generations=1):
    """A modular denoise block's use of a guider: ``prepare_inputs_from_block_state`` with a (cond, uncond) field."""
    seen, out = [], []
    state = BlockState(lat_c=torch.ones(1), lat_u=-torch.ones(1))
    for _ in range(generations):
        for step, (cond, uncond) in enumerate(preds):
            guider.set_state(step=step, num_inference_steps=len(preds), timestep=torch.tensor(999 - 100 * step))
            batches = guider.prepare_inputs_from_block_state(state, {"latents": ("lat_c", "lat_u")})
            seen.append([(float(b.latents), b.__guidance_identifier__) for b in batches])
            for batch in batches:
                guider.prepare_models(None)
                seen.append(guider.is_conditional)  # a model block reads it after prepare_models
                batch.noise_pred = cond if batch.__guidance_identifier__ == "pred_cond" else uncond
            out.append(guider(batches).pred)
    return seen, out


# ----------------------------------------------------------------------------------------------------------------
# APG guider through the block-state path (what modular pipelines call): batches and momentum reset vs diffusers
@pytest.mark.parametrize("start,stop", [(0.0, 1.0), (0.25, 1.0)])
def test_apg_guider_block_state_path_matches_diffusers_apg(start, stop):
    """Same (cond, uncond) batches and predictions as diffusers' APG (``guidance_scale = w - 1``, original
    formulation) over two generations: momentum must be reset at step 0 of each. Tolerance: float32 round-off of
    the same algebra done in another order (diffusers' own parity test uses the same)."""
    preds = _preds(4, seed=11)
    ours = APGGuider(guidance_scale=5.0, eta=0.0, norm_threshold=4.0, momentum=-0.5, start=start, stop=stop)
    theirs = AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=4.0, eta=0.0,
                                       use_original_formulation=True, start=start, stop=stop)  # fmt: skip
    seen_a, out_a = _drive_block_state(ours, preds, generations=2)
    seen_b, out_b = _drive_block_state(theirs, preds, generations=2)
    assert seen_a == seen_b
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_guider_window_bounds_truncate_like_diffusers():
    """``start``/``stop`` fractions of a step count they do not divide (7 steps: 0.5 * 7 = 3.5): the guided steps
    are diffusers' (``int`` truncation), checked against ``ClassifierFreeGuidance`` with the same window."""
    preds = _preds(7, seed=12)
    for start, stop in [(0.3, 0.5), (0.15, 0.9)]:
        ours = APGGuider(guidance_scale=3.0, momentum=0.0, norm_threshold=None, start=start, stop=stop)
        ref = ClassifierFreeGuidance(guidance_scale=3.0, start=start, stop=stop)
        seen_a, _ = _drive_block_state(ours, preds)  # batches (which steps are guided), is_conditional
        seen_b, _ = _drive_block_state(ref, preds)
        assert seen_a == seen_b


def test_apg_guider_at_scale_one_is_the_conditional_prediction_without_an_unconditional_batch():
    """Paper w = 1 is the conditional model alone: no unconditional batch is prepared and, even if both outputs are
    given, the prediction (and the pair carried along) are the raw conditional/unconditional outputs, exactly."""
    (cond, uncond), = _preds(1, seed=13)
    guider = APGGuider(guidance_scale=1.0)
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    assert guider.num_conditions == 1
    assert len(guider.prepare_inputs({"latents": (torch.ones(1), -torch.ones(1))})) == 1
    out = guider.forward(cond, uncond)
    assert torch.equal(out.pred, cond) and torch.equal(out.pred_cond, cond) and torch.equal(out.pred_uncond, uncond)


def test_apg_guider_output_carries_the_raw_pair_and_refuses_mismatched_shapes():
    """``GuiderOutput.pred_cond``/``pred_uncond`` are the raw model outputs (a pair-aware loop runs the exact rule
    from them), not the guided prediction; a batch-size mismatch is refused, not broadcast."""
    (cond, uncond), = _preds(1, seed=14)
    guider = APGGuider(guidance_scale=4.0, momentum=0.0)
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    out = guider.forward(cond, uncond)
    assert torch.equal(out.pred_cond, cond) and torch.equal(out.pred_uncond, uncond)
    assert not torch.equal(out.pred, cond)
    with pytest.raises(ValueError, match="same shape"):
        guider.forward(cond, uncond[:1])


# ----------------------------------------------------------------------------------------------------------------
# CFG++ guider: the per-step scale from the paper's formula, and the last grid step
def test_cfgpp_guider_scale_is_the_paper_formula_at_every_step_including_the_last():
    """CFG++ with a first-order step equals CFG at ``w_i = lam rho_i / (rho_i - rho_{i+1})`` with
    ``rho = sigma/alpha`` of the DDIM grid and ``rho_N = 0`` (so ``w_{N-1} = lam``); computed here from diffusers'
    ``alphas_cumprod`` directly. A step past the grid is refused. Tolerance: float64 vs float32 grid round-off."""
    n, lam = 5, 0.6
    sched = samplers.get("ddim").from_config(DDPM)
    sched.set_timesteps(n)
    ac = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)  # DDPM "linear" betas
    ac = torch.cumprod(1 - ac, 0)
    rho = [float(((1 - ac[int(t)]) / ac[int(t)]) ** 0.5) for t in sched.timesteps] + [0.0]
    guider = CFGPlusPlusGuider(guidance_scale=lam, scheduler=sched)
    (cond, uncond), = _preds(1, seed=15)
    for i in range(n):
        guider.set_state(step=i, num_inference_steps=n, timestep=sched.timesteps[i])
        w = lam * rho[i] / (rho[i] - rho[i + 1])
        assert guider.current_scale() == pytest.approx(w, rel=1e-4)
        torch.testing.assert_close(guider.forward(cond, uncond).pred, uncond + w * (cond - uncond),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    assert guider.current_scale() == pytest.approx(lam, rel=1e-6)
    guider.set_state(step=n, num_inference_steps=n, timestep=torch.tensor(0))
    with pytest.raises(ValueError, match="outside"):
        guider.current_scale()


def test_guiders_outside_their_window_or_disabled_return_the_conditional_prediction():
    """Outside ``[start, stop)`` or with ``enabled=False`` a guider is the conditional model, as diffusers'
    ``ClassifierFreeGuidance`` is (one batch; the conditional output even if both are handed in)."""
    sched = samplers.get("ddim").from_config(DDPM)
    sched.set_timesteps(4)
    (c, u), = _preds(1, seed=18)
    guiders = [CFGPlusPlusGuider(guidance_scale=0.5, scheduler=sched, start=0.5),
               CFGPlusPlusGuider(guidance_scale=0.5, scheduler=sched, enabled=False),
               APGGuider(guidance_scale=4.0, enabled=False)]  # fmt: skip
    refs = [ClassifierFreeGuidance(guidance_scale=4.0, start=0.5), ClassifierFreeGuidance(enabled=False),
            ClassifierFreeGuidance(enabled=False)]  # fmt: skip
    for guider, ref in zip(guiders, refs):
        for g in (guider, ref):
            g.set_state(step=0, num_inference_steps=4, timestep=sched.timesteps[0])
        assert guider.num_conditions == ref.num_conditions == 1
        assert torch.equal(guider.forward(c, u).pred, c) and torch.equal(ref.forward(c).pred, c)


def test_cfgpp_guider_config_leaves_out_the_scheduler(tmp_path):
    """The scheduler is runtime state: a saved guider's config holds the CFG++ settings only, and loads back."""
    sched = samplers.get("ddim").from_config(DDPM)
    guider = CFGPlusPlusGuider(guidance_scale=0.4, scheduler=sched)
    assert "scheduler" not in guider.config
    guider.save_pretrained(tmp_path)
    loaded = CFGPlusPlusGuider.from_pretrained(tmp_path)
    assert loaded.scheduler is None and loaded.rule.guidance_scale == 0.4


# ----------------------------------------------------------------------------------------------------------------
# guided stepping: raw CFG on diffusers' own schedulers, and the StepState a rule sees
def test_raw_cfg_per_step_scales_and_rescale_match_diffusers():
    """``raw_cfg`` is diffusers' ``u + w_i (c - u)`` with the scale of model call ``i`` and, with
    ``guidance_rescale``, diffusers' ``rescale_noise_cfg(guided, cond)``. Tolerance: float32 round-off."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    preds = _preds(3, seed=16)
    scales = [2.0, 5.0, 7.5]
    rule = guidance.make("cfg", scales, guidance_rescale=0.7)
    for i, (c, u) in enumerate(preds):
        ref = rescale_noise_cfg(u + scales[i] * (c - u), c, 0.7)
        torch.testing.assert_close(guidance.raw_cfg(rule, c, u, i, 3), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        guidance.raw_cfg(rule, *preds[0], 3, 3)  # model call 3 of 3 does not exist
    with pytest.raises(ValueError, match="per-step values"):
        guidance.raw_cfg(rule, *preds[0], 0, 4)


def test_step_state_reads_alpha_and_sigma_of_the_call():
    """The state a rule sees at call ``i`` of a DDIM plan: ``alpha_i = sqrt(abar_t)``, ``sigma_i = sqrt(1 - abar_t)``
    at ``t = timesteps[i]`` (diffusers' ``alphas_cumprod``)."""
    sched = samplers.get("ddim").from_config(DDPM)
    sched.set_timesteps(4)
    from diffusers import DDIMScheduler

    abar = DDIMScheduler.from_config(DDPM).alphas_cumprod.double()
    for i, t in enumerate(sched.timesteps):
        state = guidance.step_state(sched, i)
        assert state.alpha == pytest.approx(float(abar[int(t)] ** 0.5), rel=1e-5)
        assert state.sigma == pytest.approx(float((1 - abar[int(t)]) ** 0.5), rel=1e-5)


def test_step_kwargs_pass_the_generator_only_to_steps_that_take_one():
    """diffusers' stochastic DDPM/Euler-ancestral steps take ``generator``; PNDM's and DDIM's deterministic ones do not
    (passing it would be a ``TypeError``, dropping it would make the noise ignore the caller's seed)."""
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler

    g = torch.Generator().manual_seed(0)
    assert guidance.step_kwargs(DDPMScheduler(), g) == {"generator": g}
    assert guidance.step_kwargs(EulerAncestralDiscreteScheduler(), g) == {"generator": g}
    assert guidance.step_kwargs(PNDMScheduler(), g) == {}


def test_guided_step_refuses_a_bool_index_and_a_sample_of_another_shape():
    """``index`` must be an integer, not a bool (``True == 1`` would pass as call 1), and the sample must have the
    outputs' shape (a broadcast step would silently mix samples)."""
    sched = samplers.get("ddim").from_config(DDPM)
    sched.set_timesteps(4)
    (c, u), = _preds(1, seed=17)
    rule = guidance.make("cfg", 3.0)
    x = guidance.guided_step(sched, rule, c, u, sched.timesteps[0], torch.randn_like(c), 0)
    with pytest.raises(ValueError, match="must be an integer"):
        guidance.guided_step(sched, rule, c, u, sched.timesteps[1], x, True)
    with pytest.raises(ValueError, match="not the scheduler's next model call 1"):  # converting at one grid point
        guidance.guided_step(sched, rule, c, u, sched.timesteps[1], x, 2)  # and stepping from another
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="same shape"):
        guidance.guided_step(sched, rule, c, u, sched.timesteps[0], torch.randn(1, *c.shape[1:]), 0)


# ----------------------------------------------------------------------------------------------------------------
# atomic writes
def test_a_failed_write_keeps_the_existing_file_and_leaves_no_temporary(tmp_path):
    """A writer that fails part-way: the old file is byte-for-byte intact, no temporary file is left, and an
    ``OSError`` names the target."""
    path = tmp_path / "results.json"
    path.write_text("old contents")

    def fail(p):
        p.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write '.*results\.json': No space left on device"):
        atomic_write(path, fail)
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_write_permissions_follow_the_process_umask(tmp_path):
    """0666 & ~umask, as ``open()`` would give, for a umask other than the usual 022 and
    unlike mkstemp's private 0600 (the expected mode read from the file system)."""
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x"))
        ref = tmp_path / "ref.txt"
        ref.write_text("x")  # the file system's own answer for this umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(ref.stat().st_mode) == 0o640


def test_first_missing_dir_is_the_topmost_and_creatable_dir_finds_the_existing_parent(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    assert first_missing_dir(deep) == (tmp_path / "a").absolute()
    assert first_missing_dir(tmp_path) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        check_creatable_dir(tmp_path / "file" / "sub" / "dir")
    assert check_creatable_dir(deep) == deep and not (tmp_path / "a").exists()  # creates nothing


# ----------------------------------------------------------------------------------------------------------------
# split_samples across simulated processes
def _simulate_split(monkeypatch, n, world):
    """Run ``split_samples`` as each of ``world`` ranks (``distributed_state`` and ``gather_object`` faked): each
    rank's share is captured, then rank 0 assembles all shares. Returns (per-rank indices, rank 0's output, time)."""
    import accelerate.utils

    shares, asked = [], []

    class _Stop(Exception):
        pass

    def make(idx):
        asked.append(list(idx))
        return torch.tensor(idx, dtype=torch.float64)[:, None] * torch.ones(1, 2)

    def capture(obj):
        shares.append(obj[0])
        raise _Stop

    for rank in range(world):
        monkeypatch.setattr(_dist, "distributed_state",
                            lambda r=rank: SimpleNamespace(num_processes=world, process_index=r))  # fmt: skip
        monkeypatch.setattr(accelerate.utils, "gather_object", capture)
        with pytest.raises(_Stop):
            _dist.split_samples(n, make)
    monkeypatch.setattr(_dist, "distributed_state", lambda: SimpleNamespace(num_processes=world, process_index=0))
    timed = [(idx, part, float(r + 1), err) for r, (idx, part, _, err) in enumerate(shares)]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: timed)
    out, seconds = _dist.split_samples(n, make)
    return [s[0] for s in shares], asked, out, seconds


@pytest.mark.parametrize("n,world", [(1, 2), (5, 2), (7, 3), (8, 4), (3, 5), (10, 4), (9, 3)])
def test_split_samples_covers_every_index_once_in_order(monkeypatch, n, world):
    """Brute force: the ranks' shares, concatenated, are exactly ``0..n-1`` in order (contiguous, none twice, none
    missing, a rank with nothing to do never calls ``make``); the assembled output row ``i`` is sample ``i``; the
    time is the slowest share's (fake times 1, 2, ... per rank)."""
    idx, asked, out, seconds = _simulate_split(monkeypatch, n, world)
    assert [i for share in idx for i in share] == list(range(n))
    assert all(a for a in asked)  # make() is never asked for an empty share
    torch.testing.assert_close(out, torch.arange(n, dtype=torch.float64)[:, None].expand(n, 2))
    assert seconds == float(world)


def test_split_samples_failure_names_the_first_failing_rank_with_its_type(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(_dist, "distributed_state", lambda: SimpleNamespace(num_processes=3, process_index=0))
    shares = [([0], torch.zeros(1, 1), 1.0, None), ([1], None, 1.0, ("ValueError", "bad one")),
              ([2], None, 1.0, ("KeyError", "bad two"))]  # fmt: skip
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: shares)
    with pytest.raises(ValueError, match=r"process 1 of 3: ValueError: bad one"):
        _dist.split_samples(3, lambda idx: torch.zeros(len(idx), 1))
