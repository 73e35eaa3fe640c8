"""Gaps a mutation probe of guided stepping (``guidance.stepping``), STSL, guided DDIM inversion and the static
(graph-mode) guidance step left open. Every reference is independent of fewstep's code paths: diffusers' own
``DDIMInverseScheduler`` / ``DDIMScheduler`` loops, ``rescale_noise_cfg``, and the papers' / docstrings' formulas
written out again here in float64."""

from __future__ import annotations

import pytest
import torch
from _helpers import TinyDenoiser
from diffusers import DDIMInverseScheduler
from diffusers.guiders.guider_utils import rescale_noise_cfg

from fewstep import guidance, samplers
from fewstep.guidance import CFG, CFGPlusPlus

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
        "clip_sample": False}  # fmt: skip
SHAPE = (2, 2, 4, 4)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _models(seed=1):
    numel = SHAPE[1] * SHAPE[2] * SHAPE[3]
    return TinyDenoiser(numel, seed=seed), TinyDenoiser(numel, seed=seed + 1)


def _abar(config):
    """diffusers' ``alphas_cumprod`` (float32, as fewstep's grids read them) in float64."""
    return DDIMInverseScheduler.from_config(config).alphas_cumprod.double()


# ----------------------------------------------------------------------------------------------------------------
# guided DDIM inversion against diffusers' DDIMInverseScheduler and the CFG++ paper's inversion
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
def test_cfg_inversion_is_diffusers_ddim_inverse_scheduler_with_raw_cfg(spacing, offset):
    """Per-step CFG ``w_k`` on an epsilon model: each inversion step is diffusers' ``DDIMInverseScheduler.step`` fed
    ``u + w_k (c - u)``, the model called at the inverse scheduler's timestep (the level it goes up to), and ``w_k``
    the scale sampling applies at that level (inverse step ``j`` is sampling step ``n - 1 - j``). float64 on both
    sides (diffusers' float32 ``alphas_cumprod`` read as float64, as fewstep reads them): 1e-10 is rounding."""
    config = {**DDPM, "timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": True}
    n, scales = 5, [1.5, 3.0, 5.0, 2.0, 7.0]
    mc, mu = _models()
    images = _randn(*SHAPE, seed=3).clamp(-1, 1)
    sched = samplers.get("ddim").from_config(config)
    sched.set_timesteps(n)
    seen = []

    def fn(x, t):
        seen.append(int(t))
        return mc(x, t), mu(x, t)

    got = guidance.ddim_invert(fn, images, sched, CFG(scales))
    inv = DDIMInverseScheduler.from_config(config)
    inv.set_timesteps(n)
    inv.alphas_cumprod = inv.alphas_cumprod.double()
    x = images.clone()
    for j, t in enumerate(inv.timesteps):
        c, u = mc(x, t), mu(x, t)
        x = inv.step(u + scales[n - 1 - j] * (c - u), int(t), x).prev_sample
    assert seen == [int(t) for t in inv.timesteps]
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)


def test_cfgpp_inversion_is_the_papers_update():
    """CFG++ inversion (Chung et al. 2025 sec. 3.3; research note 1.4): from level ``k+1`` to ``k`` with the model at
    ``t_k``, ``D = (x - s_{k+1} eps_u) / a_{k+1}`` and ``x_k = a_k D + s_k (eps_u + lam (eps_c - eps_u))``; the grid
    read from diffusers' ``alphas_cumprod`` at the DDIM timesteps. float64: 1e-10 is rounding."""
    n, lam = 4, 0.7
    mc, mu = _models(seed=4)
    images = _randn(*SHAPE, seed=5).clamp(-1, 1)
    sched = samplers.get("ddim").from_config({**DDPM, "timestep_spacing": "trailing"})
    sched.set_timesteps(n)
    got = guidance.ddim_invert(lambda x, t: (mc(x, t), mu(x, t)), images, sched, CFGPlusPlus(lam))
    abar = _abar(DDPM)
    ts = [int(t) for t in sched.timesteps]  # 999, 749, 499, 249; the level below the last is clean (alpha 1)
    a = [float(abar[t]) ** 0.5 for t in ts] + [1.0]
    s = [(1 - float(abar[t])) ** 0.5 for t in ts] + [0.0]
    x = images.clone()
    for k in range(n - 1, -1, -1):
        c, u = mc(x, ts[k]), mu(x, ts[k])
        d = (x - s[k + 1] * u) / a[k + 1]
        x = a[k] * d + s[k] * (u + lam * (c - u))
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)


