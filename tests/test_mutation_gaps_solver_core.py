"""Gaps a mutation probe (round 8b) found in the solver core, closed against independent references.

* phi-functions at orders above the engine's (7..25) where the series is summed for ``|z| < k``, element-wise
  over mixed arrays, ``phi_array(0, .)`` and its NaN refusal -- against the closed form
  ``phi_k(z) = (e^z - sum_{j<k} z^j/j!) / z^k`` in 80-digit arithmetic (mpmath);
* the static (graph-mode) engine on noise-form transitions (``algorithm_type="dpmsolver"``, UniPC
  ``predict_x0=False``, ``sde-dpmsolver``), which the suite's bit-for-bit comparison never built, on buffers left
  NaN by a previous generation, and its base-offset refusal;
* model outputs formed at the ends of the path (``alpha = 0`` or ``sigma = 0``, allowed by ``from_pair``), the
  coefficient checks (inf, bool), ``resume_precision`` element by element and its gradient;
* time grids on a flow schedule with their default ranges (uniform time / logSNR / quadratic, Karras) against
  closed forms in ``s = t/T``; the target snapping tolerance of ``TimeGrid``; the ``steps_offset`` bound against
  diffusers; ``t_start == t_end``;
* Inception-V3 preprocessing and pooling, which only the (here skipped) pytorch-fid parity test checked: the
  bilinear ``align_corners=False`` resize to 299 against scipy's ``ndimage.zoom``, the ``[-1, 1]`` map, average
  pools excluding the padding, ``Mixed_7c``'s max pool, the final spatial mean and the block sizes of the paper.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from scipy import ndimage

from fewstep import samplers
from fewstep.solvers import grids
from fewstep.solvers.engine import EngineState, Transition
from fewstep.solvers.grids import TimeGrid
from fewstep.solvers.parameterization import from_pair, resume_precision, to_pair
from fewstep.solvers.phi import phi, phi_array
from fewstep.solvers.schedules import FlowSchedule, VPSchedule
from fewstep.solvers.static import StaticEngine, transition_rows

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


# ----------------------------------------------------------------------------------------------------------------
# phi-functions against the closed form in high precision
def _phi_exact(k: int, z: float) -> float:
    """``(e^z - sum_{j<k} z^j/j!) / z^k`` in high precision, ``1/k!`` at 0: the subtraction cancels the leading
    ~``k log10(1/|z|) + 1`` digits (and up to ~``|z| log10(e)`` for z < 0), so 40 digits are kept beyond those."""
    digits = 40 + int(k * max(0.0, -math.log10(abs(z)) if z else 0.0) + abs(z) + k)
    with mpmath.workdps(digits):
        zz = mpmath.mpf(z)
        if zz == 0:
            return float(1 / mpmath.factorial(k))
        partial = mpmath.fsum(zz**j / mpmath.factorial(j) for j in range(k))
        return float((mpmath.exp(zz) - partial) / zz**k)


#: orders above the recursion's limit (6): there the series is summed for |z| < k, and near |z| = k it needs many
#: more than the 30 minimum terms
HIGH_ORDER_CASES = [(7, 0.6), (7, -3.0), (8, 5.5), (9, 0.75), (9, -8.6), (10, 9.5), (12, -11.4), (20, 19.0),
                    (20, -19.0), (25, 23.5)]


@pytest.mark.parametrize("k,z", HIGH_ORDER_CASES)
def test_phi_high_orders_inside_the_series_range(k, z):
    # the series of positive terms (z > 0) or of decreasing alternating terms (z < 0) sums to ~1e-15 relative;
    # 1e-13 leaves room for rounding while a truncated series or the cancelling recursion misses by >= 1e-10
    assert phi(k, z) == pytest.approx(_phi_exact(k, z), rel=1e-13, abs=0)


@pytest.mark.parametrize("k", [1, 3, 7, 9, 12, 20])
def test_phi_array_element_wise_over_both_branches(k):
    """One array mixing series elements (|z| < 0.5, or |z| < k above order 6) and recursion elements must give each
    element its own closed-form value: the series loop may only stop once every series element has converged."""
    z = np.array([-1.5 * k - 1.0, -0.95 * k, -0.3, 0.0, 1e-3, 0.45, 0.7, 0.95 * k, 1.5 * k + 1.0])
    got = phi_array(k, z)
    expected = np.array([_phi_exact(k, float(v)) for v in z])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)  # see above; the recursion beyond k: ~1e-15
    for v, g in zip(z, got, strict=True):  # and the scalar function agrees with the vectorised one
        assert phi(k, float(v)) == pytest.approx(g, rel=1e-13, abs=0)


def test_phi_array_order_zero_is_exp_and_nan_is_refused():
    z = np.array([-30.0, -1.0, -1e-9, 0.0, 0.3, 5.0])
    np.testing.assert_allclose(phi_array(0, z), np.exp(z), rtol=1e-15, atol=0)  # phi_0 = e^z, not e^z - 1
    for bad in (np.array([0.2, math.nan]), np.array([math.inf, 0.1]), np.array([-math.inf])):
        with pytest.raises(ValueError, match=r"phi_2 needs finite arguments"):
            phi_array(2, bad)


# ----------------------------------------------------------------------------------------------------------------
# the static engine where the suite's comparison did not look
def _scheduler(name: str, steps: int, **config):
    sched = samplers.get(name).from_config(DDPMScheduler(**SD).config, **config)
    sched.set_timesteps(steps)
    return sched


def _run_both(plan, shape, gen, static: StaticEngine):
    """Feed the same random evaluations to ``EngineState`` (eager) and ``static``; assert every step bit for bit."""
    noise = torch.randn(plan.num_steps, *shape, generator=gen)
    static.reset(noise if static.stochastic else None)
    state = EngineState(plan)
    x_eager = x_static = torch.randn(shape, generator=gen)
    for i in range(plan.num_steps):
        x0, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        x_eager = state.advance(i, x_eager, x0, eps, noise[i] if static.stochastic else None)
        x_static = static.advance(x_static, x0, eps)
        static.index.add_(1)
        assert torch.isfinite(x_static).all() and torch.equal(x_static, x_eager), i


@pytest.mark.parametrize(
    "name,config",
    [
        ("dpm-solver++", {"algorithm_type": "dpmsolver", "solver_order": 3}),
        ("unipc", {"predict_x0": False, "solver_order": 3}),
        ("dpm-solver++", {"algorithm_type": "sde-dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}),
    ],
    ids=["dpm3-noise", "unipc3-noise", "sde-dpm2-noise"],
)
def test_static_engine_follows_engine_state_in_noise_form(name, config):
    """Noise-prediction transitions weight the buffered ``eps`` (and subtract ``sum(w) eps_base``); the graph tests
    only built data-form plans. Same evaluations in, the same samples out, bit for bit on the CPU (the module's
    contract)."""
    sched = _scheduler(name, 6, **config)
    plan = sched.plan
    noise_terms = [tr for step in plan.steps for tr in (step.corrector, step.predictor)
                   if tr is not None and tr.kind == "noise" and tr.weights]  # fmt: skip
    assert noise_terms, "the plan must exercise multistep noise-form transitions"
    shape = (2, 1, 4, 4)
    _run_both(plan, shape, torch.Generator().manual_seed(5), StaticEngine(plan, shape, "cpu", torch.float32))


@pytest.mark.parametrize("config", [{"solver_order": 3}, {"algorithm_type": "dpmsolver", "solver_order": 3}],
                         ids=["data", "noise"])
def test_static_engine_reset_forgets_a_nan_generation(config):
    """``reset`` zeroes the evaluation buffers: unused slots then add exact zeros, whereas a slot left NaN by a
    previous generation (an fp16 overflow) would poison the next one through ``0 * NaN``."""
    sched = _scheduler("dpm-solver++", 5, **config)
    plan, shape = sched.plan, (1, 1, 4, 4)
    static = StaticEngine(plan, shape, "cpu", torch.float32)
    static.reset()
    nan = torch.full(shape, math.nan)
    for _ in range(plan.num_steps):
        static.advance(nan, nan, nan)
        static.index.add_(1)
    _run_both(plan, shape, torch.Generator().manual_seed(6), static)


def test_transition_rows_refuses_a_base_outside_the_buffer():
    tr = Transition(kind="data", base=2, lin=0.5, alpha_t=0.6, sigma_t=0.8, weights=((1, 0.25),))
    with pytest.raises(ValueError, match="transition base offset 2 outside the buffer of 2 evaluations"):
        transition_rows(tr, 2, (1,))
    rows = transition_rows(tr, 3, (1,))  # in range: the one-hot base slot
    np.testing.assert_array_equal(rows[0, :, 0], [0.0, 0.0, 1.0])


# ----------------------------------------------------------------------------------------------------------------
# Inception-V3: preprocessing and pooling against numpy/scipy
@pytest.fixture(scope="module")
def inception_run():
    """A forward pass of random He-scaled weights (O(1) activations through the 94 layers) over 2 RGB images of odd
    size and one grayscale image, with the inputs/outputs of the layers under test recorded by hooks."""
    from fewstep.bench.inception import InceptionV3Features, inception_features

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = InceptionV3Features().eval()
    with torch.no_grad():  # torch's default conv init has variance 1/(3 fan_in): x sqrt(6) is He's 2/fan_in
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(6**0.5)
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        return lambda module, args, out=None: seen.setdefault(name, []).append((args[0] if out is None else out)
                                                                                .detach().double())

    for name in ("Conv2d_1a_3x3", "Mixed_5b", "Mixed_7b", "Mixed_7c"):
        getattr(net, name).register_forward_pre_hook(keep(f"{name}:in"))
    for name in ("Mixed_5b", "Mixed_7b", "Mixed_7c"):
        getattr(net, name).branch_pool.register_forward_pre_hook(keep(f"{name}.pool:in"))
    for name in ("Mixed_5d", "Mixed_6e", "Mixed_7a", "Mixed_7c"):
        getattr(net, name).register_forward_hook(lambda m, a, out, name=name: keep(f"{name}:out")(m, a, out))
    g = torch.Generator().manual_seed(2)
    rgb, gray = torch.rand(2, 3, 37, 53, generator=g), torch.rand(1, 1, 41, 30, generator=g)
    features = inception_features(net, rgb, batch_size=1)  # two chunks of one image
    gray_features = inception_features(net, gray)
    return {"net": net, "rgb": rgb, "gray": gray, "features": features, "gray_features": gray_features,
            **{k: torch.cat(v) for k, v in seen.items()}}


def _zoom_299(images: np.ndarray) -> np.ndarray:
    """Bilinear resize to 299 x 299 with half-pixel centres and edge clamping (scipy's ``grid_mode=True``, order 1,
    ``mode='nearest'``: torch's ``align_corners=False`` bilinear without antialiasing)."""
    n, c, h, w = images.shape
    return np.stack([np.stack([ndimage.zoom(images[i, j], (299 / h, 299 / w), order=1, grid_mode=True,
                                            mode="nearest") for j in range(c)]) for i in range(n)])  # fmt: skip


def _pool3(x: np.ndarray, kind: str) -> np.ndarray:
    """3x3, stride 1, padding 1 pooling over the last two axes: the mean of the in-image neighbours only
    (TensorFlow's pool, ``count_include_pad=False``), or their maximum."""
    fill = -np.inf if kind == "max" else 0.0
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(-2, -1))
    if kind == "max":
        return windows.max(axis=(-2, -1))
    ones = np.pad(np.ones(x.shape[-2:]), 1)
    count = np.lib.stride_tricks.sliding_window_view(ones, (3, 3)).sum(axis=(-2, -1))
    return windows.sum(axis=(-2, -1)) / count


