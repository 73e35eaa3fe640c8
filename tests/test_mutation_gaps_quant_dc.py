"""Tests that close gaps found by mutation testing of quantization, DC-Solver and FlowChef.

Every expected value comes from an independent reference: torch's own fake-quant ops and float8 casts, scipy,
a brute-force search over the documented candidate grid, or the paper's formula written out here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.interpolate
import scipy.stats
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from fewstep.quant import calibration, quantizers
from fewstep.quant.kernels import fp8_supported
from fewstep.quant.modules import QuantLayer
from fewstep.solvers import VPSchedule, grids
from fewstep.solvers.dc import compile_dc, compile_dc_plan, interpolation_values
from fewstep.solvers.dc_artifacts import CPRModel, RatioEntry, fit_cpr
from fewstep.solvers.flowchef import FlowChefConfig, GaussianFill, flowchef_update, measurement_cost
from fewstep.solvers.methods import unipc_decisions


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ quantizers
def test_int8_weight_fake_quant_clips_symmetrically_like_torch():
    """Weights use the symmetric grid [-127, 127]: a scale below absmax/127 clips both signs at 127 steps."""
    w = torch.randn(6, 4, 3, 3, generator=_gen(0))
    scale = w.reshape(6, -1).abs().amax(1) / 127 * 0.4  # clip 40% of the absmax: many codes saturate
    ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(6, dtype=torch.int32), 0, -127, 127)
    torch.testing.assert_close(quantizers.fake_quant_weight(w, scale), ref, rtol=0, atol=0)
    assert int(quantizers.quantize_weight(w, scale).min()) == -127


def _lp(d: torch.Tensor, p: float) -> torch.Tensor:
    return d.abs().pow(p).mean(1)


@pytest.mark.parametrize(("metric", "p"), [("lp", 2.4), ("mse", 2.0), ("cosine", 2.4)])
def test_weight_scale_search_is_the_brute_force_argmin_of_the_exact_distance(metric, p):
    """Brute force over alpha in {1, 1 - 1/grid, ..., 1/grid} with torch's per-channel fake quant."""
    g = _gen(1)
    w = torch.randn(5, 40, generator=g) * torch.rand(5, 40, generator=g).pow(4) * 3  # heavy tailed rows
    w[3:] = (torch.rand(2, 40, generator=g) - 0.5) * 2
    w[3:, 0] = -2.0  # one negative outlier: where the clip sits at -127 steps (not -128) decides the best alpha
    grid = 128
    # a row on the grid of alpha = 1 - 1/grid except its maximum: the second candidate is the best one for lp
    w[2] = 2.0 * (1 - 1 / grid) / 127 * torch.randint(-120, 121, (40,), generator=g).float()
    w[2, 0] = 2.0
    got = quantizers.weight_qparams(w, metric=metric, p=p, grid=grid)
    amax = w.abs().amax(1)
    zeros = torch.zeros(5, dtype=torch.int32)
    errs, scales = [], []
    for k in range(grid):
        s = amax * (1 - k / grid) / 127
        w_hat = torch.fake_quantize_per_channel_affine(w, s, zeros, 0, -127, 127)
        if metric == "lp":
            e = _lp(w - w_hat, p)
        elif metric == "mse":
            e = _lp(w - w_hat, 2.0)
        else:
            e = 1 - F.cosine_similarity(w, w_hat, dim=1, eps=1e-12)
        errs.append(e)
        scales.append(s)
    errs, scales = torch.stack(errs), torch.stack(scales)
    best = errs.argmin(0)  # first minimum: the largest alpha among ties
    expected = scales[best, torch.arange(5)]
    if metric == "lp":
        assert int(best[2]) == 1  # the construction above works
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_weight_scale_search_uses_the_requested_lp_exponent():
    """Long heavy-tailed rows, where L1 clips much harder than L2: lp with p = 1 is the brute-force L1 argmin."""
    g = _gen(14)
    w = torch.randn(4, 2000, generator=g) * torch.rand(4, 2000, generator=g).pow(6) * 3
    grid = 64
    amax = w.abs().amax(1)
    zeros = torch.zeros(4, dtype=torch.int32)
    scales = torch.stack([amax * (1 - k / grid) / 127 for k in range(grid)])
    d = torch.stack([w - torch.fake_quantize_per_channel_affine(w, s, zeros, 0, -127, 127) for s in scales])
    best_l1, best_l2 = _lp(d.flatten(0, 1), 1.0).reshape(grid, 4).argmin(0), d.pow(2).mean(2).argmin(0)
    assert not torch.equal(best_l1, best_l2)  # the construction discriminates
    got = quantizers.weight_qparams(w, metric="lp", p=1.0, grid=grid)
    torch.testing.assert_close(got, scales[best_l1, torch.arange(4)], rtol=1e-6, atol=0)


