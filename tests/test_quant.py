"""fewstep.quant: quantizer math, NDTC / uniform calibration, fake-quant vs real int8 parity, the per-layer
policy, artifacts, bad input and the CLI."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from torch import nn

import fewstep
from fewstep import quant
from fewstep.quant.kernels import fp8_supported, im2col, im2col_int8, int8_mm
from fewstep.quant.quantizers import (
    METRICS,
    Histogram,
    act_qparams_from_range,
    fake_quant_act,
    fake_quant_weight,
    fp8_fake_quant,
    quantize_act,
    quantize_weight,
    range_error,
    search_act_range,
    weight_qparams,
)
from fewstep.quant.triton_conv import triton_available

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pipe():
    return fewstep.load_default("digits-eps", sampler="ddim")


@pytest.fixture(scope="module")
def calibration(pipe):
    return quant.build_calibration_set(pipe, num_samples=12, steps=6, method="uniform", num_steps_kept=3, seed=1)


@pytest.fixture(scope="module")
def qmodel(pipe, calibration):
    return quant.quantize(pipe.unet, calibration, quant.QuantConfig(act_grid=25, weight_grid=20, split_skip=True))


@pytest.fixture(scope="module")
def fp8_qmodel(pipe, calibration):
    return quant.quantize(pipe.unet, calibration, quant.QuantConfig(format="fp8", act_grid=15, weight_grid=10))


def _assert_real_path_matches_reference(q: nn.Module, model: nn.Module, batch: dict, mode: str,
                                        layer_tol: float = 1e-5) -> None:
    """The real 8-bit ``mode`` of a quantized UNet against its fake-quant reference. Per layer, on the
    activations the model really produces: equal to float rounding (``layer_tol``, relative). End to end the
    two cannot be compared that tightly: a sum-order difference of 1e-7 flips the odd activation rounding, and
    every quantizer downstream spreads a perturbation below its step into more flips, so after ~20 layers the
    paths differ by a fraction of the quantization error that depends on the CPU's summation order. There the
    real path must be an equally good quantization: as close to full precision as the reference (within
    30%), and nearer the reference than the reference is to full precision."""
    layers = quant.quant_layers(q)
    seen: dict[str, tuple] = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args, out)))
             for name, layer in layers.items()]
    quant.set_mode(q, "fake")
    try:
        with torch.no_grad():
            fake = q(**batch).sample
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(layers)
    try:
        with torch.no_grad():
            for name, (args, out) in seen.items():
                real_out = layers[name].set_mode(mode)(*args)
                layers[name].set_mode("fake")
                assert float((real_out - out).norm() / out.norm()) < layer_tol, name
            ref = model(**batch).sample
            quant.set_mode(q, mode)
            assert {layer.mode for layer in layers.values()} == {mode}
            real = q(**batch).sample
    finally:
        quant.set_mode(q, "fake")
    q_err = float((fake - ref).norm() / ref.norm())
    real_err = float((real - ref).norm() / ref.norm())
    assert 1e-4 < q_err < 0.1  # W8A8 is close to, but not, full precision
    assert real_err < 1.3 * q_err and q_err < 1.3 * real_err, (real_err, q_err)
    assert float((real - fake).norm() / fake.norm()) < q_err


# --------------------------------------------------------------------------------------------- quantizer math
def test_activation_grid_scale_zero_point_and_exact_zero():
    qp = act_qparams_from_range(-1.0, 3.0)
    assert qp.scale == pytest.approx(4.0 / 255)
    assert -128 <= qp.zero_point <= 127
    assert qp.zero_point == -128 + round(1.0 / qp.scale)
    x = torch.tensor([0.0, -1.0, 3.0, 1.2345, -5.0, 9.0])
    q = quantize_act(x, qp)
    assert q.dtype == torch.int8 and int(q[0]) == qp.zero_point  # 0.0 is exactly representable
    xh = fake_quant_act(x, qp)
    assert xh[0] == 0
    assert (xh[:4] - x[:4]).abs().max() <= qp.scale / 2 + 1e-6
    assert xh[4] == pytest.approx(-1.0, abs=qp.scale) and xh[5] == pytest.approx(3.0, abs=qp.scale)  # clipped
    one_sided = act_qparams_from_range(0.5, 2.0)  # widened to contain 0
    assert one_sided.zero_point == -128 and one_sided.scale == pytest.approx(2.0 / 255)


def test_weight_scales_are_per_output_channel_and_symmetric():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 10.0]).reshape(4, 1, 1, 1)
    s = weight_qparams(w, search=False)
    assert s.shape == (4,)
    assert torch.allclose(s, w.reshape(4, -1).abs().amax(1) / 127)
    q = quantize_weight(w, s)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (fake_quant_weight(w, s) - w).abs().reshape(4, -1).amax(1)
    assert torch.all(err <= s / 2 + 1e-7)
    searched = weight_qparams(w, metric="lp", grid=40)
    assert torch.all(searched <= s + 1e-12)  # clips only shrink from absmax


def test_range_search_beats_max_on_heavy_tailed_data():
    gen = torch.Generator().manual_seed(0)
    x = _student_t(200_000, gen, dof=3)
    hist = Histogram.of(x)
    xmin, xmax = float(x.min()), float(x.max())

    def exact(lo, hi, p):
        return float((fake_quant_act(x, act_qparams_from_range(lo, hi)) - x).abs().pow(p).mean())

    for metric, p in (("lp", 2.4), ("mse", 2.0)):
        lo, hi = search_act_range(hist, metric, 2.4)
        assert xmin < lo < 0 < hi < xmax  # clips both tails
        assert exact(lo, hi, p) < 0.95 * exact(xmin, xmax, p)  # and that lowers the error it minimises
    # the histogram estimate ranks candidates like the exact error on the data
    lo_c = torch.tensor([xmin, 0.9 * xmin, 0.5 * xmin, 0.1 * xmin])
    hi_c = torch.tensor([xmax, 0.9 * xmax, 0.5 * xmax, 0.1 * xmax])
    estimated = range_error(hist, lo_c, hi_c)
    exact_errors = torch.tensor([exact(float(a), float(b), 2.4) for a, b in zip(lo_c, hi_c)])
    assert torch.equal(torch.argsort(estimated), torch.argsort(exact_errors))
    assert torch.allclose(estimated, exact_errors.double(), rtol=0.15)
    for metric in ("cosine", "kl"):
        lo_m, hi_m = search_act_range(hist, metric)
        assert xmin <= lo_m <= 0 <= hi_m <= xmax


def _student_t(n: int, gen: torch.Generator, dof: int = 2) -> torch.Tensor:
    z = torch.randn(n, generator=gen)
    chi2 = torch.randn(n, dof, generator=gen).pow(2).sum(1)
    return z / (chi2 / dof).sqrt()


def test_one_sided_and_symmetric_searches():
    x = torch.rand(10_000) * 4
    lo, hi = search_act_range(Histogram.of(x))
    assert lo == 0 and 3 < hi <= 4.01
    y = torch.randn(10_000)
    lo, hi = search_act_range(Histogram.of(y), symmetric=True)
    assert lo == pytest.approx(-hi)
    # non-positive data (found by probing: a ZeroDivisionError for every metric): the mirror of the one-sided case
    for metric in METRICS:
        lo, hi = search_act_range(Histogram.of(-x), metric)
        assert hi == 0 and -4.01 <= lo < -3
    lo, hi = search_act_range(Histogram.of(torch.full((100,), -2.0)))
    assert hi == 0 and lo == pytest.approx(-2.0, rel=0.02)


def test_fp8_grid():
    x = torch.linspace(-3, 3, 101)
    y = fp8_fake_quant(x, 3 / 448)
    assert torch.all((y - x).abs() <= x.abs() / 16 + 1e-6)  # e4m3: 3 mantissa bits, half an ulp <= 2^-4 relative
    assert y.abs().max() <= 3.0 + 1e-6
    qp = act_qparams_from_range(-2.0, 3.0, "fp8")
    assert qp.scale == pytest.approx(3 / 448) and qp.zero_point == 0
    w = torch.randn(8, 16)
    s = weight_qparams(w, fmt="fp8", search=False)
    assert quantize_weight(w, s, "fp8").dtype == torch.float8_e4m3fn


@pytest.mark.parametrize(("call", "message"), [
    (lambda: search_act_range(Histogram.of(torch.randn(100)), "l1"), r"`metric` must be one of .*got 'l1'"),
    (lambda: weight_qparams(torch.randn(2, 2), grid=0), r"`grid` must be an integer >= 1, got 0"),
    (lambda: act_qparams_from_range(0, 1, "int4"), r"`format` must be one of \['int8', 'fp8'\], got 'int4'"),
    (lambda: quant.ndtc_indices(4, 10, mean=0.7), r"`mean` .* must be in \[0, 0.5\].*got 0.7"),
    (lambda: quant.ndtc_indices(4, 10, std=0), r"`std` .* > 0, got 0"),
    (lambda: quant.uniform_indices(11, 10), r"`num_steps_kept` must be an integer in \[1, 10\].*got 11"),
    (lambda: quant.QuantConfig(metric="l1").validate(), r"`metric` must be one of"),
    (lambda: quant.QuantConfig(mode="int4").validate(), r"`mode` must be one of"),
])
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------ calibration
def test_ndtc_draws_follow_the_paper():
    gen = torch.Generator().manual_seed(0)
    d = quant.ndtc_indices(20_000, 100, mean=0.4, std=0.4, generator=gen)
    assert int(d.min()) == 0 and int(d.max()) == 99
    assert float((d == 0).float().mean()) == pytest.approx(0.16, abs=0.02)  # ~16% clamp to 0 (notes)
    assert float((d == 99).float().mean()) == pytest.approx(0.07, abs=0.02)  # ~7% clamp to T-1
    inner = d[(d > 0) & (d < 99)].float()
    assert 35 < float(inner.mean()) < 50  # centred near 0.4 T: the image end (diffusion index 0) is favoured
    assert quant.uniform_indices(5, 20).tolist() == [0, 4, 8, 12, 16]


class _Recorder(nn.Module):
    def forward(self, sample, timestep, class_labels=None):
        return sample


def test_record_maps_draws_to_diffusion_index_not_loop_counter():
    """The draw d is a diffusion index (0 = image end); the sampler loop runs d = T-1 ... 0. PTQ4DM's released
    script compares d with the loop counter, which records step T-1-d instead: this test catches that."""
    model = _Recorder()
    timesteps = torch.tensor([900, 700, 500, 300, 100])  # loop order, noisiest first
    xs = torch.arange(5.0).reshape(5, 1, 1, 1).expand(5, 2, 1, 1)  # the sample at loop step i holds value i

    def run():
        for i, t in enumerate(timesteps):
            model(xs[i].reshape(2, 1, 1, 1), t.expand(2), class_labels=torch.tensor([3, 7]))

    draws = torch.tensor([0, 1])  # row 0 wants the image end, row 1 one step before

    recs = quant.record_denoiser_inputs(model, run, steps=5, want=lambda d: torch.nonzero(draws == d).flatten())
    got = {int(r["class_labels"][0]): (int(r["timestep"][0]), float(r["sample"][0]), int(r["diffusion_index"][0]))
           for r in recs}
    assert got[3] == (100, 4.0, 0)  # last loop step = smallest model timestep
    assert got[7] == (300, 3.0, 1)


def test_ndtc_calibration_records_model_facing_timesteps_and_both_cfg_branches(pipe):
    steps = 8
    cal = quant.build_calibration_set(pipe, num_samples=6, steps=steps, method="ndtc", ndtc_mean=0.0, ndtc_std=0.01,
                                      seed=0)
    pipe.scheduler.set_timesteps(steps)
    grid = pipe.scheduler.timesteps
    assert cal.diffusion_index.eq(0).all()  # all draws at the image end ...
    assert cal.timestep.eq(grid[-1]).all() and int(grid[-1]) < 200  # ... labelled with the timestep the UNet sees
    assert len(cal) == 12  # 6 samples x (conditional + null-class rows)
    null = pipe.null_class
    assert (cal.class_labels == null).sum() == 6 and (cal.class_labels < null).sum() == 6
    cond, uncond = cal.class_labels < null, cal.class_labels == null
    assert torch.equal(cal.sample[cond], cal.sample[uncond])  # same x_t fed to both CFG branches
    # every recorded timestep is the scheduler's timestep for its diffusion index
    wide = quant.build_calibration_set(pipe, num_samples=20, steps=steps, method="ndtc", seed=3)
    assert torch.equal(wide.timestep, grid[steps - 1 - wide.diffusion_index])
    assert wide.settings["method"] == "ndtc" and wide.settings["ndtc_mean"] == 0.4


def test_uniform_calibration_keeps_evenly_spaced_steps(pipe, calibration):
    pipe.scheduler.set_timesteps(6)
    kept = quant.uniform_indices(3, 6)
    assert sorted(set(calibration.diffusion_index.tolist())) == kept.tolist()
    assert set(calibration.timestep.tolist()) == set(pipe.scheduler.timesteps[6 - 1 - kept].tolist())
    assert len(calibration) == 4 * 3 * 2  # ceil(12 / 3) trajectories x 3 steps x 2 CFG rows


# -------------------------------------------------------------------------------------- quantize and parity
def test_quantize_swaps_every_linear_and_conv_but_the_boundary_by_default(pipe, qmodel):
    layers = quant.quant_layers(qmodel)
    float_layers = quant.quantizable_layers(pipe.unet, exclude=[])
    assert quant.QuantConfig().exclude == list(quant.BOUNDARY_LAYERS) == ["conv_in", "conv_out"]
    assert set(layers) == set(float_layers) - {"conv_in", "conv_out"} and len(layers) == 50
    assert isinstance(qmodel.conv_in, nn.Conv2d) and isinstance(qmodel.conv_out, nn.Conv2d)  # x_t and output float
    assert not quant.quant_layers(pipe.unet)  # the float model is untouched (deep copy)
    assert any(isinstance(m, nn.SiLU) for m in qmodel.modules())  # nonlinearities stay float modules
    assert qmodel.fewstep_quant["config"]["metric"] == "lp"


def test_exclude_empty_quantizes_every_layer(pipe, calibration):
    q = quant.quantize(pipe.unet, calibration, quant.QuantConfig(act_grid=10, weight_grid=10, exclude=[]))
    layers = quant.quant_layers(q)
    assert set(layers) == set(quant.quantizable_layers(pipe.unet, exclude=[])) and len(layers) == 52
    assert "conv_in" in layers and "conv_out" in layers and q.fewstep_quant["config"]["exclude"] == []


def test_exclude_patterns_matching_nothing_are_ignored(pipe, calibration):
    # transformer denoisers (SD3 / Flux) have no conv_in / conv_out: the default boundary must not error
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4))
    assert set(quant.quantizable_layers(net, quant.BOUNDARY_LAYERS)) == {"0", "2"}
    assert quant.QuantConfig(exclude=["no_such_layer*"]).validate().exclude == ["no_such_layer*"]
    with pytest.raises(ValueError, match=r"`exclude` must be a list of fnmatch patterns"):
        quant.QuantConfig(exclude="conv_in").validate()


def test_skip_concat_split_points(pipe, calibration, qmodel):
    splits = quant.find_skip_splits(pipe.unet, calibration)
    assert splits["up_blocks.0.resnets.0.conv_shortcut"] == 64
    assert splits["up_blocks.2.resnets.1.conv_shortcut"] == 32
    assert all(name.endswith("conv_shortcut") and name.startswith("up_blocks") for name in splits)
    layers = quant.quant_layers(qmodel)
    assert layers["up_blocks.2.resnets.1.conv_shortcut"].split == 32
    assert layers["up_blocks.2.resnets.1.conv1"].split == 0


def test_split_quantization_helps_when_the_concat_parts_have_different_ranges():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1)
    with torch.no_grad():
        conv.weight[:, :8] *= 1000  # both parts matter for the output, like a skip concat feeding a shortcut
    x = torch.cat([0.02 * torch.randn(64, 8, 4, 4), 20 * torch.randn(64, 8, 4, 4)], dim=1)
    ref = conv(x)

    def layer_for(split):
        parts = [x] if not split else [x[:, :split], x[:, split:]]
        acts = [act_qparams_from_range(*search_act_range(Histogram.of(p))) for p in parts]
        w = conv.weight.detach()
        wparts = [w] if not split else [w[:, :split], w[:, split:]]
        return quant.QuantLayer(conv, [weight_qparams(p) for p in wparts], acts, split=split)

    with torch.no_grad():
        err_one = (layer_for(0)(x) - ref).norm()
        err_split = (layer_for(8)(x) - ref).norm()
        split_layer = layer_for(8)
        fake = split_layer(x)
        real = split_layer.set_mode("int8")(x)
    assert err_split < 0.5 * err_one
    assert torch.allclose(real, fake, rtol=1e-5, atol=1e-5 * float(fake.abs().max()))


@pytest.mark.parametrize("layer", [
    nn.Linear(40, 24),
    nn.Conv2d(6, 10, 3, padding=1),
    nn.Conv2d(6, 10, 3, stride=2, padding=1),
    nn.Conv2d(6, 10, (3, 2), padding=(0, 1)),
    nn.Conv2d(6, 10, 1),
    nn.Conv2d(6, 10, 3, dilation=2, padding=2),
])
def test_int8_path_matches_fake_quant_reference(layer):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40) if isinstance(layer, nn.Linear) else torch.randn(3, 6, 9, 9)
    x = x * 2 + 0.7  # asymmetric range: non-zero zero-point
    acts = [act_qparams_from_range(*search_act_range(Histogram.of(x)))]
    q = quant.QuantLayer(layer, [weight_qparams(layer.weight)], acts)
    assert acts[0].zero_point != 0
    with torch.no_grad():
        fake = q(x)
        real = q.set_mode("int8")(x)
        dequant = q.set_mode("dequant")(x)
    assert real.shape == fake.shape == layer(x).shape
    tol = 2e-6 * float(fake.abs().max())
    assert (real - fake).abs().max() <= tol
    assert (dequant - fake).abs().max() <= tol


def test_int8_kernels_are_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 24), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (7, 24), dtype=torch.int8, generator=gen)
    assert torch.equal(int8_mm(a, w), a.int() @ w.int().t())
    x = torch.randint(-128, 128, (2, 3, 6, 6), dtype=torch.int8, generator=gen)
    conv = {"kernel_size": (3, 3), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1)}
    rows, (ho, wo) = im2col_int8(x, conv, pad_value=0)
    ref_rows, size = im2col(x.float(), conv)
    assert (ho, wo) == size
    # same patches, (kh, kw, C) vs (C, kh, kw) order
    perm = ref_rows.reshape(-1, 3, 9).transpose(1, 2).reshape(-1, 27)
    assert torch.equal(rows.float(), perm)


def test_quantized_unet_int8_vs_fake(pipe, qmodel, calibration):
    _assert_real_path_matches_reference(qmodel, pipe.unet, next(calibration.batches(8)), "int8")


def _layer_kinds(model: nn.Module) -> set[tuple]:
    """The kinds of quantized layers ``model`` holds: layer kind, split or not, conv geometry, bias, a non-zero
    activation zero-point, format."""
    geometry = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    return {(layer.kind, bool(layer.split), tuple(layer.conv[k] for k in geometry) if layer.kind == "conv2d" else (),
             layer.bias is not None, any(a.zero_point for a in layer.act), layer.fmt)
            for layer in quant.quant_layers(model).values()}


@pytest.fixture(scope="module")
def small_quantized(pipe, calibration):
    """``small_quantized(digits_qmodel)``: a UNet2DModel of the digits UNet's configuration (every option, so the
    same diffusers code paths: class embedding, down / mid-with-attention / up blocks, down- and upsampling convs)
    at two levels of 8 and 16 channels instead of three of 32, 64, 64 (37 quantized layers, not 50), random
    weights, quantized on ``calibration`` with ``digits_qmodel``'s settings but a 4-point range search (which picks
    the scales' values only, not what the graph computes with them; 0.2 s instead of 3 s), cached per settings."""
    from diffusers import UNet2DModel

    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    config.update(down_block_types=config["down_block_types"][:2], up_block_types=config["up_block_types"][:2],
                  block_out_channels=(8, 16), norm_num_groups=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(**config).eval()
    cache = {}

    def make(digits_qmodel: nn.Module) -> nn.Module:
        settings = digits_qmodel.fewstep_quant["config"]
        key = json.dumps(settings, sort_keys=True)
        if key not in cache:
            cache[key] = quant.quantize(unet, calibration,
                                        quant.QuantConfig(**{**settings, "act_grid": 4, "weight_grid": 4}))
        return cache[key]

    return make


@pytest.mark.parametrize("mode", ["fake", "int8", "fp8"])
def test_quantized_unet_compiles_as_one_graph(request, qmodel, small_quantized, calibration, mode):
    """``torch.compile`` sees the whole quantized UNet as one graph (static activation scales, no host sync, no
    graph break), so inductor can fuse the quantize / GEMM / epilogue passes; the compiled call matches eager.
    fp8 runs where ``torch._scaled_mm`` has the float8 kernel (CPU builds that have it, or CUDA SM >= 8.9).

    Compiled: a UNet of the digits UNet's configuration at two levels of 8 / 16 channels (``small_quantized``;
    dynamo's trace of the whole model is this test's cost, about half the digits UNet's), quantized with the
    digits model's settings (format, split shortcuts, ...) and checked to hold the same kinds of quantized layers
    as the quantized digits UNet (split or not, every conv geometry, linear, non-zero zero-points)."""
    if mode == "fp8":
        if not fp8_supported("cpu"):
            pytest.skip("this PyTorch build has no CPU float8 torch._scaled_mm")
        qmodel = request.getfixturevalue("fp8_qmodel")
    digits_kinds = _layer_kinds(qmodel)
    qmodel = small_quantized(qmodel)
    assert _layer_kinds(qmodel) == digits_kinds
    batch = next(calibration.batches(4))
    quant.set_mode(qmodel, mode)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(qmodel, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
        with torch.no_grad():
            eager = qmodel(**batch).sample
            out = compiled(**batch).sample
    finally:
        quant.set_mode(qmodel, "fake")
        torch._dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- policy
def test_policy_picks_the_fastest_supported_mode(qmodel, calibration):
    batch = next(calibration.batches(4))

    def timer(layer, x, mode):
        fast_int8 = layer.kind == "conv2d"
        return {"int8": 1.0 if fast_int8 else 3.0, "dequant": 2.0, "fake": 5.0}[mode]

    report = quant.choose_modes(qmodel, batch, candidates=("int8", "fp8", "dequant"), timer=timer)
    assert len(report) == 50  # every quantized layer (conv_in / conv_out stay float by default)
    for r in report:
        assert "fp8" not in r.seconds  # int8 parameters: no fp8 kernel for them
        layer = qmodel.get_submodule(r.name)
        assert r.chosen == ("int8" if layer.kind == "conv2d" else "dequant") == layer.mode
    # a real kernel must win by the margin, else float compute is kept
    report = quant.choose_modes(qmodel, batch, candidates=("int8", "dequant"), margin=2.5, timer=timer)
    assert {r.chosen for r in report} == {"dequant"}
    report = quant.choose_modes(qmodel, batch, candidates=("int8", "dequant"), apply=False)  # real timings
    assert all(r.seconds["int8"] > 0 and r.chosen in ("int8", "dequant") for r in report)
    quant.set_mode(qmodel, "fake")
    with pytest.raises(ValueError, match=r"`candidates` must be a non-empty subset"):
        quant.choose_modes(qmodel, batch, candidates=("int4",))
    with pytest.raises(ValueError, match=r"`margin` must be a number >= 1"):
        quant.choose_modes(qmodel, batch, margin=0.5)


def test_time_layer_restores_mode():
    layer = quant.QuantLayer(nn.Linear(16, 16), [torch.full((16,), 0.01)], [act_qparams_from_range(-1, 1)])
    assert quant.time_layer(layer, torch.randn(8, 16), "int8", repeats=2) > 0
    assert layer.mode == "fake"
    # compiled: torch.compile(layer) in that mode, timed after its first (compiling) call; mode restored
    assert quant.time_layer(layer, torch.randn(8, 16), "dequant", repeats=2, warmup=1, compiled=True) > 0
    assert layer.mode == "fake"
    with pytest.raises(ValueError, match="`warmup` must be"):
        quant.time_layer(layer, torch.randn(8, 16), "dequant", warmup=0, compiled=True)


def test_compiled_timing_really_compiles_every_layer():
    """All QuantLayers share one forward code object, whose dynamo cache holds 8 entries before dynamo falls back
    to eager without an error: each compiled timing must start from (and leave) an empty cache, or the 9th
    layer would be timed eagerly under the compiled label. A counting backend sees one graph per timing."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layers = [quant.QuantLayer(nn.Linear(16, 8 + k), [torch.full((8 + k,), 0.01)], [act_qparams_from_range(-1, 1)])
              for k in range(12)]
    x = torch.randn(4, 16)
    for layer in layers:
        assert quant.time_layer(layer, x, "int8", repeats=1, warmup=1, compiled={"backend": counting_backend}) > 0
    assert len(graphs) == len(layers)
    graphs.clear()  # the same for any module class, as the CUDA benchmark compiles its layers and UNet variants
    for k in range(12):
        quant.compile_fresh(nn.Linear(16, 8 + k), backend=counting_backend)(x)
    assert len(graphs) == 12
    with pytest.raises(ValueError, match="`compiled` must be a bool or a dict of torch.compile arguments"):
        quant.time_layer(layers[0], x, "int8", compiled="yes")


def test_compiled_layers_compile_once_and_derived_weights_follow_the_weights():
    """A forward that filled a cache (int8 convs' (kh, kw, C) weight, the zero-point row sums, the Triton conv's
    weight) mutated module state, and torch.compile recompiled every such model on its second call; the derived
    tensors are now built when the mode is set, and rebuilt when the weights are loaded or moved."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = quant.QuantLayer(conv, [torch.full((16,), 0.01)], [act_qparams_from_range(-1, 2)], mode="int8")
    assert set(layer._derived) == {("nk", 0), ("zero_term", 0)}  # asymmetric range: a zero point
    x = torch.randn(2, 8, 6, 6)
    call = quant.compile_fresh(layer, backend=counting_backend)
    with torch.no_grad():
        outs = [call(x) for _ in range(3)]
    assert len(graphs) == 1 and all(torch.equal(o, outs[0]) for o in outs)
    # new weights through load_state_dict: the derived tensors follow (the int8 result equals the reference's)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight_q0"] = torch.randint(-127, 128, state["weight_q0"].shape, dtype=torch.int8)
    layer.load_state_dict(state)
    with torch.no_grad():
        real = layer(x)
        fake = layer.set_mode("fake")(x)
    torch.testing.assert_close(real, fake, rtol=1e-5, atol=1e-5)
    assert layer._derived == {}  # fake mode reads nothing derived
    layer.set_mode("int8").to("cpu")
    assert set(layer._derived) == {("nk", 0), ("zero_term", 0)}


def test_policy_times_each_layer_signature_once(qmodel, calibration):
    """Layers with the same structure and input shape share one timing and one choice; the choice follows the
    signature, not the layer's name."""
    from fewstep.quant.policy import capture_layer_inputs, layer_signature

    batch = next(calibration.batches(4))
    xs = capture_layer_inputs(qmodel, batch)
    layers = quant.quant_layers(qmodel)
    signatures = {name: layer_signature(layer, xs[name]) for name, layer in layers.items() if name in xs}
    distinct = sorted(set(signatures.values()), key=str)
    assert 1 < len(distinct) < len(signatures)  # the UNet repeats some layer shapes
    fast = set(distinct[::2])  # int8 wins for every other signature
    calls = []

    def timer(layer, x, mode):
        sig = layer_signature(layer, x)
        calls.append((sig, mode))
        return {"int8": 1.0 if sig in fast else 3.0, "dequant": 2.0}[mode]

    report = quant.choose_modes(qmodel, batch, candidates=("int8", "dequant"), timer=timer)
    assert len(calls) == 2 * len(distinct) and len(set(calls)) == len(calls)
    assert len(report) == len(signatures)
    for r in report:
        want = "int8" if signatures[r.name] in fast else "dequant"
        assert r.chosen == want == qmodel.get_submodule(r.name).mode
    quant.set_mode(qmodel, "fake")
    with pytest.raises(ValueError, match="`compiled` must be a bool or a dict of torch.compile arguments, got 'yes'"):
        quant.choose_modes(qmodel, batch, compiled="yes")


def test_layer_macs_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cases = [
        (nn.Linear(24, 40), torch.randn(3, 7, 24)),
        (nn.Conv2d(6, 10, 3, padding=1), torch.randn(2, 6, 9, 9)),
        (nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
        (nn.Conv2d(8, 12, 3, padding=1, groups=2), torch.randn(2, 8, 5, 5)),
        (nn.Conv2d(6, 4, 3, padding="same"), torch.randn(1, 6, 7, 7)),
        (nn.Conv2d(6, 4, 1), torch.randn(1, 6, 7, 7)),
    ]
    for module, x in cases:
        out_ch = module.weight.shape[0]
        layer = quant.QuantLayer(module, [torch.full((out_ch,), 0.01)], [act_qparams_from_range(-1, 1)])
        with FlopCounterMode(display=False) as counter:
            module(x)
        assert quant.layer_macs(layer, x) * 2 == counter.get_total_flops(), module


def test_policy_times_the_largest_signatures_first_within_a_budget(qmodel, calibration):
    """Signatures are timed in order of their multiply-adds (all layers sharing one), largest first; past the
    ``budget`` the rest are not timed and run ``dequant``, reported with no timings."""
    from fewstep.quant.policy import capture_layer_inputs

    batch = next(calibration.batches(4))
    xs = capture_layer_inputs(qmodel, batch)
    layers = quant.quant_layers(qmodel)
    totals: dict = {}
    for name, layer in layers.items():
        sig = quant.layer_signature(layer, xs[name])
        totals[sig] = totals.get(sig, 0) + quant.layer_macs(layer, xs[name])
    calls = []

    def timer(layer, x, mode):
        if mode == "int8":
            calls.append(quant.layer_signature(layer, x))
        return {"int8": 1.0, "dequant": 2.0}[mode]

    quant.choose_modes(qmodel, batch, candidates=("int8", "dequant"), timer=timer, apply=False)
    assert [totals[c] for c in calls] == sorted(totals.values(), reverse=True)

    def slow_timer(layer, x, mode):
        time.sleep(0.02)
        return timer(layer, x, mode)

    calls.clear()
    report = quant.choose_modes(qmodel, batch, candidates=("int8", "dequant"), timer=slow_timer, budget=0.05)
    assert 1 <= len(calls) < len(totals)  # stopped once 0.05 s of timing had passed
    timed = [r for r in report if r.seconds]
    assert timed and all(r.chosen == "int8" for r in timed)
    untimed = [r for r in report if not r.seconds]
    assert untimed and all(r.chosen == "dequant" == qmodel.get_submodule(r.name).mode for r in untimed)
    assert {quant.layer_signature(layers[r.name], xs[r.name]) for r in timed} == set(calls)
    quant.set_mode(qmodel, "fake")
    # a candidate kernel that fails to build or run is recorded and never chosen; a failing fallback is an error

    def broken_int8(layer, x, mode):
        if mode == "int8" and layer.kind == "conv2d":
            raise RuntimeError("no kernel image")
        return {"int8": 1.0, "dequant": 2.0}[mode]

    report = quant.choose_modes(qmodel, batch, candidates=("int8", "dequant"), timer=broken_int8)
    convs = [r for r in report if layers[r.name].kind == "conv2d"]
    assert convs and all(r.chosen == "dequant" and r.seconds["int8"] == float("inf") and
                         r.errors == {"int8": "RuntimeError: no kernel image"} for r in convs)  # fmt: skip
    assert all(r.chosen == "int8" and not r.errors for r in report if layers[r.name].kind == "linear")
    report = quant.choose_modes(qmodel, batch, candidates=("int8",), timer=broken_int8)
    assert {r.chosen for r in report if layers[r.name].kind == "conv2d"} == {"dequant"}

    def broken_fallback(layer, x, mode):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        quant.choose_modes(qmodel, batch, candidates=("int8", "dequant"), timer=broken_fallback)
    quant.set_mode(qmodel, "fake")
    for bad in (0, -1.0, "60", True):
        with pytest.raises(ValueError, match="`budget` must be None or a number of seconds > 0"):
            quant.choose_modes(qmodel, batch, budget=bad)


# ------------------------------------------------------------------------------------------------ artifacts
def test_save_load_round_trip(tmp_path, pipe, qmodel, calibration):
    quant.save_quantized(qmodel, tmp_path / "q", model_id="digits-eps")
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert meta["bits"] == 8 and meta["format"] == "int8" and meta["method"] == "ptq4dm-w8a8"
    assert meta["model_id"] == "digits-eps" and meta["calibration"]["method"] == "uniform"
    assert meta["config"]["metric"] == "lp" and meta["layers"]["up_blocks.0.resnets.0.conv_shortcut"]["split"] == 64
    loaded = quant.load_quantized(pipe.unet, tmp_path / "q", mode="int8")
    batch = next(calibration.batches(6))
    quant.set_mode(qmodel, "int8")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).sample, qmodel(**batch).sample)
    quant.set_mode(qmodel, "fake")
    for name, layer in quant.quant_layers(qmodel).items():
        other = loaded.get_submodule(name)
        assert torch.equal(layer.weight_q0, other.weight_q0) and layer.act == other.act
    # the layers kept in float (the default boundary) stay float after the round trip
    assert set(quant.quant_layers(loaded)) == set(quant.quant_layers(qmodel))
    assert isinstance(loaded.conv_in, nn.Conv2d) and isinstance(loaded.conv_out, nn.Conv2d)
    assert meta["config"]["exclude"] == ["conv_in", "conv_out"] and "conv_in" not in meta["layers"]


def test_auto_mode_picks_each_layers_real_path_where_it_runs(tmp_path, pipe, qmodel):
    lin = nn.Linear(16, 16)
    int8 = quant.QuantLayer(lin, [weight_qparams(lin.weight)], [act_qparams_from_range(-1, 1)])
    assert int8.set_mode("auto").mode == "int8"
    fp8 = quant.QuantLayer(lin, [weight_qparams(lin.weight, fmt="fp8")], [act_qparams_from_range(-1, 1, "fp8")],
                           fmt="fp8")
    # fp8 on CUDA only: the CPU float8 kernel is exact but slower than fake-quant
    assert fp8.set_mode("auto").mode == "fake" and fp8.weight_q0.device.type == "cpu"
    grouped = quant.QuantLayer(nn.Conv2d(4, 4, 3, groups=2), [torch.full((4,), 0.01)], [act_qparams_from_range(-1, 1)])
    assert grouped.set_mode("auto").mode == "fake"  # no int8 conv path for grouped convs
    with pytest.raises(ValueError, match=r"`mode` must be one of \['fake', 'int8', 'fp8', 'dequant', 'auto'\], "
                                         r"got 'int4'"):
        int8.set_mode("int4")
    quant.save_quantized(qmodel, tmp_path / "q", model_id="digits-eps")
    loaded = quant.load_quantized(pipe.unet, tmp_path / "q", mode="auto")
    modes = {name: layer.mode for name, layer in quant.quant_layers(loaded).items()}
    assert modes == {name: ("int8" if "int8" in layer.supported_modes() else "fake")
                     for name, layer in quant.quant_layers(loaded).items()}
    assert "int8" in modes.values()
    quant.set_mode(loaded, "fake")
    assert set(layer.mode for layer in quant.quant_layers(loaded).values()) == {"fake"}
    quant.set_mode(loaded, "auto")
    assert {name: layer.mode for name, layer in quant.quant_layers(loaded).items()} == modes


def test_load_rejects_other_models(tmp_path, pipe, qmodel):
    from diffusers import UNet2DModel

    quant.save_quantized(qmodel, tmp_path / "q", model_id="digits-eps")
    flow = fewstep.load_default("digits-flow", sampler=None).unet  # same architecture, other weights
    with pytest.raises(ValueError, match=r"does not fit this model's weights: layer '.*' weight norm"):
        quant.load_quantized(flow, tmp_path / "q")
    small = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, layers_per_block=1)
    with pytest.raises(ValueError, match=r"saved for model 'digits-eps' does not fit this model: layer"):
        quant.load_quantized(small, tmp_path / "q")
    nudged = fewstep.load_default("digits-eps", sampler=None).unet
    with torch.no_grad():
        nudged.conv_out.bias += 1e-3  # not a quantized-layer weight: only the exact hash sees it
    quant.load_quantized(nudged, tmp_path / "q")
    with pytest.raises(ValueError, match=r"weights hash .* != saved"):
        quant.load_quantized(nudged, tmp_path / "q", strict=True)
    with pytest.raises(ValueError, match=r"`model_id` is 'digits-flow'"):
        quant.load_quantized(pipe.unet, tmp_path / "q", model_id="digits-flow")
    with pytest.raises(FileNotFoundError, match=r"holds no saved quantization"):
        quant.load_quantized(pipe.unet, tmp_path / "nothing")
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    meta["version"] = 99
    (tmp_path / "q" / "quant.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"artifact version 99"):
        quant.load_quantized(pipe.unet, tmp_path / "q")



@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("layers"), r"`layers` must be a dict, got NoneType"),
    (lambda m: m.pop("weight_norms"), r"`weight_norms` must be a dict"),
    (lambda m: m.update(format="int4"), r"`format` must be one of \['int8', 'fp8'\], got 'int4'"),
    (lambda m: m.update(format="fp8"), r"`zero_point` must be an integer in \[0, 0\] for fp8|says format 'fp8'"),
    (lambda m: next(iter(m["layers"].values()))["act"][0].update(scale=0), r"activation `scale` must be a finite "
                                                                          r"number in \(0, 1e\+30\), got 0"),
    (lambda m: next(iter(m["layers"].values()))["act"][0].update(scale=float("nan")), r"`scale` must be a finite"),
    (lambda m: next(iter(m["layers"].values()))["act"][0].update(zero_point=999), r"`zero_point` must be an "
                                                                                  r"integer in \[-128, 127\]"),
    (lambda m: next(iter(m["layers"].values())).pop("act"), r"must list kind, split, shape and act"),
])
def test_load_checks_the_metadata_it_reads(tmp_path, pipe, qmodel, edit, message):
    """Found by probing: edited files loaded with zero/NaN scales, int8 codes were read as e4m3 values, and
    missing keys were a KeyError (a traceback and exit 1 from `fewstep generate --quant`)."""
    quant.save_quantized(qmodel, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    edit(meta)
    (tmp_path / "q" / "quant.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        quant.load_quantized(pipe.unet, tmp_path / "q")


def test_load_refuses_a_json_list(tmp_path, pipe, qmodel):
    quant.save_quantized(qmodel, tmp_path / "q")
    (tmp_path / "q" / "quant.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"is not a fewstep quantization file"):
        quant.load_quantized(pipe.unet, tmp_path / "q")


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_quantize_input(pipe, calibration):
    with pytest.raises(ValueError, match=r"has no quantizable layers \(nn.Linear / nn.Conv2d\)"):
        quant.quantize(nn.Sequential(nn.ReLU()), calibration)
    with pytest.raises(ValueError, match=r"has no quantizable layers .* outside exclude"):
        quant.quantize(pipe.unet, calibration, quant.QuantConfig(exclude=["*"]))
    empty = quant.CalibrationSet(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`calibration` is empty"):
        quant.quantize(pipe.unet, empty)
    with pytest.raises(TypeError, match=r"`calibration` must be a fewstep.quant.CalibrationSet"):
        quant.quantize(pipe.unet, [1, 2])
    with pytest.raises(ValueError, match=r"`method` must be one of \['ndtc', 'uniform'\]"):
        quant.build_calibration_set(pipe, method="random")
    with pytest.raises(ValueError, match=r"`model` holds no quantized layers"):
        quant.set_mode(pipe.unet, "int8")
    with pytest.raises(ValueError, match=r"`unet` is a Linear: fewstep.quant calibrates UNets"):
        quant.quantize(nn.Linear(4, 4), calibration)
    # a second pass over a quantized model (its artifact would not load onto any model) is refused
    once = quant.quantize(pipe.unet, calibration, quant.QuantConfig(act_grid=4, weight_grid=3))
    with pytest.raises(ValueError, match=r"`unet` \(UNet2DModel\) is already quantized"):
        quant.quantize(once, calibration)


class _TwoLayers(nn.Module):
    """A UNet-like module (forward(sample, timestep)) whose second layer sees only values <= 0."""

    def __init__(self, conv: nn.Module | None = None):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.c = conv if conv is not None else nn.Identity()

    def forward(self, sample, timestep=None):
        return self.c(self.b(-torch.relu(self.a(sample)) - 0.1))


def test_quantize_failures_leave_the_model_untouched():
    """Found by probing: a layer failing late (here an int8 conv with padding='same', which has no int8 path)
    left `inplace=True` models half-quantized (and then refused as 'already quantized'); a format/mode mismatch
    failed only after calibration. Also: layers whose inputs are all <= 0 raised a ZeroDivisionError."""
    gen = torch.Generator().manual_seed(0)
    cal = quant.CalibrationSet(torch.randn(8, 4, generator=gen), torch.zeros(8, dtype=torch.long))
    q = quant.quantize(_TwoLayers(), cal, quant.QuantConfig(exclude=[], act_grid=10, weight_grid=5))
    assert set(quant.quant_layers(q)) == {"a", "b"}
    with pytest.raises(ValueError, match=r"`mode` 'int8' runs int8 parameters; `format` is 'fp8'"):
        quant.QuantConfig(format="fp8", mode="int8").validate()
    model = _TwoLayers(conv=nn.Sequential(nn.Unflatten(1, (4, 1, 1)), nn.Conv2d(4, 4, 3, padding="same")))
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"layer 'c.1': `mode` 'int8' is not available .* exclude=\['c.1'\]"):
        quant.quantize(model, cal, quant.QuantConfig(exclude=[], mode="int8", act_grid=10, weight_grid=5),
                       inplace=True)
    assert {n: type(m) for n, m in model.named_modules()} == before and not hasattr(model, "fewstep_quant")


def test_dtype_casts_leave_the_stored_quantized_tensors_alone(pipe, calibration):
    """``model.to(torch.float16)`` / ``.half()`` (what ``pipe.to("cuda", torch.float16)`` does) cast the float
    parts of the model but not the 8-bit weights, float32 scales and bias that define the numerics."""
    import copy

    q = quant.quantize(pipe.unet, calibration, quant.QuantConfig(act_grid=10, weight_grid=5, split_skip=True))
    before = {n: (b.dtype, b.clone()) for n, b in q.named_buffers() if ".weight_q" in n or ".weight_scale" in n}
    half = copy.deepcopy(q).to(torch.float16)
    after = dict(half.named_buffers())
    for name, (dtype, value) in before.items():
        assert after[name].dtype == dtype and torch.equal(after[name], value), name
    layers = quant.quant_layers(half)
    assert all(layer.bias is None or layer.bias.dtype == torch.float32 for layer in layers.values())
    assert half.conv_in.weight.dtype == torch.float16  # the float layers are cast as usual
    lin = nn.Linear(16, 8)
    fp8 = quant.QuantLayer(lin, [weight_qparams(lin.weight, fmt="fp8")], [act_qparams_from_range(-1, 1, "fp8")],
                           fmt="fp8").bfloat16()
    assert fp8.weight_q0.dtype == torch.float8_e4m3fn and fp8.weight_scale0.dtype == torch.float32
    batch = next(calibration.batches(4))
    with torch.no_grad():
        ref = q(**batch).sample
        quant.set_mode(half, "dequant")
        got = half(**{k: v.half() if v.is_floating_point() else v for k, v in batch.items()}).sample
    assert got.dtype == torch.float16 and float((got.float() - ref).norm() / ref.norm()) < 0.05


def test_real_mode_errors_name_the_fallback(monkeypatch):
    lin = nn.Linear(16, 16)
    fp8 = quant.QuantLayer(lin, [weight_qparams(lin.weight, fmt="fp8")], [act_qparams_from_range(-1, 1, "fp8")],
                           fmt="fp8")
    with torch.no_grad():
        assert fp8(torch.randn(4, 16)).shape == (4, 16)  # the fake-quant reference runs anywhere
    with pytest.raises(ValueError, match=r"`mode` 'int8' needs int8-format parameters.*use 'fp8', 'fake'"):
        fp8.set_mode("int8")
    monkeypatch.setattr("fewstep.quant.modules.fp8_supported", lambda device=None: False)  # a device without it
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU with compute capability >= 8.9.*CPU float8 "
                                           r"_scaled_mm; use mode='fake'"):
        fp8.set_mode("fp8")
    assert "fp8" not in fp8.supported_modes() and fp8.set_mode("auto").mode == "fake"
    monkeypatch.undo()
    grouped = quant.QuantLayer(nn.Conv2d(4, 4, 3, groups=2), [torch.full((4,), 0.01)], [act_qparams_from_range(-1, 1)])
    assert "int8" not in grouped.supported_modes()
    with pytest.raises(ValueError, match=r"`mode` 'int8' is not available .* use 'fake' or 'dequant'"):
        grouped.set_mode("int8")


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_quantize_then_generate(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--out", str(out), "--samples", "6", "--steps", "4", "--calib", "uniform",
                 "--steps-kept", "2", "--metric", "mse", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "50 layers W8A8 int8, 2 in float, uniform calibration" in printed and "output rel. error" in printed
    meta = quant.read_metadata(out)
    assert meta["config"]["exclude"] == ["conv_in", "conv_out"] and "conv_in" not in meta["layers"]
    assert meta["calibration"]["num_steps_kept"] == 2 and meta["config"]["metric"] == "mse"
    png = tmp_path / "s.png"
    assert main(["generate", "--quant", str(out), "--out", str(png), "--num-images", "2", "--steps", "3",
                 "--quiet"]) == 0
    assert png.is_file()
    assert main(["generate", "--quant", str(out), "--quant-mode", "fp8", "--out", str(png), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fewstep generate: error: --quant-mode fp8 needs fp8 parameters; {str(out)!r} holds int8 "
                   "(use --quant-mode auto, fake, int8 or dequant)"]
    assert main(["generate", "--quant", str(out), "--quant-conv-kernel", "triton", "--out", str(png), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fewstep generate: error: --quant-conv-kernel triton runs fp8 convs: it needs fp8 parameters ({str(out)!r} "
        "holds int8) and --quant-mode fp8 or auto (got auto)")


@pytest.mark.skipif(triton_available("cpu") or CUDA, reason="checks the message where the Triton conv cannot run")
def test_cli_triton_conv_kernel_without_triton_gpu(tmp_path, capsys):
    from fewstep.cli import main

    out, png = tmp_path / "q8", tmp_path / "s.png"
    assert main(["quantize", "--out", str(out), "--format", "fp8", "--samples", "4", "--steps", "2", "--calib",
                 "uniform", "--steps-kept", "1", "--quiet"]) == 0
    capsys.readouterr()
    argv = ["generate", "--quant", str(out), "--quant-conv-kernel", "triton", "--out", str(png), "--quiet"]
    assert main([*argv, "--quant-mode", "fake"]) == 2
    assert "--quant-mode fp8 or auto (got fake)" in capsys.readouterr().err
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewstep generate: error: --quant-conv-kernel triton: the Triton fp8 conv needs the `triton` "
                          "package and a CUDA GPU") and "use conv kernel 'im2col'" in err
    assert not png.exists()


def test_cli_quant_choices_follow_the_library():
    from fewstep.cli import build_parser

    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    choices = {a.dest: a.choices for a in gen._actions if a.dest in ("quant_mode", "quant_conv_kernel")}
    assert set(choices["quant_mode"]) == set(quant.SETTABLE_MODES)
    assert tuple(choices["quant_conv_kernel"]) == quant.CONV_KERNELS


@pytest.mark.parametrize(("extra", "exclude", "count"), [
    (["--exclude", "mid_block*"], ["conv_in", "conv_out", "mid_block*"], 40),  # adds to the default boundary
    (["--quantize-all"], [], 52),
    (["--quantize-all", "--exclude", "conv_out"], ["conv_out"], 51),
])
def test_cli_quantize_exclude(tmp_path, capsys, extra, exclude, count):
    from fewstep.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--out", str(out), "--samples", "4", "--steps", "2", "--calib", "uniform", "--quiet",
                 *extra]) == 0
    meta = quant.read_metadata(out)
    assert meta["config"]["exclude"] == exclude and len(meta["layers"]) == count
    assert f"{count} layers W8A8 int8, {52 - count} in float" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["quantize", "--out", "{tmp}/q", "--exclude", " "], "--exclude needs a non-empty fnmatch pattern"),
    (["quantize", "--out", "{tmp}/q", "--ndtc-mean", "0.7"], "--ndtc-mean must be in [0, 0.5]"),
    (["quantize", "--out", "{tmp}/q", "--calib", "uniform", "--steps", "4", "--steps-kept", "9"],
     "--steps-kept must be <= --steps (4)"),
    # found by probing: options of another method / metric were ignored, --p was named `p`, s3 needs a schedule
    (["quantize", "--out", "{tmp}/q", "--calib", "uniform", "--ndtc-mean", "0.9"],
     "--ndtc-mean applies to --calib ndtc only, not --calib uniform"),
    (["quantize", "--out", "{tmp}/q", "--steps-kept", "2"], "--steps-kept applies to --calib uniform only"),
    (["quantize", "--out", "{tmp}/q", "--metric", "mse", "--p", "7"], "--p applies to --metric lp only"),
    (["quantize", "--out", "{tmp}/q", "--p", "0"], "--p must be > 0 (the exponent of the lp metric), got 0.0"),
    (["quantize", "--out", "{tmp}/q", "--sampler", "s3"], "--sampler s3 runs a searched schedule file"),
    (["generate", "--quant", "{tmp}/none", "--out", "{tmp}/s.png"], "--quant '{tmp}/none' holds no saved"),
    (["quantize", "--out", "{tmp}/q", "--model", "digits-mr"],
     "--model 'digits-mr': quantization needs digits-eps or digits-flow or a class-conditional pipeline directory"),
    (["quantize", "--out", "{tmp}/q", "--metric", "mse", "--p", "7"],
     "--p applies to --metric lp only, not --metric mse"),
    (["quantize", "--out", "{tmp}/missing/q"], "does not exist"),
    (["generate", "--model", "digits-flow", "--task", "sr", "--quant", "{tmp}", "--out", "{tmp}/s.png"],
     "--quant applies to plain sampling of UNet pipelines"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, message):
    from fewstep.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("{tmp}", str(tmp_path)) in err[0]
    assert not (tmp_path / "q").exists()


def test_cli_quantizes_the_embedded_flow_model(tmp_path, capsys):
    """Found by a probe: `--model digits-flow` was refused, though the same model saved as a directory quantized
    (and `generate --model digits-flow --quant DIR` ran)."""
    from fewstep.cli import main

    assert main(["quantize", "--model", "digits-flow", "--out", str(tmp_path / "q"), "--samples", "8", "--steps", "3",
                 "--quiet"]) == 0  # fmt: skip
    assert "layers W8A8 int8" in capsys.readouterr().out
    assert main(["generate", "--model", "digits-flow", "--quant", str(tmp_path / "q"), "--steps", "3", "--num", "2",
                 "--out", str(tmp_path / "s.png"), "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "s.png").is_file()


def test_cli_rejects_unknown_choices(tmp_path):
    from fewstep.cli import main

    assert main(["quantize", "--out", str(tmp_path), "--calib", "random"]) == 2


# ------------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_int8_matches_reference():
    torch.manual_seed(0)
    cases = ((nn.Linear(40, 24), torch.randn(3, 5, 40)), (nn.Conv2d(6, 10, 3, padding=1), torch.randn(3, 6, 9, 9)),
             (nn.Linear(40, 24), torch.randn(40, 40)))  # the last: M > 16 without padding
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference
    try:
        for layer, x in cases:
            acts = [act_qparams_from_range(*search_act_range(Histogram.of(x)))]
            q = quant.QuantLayer(layer, [weight_qparams(layer.weight)], acts).cuda()
            with torch.no_grad():
                fake = q(x.cuda())
                real = q.set_mode("int8")(x.cuda())
            assert (real - fake).abs().max() <= 1e-5 * float(fake.abs().max())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


FP8_DEVICES = [d for d in ("cpu", "cuda") if (d == "cpu" or CUDA) and fp8_supported(d)]


@pytest.mark.skipif(not FP8_DEVICES, reason="no device with a float8 torch._scaled_mm")
@pytest.mark.parametrize("device", FP8_DEVICES)
def test_real_fp8_matches_reference(device):
    """Linear, strided/padded conv and a split-input conv: the real e4m3 GEMM equals the fake-quant reference
    (exact products, float32 sums on CPU; bf16 output rounding on CUDA)."""
    torch.manual_seed(0)
    cases = ((nn.Linear(64, 48), torch.randn(3, 40, 64), 0), (nn.Linear(20, 7), torch.randn(5, 20), 0),
             (nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9), 0),
             (nn.Conv2d(12, 8, 1), torch.randn(2, 12, 5, 5), 5))
    tol = 1e-5 if device == "cpu" else 1e-2
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for layer, x, split in cases:
            groups = 2 if split else 1
            w = layer.weight.detach()
            parts = [w] if not split else [w[:, :split], w[:, split:]]
            q = quant.QuantLayer(layer, [weight_qparams(p, fmt="fp8") for p in parts],
                                 [act_qparams_from_range(-2.5, 2.5, "fp8")] * groups, fmt="fp8", split=split).to(device)
            assert "fp8" in q.supported_modes()
            with torch.no_grad():
                fake = q.set_mode("fake")(x.to(device))
                real = q.set_mode("fp8")(x.to(device))
                fp = layer.to(device)(x.to(device))
            assert real.shape == fake.shape and real.dtype == x.dtype
            assert (real - fake).abs().max() <= tol * float(fake.abs().max())
            assert (real - fp).abs().max() > 3 * (real - fake).abs().max()  # it is quantized
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.skipif(not FP8_DEVICES, reason="no device with a float8 torch._scaled_mm")
@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_bias_in_the_gemm_epilogue(device, monkeypatch):
    """Where ``_scaled_mm`` adds a bf16 bias in its epilogue (CUDA, probed once), fp8 layers without a split pass the
    bias to it and skip the float32 pass over the output; elsewhere, and for split layers, the bias is added after
    the GEMM. The CPU has no fused bias (its kernel writes float32): the probe says so, and forcing the flag there
    exercises the same layer code with the bias added inside ``fp8_mm``."""
    from fewstep.quant import kernels, modules

    assert kernels.scaled_mm_fuses_bias("cpu") is False
    torch.manual_seed(0)
    x, w = torch.randn(20, 40).to(device), torch.randn(24, 40).to(device)
    s_w = w.abs().amax(1) / 448
    w8 = (w / s_w[:, None]).to(torch.float8_e4m3fn)
    bias = torch.randn(24).to(device)
    with_bias = kernels.fp8_mm(x, 0.01, w8, s_w, bias=bias).float()
    plain = kernels.fp8_mm(x, 0.01, w8, s_w).float() + bias
    torch.testing.assert_close(with_bias, plain, rtol=1e-2, atol=1e-2 * float(plain.abs().max()))
    lin = nn.Linear(40, 24).to(device)
    layer = quant.QuantLayer(lin, [weight_qparams(lin.weight, fmt="fp8")], [act_qparams_from_range(-3, 3, "fp8")],
                             fmt="fp8").to(device)
    with torch.no_grad():
        layer.set_mode("fp8")
        expected_fused = kernels.scaled_mm_fuses_bias(device)
        assert layer._fuse_bias is expected_fused
        unfused_flag = layer(x)
        monkeypatch.setattr(modules, "scaled_mm_fuses_bias", lambda dev: True)
        layer.set_mode("fp8")
        assert layer._fuse_bias is True
        forced = layer(x)
        fake = layer.set_mode("fake")(x)
    assert layer._fuse_bias is False  # only the fp8 mode reads it
    scale = float(fake.abs().max())
    for out in (unfused_flag, forced):
        assert out.dtype == x.dtype and (out - fake).abs().max() <= 1e-2 * scale
    if device == "cpu":
        assert torch.equal(forced, unfused_flag)  # float32 output: the bias is added the same way
    split_conv = nn.Conv2d(12, 8, 1).to(device)
    parts = [split_conv.weight[:, :5], split_conv.weight[:, 5:]]
    split = quant.QuantLayer(split_conv, [weight_qparams(p, fmt="fp8") for p in parts],
                             [act_qparams_from_range(-3, 3, "fp8")] * 2, fmt="fp8", split=5).to(device)
    assert split.set_mode("fp8")._fuse_bias is False  # halves summed in float32 first


@pytest.mark.skipif("cpu" not in FP8_DEVICES, reason="this PyTorch build has no CPU float8 torch._scaled_mm")
def test_fp8_digits_unet_real_path_matches_reference(pipe, calibration, fp8_qmodel):
    """The whole fp8-quantized digits UNet (every layer on the real e4m3 GEMM) matches its fake-quant
    reference; the CPU ``_scaled_mm`` path is what makes this testable without a GPU."""
    _assert_real_path_matches_reference(fp8_qmodel, pipe.unet, next(calibration.batches(6)), "fp8")


def test_sd_shaped_unet_quantizes_and_runs_int8():
    """The same code serves text-conditional UNets (cross-attention Linears, skip concats in attention up blocks)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=4, layers_per_block=1, norm_num_groups=8).eval()
    gen = torch.Generator().manual_seed(0)
    cal = quant.CalibrationSet(torch.randn(6, 4, 8, 8, generator=gen), torch.randint(0, 1000, (6,), generator=gen),
                               encoder_hidden_states=torch.randn(6, 5, 24, generator=gen))
    q = quant.quantize(unet, cal, quant.QuantConfig(act_grid=20, weight_grid=10, split_skip=True, exclude=[]))
    layers = quant.quant_layers(q)
    assert any(name.endswith("attn2.to_k") for name in layers) and any(layers[n].split for n in layers)
    _assert_real_path_matches_reference(q, unet, next(cal.batches(3)), "int8")


def _bench_quant_cuda_module():
    from _helpers import load_script

    return load_script("bench_quant_cuda")  # imports without a GPU


def test_cuda_benchmark_script_fails_clearly_without_cuda():
    module = _bench_quant_cuda_module()
    if CUDA:
        pytest.skip("a GPU is present: the script would run")
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU \(none visible to torch\)"):
        module.main(["--parts", "layers"])


@pytest.mark.skipif("cpu" not in FP8_DEVICES, reason="this PyTorch build has no CPU float8 torch._scaled_mm")
def test_cuda_benchmark_script_logic_on_cpu_and_partial_results(tmp_path, monkeypatch):
    """The GPU-only parts of bench_quant_cuda.py run here on tiny shapes (CUDA events swapped for a call
    counter), so a device session does not find their bugs; a run cut short keeps every cell it measured."""
    bench = _bench_quant_cuda_module()
    calls = {"n": 0, "limit": None}

    def fake_ms(fn, repeats=1, warmup=0):
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise KeyboardInterrupt  # the device tool's time limit, say
        fn()
        return float(calls["n"])

    monkeypatch.setattr(bench, "require_cuda", lambda: torch.device("cpu"))
    monkeypatch.setattr(bench, "cuda_ms", fake_ms)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "cpu (test)")
    monkeypatch.setattr(bench, "LINEARS", {"tiny": (4, 32, 16)})
    monkeypatch.setattr(bench, "CONVS", {"tiny conv": (1, 8, 6)})
    tiny = dict(sample_size=8, block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=4,
                layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    monkeypatch.setattr(bench, "UNETS", {"sdxl": tiny})
    monkeypatch.setattr(bench, "TEXT_TOKENS", 5)
    out = tmp_path / "r.json"
    argv = ["--parts", "layers", "unet", "--unets", "sdxl", "--batches", "1", "2", "--formats", "fp8",
            "--no-compile", "--out", str(out)]
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    assert [row.get("layer", row.get("gemm")) for row in results["layers"]] == ["tiny", "tiny conv", "tiny"]
    cells = results["unets"][0]["per_call_ms"]
    assert set(cells) == {"1", "2"} and {"bf16", "fp8", "fp8-all", "bf16_over_fp8"} <= set(cells["2"])
    assert "int8" not in cells["2"] and results["unets"][0]["fp8_weight_ratio"] < 0.6
    assert results["unets"][0]["fp8_policy_timing"] == "eager"  # --no-compile: the policy is timed eagerly too
    assert results["unets"][0]["fp8_policy_batch"] == 2  # the largest benchmarked batch
    assert results["unets"][0]["fp8_policy_untimed_layers"] == 0
    # a tiny timing budget: the largest signature is timed, the rest run dequant
    assert bench.main([*argv[:-2], "--variants", "fp8", "--policy-batch", "1", "--policy-budget", "1e-9",
                       "--out", str(out)]) == 0  # fmt: skip
    budgeted = json.loads(out.read_text())["unets"][0]
    assert budgeted["fp8_policy_batch"] == 1 and budgeted["fp8_policy_untimed_layers"] > 0
    for bad in (["--policy-budget", "0"], ["--policy-batch", "-2"], ["--policy-batch", "two"]):
        with pytest.raises(SystemExit):
            bench.main([*argv, *bad])
    # a variant that fails (a kernel that does not build, say) is recorded and the others still run
    timings = {"n": 0}

    def failing_ms(fn, repeats=1, warmup=0):
        timings["n"] += 1
        if timings["n"] == 2:  # the second timing: batch 1, the first 8-bit variant
            raise RuntimeError("kernel failed to build")
        return fake_ms(fn, repeats, warmup)

    monkeypatch.setattr(bench, "cuda_ms", failing_ms)
    assert bench.main(["--parts", "unet", *argv[3:]]) == 0
    failed = json.loads(out.read_text())["unets"][0]
    assert failed["errors"] == {"fp8 @ 1": "RuntimeError: kernel failed to build"}
    assert set(failed["per_call_ms"]["1"]) == {"bf16", "fp8-all", "bf16_over_fp8-all"}
    assert {"bf16", "fp8", "fp8-all"} <= set(failed["per_call_ms"]["2"])
    monkeypatch.setattr(bench, "cuda_ms", fake_ms)

    calls["n"], calls["limit"] = 0, 3  # stopped during the fourth UNet timing (batch 2, fp8)
    monkeypatch.setattr(bench, "bench_layers", lambda device, args, rows: None)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*argv, "--variants", "fp8", "--grid", "1"])
    partial = json.loads(out.read_text())
    kept = partial["unets"][0]["per_call_ms"]
    assert partial["layers"] == [] and list(kept["1"]) == ["bf16", "fp8", "bf16_over_fp8"]
    assert list(kept["2"]) == ["bf16"]


class _TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(2, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.out = nn.Linear(8, 2)

    def forward(self, sample, timestep):
        h = self.act(self.inp(sample)) + timestep.float().reshape(-1, 1, 1, 1) / 1000
        return self.out(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_fp8_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _TinyDenoiser().eval()
    cal = quant.CalibrationSet(torch.randn(8, 2, 5, 5), torch.randint(0, 1000, (8,)))
    q = quant.quantize(model, cal, quant.QuantConfig(format="fp8", act_grid=20))
    assert q.inp.weight_q0.dtype == torch.float8_e4m3fn and q.inp.act[0].zero_point == 0
    quant.save_quantized(q, tmp_path / "fp8")
    loaded = quant.load_quantized(model, tmp_path / "fp8", mode="dequant")
    batch = next(cal.batches(8))
    with torch.no_grad():
        ref, got, fp = q(**batch), loaded(**batch), model(**batch)
    assert torch.allclose(got, ref, atol=1e-6)
    assert float((got - fp).norm() / fp.norm()) < 0.1


def test_device_checks_script_parses_and_names_existing_files():
    """scripts/device_checks.sh (the one prepared GPU run) is valid bash and every test file and script it runs
    exists, so a session with a GPU does not spend its device time on a typo."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "scripts" / "device_checks.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"(tests/\w+\.py|scripts/\w+\.py)", text))
    assert {"tests/test_quant.py", "scripts/bench_pipeline_cuda.py", "scripts/bench_quant_cuda.py"} <= named
    assert all((root / path).is_file() for path in named), named


# ------------------------------------------------------------------------------------- found by probing the API
def _layer(module: nn.Module, fmt: str = "int8", lo: float = -4.0, hi: float = 4.0) -> quant.QuantLayer:
    return quant.QuantLayer(module, [weight_qparams(module.weight, fmt=fmt)], [act_qparams_from_range(lo, hi, fmt)],
                            fmt=fmt)  # fmt: skip


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_fake_quant_conv_pads_with_the_layers_padding_mode(padding_mode):
    """nn.Conv2d pads with its padding_mode before convolving; the fake-quant reference padded with zeros (34-54%
    off at the border for an input of mean 3). The real 8-bit paths refuse these layers."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(2, 4, 8, 8) * 0.5 + 3.0
    q = _layer(conv, lo=0.0, hi=5.0)
    for mode in ("fake", "dequant"):
        q.set_mode(mode)
        with torch.no_grad():
            assert float((q(x) - conv(x)).norm() / conv(x).norm()) < 0.02, mode


def test_fake_quant_passes_gradients_straight_through():
    """Rounding has no gradient: guidance that backpropagates through a fake-quant denoiser (DPS) got exactly 0.
    The straight-through estimator passes it inside the clipping range and leaves the values unchanged."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = _layer(lin, lo=-2.0, hi=2.0)
    x = (torch.randn(4, 16) * 0.4).requires_grad_(True)  # inside the clipping range
    y = q(x)
    with torch.no_grad():
        assert torch.equal(y, q(x))  # the same values with and without autograd
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (ref,) = torch.autograd.grad(lin(x).square().sum(), x)
    assert float((g - ref).norm() / ref.norm()) < 0.1
    outside = torch.full((1, 16), 5.0, requires_grad=True)  # clipped: no gradient
    assert torch.count_nonzero(torch.autograd.grad(q(outside).sum(), outside)[0]) == 0


def test_state_dict_carries_the_activation_quantizers():
    torch.manual_seed(0)
    a, b = _layer(nn.Linear(16, 8), lo=-1.0, hi=1.0), _layer(nn.Linear(16, 8), lo=-3.0, hi=0.5)
    b.load_state_dict(a.state_dict())
    assert b.act == a.act
    x = torch.randn(3, 16)
    for mode in ("fake", "int8"):
        a.set_mode(mode), b.set_mode(mode)
        assert torch.equal(a(x), b(x)), mode


def test_load_rejects_same_norm_weights_and_modules_from_other_weights(tmp_path, pipe, qmodel):
    """Negated or permuted weights keep every norm: the saved projections tell them apart (also for a quantized
    module handed to FewstepPipeline.from_pipe)."""
    import copy

    from fewstep.pipelines import FewstepPipeline

    quant.save_quantized(qmodel, tmp_path / "q")
    flipped = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        layer = next(m for n, m in flipped.named_modules() if n in quant.quant_layers(qmodel))
        layer.weight.neg_()
    with pytest.raises(ValueError, match=r"has weights of the same norm but other values"):
        quant.load_quantized(flipped, tmp_path / "q")
    quant.load_quantized(copy.deepcopy(pipe.unet).to(torch.bfloat16), tmp_path / "q")  # bf16 rounding is fine
    # found by probing: a loaded model saved again lost the projections, and the re-saved artifact took them
    quant.save_quantized(quant.load_quantized(pipe.unet, tmp_path / "q"), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "quant.json").read_text())["weight_projections"]
    with pytest.raises(ValueError, match=r"has weights of the same norm but other values"):
        quant.load_quantized(flipped, tmp_path / "again")
    other = type(pipe)(unet=flipped, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match=r"`quantized` \(a module\) does not fit this model's weights"):
        FewstepPipeline.from_pipe(other, quantized=qmodel)