def test_inception_input_is_the_bilinear_299_resize_mapped_to_minus_one_one(inception_run):
    r = inception_run
    got = r["Conv2d_1a_3x3:in"].numpy()
    assert got.shape == (3, 3, 299, 299)
    expected = 2.0 * _zoom_299(r["rgb"].double().numpy()) - 1.0
    # torch interpolates in float32, source coordinates included: ~1e-5 off at 299 px (measured 6e-6); a float16
    # detour, align_corners=True, bicubic or a missing [-1, 1] map all differ by >= 1e-3
    np.testing.assert_allclose(got[:2], expected, rtol=0, atol=3e-5)
    # grayscale: the same resize of the one channel, on each of the three
    gray = 2.0 * _zoom_299(r["gray"].double().numpy()) - 1.0
    np.testing.assert_allclose(got[2:], np.repeat(gray, 3, axis=1), rtol=0, atol=3e-5)


@pytest.mark.parametrize("block,kind", [("Mixed_5b", "avg"), ("Mixed_7b", "avg"), ("Mixed_7c", "max")])
def test_inception_pool_branches(inception_run, block, kind):
    """The pool branch sees a 3x3 average pool that excludes the padding (Mixed_5*, 6*, 7b) or, in Mixed_7c, a 3x3
    max pool (the FID graph's pools, pytorch-fid's FIDInception* blocks)."""
    x = inception_run[f"{block}:in"].numpy()
    got = inception_run[f"{block}.pool:in"].numpy()
    expected = _pool3(x, kind)
    scale = np.abs(expected).max()
    assert scale > 0.1  # O(1) activations, so the tolerance below is meaningful
    # float32 sums of 9 values: ~1e-7 relative; counting the padding changes border means by >= 1/9 relative
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


