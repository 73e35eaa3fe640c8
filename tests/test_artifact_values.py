"""Artifacts whose values (not only their structure) make no sense are refused at load, naming the file, the field,
the value and what is allowed: S3 schedules, DC-Solver ratios, EMS tables and estimation checkpoints, quantized
models and bench caches (found by a probe that edited finite values: all of these loaded and ran)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import damaged_quant_copy
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fewstep import quant, samplers
from fewstep.solvers.schedules import VPSchedule

ASSETS = Path(__file__).resolve().parent.parent / "fewstep" / "assets"
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


# ------------------------------------------------------------------------------------------ 3. S3 schedules
def _schedule_file(tmp_path: Path, timesteps: list[float], **changes) -> Path:
    data = json.loads((ASSETS / "s3" / "digits-eps-nfe5.json").read_text())
    data["timesteps"] = timesteps
    data.update(changes)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    return path


def test_s3_timesteps_equal_in_float32_are_refused_naming_the_file(tmp_path):
    """Found by probing: 715.9 and 715.8999999 strictly decrease in float64 but are one float32 model time: the model
    got 715.9000244 twice and the sample reached 3.3e10 (finite: no NaN check fired), exit 0."""
    from fewstep.solvers.s3 import SolverSchedule

    path = _schedule_file(tmp_path, [999.0, 715.9, 715.8999999, 242.9, 32.2])
    with pytest.raises(ValueError, match=r"s\.json'.*`timesteps` holds 715\.9 and 715\.8999999 \(points 1 and 2\), "
                                         r"which are one model time in float32"):
        SolverSchedule.load(path)


def test_s3_timesteps_closer_than_the_minimum_lambda_gap_are_refused(tmp_path):
    """715.9 and 715.89 differ in float32 but lie 7e-5 apart in lambda (error ~1/gap: 3.3e5 in the probe)."""
    from fewstep.solvers.grids import MIN_LAMBDA_GAP
    from fewstep.solvers.s3 import SolverSchedule

    schedule = VPSchedule.from_config(DDPM)
    close = SolverSchedule.load(_schedule_file(tmp_path, [999.0, 715.9, 715.89, 242.9, 32.2]))
    with pytest.raises(ValueError, match=r"s\.json' `timesteps`: points 1 and 2 \(t = 715\.9 and 715\.89\) are "
                                         r"7\.27e-05 apart in log-SNR lambda; they must be at least 0\.0001 apart"):
        close.grid(schedule)
    S3 = samplers.get("s3")
    with pytest.raises(ValueError, match=r"at least 0\.0001 apart"):
        S3(**DDPM, s3_schedule=str(tmp_path / "s.json"), s3_model="digits-eps").set_timesteps(5)
    fine = SolverSchedule.load(_schedule_file(tmp_path, [999.0, 715.9, 714.9, 242.9, 32.2]))  # h = 7.3e-3: runs
    assert np.diff(fine.grid(schedule).lambdas[:5]).min() > MIN_LAMBDA_GAP


@pytest.mark.parametrize(("timesteps", "message"), [
    ([999.0, 715.9, 715.8999999, 242.9, 32.2], r"which are one model time in float32 \(715\.9000244140625"),
    ([999.0, 715.9, 715.899, 242.9, 32.2], r"`timesteps`: points 1 and 2 .* at least 0\.0001 apart"),
])
def test_custom_timesteps_get_the_same_checks(timesteps, message):
    """The shared custom-timesteps grid (every scheduler's set_timesteps(timesteps=...)) accepted the float32 duplicate
    too."""
    sched = samplers.get("dpm-solver++")(**DDPM)
    with pytest.raises(ValueError, match=message):
        sched.set_timesteps(timesteps=timesteps)
    sched.set_timesteps(timesteps=[999.0, 715.9, 700.0, 242.9, 32.2])  # distinct and far enough apart: fine
    assert sched.timesteps.dtype == torch.float32 and len(set(sched.timesteps.tolist())) == 5


# ------------------------------------------------------------------------------------------ 4. DC ratios
@pytest.mark.parametrize(("ratios", "message"), [
    ([1, 1, 1, 0.0, 1, 1], r"`dc_ratios`\[3\] = 0\.0: ratios must be > 0"),
    ([1, 1, 1, -1.0, 1, 1], r"`dc_ratios`\[3\] = -1\.0: ratios must be > 0"),
    ([True, 1, 1, 1, 1, 1], r"`dc_ratios`\[0\] is the bool True"),
    (np.array([True] * 6), r"`dc_ratios`\[0\] is the bool True"),
])
def test_dc_ratios_must_be_positive_numbers(ratios, message):
    """Found by probing: inline and file ratios 0, -1, -5 ran (rho <= 0 puts tau at or before the previous step; the
    CPR path already refused them) and dc_ratios=[True, ...] was taken as 1.0."""
    from fewstep.solvers.dc import check_ratios

    with pytest.raises(ValueError, match=message.replace("`dc_ratios`", "`ratios`")):  # the function's own name
        check_ratios(ratios, 6)
    with pytest.raises(ValueError, match=message):  # the scheduler's messages name its option
        samplers.get("dc-solver")(dc_ratios=list(ratios) if isinstance(ratios, list) else ratios)
    assert check_ratios([1, 1, 1e-9, 50.0, 1, 1], 6)[3] == 50.0  # small or large positive ratios: no bound justified


# ------------------------------------------------------------------------------------------ 1. EMS tables
def _shipped_ems() -> tuple[dict, dict]:
    with safe_open(str(ASSETS / "ems" / "digits-eps.safetensors"), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}


def _ems_copy(path: Path, lambdas=None, meta_edit=None) -> Path:
    header, tensors = _shipped_ems()
    if lambdas is not None:
        tensors["lambdas"] = torch.as_tensor(lambdas, dtype=torch.float64)
    if meta_edit is not None:
        meta = json.loads(header["meta"])
        meta_edit(meta)
        header["meta"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=header)
    return path


def test_shipped_ems_satisfy_the_value_checks():
    from fewstep.solvers.ems import load_ems

    for name in ("digits-eps", "digits-flow"):
        ems = load_ems(ASSETS / "ems" / f"{name}.safetensors")
        assert ems.num_points == ems.meta["settings"]["num_intervals"] + 1


def test_ems_lambdas_must_be_uniform(tmp_path):
    """Found by probing: a warped grid (lo + (hi - lo) * u^2) loaded; the model was then called at other times than
    the steps the solver integrated between (EMS.snap divides by the mean spacing)."""
    from fewstep.solvers.ems import EMS, load_ems

    lo, hi = -5.058836518942976, 4.6050372124078045
    warped = lo + (hi - lo) * np.linspace(0.0, 1.0, 65) ** 2
    path = _ems_copy(tmp_path / "warp.safetensors", warped, lambda m: m.pop("settings"))
    with pytest.raises(ValueError, match=r"EMS file '.*warp\.safetensors': EMS `lambdas` must be uniformly spaced .*"
                                         r"interval 0 .*\(allowed deviation 1\.51e-07\)"):
        load_ems(path)
    ones = np.ones((11, 2))
    EMS(np.linspace(-5.0, 4.0, 11), ones, 0 * ones, 0 * ones)  # a float64 linspace passes
    EMS(torch.linspace(-5.0, 4.0, 11, dtype=torch.float32), ones, 0 * ones, 0 * ones)  # float32 rounding allowed
    nudged = np.linspace(-5.0, 4.0, 11)
    nudged[5] += 1e-4
    with pytest.raises(ValueError, match=r"must be uniformly spaced"):
        EMS(nudged, ones, 0 * ones, 0 * ones)


def test_ems_grids_finer_than_the_minimum_lambda_gap_are_refused():
    from fewstep.solvers.ems import EMS
    from fewstep.solvers.ems_estimate import ems_lambdas

    ones = np.ones((65, 1))
    with pytest.raises(ValueError, match=r"a spacing of 1\.56e-14, below the minimum 0\.0001"):
        EMS(np.linspace(0.0, 1e-12, 65), ones, 0 * ones, 0 * ones)
    with pytest.raises(ValueError, match=r"`num_intervals`=1000000 .* below the minimum 0\.0001"):
        ems_lambdas(VPSchedule.from_config(DDPM), 1_000_000)  # refused before hours of estimation, not after


@pytest.mark.parametrize("lambdas", [np.linspace(-2.058836518942976, 7.6050372124078045, 65),  # shifted by +3
                                     np.linspace(-1e30, 1e30, 65)])
def test_ems_lambdas_must_lie_in_the_schedules_range(tmp_path, lambdas):
    """Found by probing: lambdas shifted +3 past the schedule's top were accepted (t_of_lambda clamps silently);
    linspace(-1e30, 1e30) failed with a misleading 'steps snap to repeated EMS grid points'."""
    path = _ems_copy(tmp_path / "shift.safetensors", lambdas, lambda m: m.pop("settings"))
    with pytest.raises(ValueError, match=r"EMS file '.*shift\.safetensors': EMS `lambdas` run from .* but this "
                                         r"scheduler's noise schedule spans lambda in \[-5\.05884, 4\.60504\]"):
        samplers.get("dpm-solver-v3")(**DDPM, ems_file=str(path))
    with pytest.raises(ValueError, match=r"spans lambda in"):
        samplers.get("s3")(**DDPM, ems_file=str(path))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lambda_range", [0.0, 1.0], r"meta\.settings lambda_range is \[0\.0, 1\.0\], but `lambdas` run from "
                                 r"-5\.05883.* to 4\.6050"),
    ("num_intervals", 7, r"meta\.settings num_intervals is 7, but the tables hold 65 grid points"),
    ("sample_shape", [3, 64, 64], r"meta\.settings sample_shape is \[3, 64, 64\], but `l`, `s`, `b` hold samples of "
                                  r"shape \[1, 16, 16\]"),
])
def test_ems_settings_must_describe_the_tensors(tmp_path, key, value, message):
    from fewstep.solvers.ems import load_ems

    path = _ems_copy(tmp_path / "meta.safetensors", meta_edit=lambda m: m["settings"].__setitem__(key, value))
    with pytest.raises(ValueError, match=r"EMS file '.*meta\.safetensors': " + message):
        load_ems(path)


# ------------------------------------------------------------------------------------------ 2. EMS checkpoints
def _eps_fn(x, lam, dlam):
    return 0.5 * x * torch.sigmoid(-2 * (dlam + lam))  # smooth in x and lambda, any sample shape


def _estimate(ck: Path):
    from fewstep.solvers.ems_estimate import estimate_ems

    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return estimate_ems(_eps_fn, data, VPSchedule.from_config(DDPM), num_intervals=4, batch_size=4, checkpoint=ck,
                        progress=False)


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), "pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=header)
    return dst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ems") / "orig.ckpt"
    return ck, _estimate(ck)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t["lambdas"].add_(1.0), r"is damaged: its grid point 0 is lambda -4\.05.*, its settings give -5\.05"),
    (lambda t: t["counts"][2].mul_(2), r"is damaged: grid point 2 counts 16 samples after 2 batches of 4 \(of 8 "
                                       r"samples: 8 expected\)"),
    (lambda t: t["batches"][4].fill_(0), r"is damaged: grid point 4 counts 8 samples after 0 batches"),
    (lambda t: t["batches"].fill_(2**62), r"is damaged: grid point 0 records 4611686018427387904 finished batches"),
    (lambda t: t["sums"][2].view(-1)[0:1].fill_(float("nan")), r"is damaged: `sums` hold NaN/Inf at grid points \[2\]"),
])
def test_ems_checkpoint_values_are_checked_on_resume(checkpoint, tmp_path, edit, message):
    """Found by probing: a checkpoint's lambdas + 1 gave EMS with lambdas shifted by 1 (exit 0); counts x 2 gave wrong
    l, s, b silently; NaN sums failed with 're-estimate them' and every re-run resumed the same checkpoint."""
    orig, ems = checkpoint
    bad = _edit_checkpoint(orig, tmp_path / "bad.ckpt", edit)
    with pytest.raises(ValueError, match=r"checkpoint '.*bad\.ckpt' " + message + r".*delete it to start over"):
        _estimate(bad)
    again = _estimate(_edit_checkpoint(orig, tmp_path / "same.ckpt", lambda t: None))  # an intact one resumes
    np.testing.assert_array_equal(again.l, ems.l)
    np.testing.assert_array_equal(again.lambdas, ems.lambdas)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that makes the tables NaN
def test_tables_that_fail_from_checkpoint_sums_name_the_checkpoint(checkpoint, tmp_path):
    orig, _ = checkpoint
    bad = _edit_checkpoint(orig, tmp_path / "huge.ckpt", lambda t: t["sums"][2].fill_(1e300))  # finite, overflows
    with pytest.raises(ValueError, match=r"holds NaN/Inf .* \(the sums come from checkpoint '.*huge\.ckpt': delete "
                                         r"it to estimate them afresh\)"):
        _estimate(bad)


# ------------------------------------------------------------------------------------------ 5-7, 10. quantization
class _Small(nn.Module):
    """forward(sample, timestep) like a UNet: a float conv_in, then a quantized conv (with bias) and linear."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 2)

    def forward(self, sample, timestep=None):
        h = torch.relu(self.conv(self.conv_in(sample)))
        return self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module", params=["int8", "fp8"])
def saved_quant(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _Small().eval()
    gen = torch.Generator().manual_seed(1)
    calibration = quant.CalibrationSet(torch.randn(8, 2, 6, 6, generator=gen), torch.zeros(8, dtype=torch.long))
    qmodel = quant.quantize(model, calibration, quant.QuantConfig(format=request.param, act_grid=10, weight_grid=10))
    root = tmp_path_factory.mktemp(f"q{request.param}") / "saved"
    quant.save_quantized(qmodel, root, model_id="small")
    return model, root, request.param


def _damaged(saved_quant, tmp_path: Path, meta_edit=None, tensor_edit=None) -> Path:
    return damaged_quant_copy(saved_quant[1], tmp_path, meta_edit, tensor_edit)


def test_a_fresh_quantization_passes_the_value_checks(saved_quant):
    model, root, _ = saved_quant
    assert set(quant.quant_layers(quant.load_quantized(model, root))) == {"conv", "proj"}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["weight_norms"].__setitem__("conv", "6.58"),
     r"`weight_norms` of layer 'conv' must be a finite number >= 0 \(the float weight's L2 norm\), got '6\.58'"),
    (lambda m: m["weight_norms"].__setitem__("conv", float("nan")), r"`weight_norms` of layer 'conv' .* got nan"),
    (lambda m: m["weight_norms"].pop("conv"), r"`weight_norms` lacks layer 'conv'"),
    (lambda m: m["weight_projections"].__setitem__("conv", []),
     r"`weight_projections` of layer 'conv' must be a list of 4 finite numbers, got \[\]"),
    (lambda m: m["weight_projections"].__setitem__("conv", [float("nan")] * 4),
     r"`weight_projections` of layer 'conv' must be a list of 4 finite numbers, got \[nan"),
    (lambda m: m["weight_projections"].__setitem__("conv", "abc"),
     r"`weight_projections` of layer 'conv' must be a list of 4 finite numbers, got 'abc'"),
])
def test_weight_signatures_in_quant_json_are_checked(saved_quant, tmp_path, edit, message):
    """Found by probing: a string norm was a bare TypeError, [] projections 'max() arg is an empty sequence', and a
    NaN norm or projections switched the weight-identity check off silently (abs(x - nan) > tol is False)."""
    model = saved_quant[0]
    with pytest.raises(ValueError, match=r"damaged/quant\.json': " + message):
        quant.load_quantized(model, _damaged(saved_quant, tmp_path, meta_edit=edit))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.__setitem__("bits", 4), r"`bits` must be 8 .*got 4"),
    (lambda m: m["layers"]["conv"].__setitem__("mode", "bogus"),
     r"layer 'conv': `mode` must be one of \['fake', 'int8', 'fp8', 'dequant'\], got 'bogus'"),
    (lambda m: m["config"].__setitem__("format", "int4"), r"`config\.format` is 'int4' but `format` is '(int8|fp8)'"),
])
def test_other_settings_in_quant_json_are_checked(saved_quant, tmp_path, edit, message):
    model = saved_quant[0]
    with pytest.raises(ValueError, match=message):
        quant.load_quantized(model, _damaged(saved_quant, tmp_path, meta_edit=edit))


