"""Guidance rules on (x0, eps) pairs: CFG, CFG++ and APG, through every fewstep solver."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from _helpers import TinyDenoiser
from diffusers.guiders.guider_utils import rescale_noise_cfg

from fewstep import guidance, samplers
from fewstep.guidance import APG, CFG, CFGPlusPlus, StepState

DDPM = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "clip_sample": False,
}
SHAPE = (3, 2, 4, 4)
# every fewstep solver family, in the configurations that differ in how the pair is used
SOLVERS = {
    "ddim": ("ddim", {}),
    "dpm-solver++ 2M": ("dpm-solver++", {"solver_order": 2}),
    "dpm-solver++ 3M": ("dpm-solver++", {"solver_order": 3}),
    "dpm-solver 2M (noise)": ("dpm-solver++", {"solver_order": 2, "algorithm_type": "dpmsolver"}),
    "unipc bh2": ("unipc", {"solver_order": 2}),
    "unipc bh1 3": ("unipc", {"solver_order": 3, "solver_type": "bh1"}),
}
# and every other registered diffusion sampler in its default configuration (momentum, DC, ...)
SOLVERS.update(
    {
        name: (name, {})
        for name in samplers.names("diffusion", standalone=True)
        if name not in ("ddim", "dpm-solver++", "unipc")
    }
)


@pytest.fixture(scope="module")
def models():
    numel = int(np.prod(SHAPE[1:]))
    return TinyDenoiser(numel, seed=1), TinyDenoiser(numel, seed=2)  # "conditional", "unconditional"


def _x_start(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sample(models, rule, steps=6, sampler=("ddim", {}), uncond_only=False, x=None):
    """Guided sampling loop through ``step_pair`` (``uncond_only``: the unconditional model by itself)."""
    name, kw = sampler
    scheduler = samplers.get(name).from_config(DDPM, **kw)
    scheduler.set_timesteps(steps)
    x = _x_start() if x is None else x
    cond_model, uncond_model = models
    for i, t in enumerate(scheduler.timesteps):
        if uncond_only:
            x = scheduler.step(uncond_model(x, t), t, x).prev_sample
        else:
            x = guidance.guided_step(scheduler, rule, cond_model(x, t), uncond_model(x, t), t, x, i)
    return x, scheduler


def _pairs(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64))
        for _ in range(2)
    ]


STATE = StepState(index=0, num_steps=4, alpha=0.8, sigma=0.6)


def test_registry_names_and_make():
    assert guidance.names() == ["cfg", "cfg++", "apg"]
    assert guidance.get("cfgpp") is CFGPlusPlus and guidance.get("apg") is APG
    with pytest.raises(ValueError, match=r"unknown guidance rule 'pag'; available: cfg, cfg\+\+, apg"):
        guidance.get("pag")
    rule = APG(guidance_scale=4.0)
    assert guidance.make(rule) is rule and guidance.make("cfg++", 0.3).guidance_scale == 0.3
    with pytest.raises(ValueError, match="`guidance_scale`=2.0 given together with a guidance rule object"):
        guidance.make(rule, 2.0)


def test_cfg_matches_diffusers_formula_and_rescale():
    (x0c, ec), (x0u, eu) = _pairs()
    x = STATE.alpha * x0c + STATE.sigma * ec  # a shared x_t: make both pairs consistent with it
    x0u = (x - STATE.sigma * eu) / STATE.alpha
    x0, eps = CFG(5.0)((x0c, ec), (x0u, eu), STATE)
    assert torch.allclose(eps, eu + 5.0 * (ec - eu), atol=1e-12)
    assert torch.allclose(STATE.alpha * x0 + STATE.sigma * eps, x, atol=1e-12)
    x0r, epsr = CFG(5.0, guidance_rescale=0.7)((x0c, ec), (x0u, eu), STATE)
    assert torch.allclose(epsr, rescale_noise_cfg(eu + 5.0 * (ec - eu), ec, 0.7), atol=1e-12)
    assert torch.allclose(STATE.alpha * x0r + STATE.sigma * epsr, x, atol=1e-12)  # still consistent
    assert not torch.allclose(epsr, eps)


@pytest.mark.parametrize("steps", [5, 12])
def test_cfgpp_equals_cfg_with_per_step_scales_on_ddim(models, steps):
    lam = 0.6
    x_pp, scheduler = _sample(models, CFGPlusPlus(lam), steps)
    omegas = guidance.cfgpp_equivalent_scales(lam, guidance.scheduler_rhos(scheduler))
    x_cfg, _ = _sample(models, CFG(omegas), steps)
    assert torch.allclose(x_pp, x_cfg, rtol=0, atol=1e-10)
    assert omegas[-1] == pytest.approx(lam)  # the last step ends at rho = 0
    x_const, _ = _sample(models, CFG(float(np.mean(omegas))), steps)
    assert (x_const - x_pp).abs().max() > 1e-3  # a constant scale is not the same thing


def test_cfgpp_equivalent_scale_depends_on_step_count():
    scheduler = samplers.get("ddim").from_config(DDPM)
    means = {}
    for n in (10, 20, 50):
        scheduler.set_timesteps(n)
        means[n] = float(np.mean(guidance.cfgpp_equivalent_scales(1.0, guidance.scheduler_rhos(scheduler))))
    assert means[10] < means[20] < means[50]
    assert guidance.cfgpp_equivalent_scales(0.5, [math.inf, 3.0, 1.0, 0.0]) == [0.5, 0.5 * 3 / 2, 0.5]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_cfgpp_at_zero_is_unconditional_sampling_exactly(models, solver):
    x_pp, _ = _sample(models, CFGPlusPlus(0.0), sampler=SOLVERS[solver])
    x_u, _ = _sample(models, None, sampler=SOLVERS[solver], uncond_only=True)
    assert torch.equal(x_pp, x_u)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_cfgpp_reaches_every_solver_as_an_inconsistent_pair(models, solver):
    """CFG++ (lam) differs from CFG (lam): the solver really renoises with eps_u; with a conditional model
    equal to the unconditional one, all rules are plain sampling."""
    x_pp, _ = _sample(models, CFGPlusPlus(0.7), sampler=SOLVERS[solver])
    x_cfg, _ = _sample(models, CFG(0.7), sampler=SOLVERS[solver])
    assert torch.isfinite(x_pp).all() and (x_pp - x_cfg).abs().max() > 1e-3
    same = (models[1], models[1])
    x_u, _ = _sample(same, None, sampler=SOLVERS[solver], uncond_only=True)
    for rule in (CFGPlusPlus(0.7), CFG(4.0), APG(4.0, norm_threshold=1.0)):
        assert torch.allclose(_sample(same, rule, sampler=SOLVERS[solver])[0], x_u, atol=1e-12)


def test_cfgpp_ddim_step_is_unconditional_step_plus_guidance(models):
    """Unifying view for DDIM: x' = DDIM_u(x) + alpha' lam (D_c - D_u)."""
    scheduler = samplers.get("ddim").from_config(DDPM)
    scheduler.set_timesteps(4)
    x, t = _x_start(), scheduler.timesteps[1]
    cond, uncond = models[0](x, t), models[1](x, t)
    scheduler.step(uncond, scheduler.timesteps[0], x)  # advance to step 1
    (d_c, _), (d_u, _) = scheduler.convert_model_output(cond, x, 1), scheduler.convert_model_output(uncond, x, 1)
    a_next = float(scheduler.plan.grid.alphas[2])
    ref = samplers.get("ddim").from_config(DDPM)
    ref.set_timesteps(4)
    ref.set_begin_index(1)
    expected = ref.step(uncond, t, x).prev_sample + a_next * 0.4 * (d_c - d_u)
    got = guidance.guided_step(scheduler, CFGPlusPlus(0.4), cond, uncond, t, x, 1)
    assert torch.allclose(got, expected, atol=1e-12)


def test_apg_neutral_settings_are_cfg(models):
    (x0c, ec), (x0u, eu) = _pairs(3)
    neutral = APG(5.0, eta=1.0, norm_threshold=None, momentum=0.0)
    x0, _ = neutral((x0c, ec), (x0u, eu), STATE)
    assert torch.allclose(x0, x0u + 5.0 * (x0c - x0u), atol=1e-12)
    for space in ("x0", "eps"):
        rule = APG(3.0, eta=1.0, norm_threshold=math.inf, momentum=0.0, space=space)
        for solver in ("ddim", "unipc bh2"):
            a, _ = _sample(models, rule, sampler=SOLVERS[solver])
            b, _ = _sample(models, CFG(3.0), sampler=SOLVERS[solver])
            assert torch.allclose(a, b, atol=1e-10)


def test_apg_projection_clip_and_pair_consistency():
    (x0c, ec), (x0u, eu) = _pairs(4)
    x = STATE.alpha * x0c + STATE.sigma * ec
    x0u = (x - STATE.sigma * eu) / STATE.alpha
    w, r = 6.0, 0.5
    x0, eps = APG(w, eta=0.0, norm_threshold=r, momentum=0.0)((x0c, ec), (x0u, eu), STATE)
    update = (x0 - x0c) / (w - 1)
    dims = (1, 2, 3)
    assert torch.allclose((update * x0c).sum(dims), torch.zeros(SHAPE[0], dtype=torch.float64), atol=1e-10)
    assert (update.flatten(1).norm(dim=1) <= r + 1e-12).all()  # clipped, then projected (projection shrinks)
    assert torch.allclose(STATE.alpha * x0 + STATE.sigma * eps, x, atol=1e-12)
    # eta = 1 keeps the whole clipped difference: its norm is exactly r per sample (all exceed r here)
    x1, _ = APG(w, eta=1.0, norm_threshold=r, momentum=0.0)((x0c, ec), (x0u, eu), STATE)
    assert torch.allclose(
        ((x1 - x0c) / (w - 1)).flatten(1).norm(dim=1), torch.full((SHAPE[0],), r, dtype=torch.float64)
    )


def test_apg_momentum_accumulates_and_resets_per_generation(models):
    (x0c, ec), (x0u, eu) = _pairs(5)
    rule = APG(4.0, eta=1.0, norm_threshold=None, momentum=-0.5)
    first = rule((x0c, ec), (x0u, eu), STATE)[0]
    second = rule((x0c, ec), (x0u, eu), StepState(1, 4, 0.8, 0.6))[0]
    delta = x0c - x0u
    assert torch.allclose(first, x0c + 3.0 * delta, atol=1e-12)
    assert torch.allclose(second, x0c + 3.0 * 0.5 * delta, atol=1e-12)  # m = delta - 0.5 delta
    again = rule((x0c, ec), (x0u, eu), STATE)[0]  # index 0: a new generation
    assert torch.equal(again, first)
    a, _ = _sample(models, APG(4.0, norm_threshold=2.0), sampler=SOLVERS["unipc bh2"])
    b, _ = _sample(models, APG(4.0, norm_threshold=2.0, momentum=0.0), sampler=SOLVERS["unipc bh2"])
    rule = APG(4.0, norm_threshold=2.0)
    c1, _ = _sample(models, rule, sampler=SOLVERS["unipc bh2"])
    c2, _ = _sample(models, rule, sampler=SOLVERS["unipc bh2"])
    assert torch.equal(c1, c2) and torch.equal(a, c1) and (a - b).abs().max() > 1e-6


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: CFGPlusPlus(1.5),
         r"`guidance_scale` must be a finite number in \[0, 1\] for CFG\+\+ .*allow_extrapolation.*1\.5"),
        (lambda: CFGPlusPlus(-0.1), r"`guidance_scale` must be a finite number in \[0, 1\].*-0\.1"),
        (lambda: CFGPlusPlus(float("nan")), r"`guidance_scale` must be a finite number"),
        (lambda: APG(eta=-0.5), r"`eta` must be a finite number >= 0, got -0\.5"),
        (lambda: APG(norm_threshold=0.0),
         r"`norm_threshold` must be a finite number in \(0, inf\] or None \(no clipping\), got 0\.0"),
        (lambda: APG(norm_threshold=-3), r"`norm_threshold` must be a finite number in \(0, inf\].*-3"),
        (lambda: APG(momentum=1.0), r"`momentum` must be a finite number in \(-1, 1\), got 1\.0"),
        (lambda: APG(space="v"), r"`space` must be one of \['x0', 'eps'\], got 'v'"),
        (lambda: CFG(-1.0), r"`guidance_scale` must be a finite number >= 0, got -1\.0"),
        (lambda: CFG(3.0, guidance_rescale=1.5), r"`guidance_rescale` must be a finite number in \[0, 1\], got 1\.5"),
        (lambda: StepState(0, 4, 0.5, 0.0), r"`sigma` must be a finite number > 0, got 0\.0"),
        (lambda: APG(norm_dims="12"), r"`norm_dims` must be non-batch dimensions \(ints, not 0\), got '12'"),
        (lambda: APG(2.0, norm_dims=(-4,))(*_pairs(2), STATE),
         r"`norm_dims` \(-4,\) include the batch dimension of 4-D predictions"),
    ],
)
def test_bad_parameters_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_apg_takes_one_norm_dim_as_an_int_and_cfg_a_0d_array():
    cond, uncond = _pairs(2)
    one = APG(3.0, norm_dims=1)(cond, uncond, STATE)
    tup = APG(3.0, norm_dims=(1,))(cond, uncond, STATE)
    assert all(torch.equal(a, b) for a, b in zip(one, tup))
    assert CFG(np.array(3.0)).guidance_scale == 3.0


def test_extrapolation_is_explicit_and_bad_predictions_are_rejected():
    assert CFGPlusPlus(2.0, allow_extrapolation=True).guidance_scale == 2.0
    (x0c, ec), _ = _pairs(6)
    small = (x0c[:2], ec[:2])
    with pytest.raises(ValueError, match=r"same shape \(batch included\); got \(3, 2, 4, 4\) and \(2, 2, 4, 4\)"):
        CFG(3.0)((x0c, ec), small, STATE)
    with pytest.raises(TypeError, match=r"`uncond` must be an \(x0, eps\) pair of tensors"):
        APG()((x0c, ec), x0c, STATE)
    with pytest.raises(ValueError, match=r"has 3 per-step values but sampling runs 4 steps \(one value per solver "
                                         r"step; a step whose implicit "):
        CFG([1.0, 2.0, 3.0])((x0c, ec), (x0c, ec), STATE)


def _affine_models():
    """eps depends on t only (cond and uncond differ): DDIM inversion then sampling is exact."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)

    def model_c(x, t):
        return a * (1 + float(t) / 1000) + 0 * x

    def model_u(x, t):
        return b * (1 - float(t) / 2000) + 0 * x

    return model_c, model_u


