"""fewstep.quant: fixes of the defects a probe of the quantization API found (gradients through real 8-bit kernels,
NaN in int8 mode, atomic in-place loading, argument checks, state_dict checks, all-or-nothing set_mode)."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewstep import quant
from fewstep.quant.kernels import fp8_supported
from fewstep.quant.quantizers import act_qparams_from_range, weight_qparams

FP8_CPU = fp8_supported("cpu")


def _layer(module: nn.Module, fmt: str = "int8", lo: float = -2.0, hi: float = 3.0, split: int = 0,
           name: str = "") -> quant.QuantLayer:
    w = module.weight.detach()
    parts = [w] if not split else [w[:, :split], w[:, split:]]
    return quant.QuantLayer(module, [weight_qparams(p, fmt=fmt) for p in parts],
                            [act_qparams_from_range(lo, hi, fmt) for _ in parts], fmt=fmt, split=split, name=name)


class _Tiny(nn.Module):
    """A UNet-like module (forward(sample, timestep)): a float boundary conv_in, then a conv and a linear."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Linear(4, 4)

    def forward(self, sample, timestep=None):
        h = torch.relu(self.a(self.conv_in(sample)))
        return self.b(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _tiny_calibration(n: int = 6) -> quant.CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return quant.CalibrationSet(torch.randn(n, 2, 6, 6, generator=g), torch.zeros(n, dtype=torch.long))


def _tiny_quantized(fmt: str = "int8") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _Tiny().eval()
    return model, quant.quantize(model, _tiny_calibration(), quant.QuantConfig(format=fmt, act_grid=10,
                                                                               weight_grid=5))


# -------------------------------------------------------------------------------------- 1. gradients
@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(
    not FP8_CPU, reason="no CPU float8 _scaled_mm in this torch build"))])