def _scaled(name, factor):
    return lambda t: t.__setitem__(name, t[name] * factor)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.__setitem__("conv.weight_q0", torch.zeros_like(t["conv.weight_q0"])),
     r"layer 'conv''s stored weights times their scales have norm 0, but quant\.json records the float weight's norm"),
    (_scaled("conv.weight_scale0", 100.0), r"layer 'conv''s stored weights times their scales have norm"),
    (lambda t: t.__setitem__("conv.weight_q0", (-t["conv.weight_q0"].float()).to(t["conv.weight_q0"].dtype)),
     r"layer 'conv''s stored weights times their scales are not the weights quant\.json records"),
    (lambda t: t["conv.weight_scale0"].__setitem__(0, 1e30), r"weight_scale0 must hold 8 finite positive floats .*"
                                                             r"below 1e\+30"),
    (lambda t: t["conv.weight_scale0"].__setitem__(0, 1e-45), r"weight_scale0 must hold 8 finite positive floats .*"
                                                              r"at least 1\.1754944e-38"),
    (lambda t: t.__setitem__("conv.bias", torch.full_like(t["conv.bias"], 1e30)),
     r"layer 'conv''s bias differs from the model's by"),
    (_scaled("conv.bias", 1000.0), r"layer 'conv''s bias differs from the model's by"),
])
def test_stored_weights_scales_and_biases_are_checked(saved_quant, tmp_path, edit, message):
    """Found by probing: zeroed or negated codes and scales x 100 loaded silently; a weight scale or bias of 1e30
    loaded and failed later with 'sampling produced NaN/Inf at step 0' (wrong advice)."""
    model = saved_quant[0]
    with pytest.raises(ValueError, match=r"damaged/quant\.safetensors'.*" + message):
        quant.load_quantized(model, _damaged(saved_quant, tmp_path, tensor_edit=edit))