@pytest.mark.parametrize("rule", [CFGPlusPlus(0.8), CFG(5.0), CFG([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])],
                         ids=["cfg++", "cfg", "cfg-per-step"])
def test_guided_ddim_inversion_round_trip(rule):
    models = _affine_models()
    images = _x_start(3).clamp(-1, 1)
    scheduler = samplers.get("ddim").from_config(DDPM, timestep_spacing="trailing")
    scheduler.set_timesteps(8)
    latent = guidance.ddim_invert(lambda x, t: (models[0](x, t), models[1](x, t)), images, scheduler, rule)
    back, _ = _sample(models, rule, steps=8, sampler=("ddim", {"timestep_spacing": "trailing"}), x=latent)
    assert torch.allclose(back, images, atol=1e-8)
    with pytest.raises(ValueError, match="must be a fewstep scheduler after set_timesteps"):
        guidance.ddim_invert(lambda x, t: (x, x), images, samplers.get("ddim").from_config(DDPM), rule)



def test_cfgpp_inversion_is_cfg_inversion_with_the_equivalent_schedule(models):
    """CFG++ (first order) is CFG at w_i = lam rho_i / (rho_i - rho_{i+1}) when sampling, and the same holds for
    inversion once each level gets its own scale (a per-step schedule was applied in reverse before)."""
    scheduler = samplers.get("ddim").from_config(DDPM, timestep_spacing="trailing")
    scheduler.set_timesteps(6)
    grid = scheduler.plan.grid
    rho = np.asarray(grid.sigmas) / np.asarray(grid.alphas)
    lam = 0.7
    schedule = [lam * rho[i] / (rho[i] - rho[i + 1]) for i in range(6)]
    images = _x_start(3).clamp(-1, 1)
    fn = lambda x, t: (models[0](x, t), models[1](x, t))  # noqa: E731
    pp = guidance.ddim_invert(fn, images, scheduler, CFGPlusPlus(lam))
    cfg = guidance.ddim_invert(fn, images, scheduler, CFG(schedule))
    torch.testing.assert_close(cfg, pp, rtol=1e-9, atol=1e-9)