def test_cfg_inversion_of_a_v_model_rescales_the_raw_v_at_the_target_level():
    """A v-prediction model with ``guidance_rescale``: the raw guided ``v = v_u + w (v_c - v_u)`` is rescaled as
    diffusers does (``rescale_noise_cfg(v, v_c, phi)``) and converted at the level the model was called at (``t_k``:
    ``eps = s_k x + a_k v``), then ``x_k = a_k (x - s_{k+1} eps) / a_{k+1} + s_k eps`` (module docstring). float64:
    1e-10 is rounding."""
    n, w, phi = 4, 4.0, 0.7
    mc, mu = _models(seed=6)
    images = _randn(*SHAPE, seed=7).clamp(-1, 1)
    config = {**DDPM, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    sched = samplers.get("ddim").from_config(config)
    sched.set_timesteps(n)
    got = guidance.ddim_invert(lambda x, t: (mc(x, t), mu(x, t)), images, sched, CFG(w, guidance_rescale=phi))
    abar = _abar(DDPM)
    ts = [int(t) for t in sched.timesteps]
    a = [float(abar[t]) ** 0.5 for t in ts] + [1.0]
    s = [(1 - float(abar[t])) ** 0.5 for t in ts] + [0.0]
    x = images.clone()
    for k in range(n - 1, -1, -1):
        vc, vu = mc(x, ts[k]), mu(x, ts[k])
        v = rescale_noise_cfg(vu + w * (vc - vu), vc, phi)
        eps = s[k] * x + a[k] * v
        x = a[k] * (x - s[k + 1] * eps) / a[k + 1] + s[k] * eps
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)



def test_inversion_refuses_a_plan_with_an_analytical_first_step():
    """An s3 schedule with an analytical first step (``afs``) makes one call per grid level but starts sampling one
    level before its grid: inverting to its grid's first level is not what sampling maps back, so it is refused."""
    from fewstep.solvers.engine import StepDecision

    sched = _s3_scheduler([StepDecision("data", 1), StepDecision("data", 2), StepDecision("data", 1)],
                          [900.0, 500.0, 100.0], afs="zero_x0")  # fmt: skip
    assert sched.plan.analytic_start is not None and len(sched.plan.calls) == sched.plan.num_steps
    with pytest.raises(ValueError, match="analytical first step"):
        guidance.ddim_invert(lambda x, t: (x, x), _randn(*SHAPE, seed=25), sched, CFG(2.0))

# ----------------------------------------------------------------------------------------------------------------
# guided_step: clip once after combining, s3 call bookkeeping, half precision
def test_guided_cfg_with_clip_sample_is_diffusers_ddim_fed_raw_cfg():
    """With ``clip_sample`` the guided ``x0`` is clipped once, after combining (diffusers clips the ``x0`` of
    ``u + w (c - u)``); clipping each branch first is another result wherever a branch leaves ``[-r, r]``. Stock
    ``DDIMScheduler`` loop as the reference, float64 alphas (1e-10: rounding)."""
    from diffusers import DDIMScheduler

    config = {**DDPM, "clip_sample": True, "clip_sample_range": 1.0, "steps_offset": 1}
    mc, mu = _models(seed=8)
    x_start = 1.5 * _randn(*SHAPE, seed=9)
    ours = samplers.get("ddim").from_config(config)
    ours.set_timesteps(5)
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(5)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    rule, w = CFG(6.0), 6.0
    x = y = x_start
    for i, t in enumerate(ours.timesteps):
        x = guidance.guided_step(ours, rule, 3 * mc(x, t), mu(x, t), t, x, i)  # x3: the conditional x0 leaves [-1, 1]
        c, u = 3 * mc(y, t), mu(y, t)
        y = ref.step(u + w * (c - u), t, y).prev_sample
    torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def _s3_scheduler(decisions, times, **schedule_kw):
    from fewstep.solvers.s3 import SolverSchedule

    schedule = SolverSchedule(times, decisions, **schedule_kw)
    sched = samplers.get("s3").from_config(DDPM, s3_schedule=schedule.to_dict())
    sched.set_timesteps(schedule.nfe)
    return sched