def test_eight_bit_codes_must_be_valid(saved_quant, tmp_path):
    """int8 weights are symmetric ([-127, 127]: -128 was accepted); e4m3's 0x7F/0xFF are NaN codes."""
    model, _, fmt = saved_quant
    if fmt == "int8":
        def edit(t):
            t["conv.weight_q0"].view(-1)[0] = -128
        message = r"layer 'conv''s weight_q0 holds the code -128; int8 weights are symmetric, in \[-127, 127\]"
    else:
        def edit(t):
            t["conv.weight_q0"].view(torch.uint8).view(-1)[0] = 0x7F
        message = r"layer 'conv''s weight_q0 holds NaN codes \(fp8 e4m3 weights must be finite\)"
    with pytest.raises(ValueError, match=message):
        quant.load_quantized(model, _damaged(saved_quant, tmp_path, tensor_edit=edit))


@pytest.mark.parametrize("scale", [5e-324, 1e-39])
def test_denormal_activation_scales_are_refused(saved_quant, tmp_path, scale):
    """Found by probing: 5e-324 passed the (0, 1e30) range; float32 kernels flush it to zero (the layer then outputs
    its bias alone). Normal scales, however odd (1e-30, 1e29), have no data-free bound and still load."""
    from fewstep.quant.quantizers import SCALE_MIN, act_qparams_problem

    model = saved_quant[0]

    def edit(m):
        m["layers"]["conv"]["act"][0]["scale"] = scale

    with pytest.raises(ValueError, match=rf"layer 'conv': activation `scale` .* got {scale!r} \(and at least "
                                         r"1\.1754944e-38, float32's smallest normal number"):
        quant.load_quantized(model, _damaged(saved_quant, tmp_path, meta_edit=edit))
    assert SCALE_MIN == float(np.finfo(np.float32).tiny)
    assert act_qparams_problem(SCALE_MIN, 0, "int8") is None and act_qparams_problem(1e29, 0, "int8") is None
    assert math.isfinite(255 * np.float32(SCALE_MIN)) and 255 * np.float32(SCALE_MIN) >= np.finfo(np.float32).tiny