def test_half_precision_inversion_steps_in_float32():
    """As ``step``: half images are inverted in float32 (the model sees the images' dtype) and returned in half, so the
    result is the float32 inversion rounded once; it rounded to half at every level before."""
    models = _affine_models()
    seen = []

    def fn(x, t):
        seen.append(x.dtype)
        return tuple(m(x, t).to(x.dtype) for m in models)

    scheduler = samplers.get("ddim").from_config(DDPM, timestep_spacing="trailing")
    scheduler.set_timesteps(8)
    images = _x_start(3).clamp(-1, 1).to(torch.float16)
    half = guidance.ddim_invert(fn, images, scheduler, CFGPlusPlus(0.8))
    assert half.dtype == torch.float16 and set(seen) == {torch.float16}
    reference = guidance.ddim_invert(lambda x, t: tuple(m(x, t).half().float() for m in models), images.float(),
                                     scheduler, CFGPlusPlus(0.8))
    torch.testing.assert_close(half, reference.half(), atol=0, rtol=0)


def test_inversion_refuses_plans_without_one_call_per_level():
    from fewstep.solvers.engine import StepDecision
    from fewstep.solvers.s3 import SolverSchedule

    schedule = SolverSchedule([900.0, 500.0, 100.0], [StepDecision(), StepDecision(corrector="implicit"),
                                                     StepDecision()])
    scheduler = samplers.get("s3").from_config(DDPM, s3_schedule=schedule.to_dict())
    scheduler.set_timesteps(schedule.nfe)
    with pytest.raises(ValueError, match="must make one model call per grid level"):
        guidance.ddim_invert(lambda x, t: (x, x), _x_start(2), scheduler, CFG(2.0))