def test_guided_step_reads_the_grid_point_of_each_call_of_an_implicit_corrector_schedule():
    """An s3 schedule with implicit correctors calls the model twice at a grid point: a per-point CFG schedule
    ``w_i`` applies at point ``i`` on both calls. Reference: the functional engine fed CFG written out on the pairs
    at each call's grid point (``x0 = x0_u + w_i (x0_c - x0_u)``, same for ``eps``). float64: 1e-10 is rounding."""
    from fewstep.solvers.engine import StepDecision, sample_loop

    decisions = [StepDecision("data", 1, corrector="implicit"), StepDecision("data", 2, corrector="implicit"),
                 StepDecision("data", 1)]  # fmt: skip
    sched = _s3_scheduler(decisions, [900.0, 500.0, 100.0])
    plan = sched.plan
    assert plan.calls == [(0, False), (1, False), (1, True), (2, False), (2, True)]
    scales = [2.0, 6.0, 3.5]
    mc, mu = _models(seed=10)
    x_start = _randn(*SHAPE, seed=11)
    x = x_start
    for k, t in enumerate(sched.timesteps):
        x = guidance.guided_step(sched, CFG(scales), mc(x, t), mu(x, t), t, x, k)
    g = plan.grid

    def pair_fn(z, i):
        a, s, t = float(g.alphas[i]), float(g.sigmas[i]), g.timesteps[i]
        ec, eu = mc(z, t), mu(z, t)
        eps = eu + scales[i] * (ec - eu)
        return (z - s * eps) / a, eps

    torch.testing.assert_close(x, sample_loop(pair_fn, x_start, plan), rtol=0, atol=1e-10)


def test_apg_momentum_carries_over_the_second_call_at_the_first_grid_point():
    """An analytical first step whose implicit corrector re-evaluates grid point 0: the second call there is a
    ``repeat`` and must not reset APG's momentum (only a generation's first call does). Reference: the functional
    engine from ``analytic_start.start(noise)`` fed APG written out from the paper (Sadat et al. 2025, Alg. 1, x0
    space, ``eta = 0``, no clip: ``m <- Delta + beta m``, ``D = D_c + (w - 1) m_perp``; ``eps`` kept consistent).
    float64: 1e-10 is rounding."""
    from fewstep.guidance import APG
    from fewstep.solvers.engine import StepDecision, sample_loop

    decisions = [StepDecision("data", 1, corrector="implicit"), StepDecision("data", 2, corrector="implicit"),
                 StepDecision("data", 1)]  # fmt: skip
    sched = _s3_scheduler(decisions, [900.0, 500.0, 100.0], afs="zero_x0")
    plan = sched.plan
    assert plan.calls == [(0, False), (0, True), (1, False), (1, True)]
    w, beta = 4.0, -0.5
    mc, mu = _models(seed=12)
    noise = _randn(*SHAPE, seed=13)
    x = noise * sched.init_noise_sigma
    rule = APG(w, eta=0.0, norm_threshold=None, momentum=beta)
    for k, t in enumerate(sched.timesteps):
        x = guidance.guided_step(sched, rule, mc(x, t), mu(x, t), t, x, k)
    g = plan.grid
    state = {"m": torch.zeros(SHAPE, dtype=torch.float64)}

    def pair_fn(z, i):
        a, s, t = float(g.alphas[i]), float(g.sigmas[i]), g.timesteps[i]
        ec, eu = mc(z, t), mu(z, t)
        dc, du = (z - s * ec) / a, (z - s * eu) / a
        m = (dc - du) + beta * state["m"]
        state["m"] = m
        unit = dc / dc.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        perp = m - (m * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
        d = dc + (w - 1) * perp
        return d, (z - a * d) / s

    ref = sample_loop(pair_fn, plan.analytic_start.start(noise), plan)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)


def test_guided_step_in_half_precision_is_the_schedulers_own_half_step():
    """CFG at scale 1 on equal outputs is the model itself (diffusers' semantics), so in float16 a guided loop must be
    the scheduler's own ``step`` loop bit for bit: the conversion in float32 and the float32 sample the scheduler
    kept from its previous step (a half-precision conversion or a re-rounded sample differs in the last bits)."""
    mc, _ = _models(seed=14)
    x_start = _randn(*SHAPE, seed=15).half()
    loops = []
    for guided in (True, False):
        sched = samplers.get("dpm-solver++").from_config(DDPM, solver_order=2)
        sched.set_timesteps(8)
        x = x_start
        for i, t in enumerate(sched.timesteps):
            out = mc(x.double(), t).half()
            if guided:
                x = guidance.guided_step(sched, CFG(1.0), out, out, t, x, i)
            else:
                x = sched.step(out, t, x).prev_sample
        loops.append(x)
    assert loops[0].dtype == torch.float16
    assert torch.equal(loops[0], loops[1])