def test_real_8bit_modes_refuse_gradients_instead_of_returning_wrong_ones(fmt):
    """Found by probing: DPS/PSLD/STSL through an int8 UNet ran and returned garbage -- the real kernels have no
    gradient, so only the float layers (conv_in, conv_out) contributed one. A backward through a real 8-bit layer
    is refused naming the layer, the mode and the fix; the forward itself runs with grad mode on (plain inference
    of a model whose float layers still require grad used to be refused too) and gives the no_grad result."""
    _, q = _tiny_quantized(fmt)
    assert quant.quant_layers(q)["a"].name == "a"  # quantize names its layers (what the error says)
    quant.set_mode(q, fmt)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    with torch.no_grad():
        ref = q(x)
    out = q(x)  # conv_in (float) makes the first quantized layer's input require grad: the forward still runs
    assert out.requires_grad and torch.equal(out.detach(), ref)
    with pytest.raises(RuntimeError, match=rf"QuantLayer '[ab]' ran in '{fmt}' mode.* no gradient.*"
                                           r"set_mode\(model, 'fake'\) or 'dequant'"):
        out.square().sum().backward()
    with pytest.raises(RuntimeError, match=rf"QuantLayer '[ab]' ran in '{fmt}' mode"):
        torch.autograd.grad(q(x).sum(), x)
    q.requires_grad_(False)  # (as guidance does: gradients to the input only)
    assert torch.equal(q(x.detach()), ref)  # grad mode on, but nothing needs a gradient: runs
    lin = _layer(nn.Linear(8, 4), fmt)
    lin.set_mode(fmt)
    y = lin(torch.randn(3, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match=rf"QuantLayer '\(unnamed\)' ran in '{fmt}' mode"):
        y.sum().backward()
    conv = _layer(nn.Conv2d(2, 3, 3, padding=1), fmt)  # unbatched (C, H, W) input, grad on
    conv.set_mode(fmt)
    xu = torch.randn(2, 5, 5, requires_grad=True)
    with torch.no_grad():
        want = conv(xu)
    assert torch.equal(conv(xu).detach(), want)
    quant.set_mode(q, "fake")  # the straight-through reference gives a gradient
    (g,) = torch.autograd.grad(q(x).square().sum(), x)
    assert float(g.abs().sum()) > 0


# -------------------------------------------------------------------------------------- 2. NaN in int8
_NAN_CASES = [
    ("linear", lambda: nn.Linear(13, 7), (3, 13), 0),
    ("linear 3-d", lambda: nn.Linear(13, 7), (2, 3, 13), 0),
    ("linear split", lambda: nn.Linear(13, 9, bias=False), (4, 13), 5),
    ("conv 3x3 pad 1", lambda: nn.Conv2d(5, 6, 3, 1, 1), (2, 5, 7, 9), 0),
    ("conv stride 2", lambda: nn.Conv2d(5, 6, 3, 2, 1), (2, 5, 7, 9), 0),
    ("conv dilation 2", lambda: nn.Conv2d(5, 6, 3, 1, 2, dilation=2), (2, 5, 7, 9), 0),
    ("conv padding > kernel", lambda: nn.Conv2d(3, 4, 3, 1, 3), (1, 3, 5, 5), 0),
    ("conv 1x1 split", lambda: nn.Conv2d(11, 6, 1), (2, 11, 4, 4), 4),
    ("conv 3x1", lambda: nn.Conv2d(5, 6, (3, 1), 1, (1, 0)), (2, 5, 7, 9), 0),
    ("conv unbatched", lambda: nn.Conv2d(5, 6, 3, 1, 1), (5, 6, 6), 0),
]


@pytest.mark.parametrize(("case", "make", "shape", "split"), _NAN_CASES, ids=[c[0] for c in _NAN_CASES])
def test_int8_mode_propagates_nan_inputs_as_fake_quant_does(case, make, shape, split):
    """Found by probing: int8 mode turned NaN inputs into finite outputs (the cast of a NaN to int8 is arbitrary)
    while fake-quant propagates NaN. Now the outputs the reference makes NaN (a Linear's whole row; every output
    position of a conv whose patch holds the NaN) are NaN, the rest unchanged; +-Inf clamps to the range in both."""
    torch.manual_seed(0)
    q = _layer(make(), split=split)
    x = torch.randn(shape)
    flat = x.view(-1)
    flat[3] = float("nan")
    flat[-7] = float("nan")
    flat[len(flat) // 2] = float("inf")
    flat[len(flat) // 3] = -float("inf")
    with torch.no_grad():
        q.set_mode("fake")
        ref = q(x)
        q.set_mode("int8")
        out = q(x)
        clean = q(torch.nan_to_num(x, nan=0.0))
    assert ref.isnan().any() and not ref.isnan().all()
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    assert torch.allclose(out[finite], ref[finite], rtol=1e-5, atol=1e-5 * float(ref[finite].abs().max()))
    assert torch.equal(out[finite], clean[finite])  # only the NaN-reached outputs change


@pytest.mark.skipif(not FP8_CPU, reason="no CPU float8 _scaled_mm in this torch build")
def test_fp8_mode_propagates_nan_as_fake_quant_does():
    torch.manual_seed(0)
    for make, shape in ((lambda: nn.Linear(13, 7), (3, 13)), (lambda: nn.Conv2d(5, 6, 3, 2, 1), (2, 5, 7, 9))):
        q = _layer(make(), "fp8")
        x = torch.randn(shape)
        x.view(-1)[4] = float("nan")
        with torch.no_grad():
            ref = q(x)
            out = q.set_mode("fp8")(x)
        assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())


def test_int8_nan_rows_reach_the_model_output_like_fake_quant():
    _, q = _tiny_quantized()
    x = torch.randn(2, 2, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        ref = q(x)
        out = quant.set_mode(q, "int8")(x)
    assert torch.equal(out.isnan(), ref.isnan()) and ref[0].isnan().any() and not ref[1].isnan().any()


# -------------------------------------------------------------------------------------- 3. atomic load
def test_failed_inplace_load_leaves_the_model_untouched(tmp_path, monkeypatch):
    """Found by probing: a damaged last layer made load_quantized(..., inplace=True) raise after the earlier
    layers were already swapped: a half-quantized model. Every layer is now built and checked before any swap."""
    from safetensors.torch import load_file, save_file

    model, q = _tiny_quantized()
    quant.save_quantized(q, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "quant.safetensors"))
    last = list(quant.quant_layers(q))[-1]
    tensors[f"{last}.weight_scale0"] = -tensors[f"{last}.weight_scale0"]
    save_id = json.loads((tmp_path / "q" / "quant.json").read_text())["save_id"]
    save_file(tensors, str(tmp_path / "q" / "quant.safetensors"), metadata={"format": "pt", "save_id": save_id})
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=rf"layer '{last}''s weight_scale0 must hold 4 finite positive floats"):
        quant.load_quantized(model, tmp_path / "q", inplace=True)
    assert {n: type(m) for n, m in model.named_modules()} == before and not hasattr(model, "fewstep_quant")
    # a mode that fails on a later layer (fp8 unavailable): same, and the error names the layer
    _, qf = _tiny_quantized("fp8")
    quant.save_quantized(qf, tmp_path / "fp8")
    monkeypatch.setattr("fewstep.quant.modules.fp8_supported", lambda device=None: False)
    with pytest.raises(RuntimeError, match=r"layer 'a': the fp8 path"):
        quant.load_quantized(model, tmp_path / "fp8", mode="fp8", inplace=True)
    assert {n: type(m) for n, m in model.named_modules()} == before and not hasattr(model, "fewstep_quant")
    monkeypatch.undo()
    loaded = quant.load_quantized(model, tmp_path / "fp8", mode="fake", inplace=True)
    assert loaded is model and {n: layer.name for n, layer in quant.quant_layers(model).items()} == {"a": "a",
                                                                                                      "b": "b"}
    with pytest.raises(ValueError, match=r"`mode` must be one of .*got 'int4'"):
        quant.load_quantized(_Tiny(), tmp_path / "fp8", mode="int4")


# -------------------------------------------------------------------------------------- 4. calibration args
_PIPE = types.SimpleNamespace(unet=None, num_classes=10)  # every check runs before the pipeline does


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"classes": []}, r"`classes` must be a non-empty sequence of class labels in \[0, 9\].*got \[\]"),
    ({"classes": [3, 10]}, r"`classes` \(each label\) must be an integer in \[0, 9\], got 10"),
    ({"classes": [1.5]}, r"`classes` \(each label\) must be an integer in \[0, 9\], got 1.5"),
    ({"method": "uniform", "num_steps_kept": 0}, r"`num_steps_kept` must be an integer in \[1, 6\].*got 0"),
    ({"method": "uniform", "ndtc_mean": 0.9}, r"`ndtc_mean` applies to method='ndtc' only, not method='uniform'"),
    ({"method": "uniform", "ndtc_mean": 0.2}, r"`ndtc_mean` applies to method='ndtc' only"),
    ({"method": "uniform", "ndtc_std": 0.1}, r"`ndtc_std` applies to method='ndtc' only"),
    ({"method": "uniform", "ndtc_mean": 0.4}, r"`ndtc_mean` applies to method='ndtc' only"),  # = the default, given
    ({"num_steps_kept": 2}, r"`num_steps_kept` applies to method='uniform' only, not method='ndtc', got 2"),
    ({"seed": 1.5}, r"`seed` must be an integer in \[0, 9223372036854775807\], got 1.5"),
    ({"seed": -1}, r"`seed` must be an integer in \[0, "),
])
def test_build_calibration_set_checks_its_arguments(kwargs, message):
    """Found by probing: classes=[] was a ZeroDivisionError, num_steps_kept=0 silently became the default, the
    other method's options were silently ignored (the CLI refuses them), seed=1.5 crashed inside torch."""
    with pytest.raises(ValueError, match=message):
        quant.build_calibration_set(_PIPE, **{"num_samples": 2, "steps": 6, **kwargs})