def test_cfgpp_inversion_mirrors_the_sampler(models):
    """CFG++ inversion denoises with eps_u and renoises with eps_lam; at lam = 0 it is unconditional inversion."""
    scheduler = samplers.get("ddim").from_config(DDPM)
    scheduler.set_timesteps(5)
    images = _x_start(4).clamp(-1, 1)
    fn = lambda x, t: (models[0](x, t), models[1](x, t))  # noqa: E731
    zero_pp = guidance.ddim_invert(fn, images, scheduler, CFGPlusPlus(0.0))
    zero_cfg = guidance.ddim_invert(fn, images, scheduler, CFG(0.0))
    assert torch.equal(zero_pp, zero_cfg)
    assert (guidance.ddim_invert(fn, images, scheduler, CFGPlusPlus(0.5)) - zero_pp).abs().max() > 1e-3


@pytest.mark.parametrize(
    "rule",
    [CFG(3.0, guidance_rescale=0.5), CFGPlusPlus(0.6), APG(5.0, norm_threshold=2.0), APG(5.0, space="eps")],
    ids=["cfg-rescale", "cfg++", "apg", "apg-eps"],
)
@pytest.mark.parametrize("sampler", samplers.names("diffusion", standalone=True))
def test_guided_loop_on_meta_device(rule, sampler):
    """No .item(), .cpu() or tensor-valued branch in a guided step: the whole loop runs on meta tensors."""
    scheduler = samplers.get(sampler).from_config(DDPM)
    scheduler.set_timesteps(5, device="meta")
    x = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.float16)
    for i, t in enumerate(scheduler.timesteps):
        x = guidance.guided_step(scheduler, rule, torch.empty_like(x), torch.empty_like(x), t, x, i)
    assert x.device.type == "meta" and x.dtype == torch.float16