def test_guided_sde_steps_draw_their_noise_from_the_callers_generator():
    """A stochastic (SDE-DPM-Solver++) guided run with a seeded generator is diffusers' own
    ``DPMSolverMultistepScheduler`` loop fed raw CFG with a generator of the same seed: the noise comes from the
    caller's generator, not torch's global one. Tolerance: diffusers keeps its sigmas in float32 (measured ~1e-7);
    noise from another stream is O(1) off."""
    from diffusers import DPMSolverMultistepScheduler

    config = {**DDPM, "algorithm_type": "sde-dpmsolver++", "solver_order": 2}
    mc, mu = _models(seed=16)
    x_start = _randn(*SHAPE, seed=17)
    w = 3.0
    ours = samplers.get("dpm-solver++").from_config(config)
    ours.set_timesteps(6)
    ref = DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(6)
    assert [int(t) for t in ours.timesteps] == [int(t) for t in ref.timesteps]
    g_ours, g_ref = torch.Generator().manual_seed(18), torch.Generator().manual_seed(18)
    x = y = x_start
    torch.manual_seed(0)
    for i, t in enumerate(ours.timesteps):
        x = guidance.guided_step(ours, CFG(w), mc(x, t), mu(x, t), t, x, i, generator=g_ours)
        c, u = mc(y, t), mu(y, t)
        y = ref.step(u + w * (c - u), t, y, generator=g_ref).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)