def test_int8_activation_quantizer_matches_torch_and_reproduces_its_range():
    """s = (hi - lo) / 255, z = -128 - round(lo / s) (0 exact); every x in [lo, hi] comes back within s/2."""
    lo, hi = -1.2, 4.91  # lo / s = -50.08: rounding and flooring give different zero points
    qp = quantizers.act_qparams_from_range(lo, hi)
    assert qp.scale == pytest.approx((hi - lo) / 255, rel=1e-12)
    x = torch.linspace(lo, hi, 5001)
    x_hat = quantizers.fake_quant_act(x, qp)
    ref = torch.fake_quantize_per_tensor_affine(x, qp.scale, qp.zero_point, -128, 127)
    torch.testing.assert_close(x_hat, ref, rtol=0, atol=1e-6)
    assert float((x_hat - x).abs().max()) <= qp.scale / 2 * (1 + 1e-4)
    assert float(quantizers.fake_quant_act(torch.zeros(1), qp)) == 0.0


def test_fp8_activation_scale_covers_the_larger_side():
    """fp8: s = max(|lo|, |hi|) / 448, so the negative extreme is representable too."""
    qp = quantizers.act_qparams_from_range(-8.0, 2.0, fmt="fp8")
    assert qp.scale == pytest.approx(8.0 / 448)
    x = torch.tensor([-8.0, -5.0, 2.0])
    ref = (x / qp.scale).to(torch.float8_e4m3fn).float() * qp.scale
    torch.testing.assert_close(quantizers.fake_quant_act(x, qp), ref)


def test_straight_through_gradient_covers_the_closed_clipping_range():
    """The STE passes the gradient on [lo_q, hi_q] (the representable extremes included) and nowhere else."""
    qp = quantizers.act_qparams_from_range(-1.0, 3.0)
    lo_q, hi_q = (-128 - qp.zero_point) * qp.scale, (127 - qp.zero_point) * qp.scale
    x = torch.tensor([lo_q - 0.1, lo_q, 0.3, hi_q, hi_q + 0.1], requires_grad=True)
    quantizers.fake_quant_act(x, qp).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_histogram_matches_numpy():
    x = torch.randn(3000, generator=_gen(2)).double()
    h = quantizers.Histogram.of(x, bins=64)
    counts, edges = np.histogram(x.numpy(), bins=64, range=(h.lo, h.hi))
    np.testing.assert_allclose(h.centers.numpy(), (edges[:-1] + edges[1:]) / 2, rtol=0, atol=1e-12)
    assert np.abs(h.counts.numpy() - counts).sum() <= 2  # float32 binning may move a value at an edge


def _one_bin_hist(value: float, lo: float, hi: float, bins: int = 1024) -> quantizers.Histogram:
    """A histogram with all its mass in the bin whose centre is closest to ``value``."""
    h = quantizers.Histogram(lo, hi, bins)
    k = int(torch.argmin((h.centers - value).abs()))
    h.counts[k] = 1.0
    return h