def test_public_guidance_helpers_check_their_inputs():
    """Found by probing: apg_update took r = 0 (guidance zeroed) and r < 0 (guidance reversed), repeated or
    out-of-range norm_dims failed inside torch at the first step, zero Hutchinson probes returned NaN,
    cfgpp_equivalent_scales took a negative lambda and equal infinite levels, and scheduler_rhos read an Euler
    scheduler's 1000 training levels before set_timesteps."""
    from diffusers import EulerDiscreteScheduler

    from fewstep.guidance.rules import apg_update, cfgpp_equivalent_scales, scheduler_rhos
    from fewstep.guidance.stsl import fd_hutchinson_trace

    d, c = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    for r in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"`norm_threshold` must be a finite number in \(0, inf\] or None"):
            apg_update(d, c, 1.0, r)
    torch.testing.assert_close(apg_update(d, c, 1.0, None), d)
    with pytest.raises(ValueError, match=r"`norm_dims` must be distinct non-batch dimensions"):
        APG(norm_dims=[1, 1])
    with pytest.raises(ValueError, match=r"`norm_dims` \(5,\) name dimensions that 2-D predictions do not have"):
        apg_update(d, c, 1.0, None, norm_dims=[5])
    with pytest.raises(ValueError, match=r"`probes` must have shape \[P, \*x.shape\] .* with P >= 1"):
        fd_hutchinson_trace(torch.tanh, torch.zeros(2, 3), torch.zeros(0, 2, 3))
    with pytest.raises(ValueError, match=r"`guidance_scale` \(CFG\+\+ lambda\) must be a finite number >= 0"):
        cfgpp_equivalent_scales(-1.0, [2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"`rhos` must be a strictly decreasing sequence"):
        cfgpp_equivalent_scales(0.5, [math.inf, math.inf, 0.0])
    assert cfgpp_equivalent_scales(0.5, [math.inf, 1.0, 0.0]) == [0.5, 0.5]
    assert all(type(w) is float for w in cfgpp_equivalent_scales(0.5, [2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler has no sampling grid yet: call set_timesteps"):
        scheduler_rhos(EulerDiscreteScheduler())
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(4)
    assert scheduler_rhos(euler).shape == (5,)


def test_apg_update_and_rescale_check_eta_phi_and_shapes():
    """Found by probing: apg_update took eta = NaN (all NaN) and eta = "0" (a torch index error), and projected every
    sample on sample 0's direction for cond [1, 5] against diff [2, 5] (cond [2, 1] also broadcast); rescale_to_std
    took phi = NaN, 5 and a string and broadcast mismatched shapes."""
    from fewstep.guidance.rules import apg_update, rescale_to_std

    g = torch.Generator().manual_seed(0)
    d, c = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    for eta in (float("nan"), -1.0, "0", None):
        with pytest.raises(ValueError, match=r"`eta` must be a finite number >= 0, got"):
            apg_update(d, c, eta, None)
    for bad in (c[:1], c[:, :1]):
        with pytest.raises(ValueError, match=r"`cond` must have the shape of `diff` \(2, 5\) .*got \(\d, \d\)"):
            apg_update(d, bad, 0.0, None)
    assert apg_update(d, c, np.float32(0.5), None).shape == d.shape
    for phi in (float("nan"), 5, -0.1, "a"):
        with pytest.raises(ValueError, match=r"`phi` \(guidance_rescale\) must be a finite number in \[0, 1\], got"):
            rescale_to_std(d, c, phi)
    with pytest.raises(ValueError, match=r"`cond` must have the shape of `guided` \(2, 5\) .*got \(1, 5\)"):
        rescale_to_std(d, c[:1], 0.5)
    with pytest.raises(TypeError, match=r"`cond` must be a tensor of `guided`.s shape \(2, 5\), got list"):
        rescale_to_std(d, [1.0], 0.5)


def test_guidance_rescale_leaves_predictions_without_spread_unrescaled():
    """Found by probing: CFG(3, guidance_rescale=0.7) returned NaN where the guided eps has zero per-sample std (a
    constant eps, or one value per sample). diffusers' rescale_noise_cfg divides by that std and gives NaN too; here
    such a sample keeps the plain CFG prediction. Samples with spread still match diffusers exactly."""
    rule = CFG(3.0, guidance_rescale=0.7)
    ones = torch.ones(2, 4, dtype=torch.float64)
    cond, uncond = (ones, ones), (0 * ones, 0.5 * ones)
    assert torch.isnan(rescale_noise_cfg(uncond[1] + 3 * (cond[1] - uncond[1]), cond[1], 0.7)).all()  # diffusers
    x0, eps = rule(cond, uncond, STATE)
    torch.testing.assert_close(eps, torch.full_like(ones, 2.0))  # plain CFG: 0.5 + 3 * 0.5
    torch.testing.assert_close(x0, torch.full_like(ones, 3.0))
    col = torch.arange(3.0, dtype=torch.float64)[:, None]  # [N, 1]: the std of one value is undefined
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even computed (torch warns about the degrees of freedom)
        x0, eps = rule((col, col), (col / 2, col / 2), StepState(0, 4, 0.8, 0.6))
    torch.testing.assert_close(eps, col / 2 + 3 * (col / 2))
    # one sample without spread, one with: the first is left alone, the second equals diffusers
    (c0, c1), (u0, u1) = _pairs(3, shape=(2, 8))
    c1[0], u1[0] = 1.0, 0.0
    _, eps = rule((c0, c1), (u0, u1), STATE)
    guided = u1 + 3 * (c1 - u1)
    torch.testing.assert_close(eps[0], guided[0])
    torch.testing.assert_close(eps[1], rescale_noise_cfg(guided, c1, 0.7)[1])
    assert torch.isfinite(guidance.raw_cfg(rule, ones, 0 * ones, 0, 4)).all()


def test_raw_cfg_checks_shapes_and_takes_numpy_indices():
    """Found by probing: raw_cfg broadcast out_cond [1, 4] against out_uncond [2, 4] (guided_step refuses it), and
    refused numpy integer indices with "must be an integer ... got np.int64(0)"."""
    c, u = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"same shape \(batch included; no broadcasting\); got \(1, 4\) and \(2, 4\)"):
        guidance.raw_cfg(CFG(3.0), c[:1], u, 0, 5)
    torch.testing.assert_close(guidance.raw_cfg(CFG(3.0), c, u, np.int64(1), np.int64(5)), u + 3 * (c - u))
    with pytest.raises(ValueError, match=r"`index` must be an integer in \[0, 4\], got 5"):
        guidance.raw_cfg(CFG(3.0), c, u, 5, 5)


def test_step_state_takes_numpy_scalars_and_stores_python_numbers():
    """Found by probing: StepState(0, np.int64(5), ...) said "`num_steps` must be an integer > index (0), got
    np.int64(5)"."""
    state = StepState(np.int64(1), np.int64(5), np.float32(0.8), np.float64(0.6))
    assert (state.index, state.num_steps) == (1, 5) and type(state.index) is int and type(state.num_steps) is int
    assert type(state.alpha) is float and type(state.sigma) is float and state.sigma == 0.6
    got = re.escape(repr(np.int64(1)))  # numpy 2: np.int64(1); numpy 1: 1
    with pytest.raises(ValueError, match=r"`num_steps` must be an integer > index \(1\), got " + got):
        StepState(1, np.int64(1), 0.8, 0.6)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number >= 0, got 'a'"):
        StepState(0, 4, "a", 0.6)


def test_hutchinson_and_surrogate_check_shapes_and_dim():
    """Found by probing: fd_hutchinson_trace took fx = zeros(1, 1) for x [2, 3] (garbage [364, 2300] instead of ~6)
    and an fn that changes the shape; stsl_surrogate divided by dim = 0 (ZeroDivisionError) and flipped the trace
    term's sign for dim = -1."""
    from fewstep.guidance.stsl import fd_hutchinson_trace, stsl_surrogate

    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probes = torch.randn(64, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`fx` must have the shape of `x` \(2, 3\) .*got \(1, 1\)"):
        fd_hutchinson_trace(lambda v: 2 * v, x, probes, fx=torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"`fn\(x\)` must have the shape of `x` \(2, 3\) .*got \(2, 1\)"):
        fd_hutchinson_trace(lambda v: v.sum(1, keepdim=True), x, probes)
    # a linear map: the finite difference is exact, (1 / delta P) sum_p xi_p . (2 delta xi_p) = 2 mean_p |xi_p|^2
    # (~6 = Tr 2I in expectation); measured 6e-14 off (rounding)
    torch.testing.assert_close(fd_hutchinson_trace(lambda v: 2 * v, x, probes, fx=2 * x),
                               2 * probes.pow(2).sum(-1).mean(0), atol=1e-10, rtol=0)
    for dim in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"`dim` \(values per sample\) must be an integer >= 1, got"):
            stsl_surrogate(torch.ones(2), torch.ones(2), 0.1, dim)
    with pytest.raises(ValueError, match=r"`eta` must be a finite number >= 0, got nan"):
        stsl_surrogate(torch.ones(2), torch.ones(2), float("nan"), 4)
    assert float(stsl_surrogate(torch.ones(2), torch.ones(2), 0.1, np.int64(2))) == pytest.approx(2.1)


def test_guided_step_forgets_apg_momentum_at_a_part_way_start():
    """Found by probing: an img2img loop (set_begin_index) never passed model call 0, so the rule's reset at index 0
    never fired and APG's momentum leaked from one generation into the next."""
    from fewstep import samplers
    from fewstep.guidance import APG, guided_step

    rule = APG(4.0, momentum=-0.5)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 2, 4, 4, generator=g)

    def generation():
        sched = samplers.get("unipc")()
        sched.set_timesteps(6)
        sched.set_begin_index(2)
        x = start
        for j, t in enumerate(sched.timesteps[2:]):
            x = guided_step(sched, rule, 0.3 * x + 0.1, 0.2 * x, t, x, 2 + j)
        return x

    assert torch.equal(generation(), generation())


def test_convert_model_output_checks_its_step_index():
    """A public method guided_step calls: before set_timesteps it named a NoneType attribute; -1 converted silently
    at the last grid point and 99 raised a bare IndexError (found by the type-check probe)."""
    sched = samplers.get("unipc")()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="call `set_timesteps` before `convert_model_output`"):
        sched.convert_model_output(x, x, 0)
    sched.set_timesteps(5)
    for bad in (-1, 5, 2.0, True):
        with pytest.raises(ValueError, match=rf"`step_index` .* must be an integer in \[0, 4\], got {bad}"):
            sched.convert_model_output(x, x, bad)
    x0, eps = sched.convert_model_output(x + 1.0, x, np.int64(4))
    torch.testing.assert_close(eps, x + 1.0)  # epsilon prediction: eps is the model output itself
    # an integer CPU tensor, as guided_step's `index` takes; a float or bool tensor is refused
    torch.testing.assert_close(sched.convert_model_output(x + 1.0, x, torch.tensor(4))[0], x0)
    for bad in (torch.tensor(2.0), torch.tensor(True), torch.tensor([2])):
        with pytest.raises(ValueError, match=r"`step_index` .* must be an integer in \[0, 4\]"):
            sched.convert_model_output(x, x, bad)