def test_diffusers_multistep_schedulers_do_not_take_pairs():
    """diffusers' DPM-Solver and UniPC have a ``convert_model_output`` of their own but no ``(x0, eps)`` entry point:
    they run raw CFG, and a pair rule on them is refused up front (not an ``AttributeError`` mid-step)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        sched = cls.from_config(DDPM)
        sched.set_timesteps(4)
        assert hasattr(sched, "convert_model_output") and not guidance.supports_pairs(sched)
        c = torch.zeros(1, 1, 2, 2)
        with pytest.raises(ValueError, match="needs a fewstep scheduler"):
            guidance.guided_step(sched, CFG(3.0), c, c, sched.timesteps[0], c)
    assert guidance.supports_pairs(samplers.get("dpm-solver++").from_config(DDPM))

def test_raw_cfg_rescales_below_one_half():
    """``guidance_rescale`` phi in (0, 1) blends the rescaled and the plain guided output: any phi > 0 acts, as
    diffusers' ``rescale_noise_cfg`` (reference; float32 round-off 1e-6)."""
    c, u = 2 * _randn(*SHAPE, seed=19).float(), _randn(*SHAPE, seed=20).float()
    for phi in (0.05, 0.3):
        got = guidance.raw_cfg(CFG(5.0, guidance_rescale=phi), c, u, 0, 4)
        torch.testing.assert_close(got, rescale_noise_cfg(u + 5.0 * (c - u), c, phi), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, u + 5.0 * (c - u), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# STSL: the stochastic DDIM outer step and the evaluation count of grouped probes
def _stsl_problem():
    from fewstep.guidance import InverseProblem
    from fewstep.guidance.operators import BoxInpainting

    op = BoxInpainting(4, box=2)
    return op, InverseProblem(op, op(_randn(2, 1, 4, 4, seed=21)))


def test_stsl_stochastic_ddim_step_is_song_eq12_with_the_callers_generator():
    """``ddim_eta > 0``: after the inner step, ``z' = a' z0 + sqrt(1 - a'^2 - c^2) eps + c xi`` with Song et al.'s
    ``c = eta sqrt((1 - a'^2)/(1 - a^2)) sqrt(1 - a^2/a'^2)`` and ``xi`` standard normal from the caller's generator
    (drawn in float32). First-order inner step (trace weight 0), one inner iteration, ``eps`` reused. float64:
    1e-10 is rounding."""
    from fewstep.guidance import STSL

    op, problem = _stsl_problem()
    alphas, sigmas = [0.6, 0.8, 0.95], [0.8, 0.6, (1 - 0.95**2) ** 0.5]
    zeta, ddim_eta = 0.3, 0.8
    z_start = _randn(2, 1, 4, 4, seed=22)

    def eps_fn(z):
        return torch.tanh(z) + 0.1 * z * z

    def model_fn(z, i):
        eps = eps_fn(z)
        return (z - sigmas[i] * eps) / alphas[i], eps

    method = STSL(eta=0.0, step_size=zeta, inner_steps=1, init="noise", ddim_eta=ddim_eta)
    torch.manual_seed(123)  # the global stream must not be what is used
    got = method.sample(model_fn, problem, z_start, alphas, sigmas, torch.Generator().manual_seed(7)).sample
    g = torch.Generator().manual_seed(7)
    z = z_start
    for i in range(2):
        a, s, a_n = alphas[i], sigmas[i], alphas[i + 1]
        zg = z.detach().requires_grad_(True)
        eps = eps_fn(zg)
        (grad,) = torch.autograd.grad((problem.measurement - op((zg - s * eps) / a)).flatten(1).norm(dim=1).sum(), zg)
        z = (z - zeta * grad).detach()
        z0 = (z - s * eps.detach()) / a
        c = ddim_eta * ((1 - a_n**2) / (1 - a**2)) ** 0.5 * (1 - a**2 / a_n**2) ** 0.5
        xi = torch.randn(z.shape, generator=g, dtype=torch.float32).double()
        z = a_n * z0 + (1 - a_n**2 - c**2) ** 0.5 * eps.detach() + c * xi
    torch.testing.assert_close(got, z, rtol=0, atol=1e-10)


def test_stsl_counts_every_probe_evaluation_of_a_partial_group():
    """NFE is ``K (1 + P)`` per step whatever ``probe_batch`` is: 3 probes in groups of 2 (a full and a partial group)
    are 3 evaluations, counted by brute force here as rows the model saw divided by the batch size."""
    from fewstep.guidance import STSL

    _, problem = _stsl_problem()
    rows = []

    def model_fn(z, i):
        rows.append(z.shape[0])
        eps = torch.tanh(z)
        return (z - 0.8 * eps) / 0.6, eps

    res = STSL(eta=0.5, num_probes=3, probe_batch=2, inner_steps=2, init="noise").sample(
        model_fn, problem, _randn(2, 1, 4, 4, seed=23), [0.6, 1.0], [0.8, 0.0], torch.Generator().manual_seed(0))
    assert sum(rows) // 2 == 2 * (1 + 3) == res.nfe == res.grad_evals



# ----------------------------------------------------------------------------------------------------------------
# the static (graph-mode) guidance step, written out on consistent pairs
def _pairs_at(x, alpha, sigma, seed):
    ec, eu = 1.5 * _randn(*SHAPE, seed=seed), _randn(*SHAPE, seed=seed + 1)
    return ((x - sigma * ec) / alpha, ec), ((x - sigma * eu) / alpha, eu)


def test_static_cfg_rescale_of_an_epsilon_model_is_diffusers_rescale_noise_cfg():
    """Graph mode's CFG with ``guidance_rescale`` on an epsilon model: ``eps = rescale_noise_cfg(u + w (c - u), c,
    phi)`` (diffusers) and ``x0`` kept on ``x_t`` (``x0 = (x - sigma eps) / alpha``). float64: 1e-10 is rounding."""
    from fewstep.guidance.static import StaticGuidance

    alpha, sigma, w, phi = 0.8, 0.6, 5.0, 0.7
    x = _randn(*SHAPE, seed=26)
    cond, uncond = _pairs_at(x, alpha, sigma, seed=27)
    static = StaticGuidance(CFG(w, guidance_rescale=phi), SHAPE, "cpu", torch.float64)
    cols = torch.as_tensor(static.columns([alpha], [sigma])[0], dtype=torch.float64)
    x0, eps = static.combine(cond, uncond, *cols)
    want = rescale_noise_cfg(uncond[1] + w * (cond[1] - uncond[1]), cond[1], phi)
    torch.testing.assert_close(eps, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(x0, (x - sigma * want) / alpha, rtol=0, atol=1e-10)


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_static_apg_with_eta_keeps_that_share_of_the_parallel_part(space):
    """Graph mode's APG (Sadat et al. 2025, Alg. 1, no momentum, no clip): ``D = D_c + (w - 1)(Delta_perp + eta
    Delta_par)`` with ``Delta = D_c - D_u`` split against ``D_c`` per sample (``space="eps"``: the same on the noise
    predictions), the other member of the pair kept on ``x_t``. float64: 1e-10 is rounding."""
    from fewstep.guidance import APG
    from fewstep.guidance.static import StaticGuidance

    alpha, sigma, w, eta = 0.8, 0.6, 4.0, 0.4
    x = _randn(*SHAPE, seed=28)
    cond, uncond = _pairs_at(x, alpha, sigma, seed=29)
    static = StaticGuidance(APG(w, eta=eta, norm_threshold=None, momentum=0.0, space=space), SHAPE, "cpu",
                            torch.float64)  # fmt: skip
    cols = torch.as_tensor(static.columns([alpha], [sigma])[0], dtype=torch.float64)
    x0, eps = static.combine(cond, uncond, *cols)
    j = 0 if space == "x0" else 1
    c, delta = cond[j], cond[j] - uncond[j]
    unit = c / c.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    par = (delta * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
    guided = c + (w - 1) * (delta - par + eta * par)
    torch.testing.assert_close((x0, eps)[j], guided, rtol=0, atol=1e-10)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=0, atol=1e-10)

# ----------------------------------------------------------------------------------------------------------------
# found by this probe (fixed): inversion with clip_sample clipped x read at the target level, not the x0 it denoises to
def test_cfg_inversion_with_clip_sample_is_diffusers_and_round_trips():
    """Constant model outputs make the inversion shortcut exact and every level's denoised ``x0`` the image itself:
    diffusers' ``DDIMInverseScheduler`` (clip_sample=True) then inverts DDIM sampling exactly for images inside
    ``[-1, 1]`` (measured 1e-13), and so must fewstep's CFG inversion (same algorithm: clip the ``x0`` denoised to,
    renoise with the guided eps). Before the fix: fewstep's latent was 18.6 off diffusers', its round trip 1.74 off
    (1e-13 without clip_sample)."""
    config = {**DDPM, "clip_sample": True, "clip_sample_range": 1.0, "steps_offset": 1}
    g = torch.Generator().manual_seed(24)
    table = {}

    def fn(x, t):  # independent of x and t
        return tuple(table.setdefault(k, torch.randn(SHAPE, generator=g, dtype=torch.float64)) for k in "cu")

    images = 0.8 * (2 * torch.rand(SHAPE, generator=g, dtype=torch.float64) - 1)
    sched = samplers.get("ddim").from_config(config)
    sched.set_timesteps(5)
    w = 3.0
    latent = guidance.ddim_invert(fn, images, sched, CFG(w))
    inv = DDIMInverseScheduler.from_config(config)
    inv.set_timesteps(5)
    inv.alphas_cumprod = inv.alphas_cumprod.double()
    ref = images.clone()
    for t in inv.timesteps:
        c, u = fn(ref, t)
        ref = inv.step(u + w * (c - u), int(t), ref).prev_sample
    y = ref
    for i, t in enumerate(sched.timesteps):
        y = guidance.guided_step(sched, CFG(w), *fn(y, t), t, y, i)
    torch.testing.assert_close(y, images, rtol=0, atol=1e-10)  # the reference round-trips (fewstep's sampler)
    torch.testing.assert_close(latent, ref, rtol=0, atol=1e-10)
    # CFG++ (no diffusers counterpart) round-trips with clip_sample where its denoised x0 stays the image: equal
    # branches (with unequal ones, x0_hat = image + s (eps_lam - eps_u) / a leaves [-1, 1] at high noise, and no
    # inversion can undo the sampler's clip there)
    rule = guidance.CFGPlusPlus(0.6)

    def same(x, t):
        return fn(x, t)[1], fn(x, t)[1]

    sched.set_timesteps(5)
    latent = guidance.ddim_invert(same, images, sched, rule)
    y = latent
    sched.set_timesteps(5)
    for i, t in enumerate(sched.timesteps):
        y = guidance.guided_step(sched, rule, *same(y, t), t, y, i)
    torch.testing.assert_close(y, images, rtol=0, atol=1e-10)


def test_static_columns_refuse_a_scale_schedule_of_another_length():
    """As the eager rule: a per-step CFG schedule must have one value per evaluated step; a one-value schedule would
    otherwise be broadcast over every step by numpy, silently."""
    from fewstep.guidance.static import StaticGuidance

    for scales in ([5.0], [5.0, 4.0]):
        static = StaticGuidance(CFG(scales), SHAPE, "cpu", torch.float64)
        with pytest.raises(ValueError, match="per-step values"):
            static.columns([0.6, 0.8, 0.9], [0.8, 0.6, 0.3])