def test_inception_features_are_the_spatial_mean_of_mixed_7c_at_the_papers_sizes(inception_run):
    r = inception_run
    # Szegedy et al. 2016, Table 1 (299 x 299 input): 35x35x288, 17x17x768, 8x8x1280, 8x8x2048
    assert r["Mixed_5d:out"].shape == (3, 288, 35, 35)
    assert r["Mixed_6e:out"].shape == (3, 768, 17, 17)
    assert r["Mixed_7a:out"].shape == (3, 1280, 8, 8)
    assert r["Mixed_7c:out"].shape == (3, 2048, 8, 8)
    feats = torch.cat([r["features"], r["gray_features"]])
    assert feats.dtype == torch.float64 and feats.shape == (3, 2048)
    expected = r["Mixed_7c:out"].mean(dim=(2, 3))
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_inception_batch_norms_use_tensorflows_epsilon(inception_run):
    bns = [m for m in inception_run["net"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)  # the TF graph's (and pytorch-fid's) 0.001


# ----------------------------------------------------------------------------------------------------------------
# time grids: flow defaults, snapping, bounds
T = 1000


def _flow_s(lam: np.ndarray) -> np.ndarray:
    """Flow time ``s`` of log-SNR ``lambda = log((1 - s)/s)``."""
    return 1.0 / (1.0 + np.exp(lam))


@pytest.mark.parametrize("n", [1, 6])
def test_flow_schedule_default_ranges_of_the_continuous_grids(n):
    """A flow schedule's ends have infinite lambda (``alpha = 0`` at ``t = T``, ``sigma = 0`` at ``t = 0``): the
    grids start at ``t = T - 1``; a grid uniform in lambda ends at ``t = 1``, the others at clean data ``t = 0``."""
    sched = FlowSchedule(T)
    grid = grids.uniform_lambda_grid(sched, n)
    s = _flow_s(np.linspace(-math.log(T - 1.0), math.log(T - 1.0), n + 1))  # s = 0.999 ... 0.001
    # closed forms in float64: ~1e-15 relative (t_of_lambda inverts exactly up to rounding)
    np.testing.assert_allclose(grid.sigmas, s, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grid.alphas, 1.0 - s, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grid.timesteps, T * s[:-1], rtol=1e-12, atol=0)
    for build, times in ((grids.uniform_time_grid, np.linspace(T - 1.0, 0.0, n + 1)),
                         (grids.time_quadratic_grid, np.linspace(math.sqrt(T - 1.0), 0.0, n + 1) ** 2)):
        grid = build(sched, n)
        np.testing.assert_allclose(grid.timesteps, times[:-1], rtol=1e-14, atol=0)
        np.testing.assert_allclose(grid.sigmas, times / T, rtol=1e-14, atol=0)
        assert grid.sigmas[-1] == 0.0 and grid.alphas[-1] == 1.0


@pytest.mark.parametrize("n", [2, 7])
def test_karras_grid_on_a_flow_schedule_spans_its_finite_range(n):
    """Karras eq. 5 in ``rho = s/(1 - s)`` between ``t = T - 1`` (rho 999) and ``t = 1`` (rho 1/999); model times
    ``T rho/(1 + rho)``, not rounded (rounding is for VP schedules)."""
    grid = grids.karras_grid(FlowSchedule(T), n)
    rho = np.linspace((T - 1.0) ** (1 / 7), (1 / (T - 1.0)) ** (1 / 7), n) ** 7
    np.testing.assert_allclose(grid.rhos[:-1], rho, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grid.timesteps, T * rho / (1.0 + rho), rtol=1e-12, atol=0)
    assert grid.sigmas[-1] == 0.0
    # the flow's own points (1 - s, s) at those times: the grid stored VP-normalised ones (alpha = 1/sqrt(1 + rho^2),
    # alpha + sigma up to 1.39), which sample_loop would have fed a flow model
    s = rho / (1.0 + rho)
    np.testing.assert_allclose(grid.alphas[:-1], 1.0 - s, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grid.sigmas[:-1], s, rtol=1e-12, atol=1e-15)


def _vp_points(lambdas) -> tuple[np.ndarray, np.ndarray]:
    lam = np.asarray(lambdas, dtype=np.float64)
    alphas = 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lam))
    return alphas, alphas * np.exp(-lam)