@pytest.mark.parametrize(("metric", "power"), [("lp", 2.4), ("lp", 1.5), ("mse", 2.0)])
def test_range_error_inside_the_range_is_uniform_rounding_noise(metric, power):
    """Inside the range the surrogate is E|u|^p for u ~ U(-step/2, step/2): integrated with scipy."""
    h = _one_bin_hist(0.3, -1.0, 2.0)
    lo, hi = torch.tensor([-1.0, -0.5]), torch.tensor([2.0, 1.0])
    got = quantizers.range_error(h, lo, hi, metric, p=power)
    for k in range(2):
        step = float(hi[k] - lo[k]) / 255
        ref = 2 * scipy.integrate.quad(lambda u, w=step: u**power / w, 0, step / 2, epsabs=0, epsrel=1e-12)[0]
        assert float(got[k]) == pytest.approx(ref, rel=1e-6)


def test_cosine_range_error_counts_the_rounding_noise_in_the_norm():
    """cosine surrogate of one value v inside the range: 1 - E[v (v + u)] / sqrt(v^2 E[(v + u)^2]) with u uniform
    rounding noise of one step (scipy quadrature of the documented noise model)."""
    h = _one_bin_hist(0.05, -1.0, 2.0)
    v = float(h.centers[int(h.counts.argmax())])
    lo, hi = torch.tensor([-1.0]), torch.tensor([2.0])
    step = 3.0 / 255
    second = scipy.integrate.quad(lambda u: (v + u) ** 2 / step, -step / 2, step / 2, epsabs=0, epsrel=1e-12)[0]
    expected = 1 - v * v / math.sqrt(v * v * second)
    got = float(quantizers.range_error(h, lo, hi, "cosine")[0])
    assert got == pytest.approx(expected, rel=1e-6)
    assert got > 1e-6  # the noise term is what makes it non-zero


def _e4m3_spacing(m: float) -> float:
    """Spacing of the e4m3 grid at |m| (from torch's float8 values: the gap above m's grid point)."""
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(grid[torch.isfinite(grid) & (grid >= 0)])
    k = int(torch.searchsorted(grid, torch.tensor(m), right=True)) - 1
    return float(grid[k + 1] - grid[k])


@pytest.mark.parametrize("value", [0.3, 1.7, 0.013])
def test_fp8_range_error_uses_the_e4m3_spacing(value):
    """fp8 rounding noise at a value uses the e4m3 spacing there (3 mantissa bits), read off torch's grid."""
    h = _one_bin_hist(value, -2.0, 2.0, bins=4096)
    v = float(h.centers[int(h.counts.argmax())])
    amax = 2.0
    s = amax / 448
    got = float(quantizers.range_error(h, torch.tensor([-amax]), torch.tensor([amax]), "mse", fmt="fp8")[0])
    step = _e4m3_spacing(v / s) * s
    assert got == pytest.approx(step**2 / 12, rel=1e-6)


def _brute_force_range(h, lo, hi, metric, fmt="int8"):
    err = quantizers.range_error(h, lo, hi, metric, fmt=fmt)
    k = int(torch.argmin(err))
    return float(lo[k]), float(hi[k]), float(err[k])


def test_one_sided_search_includes_the_full_range():
    """Uniform data on [0, 1]: no outliers, the full range (alpha = 1) is the best of the documented grid."""
    x = torch.rand(20000, generator=_gen(3))
    h = quantizers.Histogram.of(x)
    grid = 100
    alphas = torch.arange(1, grid + 1, dtype=torch.float64) / grid
    lo_b, hi_b, _ = _brute_force_range(h, torch.zeros_like(alphas), alphas * h.hi, "lp")
    lo, hi = quantizers.search_act_range(h, "lp", grid=grid)
    assert (lo, hi) == pytest.approx((lo_b, hi_b), rel=1e-12)
    assert hi == pytest.approx(h.hi, rel=1e-12)