def test_build_calibration_set_refuses_a_non_class_conditional_pipe():
    with pytest.raises(ValueError, match=r"`pipe` must be a class-conditional pipeline .*got a object without "
                                         r"\.unet"):
        quant.build_calibration_set(object())


# -------------------------------------------------------------------------------------- 5. state_dict checks
@pytest.mark.parametrize(("edit", "message"), [
    (lambda sd: sd["_extra_state"].__setitem__((0, 0), 0.0), r"activation `scale` must be a finite number in "
                                                             r"\(0, 1e\+30\), got 0.0"),
    (lambda sd: sd["_extra_state"].__setitem__((0, 0), float("nan")), r"activation `scale` .* got nan"),
    (lambda sd: sd["_extra_state"].__setitem__((0, 0), -0.1), r"activation `scale` .* got -0.1"),
    (lambda sd: sd["_extra_state"].__setitem__((0, 1), 500.0), r"`zero_point` must be an integer in \[-128, 127\] "
                                                               r"for int8, got 500"),
    (lambda sd: sd["_extra_state"].__setitem__((0, 1), 3.5), r"`zero_point` .* got 3.5"),
    (lambda sd: sd["weight_scale0"].__setitem__(0, float("nan")), r"state_dict 'weight_scale0' of QuantLayer "
                                                                  r"'\(unnamed\)' must hold 8 finite positive"),
    (lambda sd: sd["weight_scale0"].__setitem__(2, 0.0), r"'weight_scale0' .* must hold 8 finite positive floats"),
])
def test_load_state_dict_checks_the_quantizers_as_load_quantized_does(edit, message):
    """Found by probing: set_extra_state checked only the row count (scale 0/NaN/negative, zero-point 500 loaded
    silently) and the weight scales were not checked at all. The layer is left as it was."""
    torch.manual_seed(0)
    a, b = _layer(nn.Linear(16, 8), lo=-1.0, hi=1.0), _layer(nn.Linear(16, 8), lo=-3.0, hi=0.5)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    edit(state)
    act, scale = list(b.act), b.weight_scale0.clone()
    with pytest.raises(ValueError, match=message):
        b.load_state_dict(state)
    assert b.act == act and torch.equal(b.weight_scale0, scale)