def test_time_grid_snaps_only_a_target_equal_to_the_last_point_up_to_rounding():
    alphas, sigmas = _vp_points([-2.0, 1.0, 1.0 + 1e-6])  # a real (if short) last step of 1e-6 in lambda
    grid = TimeGrid([900.0, 10.0], alphas, sigmas)
    assert grid.lambdas[-1] - grid.lambdas[-2] == pytest.approx(1e-6, rel=1e-6)
    assert grid.sigmas[-1] == pytest.approx(sigmas[-1], rel=1e-15)
    alphas, sigmas = _vp_points([-2.0, 1.0, 1.0 + 1e-12])  # rounding: snapped onto the last point
    grid = TimeGrid([900.0, 10.0], alphas, sigmas)
    assert grid.lambdas[-1] == grid.lambdas[-2] and grid.alphas[-1] == grid.alphas[-2]


def test_steps_offset_bound_matches_diffusers():
    """``leading`` with one step puts t = 500 + steps_offset first: 999 is diffusers' last training step (kept),
    1000 is past it (refused)."""
    reference = DPMSolverMultistepScheduler(timestep_spacing="leading", steps_offset=499)
    reference.set_timesteps(1)
    ours = grids.spacing_timesteps(T, 1, "leading", steps_offset=499)
    np.testing.assert_array_equal(ours, reference.timesteps.double().numpy())
    assert ours.tolist() == [999.0]
    with pytest.raises(ValueError, match=r"steps_offset=500 puts the first of 1 'leading' timesteps at 1000, past"):
        grids.spacing_timesteps(T, 1, "leading", steps_offset=500)