def test_symmetric_fp8_search_uses_the_larger_magnitude():
    """Mostly negative data: the fp8 candidates are [-a m, a m] with m = max|x| (brute force over a)."""
    x = -torch.rand(20000, generator=_gen(4)) * 10 + 1.0  # in [-9, 1]
    h = quantizers.Histogram.of(x)
    grid = 50
    alphas = torch.arange(1, grid + 1, dtype=torch.float64) / grid
    m = max(-h.lo, h.hi)
    lo_b, hi_b, _ = _brute_force_range(h, -alphas * m, alphas * m, "mse", fmt="fp8")
    lo, hi = quantizers.search_act_range(h, "mse", grid=grid, fmt="fp8")
    assert (lo, hi) == pytest.approx((lo_b, hi_b), rel=1e-12)


def test_two_dimensional_search_finds_the_brute_force_optimum():
    """Asymmetric data whose best clip factors differ on each side: coarse to fine ends at the full grid's best."""
    g = _gen(5)
    x = torch.cat([-torch.rand(30000, generator=g) ** 6 * 5, torch.randn(30000, generator=g).abs() * 0.3,
                   torch.tensor([2.0])])  # a far negative tail, a compact positive side with one outlier
    h = quantizers.Histogram.of(x, bins=512)
    grid = 50
    alphas = torch.arange(1, grid + 1, dtype=torch.float64) / grid
    a, b = torch.meshgrid(alphas, alphas, indexing="ij")
    lo_all, hi_all = (a * h.lo).flatten(), (b * h.hi).flatten()
    _, _, err_b = _brute_force_range(h, lo_all, hi_all, "lp")
    lo, hi = quantizers.search_act_range(h, "lp", grid=grid)
    got = float(quantizers.range_error(h, torch.tensor([lo]), torch.tensor([hi]), "lp")[0])
    assert got == pytest.approx(err_b, rel=1e-9)


# ------------------------------------------------------------------------------------- layers (real 8-bit paths)
def _conv_reference(conv: torch.nn.Conv2d, x: torch.Tensor, w_scale: torch.Tensor, qp, fmt: str) -> torch.Tensor:
    """The layer's documented numerics from torch alone: fake-quantized input and weight, then F.conv2d in
    float64."""
    if fmt == "int8":
        xq = torch.fake_quantize_per_tensor_affine(x, qp.scale, qp.zero_point, -128, 127)
        zeros = torch.zeros(len(w_scale), dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(conv.weight.detach(), w_scale, zeros, 0, -127, 127)
    else:
        xq = (x / qp.scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * qp.scale
        s = w_scale.reshape(-1, 1, 1, 1)
        wq = (conv.weight.detach() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return F.conv2d(xq.double(), wq.double(), conv.bias.detach().double(), conv.stride, conv.padding,
                    conv.dilation).float()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "hw"), [
    ((3, 5), (1, 2), (1, 2), (7, 11)),   # non-square kernel, stride, padding and input
    ((1, 1), (1, 1), (1, 1), (5, 6)),    # a padded 1x1 conv: the border outputs are the bias alone
    ((2, 3), (2, 1), (0, 1), (6, 9)),
])
def test_real_conv_paths_match_torch_on_non_square_geometry(fmt, kernel, stride, padding, hw):
    if fmt == "fp8" and not fp8_supported("cpu"):
        pytest.skip("this PyTorch build has no CPU float8 _scaled_mm")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 4, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 5, *hw, generator=_gen(6)) + 0.7  # asymmetric range: zero point != 0
    w_scale = quantizers.weight_qparams(conv.weight, fmt=fmt)
    qp = quantizers.act_qparams_from_range(float(x.min()) * 0.8, float(x.max()) * 0.8, fmt)  # some clipping
    x = x.clone()
    x[0, 0, 0, 0] = 600 * qp.scale if fmt == "fp8" else x[0, 0, 0, 0]  # beyond fp8's +-448 steps: saturates
    layer = QuantLayer(conv, [w_scale], [qp], fmt=fmt, mode=fmt)
    ref = _conv_reference(conv, x, w_scale, qp, fmt)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.set_mode("fake")(x), ref, rtol=1e-5, atol=1e-5)