def test_state_dict_errors_name_the_layer_in_its_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1] = _layer(model[1])
    state = model.state_dict()
    state["1._extra_state"] = torch.tensor([[float("inf"), 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"QuantLayer '1': activation `scale` .* got inf"):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match=r"`zero_point` must be an integer in \[0, 0\] for fp8, got 3"):
        _layer(nn.Linear(4, 4), "fp8").set_extra_state(torch.tensor([[0.1, 3.0]], dtype=torch.float64))


# -------------------------------------------------------------------------------------- 6. set_mode
def test_set_mode_is_all_or_nothing_for_runtime_errors_and_names_the_layer(monkeypatch):
    """Found by probing: only ValueError was rolled back; fp8 being unavailable (a RuntimeError) left the layers
    before it switched, and the message did not name the layer."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    for i in (0, 1):
        model[i] = _layer(model[i], "fp8")
    monkeypatch.setattr("fewstep.quant.modules.fp8_supported", lambda device=None: False)
    with pytest.raises(RuntimeError, match=r"layer '1': the fp8 path \(torch._scaled_mm\) needs"):
        quant.set_mode(model, {"0": "dequant", "1": "fp8"})
    assert [layer.mode for layer in model] == ["fake", "fake"]


# -------------------------------------------------------------------------------------- 8. config and inputs
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"exclude": None}, r"`exclude` must be a list of fnmatch patterns .*got None"),
    ({"symmetric_act": "no"}, r"`symmetric_act` must be True or False, got 'no'"),
    ({"split_skip": 1}, r"`split_skip` must be True or False, got 1"),
    ({"bins": 4}, r"`bins` must be an integer >= 16, got 4"),
    ({"p": float("inf")}, r"`p` must be a finite number > 0, got inf"),
])
def test_quant_config_checks_its_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.QuantConfig(**kwargs).validate()


def test_calibration_set_needs_timesteps():
    with pytest.raises(ValueError, match=r"CalibrationSet `timestep` must be a tensor with one row per network "
                                         r"input \(2\), got None"):
        quant.CalibrationSet(torch.randn(2, 4, 8, 8), None)


def test_a_nan_weight_is_reported_as_the_weight_not_the_calibration():
    """Found by probing: a NaN weight of the float model was reported as the calibration set driving a later
    layer to non-finite inputs."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    with torch.no_grad():
        model.a.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/Inf\) in parameter 'a.weight' \(layer 'a'\)"):
        quant.quantize(model, _tiny_calibration(), quant.QuantConfig(act_grid=5, weight_grid=5))
    bad = dataclasses.replace(_tiny_calibration(), sample=_tiny_calibration().sample.clone())
    bad.sample[0, 0, 0, 0] = float("nan")  # a NaN in the calibration data is still reported as such
    with pytest.raises(ValueError, match=r"drives layer '.*' to non-finite inputs"):
        quant.quantize(_Tiny(), bad, quant.QuantConfig(act_grid=5, weight_grid=5))


def test_nan_mask_conv_matches_patch_geometry():
    """The conv NaN mask is a conv of the NaN map with a window of ones: it must cover exactly the patches."""
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 4] = 1.0
    q = _layer(nn.Conv2d(1, 1, 3, 2, 1))
    x_nan = x.masked_fill(x > 0, float("nan"))
    mask = q._nan_rows(x_nan).reshape(1, 3, 3)
    ref = F.conv2d(x, torch.ones(1, 1, 3, 3), None, 2, 1)[0] > 0
    assert torch.equal(mask, ref)