@pytest.mark.parametrize("build", [grids.uniform_time_grid, grids.uniform_lambda_grid, grids.time_quadratic_grid])
def test_equal_grid_ends_are_refused_by_name(build):
    with pytest.raises(ValueError, match=r"need t_start > t_end, got t_start=500.0, t_end=500.0"):
        build(VPSchedule.from_config(DDPMScheduler(**SD).config), 4, t_start=500.0, t_end=500.0)


def test_uniform_lambda_grid_ends_exactly_where_asked():
    """The log-SNR grid maps its inner points through ``t(lambda)`` but pins both ends: ``t_of_lambda(lambda(990))``
    is 990 + 1.1e-13 on SD's schedule, so the first model time and the target's noise level would be off by a
    rounding step from the requested ones (a resumed img2img start, a search space's bounds)."""
    sched = VPSchedule.from_config(DDPMScheduler(**SD).config)
    grid = grids.uniform_lambda_grid(sched, 5, t_start=990.0, t_end=5.0)
    assert grid.timesteps[0] == 990.0
    alpha, sigma = (float(v) for v in sched.alpha_sigma(5.0))
    assert (grid.alphas[-1], grid.sigmas[-1]) == (alpha, sigma)


def test_custom_timesteps_ending_at_zero_with_a_sigma_min_target_match_diffusers():
    """The ``MIN_LAMBDA_GAP`` check spans the evaluation points only: a ``sigma_min`` target equal to the last
    point (t = 0) is a zero-length final step, which diffusers takes too (its last two sigmas are equal)."""
    kw = {**SD, "final_sigmas_type": "sigma_min"}
    reference = DPMSolverMultistepScheduler(**kw)
    reference.set_timesteps(timesteps=[999, 500, 0])
    sched = VPSchedule.from_config(DDPMScheduler(**SD).config)
    grid = grids.custom_timesteps_grid(sched, [999, 500, 0], final_sigmas_type="sigma_min")
    np.testing.assert_array_equal(grid.timesteps, reference.timesteps.double().numpy())
    np.testing.assert_allclose(grid.rhos, reference.sigmas.double().numpy(), rtol=1e-6, atol=0)  # float32 sigmas
    assert grid.lambdas[-1] == grid.lambdas[-2]