def test_split_layer_adds_the_bias_once():
    """A split conv (two input parts, two quantizers) equals the sum of the two part convs plus one bias."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 3, 3, padding=1)
    x = torch.cat([torch.randn(2, 4, 5, 5, generator=_gen(7)), 5 * torch.rand(2, 2, 5, 5, generator=_gen(8))], 1)
    scales = [quantizers.weight_qparams(conv.weight[:, :4]), quantizers.weight_qparams(conv.weight[:, 4:])]
    acts = [quantizers.act_qparams_from_range(float(x[:, :4].min()), float(x[:, :4].max())),
            quantizers.act_qparams_from_range(0.0, float(x[:, 4:].max()))]
    zeros = torch.zeros(3, dtype=torch.int32)
    ref = conv.bias.detach().double().reshape(1, -1, 1, 1)
    for part, w, s, qp in ((x[:, :4], conv.weight[:, :4], scales[0], acts[0]),
                           (x[:, 4:], conv.weight[:, 4:], scales[1], acts[1])):
        xq = torch.fake_quantize_per_tensor_affine(part, qp.scale, qp.zero_point, -128, 127)
        wq = torch.fake_quantize_per_channel_affine(w.detach(), s, zeros, 0, -127, 127)
        ref = ref + F.conv2d(xq.double(), wq.double(), None, 1, 1)
    for mode in ("fake", "int8"):
        layer = QuantLayer(conv, scales, acts, split=4, mode=mode)
        torch.testing.assert_close(layer(x), ref.float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ calibration
def test_ndtc_draws_follow_the_floored_clamped_normal():
    """d = clamp(floor(N(mean T, std T)), 0, T-1): the empirical law of many draws against scipy's normal."""
    steps, mean, std, n = 20, 0.3, 0.25, 400_000
    d = calibration.ndtc_indices(n, steps, mean, std, generator=_gen(9)).numpy()
    edges = np.arange(steps + 1, dtype=np.float64)
    cdf = scipy.stats.norm(mean * steps, std * steps).cdf(edges)
    probs = np.diff(cdf)
    probs[0] += cdf[0]  # floor < 0 clamps to 0
    probs[-1] += 1 - cdf[-1]  # floor >= T clamps to T - 1
    freq = np.bincount(d, minlength=steps) / n
    assert d.min() >= 0 and d.max() <= steps - 1
    np.testing.assert_allclose(freq, probs, atol=4e-3)
    assert abs(d.mean() - probs @ np.arange(steps)) < 0.03  # about 6 standard errors


@pytest.mark.parametrize("mean", [0.51, 0.8, 1.0, -0.1])
def test_ndtc_mean_beyond_half_the_steps_is_refused(mean):
    """PTQ4DM's NDTC keeps mu <= T/2 (skewed toward the image end): a mean fraction outside [0, 0.5] is an error."""
    with pytest.raises(ValueError, match="mean"):
        calibration.ndtc_indices(10, 20, mean=mean)