# ------------------------------------------------------------------------------------------ 9. bench caches
def _stats_file(tmp_path: Path, mean: torch.Tensor, cov: torch.Tensor) -> tuple[Path, dict]:
    from fewstep.bench._cache import cache_name, save_cached

    key = {"kind": "reference-statistics", "model": "toy"}
    path = tmp_path / cache_name("refstats", key)
    save_cached(path, {"mean": mean, "cov": cov}, key)
    return path, key


@pytest.mark.parametrize(("make_cov", "message"), [
    (lambda c: -c, r"holds a damaged covariance: `cov` must be a positive semi-definite covariance matrix"),
    (lambda c: c + torch.triu(torch.ones_like(c), 1), r"holds a damaged covariance: `cov` must be a symmetric"),
    (lambda c: c * 1e300, r"holds statistics whose entries reach .* below ~1e150"),
])
def test_cached_statistics_are_checked_naming_the_file(tmp_path, make_cov, message):
    """Found by probing: a negated or asymmetric cached covariance failed inside the Frechet distance naming its
    argument `cov2`, not the cache file, nor that deleting it fixes the run."""
    from fewstep.bench._cache import load_statistics

    feats = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, cov = feats.mean(0), torch.from_numpy(np.cov(feats.numpy(), rowvar=False))
    path, key = _stats_file(tmp_path, mean, cov)
    assert load_statistics(path, key)[1].shape == (6, 6)  # real statistics load
    path, key = _stats_file(tmp_path, mean, make_cov(cov))
    with pytest.raises(ValueError, match=r"cache file '.*refstats-.*\.safetensors' " + message + r".*delete it"):
        load_statistics(path, key)