# ----------------------------------------------------------------------------------------------------------------
# prediction-type conversions at the ends of the path, their checks, resume_precision
def _xe(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)


def test_from_pair_forms_outputs_at_clean_data_and_pure_noise():
    """``from_pair`` takes ``alpha, sigma >= 0`` (a target at sigma = 0, flow's pure noise at alpha = 0): the
    definitions ``v = alpha eps - sigma x0`` (Salimans & Ho) and flow's ``eps - x0`` hold there as anywhere."""
    x0, eps = _xe(1)
    torch.testing.assert_close(from_pair(x0, eps, 1.0, 0.0, "v_prediction"), eps, rtol=0, atol=0)
    torch.testing.assert_close(from_pair(x0, eps, 0.0, 1.0, "v_prediction"), -x0, rtol=0, atol=0)
    torch.testing.assert_close(from_pair(x0, eps, 0.0, 1.0, "flow"), eps - x0, rtol=0, atol=0)
    assert from_pair(x0, eps, 1.0, 0.0, "sample") is x0 and from_pair(x0, eps, 0.0, 1.0, "epsilon") is eps
    with pytest.raises(ValueError, match=r"`sigma` must be a finite number >= 0 .* to form a 'flow' output"):
        from_pair(x0, eps, 1.0, -1e-3, "flow")