@pytest.mark.parametrize(("kept", "steps"), [(3, 20), (7, 10), (4, 4), (6, 50)])
def test_uniform_indices_are_every_t_over_k_steps(kept, steps):
    """Q-Diffusion's k evenly spaced steps: d_j = floor(j T / k), in exact integer arithmetic."""
    assert calibration.uniform_indices(kept, steps).tolist() == [j * steps // kept for j in range(kept)]


# ------------------------------------------------------------------------------------------------ DC-Solver
@pytest.mark.parametrize("start", [0, 1])
def test_dc_table_compensates_from_the_first_step_with_k_plus_one_outputs(start):
    """Step i is compensated as soon as K+1 outputs are buffered (i >= start + K), with the Lagrange weights of
    the buffered points at tau = v_{i-1} + rho (v_i - v_{i-1}) (scipy's Lagrange polynomial as the reference)."""
    order, n = 2, 7
    grid = grids.spacing_grid(VPSchedule.from_config(DDPMScheduler().config), n)
    plan = compile_dc_plan(grid, unipc_decisions(n), order=order)
    ratios = [1.0] * order + [1.3, 0.8, 1.1, 1.2, 0.9]
    table = compile_dc(plan, ratios, order=order, start=start)
    v = interpolation_values(grid, "t")
    for i in range(n):
        if i < start + order:
            assert table[i] is None
            continue
        assert table[i] is not None, i
        tau = v[i - 1] + ratios[i] * (v[i] - v[i - 1])
        nodes = [v[i - k] for k in range(order + 1)]
        expected = [scipy.interpolate.lagrange(nodes, np.eye(order + 1)[k])(tau) for k in range(order + 1)]
        np.testing.assert_allclose([float(w) for w in table[i].weights], expected, rtol=1e-7, atol=1e-9)


def _released_cascade(c: np.ndarray, nfe: int, cfg: float, step: int) -> float:
    """DC-Solver's CPR written out (research notes sec. 2.4): rho = sum_k c_k x^k, x = step/NFE (1-based step),
    c_k = A_k g^2 + B_k g + C_k with g = CFG/12, each of A, B, C = a n^2 + b n + c with n = NFE/50; here in
    fewstep's ascending-power layout C[k, p, q] for x^k g^p n^q."""
    x, g, nn = step / nfe, cfg / 12.0, nfe / 50.0
    return sum(c[k, p, q] * x**k * g**p * nn**q for k in range(4) for p in range(3) for q in range(3))


def test_cpr_predicts_the_cascade_polynomial_of_the_paper():
    c = np.random.default_rng(3).normal(scale=0.2, size=(4, 3, 3))
    c[0, 0, 0] = 1.0
    model = CPRModel(c.reshape(-1), order=2)
    for nfe, cfg in ((5, 7.5), (8, 2.0), (12, 12.0)):
        expected = [1.0, 1.0] + [_released_cascade(c, nfe, cfg, j) for j in range(3, nfe + 1)]
        np.testing.assert_allclose(model.predict(nfe, cfg, warn=False), expected, rtol=1e-12, atol=1e-12)


def test_cpr_fit_ignores_the_fixed_first_ratios():
    """The first K ratios are 1 by construction (not searched): the fit uses steps > K only, so ratios that lie on
    a cascade polynomial beyond K are recovered exactly however far the fixed ones are from it."""
    c = np.random.default_rng(4).normal(scale=0.3, size=(4, 3, 3))
    c[0, 0, 0] = 2.0
    entries = []
    for nfe in (5, 6, 8, 10, 12, 15):
        for cfg in (1.0, 3.0, 7.5):
            ratios = [1.0, 1.0] + [_released_cascade(c, nfe, cfg, j) for j in range(3, nfe + 1)]
            entries.append(RatioEntry(nfe, cfg, ratios))
    cpr = fit_cpr(entries, order=2, ridge=0.0)
    for nfe, cfg in ((7, 5.0), (9, 2.0)):
        expected = [1.0, 1.0] + [_released_cascade(c, nfe, cfg, j) for j in range(3, nfe + 1)]
        np.testing.assert_allclose(cpr.predict(nfe, cfg, warn=False), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ FlowChef
@pytest.mark.parametrize("inner", [1, 4])
def test_flowchef_adam_matches_torch_adam(inner):
    """FlowChef's Adam (fresh moments each denoising step) is torch.optim.Adam on x for M steps of cost(x + offset)."""
    g = _gen(10)
    x, offset, y = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    cost = measurement_cost(lambda z: z[..., :3], y[..., :3], scale=0.7)
    config = FlowChefConfig(step_size=0.05, inner_steps=inner, optimizer="adam", betas=(0.8, 0.95), adam_eps=1e-3)
    moved = flowchef_update(x, offset, cost, config)
    param = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=0.05, betas=(0.8, 0.95), eps=1e-3)
    for _ in range(inner):
        opt.zero_grad()
        cost(param + offset).sum().backward()
        opt.step()
    torch.testing.assert_close(moved, param.detach(), rtol=1e-12, atol=1e-12)


def test_gaussian_fill_applies_its_ridge():
    """delta_h = scale * Sigma_ho (Sigma_oo + ridge I)^-1 delta_o, with numpy's solver as the reference."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(10, 10))
    cov = a @ a.T + 0.1 * np.eye(10)
    observed = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0], dtype=bool)
    ridge, scale = 0.7, 0.6
    fill = GaussianFill(torch.from_numpy(cov), torch.from_numpy(observed), ridge=ridge, scale=scale)
    delta = rng.normal(size=(3, 10)) * observed
    out = fill(torch.from_numpy(delta).float()).double().numpy()
    o, h = observed, ~observed
    expected = scale * cov[np.ix_(h, o)] @ np.linalg.solve(cov[np.ix_(o, o)] + ridge * np.eye(o.sum()), delta[:, o].T)
    np.testing.assert_allclose(out[:, h], expected.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[:, o], delta[:, o], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("steered", "expected"), [(2, [0, 1]), (0, []), (None, [0, 1, 2, 3]), (5, [0, 1, 2, 3, 4])])
def test_flowchef_hook_steers_exactly_the_first_k_steps(steered, expected):
    """``steered_steps=K`` steers steps 0..K-1; ``None`` all but the last of the run."""
    from fewstep import samplers
    from fewstep.solvers.engine import EngineState
    from fewstep.solvers.flowchef import FlowChefHook

    sched = samplers.get("flow-euler")(shift=3.0)
    sched.set_timesteps(5)
    calls: list[int] = []

    class Cost:
        step = -1

        def set_step(self, i):
            self.step = i

        def __call__(self, x0_hat):
            calls.append(self.step)
            return x0_hat.pow(2).flatten(1).sum(1)

    state = EngineState(sched.plan, [FlowChefHook(Cost(), FlowChefConfig(step_size=0.1, steered_steps=steered))])
    g = _gen(11)
    x = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    grid = sched.plan.grid
    for i in range(5):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        s = grid.sigmas[i]
        x = state.advance(i, x, x - s * v, x + (1 - s) * v)
    assert calls == expected


# ------------------------------------------------------------------------------------------------ EMS
def test_ems_finalize_is_the_per_element_least_squares_with_the_exact_l_derivative():
    """l quadratic in lambda (so its derivative is exactly 2 a lambda + c, also at the grid's ends): s and b are
    numpy's least squares of f' = (l - 1) u + w - l' y on f = u - l y (v3 sec. 3.2), element by element."""
    from fewstep.solvers.ems_estimate import EMSAccumulator

    lam = np.linspace(-3.0, 2.0, 6)
    acc = EMSAccumulator(lam, (3,))
    rng = np.random.default_rng(6)
    s_all, b_all = [], []
    for i, la in enumerate(lam):
        l_i, l_dot = 0.3 * la**2 - 0.2 * la + 0.1, 0.6 * la - 0.2
        u, y, w = (rng.normal(size=(50, 3)) for _ in range(3))
        acc.add(i, torch.full((50, 3), l_i, dtype=torch.float64), *(torch.from_numpy(a) for a in (u, y, w)))
        f, fp = u - l_i * y, (l_i - 1) * u + w - l_dot * y
        s = [np.polyfit(f[:, e], fp[:, e], 1) for e in range(3)]  # slope, intercept: least squares
        s_all.append([c[0] for c in s])
        b_all.append([c[1] for c in s])
    ems = acc.finalize()
    np.testing.assert_allclose(ems.s, np.array(s_all), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ems.b, np.array(b_all), rtol=1e-8, atol=1e-10)