def test_real_convs_take_unbatched_input_as_nn_conv2d_does():
    torch.manual_seed(0)
    q = _layer(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(4, 8, 8)
    q.set_mode("fake")
    ref = q(x)
    q.set_mode("int8")
    out = q(x)
    assert out.shape == (6, 8, 8) and float((out - ref).norm() / ref.norm()) < 1e-5


def test_set_mode_is_all_or_nothing_and_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 8, 3, groups=8), nn.Linear(8, 8))
    for i in (0, 1, 2):
        model[i] = _layer(model[i])
    with pytest.raises(ValueError, match=r"layer '1': `mode` 'int8' is not available"):
        quant.set_mode(model, "int8")
    assert [layer.mode for layer in model] == ["fake", "fake", "fake"]


def test_non_finite_calibration_and_unfused_lora_layers_are_clear_errors(pipe, calibration):
    import dataclasses

    bad = dataclasses.replace(calibration, sample=calibration.sample.clone())
    bad.sample[-1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"drives layer '.*' to non-finite inputs"):
        quant.quantize(pipe.unet, bad, quant.QuantConfig(act_grid=5, weight_grid=5, batch_size=3))

    class LoRALinear(nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.up = nn.Linear(2, self.out_features, bias=False)
            self.down = nn.Linear(self.in_features, 2, bias=False)

        def forward(self, x):
            return super().forward(x) + self.up(self.down(x))

    model = nn.Sequential(LoRALinear(8, 8))
    with pytest.raises(ValueError, match=r"layer '0' is a LoRALinear .* fuse it first"):
        quant.quantizable_layers(model)
    assert set(quant.quantizable_layers(model, exclude=["0"])) == {"0.up", "0.down"}


def test_quant_layer_keeps_the_replaced_layers_shape_attributes():
    """diffusers' SDXL pipeline reads ``unet.add_embedding.linear_1.in_features``: a quantized UNet failed there."""
    lin, conv = torch.nn.Linear(6, 4), torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    ql = quant.QuantLayer(lin, [torch.ones(4)], [quant.ActQParams(0.1, 0, "int8")])
    qc = quant.QuantLayer(conv, [torch.ones(5)], [quant.ActQParams(0.1, 0, "int8")])
    assert (ql.in_features, ql.out_features) == (6, 4)
    assert (qc.in_channels, qc.out_channels, qc.kernel_size, qc.stride, qc.padding, qc.dilation) == (
        3, 5, (3, 3), (2, 2), (1, 1), (1, 1))
    with pytest.raises(AttributeError, match="in_features"):  # not on a conv, as nn.Conv2d
        qc.in_features  # noqa: B018
    with pytest.raises(AttributeError, match="kernel_size"):
        ql.kernel_size  # noqa: B018


def test_damaged_quantization_files_are_refused_by_name(tmp_path, pipe, qmodel):
    """Found by probing: quant.safetensors tensors of the wrong shape were broadcast by copy_, NaN / zero scales and
    NaN biases were taken (NaN or wrong samples, exit 0), and a truncated file was a raw safetensors traceback."""
    from safetensors.torch import load_file, save_file

    quant.save_quantized(qmodel, tmp_path / "q", model_id="digits-eps")
    tensors = load_file(str(tmp_path / "q" / "quant.safetensors"))
    name = next(k[: -len(".weight_q0")] for k in tensors if k.endswith(".weight_q0"))
    cases = {
        "weight": ({f"{name}.weight_q0": tensors[f"{name}.weight_q0"][:1]}, "weight_q0 has shape"),
        "scale": ({f"{name}.weight_scale0": tensors[f"{name}.weight_scale0"] * float("nan")}, "weight_scale0 must"),
        "zero": ({f"{name}.weight_scale0": tensors[f"{name}.weight_scale0"] * 0}, "weight_scale0 must"),
    }
    if f"{name}.bias" in tensors:
        cases["bias"] = ({f"{name}.bias": tensors[f"{name}.bias"] * float("nan")}, "bias must")
    for case, (change, match) in cases.items():
        folder = tmp_path / case
        shutil.copytree(tmp_path / "q", folder)
        header = {"format": "pt", "save_id": json.loads((folder / "quant.json").read_text())["save_id"]}
        save_file({**tensors, **change}, str(folder / "quant.safetensors"), metadata=header)  # same save, damaged
        with pytest.raises(ValueError, match=f"layer {re.escape(repr(name))}'s {match}"):
            quant.load_quantized(pipe.unet, folder)
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "q", truncated)
    data = (truncated / "quant.safetensors").read_bytes()
    (truncated / "quant.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="quant.safetensors' is not a readable safetensors file"):
        quant.load_quantized(pipe.unet, truncated)