def test_cached_reference_images_must_lie_in_the_unit_range(tmp_path):
    """Found by probing: cached reference images of 1e30 (the bench stores them in [0, 1]) gave 'MSE to ref 1e60'."""
    from fewstep.bench._cache import cached_tensor, save_cached

    key = {"kind": "reference-solve", "model": "toy"}
    computed = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    first = cached_tensor(tmp_path, "refsolve", key, "images", lambda: computed, rows=3)
    assert torch.equal(cached_tensor(tmp_path, "refsolve", key, "images", lambda: None, rows=3), first)
    path = next(tmp_path.glob("refsolve-*.safetensors"))
    save_cached(path, {"images": torch.full_like(computed, 1e30)}, key)
    with pytest.raises(ValueError, match=r"cache file '.*refsolve-.*' holds 'images' with values in \[1e\+30, "
                                         r"1e\+30\], outside \[0, 1\] where the bench stores them; delete it"):
        cached_tensor(tmp_path, "refsolve", key, "images", lambda: None, rows=3)
    latents = {"kind": "reference-solve", "model": "pipe"}  # real pipelines' latents are unbounded
    cached_tensor(tmp_path, "refsolve", latents, "latents", lambda: torch.full((3, 4), 50.0, dtype=torch.float64))
    assert float(cached_tensor(tmp_path, "refsolve", latents, "latents", lambda: None).max()) == 50.0


# ------------------------------------------------------------------------------------------ 10. S3 version
def test_s3_version_true_is_refused(tmp_path):
    """True == 1 in Python: "version": true loaded as format version 1."""
    from fewstep.solvers.s3 import SolverSchedule

    path = _schedule_file(tmp_path, [999.0, 715.9, 476.5, 242.9, 32.2], version=True)
    with pytest.raises(ValueError, match=r"schedule format version True is not supported"):
        SolverSchedule.load(path)