@pytest.mark.parametrize("alpha,sigma,name", [(math.inf, 0.5, "alpha"), (0.5, math.nan, "sigma"),
                                              (True, 0.5, "alpha"), (0.5, np.bool_(True), "sigma")])
def test_conversion_coefficients_must_be_finite_numbers(alpha, sigma, name):
    x, out = _xe(2)
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number > 0"):
        to_pair(out, x, alpha, sigma, "epsilon")
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number >= 0"):
        from_pair(x, out, alpha, sigma, "v_prediction")
    # numpy scalars are numbers: the same result as Python floats
    for a, b in zip(to_pair(out, x, np.float64(0.6), np.float64(0.8), "v_prediction"),
                    to_pair(out, x, 0.6, 0.8, "v_prediction"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resume_precision_element_by_element_and_its_gradient(dtype):
    """Elements equal to the rounded ``full`` continue from ``full``; edited ones are the caller's; the gradient
    goes to ``sample`` unchanged (numpy reference of the rule)."""
    g = torch.Generator().manual_seed(3)
    full = torch.randn(40, generator=g) * 3.0
    sample = full.to(dtype)
    sample[::7] = torch.randn(sample[::7].shape, generator=g).to(dtype)  # the caller's edits
    got = resume_precision(sample, full)
    kept = sample.float().numpy() == full.to(dtype).float().numpy()
    expected = np.where(kept, full.numpy(), sample.float().numpy())
    assert got.dtype == torch.float32 and kept.sum() < 40 and (~kept).sum() >= 6
    np.testing.assert_array_equal(got.numpy(), expected)
    leaf = sample.clone().requires_grad_(True)
    (resume_precision(leaf, full) * torch.arange(40.0)).sum().backward()
    torch.testing.assert_close(leaf.grad.float(), torch.arange(40.0).to(dtype).float(), rtol=0, atol=0)


def test_custom_timesteps_closer_than_the_minimum_lambda_gap_are_refused():
    """``MIN_LAMBDA_GAP`` = 1e-4 in log-SNR: two points 5e-5 apart are refused, 2e-4 apart accepted (the gap
    computed here from the schedule's own lambda)."""
    sched = VPSchedule.from_config(DDPMScheduler(**SD).config)
    lam = float(sched.lambda_(500.0))
    for gap, ok in ((5e-5, False), (2e-4, True)):
        t2 = float(sched.t_of_lambda(np.array([lam + gap]))[0])  # a few 1e-3 below 500: distinct in float32
        assert float(sched.lambda_(t2)) - lam == pytest.approx(gap, rel=1e-6)
        if ok:
            assert grids.custom_timesteps_grid(sched, [999.0, 500.0, t2, 10.0]).num_steps == 4
        else:
            with pytest.raises(ValueError, match=r"points 1 and 2 .* are 5e-05 apart in log-SNR lambda; they must be "
                                                 r"at least 0.0001 apart"):
                grids.custom_timesteps_grid(sched, [999.0, 500.0, t2, 10.0])


def test_finite_lambdas_include_a_target_that_is_not_clean_data():
    """``finite_lambdas``: every point with a finite log-SNR, the target included unless it is clean (sigma = 0);
    here against ``log(alpha/sigma)`` of the schedule at the grid's times (t = 0: the sigma_min target)."""
    sched = VPSchedule.from_config(DDPMScheduler(**SD).config)
    times = np.array([999.0, 600.0, 200.0, 0.0])
    alpha, sigma = sched.alpha_sigma(times)
    lam = np.log(alpha) - np.log(sigma)
    grid = grids.custom_timesteps_grid(sched, times[:-1], final_sigmas_type="sigma_min")
    np.testing.assert_allclose(grid.finite_lambdas, lam, rtol=1e-12, atol=1e-12)
    clean = grids.custom_timesteps_grid(sched, times[:-1], final_sigmas_type="zero")
    np.testing.assert_allclose(clean.finite_lambdas, lam[:-1], rtol=1e-12, atol=1e-12)
