"""Mutation gaps in graph mode's static step (``fewstep/pipelines/graph_step.py``) and the quantization artifacts
(``fewstep/quant/artifacts.py``).

The static step is checked against the eager loop (same scheduler and rule, no static buffers) where its reused
buffers, its half-precision state or a rarely used prediction type make a difference, and its cache key against
what a captured step bakes in. The artifacts are read back with ``safetensors.torch.load_file`` and ``json`` and
compared field by field with the quantized module, loaded into a fresh model (outputs bit for bit), and damaged
one field at a time.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from _helpers import SD3_FLOW, SD15_PNDM, damaged_quant_copy
from diffusers import PNDMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from test_fewstep_pipeline import _unet, _vae
from torch import nn

from fewstep import quant, samplers
from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.graph_step import check_graph_scheduler, graph_samplers, kwargs_cache_key, module_state_key
from fewstep.quant.quantizers import act_qparams_from_range, weight_qparams


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_sd(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=_unet(), scheduler=PNDMScheduler.from_config(SD15_PNDM),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(dtype=dtype)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return _tiny_sd()


def _embeds(seed: int, dtype: torch.dtype = torch.float32) -> dict:
    g = _gen(seed)
    return {"prompt_embeds": torch.randn(1, 5, 16, generator=g).to(dtype),
            "negative_prompt_embeds": torch.randn(1, 5, 16, generator=g).to(dtype)}  # fmt: skip


def _run(fp: FewstepPipeline, mode: str, seed: int = 1, **kw) -> torch.Tensor:
    fp._loop_mode = mode
    return fp(**kw, generator=_gen(seed), output_type="latent").images


def _sched(pipe, name: str, **extra):
    # as keyword arguments: diffusers drops a key of the config dict that its `_use_default_values` lists (the SD 1.5
    # PNDM config's prediction_type), so from_config({**config, "prediction_type": ...}) keeps "epsilon"
    scheduler = samplers.get(name).from_config(pipe.scheduler.config, **extra)
    assert all(scheduler.config[k] == v for k, v in extra.items())
    return scheduler


# ----------------------------------------------------------------------------------------- reused static buffers
def test_reused_buffers_take_the_new_prompt_embeddings(sd):
    """A second call of the same shapes reuses the static buffers: its (other) prompt embeddings must be copied in,
    so it gives the eager loop's latents for those embeddings, not the first call's."""
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=4.0)
    _run(fp, "static", **_embeds(3), num_inference_steps=3)
    run = fp._graph_cache[1]
    static = _run(fp, "static", **_embeds(4), num_inference_steps=3)
    assert fp._graph_cache[1] is run  # the reuse path
    eager = _run(fp, "eager", **_embeds(4), num_inference_steps=3)
    assert torch.equal(static, eager)  # the static step equals the eager loop bit for bit on the CPU (its tests)
    assert not torch.equal(eager, _run(fp, "eager", **_embeds(3), num_inference_steps=3))


def test_reused_buffers_take_a_new_schedule_of_the_same_length(sd):
    """Another time grid with the same number of steps keeps every shape (the buffers are reused) but changes
    the timesteps, alpha/sigma, the solver coefficients and the SDE noise coefficients: all must be reloaded."""
    kw = dict(**_embeds(3), num_inference_steps=3)
    first = _sched(sd, "dpm-solver++", algorithm_type="sde-dpmsolver++", solver_order=2, time_grid="uniform_lambda")
    fp = FewstepPipeline.from_pipe(sd, scheduler=first, guidance="cfg", guidance_scale=3.0)
    _run(fp, "static", **kw)
    run = fp._graph_cache[1]
    fp.pipe.scheduler = _sched(sd, "dpm-solver++", algorithm_type="sde-dpmsolver++", solver_order=2,
                               time_grid="time_quadratic")  # fmt: skip
    static = _run(fp, "static", **kw)
    assert fp._graph_cache[1] is run
    eager = _run(fp, "eager", **kw)
    assert torch.equal(static, eager)
    fp.pipe.scheduler = first
    assert not torch.equal(eager, _run(fp, "eager", **kw))  # the two schedules do differ


def test_half_precision_static_step_keeps_the_float32_state_as_eager(sd):
    """A bfloat16 pipeline: the eager steps continue from their float32 result (``working_sample``), the static
    step from its float32 buffer; re-rounding to bfloat16 between steps would lose increments below half an ULP."""
    pipe = _tiny_sd(torch.bfloat16)
    fp = FewstepPipeline.from_pipe(pipe, scheduler="dpm-solver++", guidance="cfg", guidance_scale=3.0)
    kw = dict(**_embeds(3, torch.bfloat16), num_inference_steps=4)
    for seed in (1, 2):  # the second call reuses the buffers (the float32 state is reloaded)
        static = _run(fp, "static", seed, **kw)
        eager = _run(fp, "eager", seed, **kw)
        assert static.dtype == torch.bfloat16 and torch.equal(static, eager), seed
    # latents handed in equal to the last call's result (bfloat16): the run starts from them, not from the float32
    # state the last call ended in (which rounds to them)
    static = _run(fp, "static", latents=eager, **kw)
    assert torch.equal(static, _run(fp, "eager", latents=eager, **kw))


def test_sample_prediction_static_step_equals_eager(sd):
    """``prediction_type="sample"``: the model output is x0 and eps = (x - alpha x0) / sigma."""
    sched = _sched(sd, "ddim", prediction_type="sample")
    fp = FewstepPipeline.from_pipe(sd, scheduler=sched, guidance="apg", guidance_scale=3.0)
    kw = dict(**_embeds(3), num_inference_steps=3)
    assert torch.equal(_run(fp, "static", **kw), _run(fp, "eager", **kw))


# ------------------------------------------------------------------------------------------------ cache key
@pytest.mark.parametrize("change", ["prediction_type", "clip_sample", "clip_sample_range"])
def test_a_setting_baked_into_the_captured_step_recaptures(sd, change):
    """The prediction type (the pair conversion) and x0 clipping are constants of a captured step (not table
    entries): a call with another one must not replay the old step -- a new static run -- and equals eager."""
    base = {"prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 0.5}
    other = {"prediction_type": {"prediction_type": "epsilon"}, "clip_sample": {"clip_sample": False},
             "clip_sample_range": {"clip_sample_range": 2.0}}[change]  # fmt: skip
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=3.0)
    # set directly: from_pipe gives an SD pipeline's scheduler clip_sample=False, as StableDiffusionPipeline does
    fp.pipe.scheduler = _sched(sd, "ddim", **base)
    kw = dict(**_embeds(3), num_inference_steps=3)
    first = _run(fp, "static", **kw)
    assert torch.equal(first, _run(fp, "eager", **kw))
    run = fp._graph_cache[1]
    fp.pipe.scheduler = _sched(sd, "ddim", **{**base, **other})
    static = _run(fp, "static", **kw)
    assert fp._graph_cache[1] is not run
    assert torch.equal(static, _run(fp, "eager", **kw)) and not torch.equal(static, first)


def test_kwargs_cache_key_tells_views_of_one_storage_apart():
    """A captured step reads an attention-kwargs tensor at its address with its shape, strides and dtype: views of
    one storage that differ in any of them are other inputs; a list and a tuple of the same items are other kwargs."""
    a = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    assert a.data_ptr() == a.t().data_ptr() == a.view(torch.int32).data_ptr()
    assert kwargs_cache_key(a) != kwargs_cache_key(a.t())  # same shape, other strides
    assert kwargs_cache_key(a) != kwargs_cache_key(a.view(torch.int32))  # same shape and strides, other dtype
    assert kwargs_cache_key([1, 2]) != kwargs_cache_key((1, 2))
    assert kwargs_cache_key({"a": 1, "b": 2}) == kwargs_cache_key({"b": 2, "a": 1})


def test_module_state_key_follows_buffers_and_attention_processors():
    """A captured step also reads the module's buffers by address and bakes in its attention processors."""
    net = nn.Linear(2, 2)
    net.register_buffer("table", torch.zeros(3))
    net.processor = object()
    key = module_state_key(net)
    assert module_state_key(net) == key
    net.table = torch.zeros(3)  # a buffer replaced (another storage)
    after_buffer = module_state_key(net)
    assert after_buffer != key
    net.processor = object()  # a processor swapped
    assert module_state_key(net) not in (key, after_buffer)


def test_graph_samplers_are_the_documented_ones(sd):
    """README: graph mode refuses ``hb``/``ghvb``/``dc-solver``/``flowchef``/``mrs`` (momentum, step hooks, a
    mean-reverting step) and supports ``ddim``, ``dpm-solver++``, ``unipc``, ``dpm-solver-v3``, ``flow-euler``,
    ``s3``."""
    assert set(graph_samplers()) == {"ddim", "dpm-solver++", "unipc", "dpm-solver-v3", "flow-euler", "s3"}
    mr = {**SD15_PNDM, "beta_schedule": "mr_cosine", "stationary_std": 0.5}
    for name, config in [("hb", SD15_PNDM), ("ghvb", SD15_PNDM), ("dc-solver", SD15_PNDM), ("flowchef", SD3_FLOW),
                         ("mrs", mr)]:
        scheduler = samplers.get(name).from_config(config)
        with pytest.raises(ValueError, match=rf"cuda_graph=True cannot replay {type(scheduler).__name__} "):
            check_graph_scheduler(scheduler)


def test_static_loop_callbacks_and_interrupt_match_eager(sd):
    """Callbacks see the same step index, timestep and ``_current_timestep`` (diffusers' ``current_timestep``) in both
    loops; an interrupt set at step 1 skips the remaining steps alike; it is None again after the call."""
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=3.0)
    kw = dict(**_embeds(3), num_inference_steps=4)
    seen: dict[str, list] = {"eager": [], "static": []}
    outs = {}
    for mode in ("eager", "static"):
        def callback(pipe, i, t, tensors, mode=mode):
            seen[mode].append((i, float(t), float(pipe._current_timestep)))
            if i == 1:
                pipe._interrupt = True
            return {}

        outs[mode] = _run(fp, mode, **kw, callback_on_step_end=callback)
        assert fp.pipe._current_timestep is None
    timesteps = [float(t) for t in fp.pipe.scheduler.timesteps]
    assert seen["eager"] == [(i, timesteps[i], timesteps[i]) for i in range(2)]  # interrupted after step 1
    assert seen["static"] == seen["eager"] and torch.equal(outs["static"], outs["eager"])


# ------------------------------------------------------------------------------------------------ artifacts
class _Net(nn.Module):
    """A float conv with bias, a linear without bias (split in two input groups) and a float boundary layer."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.proj = nn.Linear(6, 3, bias=False)

    def forward(self, sample, timestep=None):
        h = torch.relu(self.conv(self.conv_in(sample)))
        return self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _quantized(fmt: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _Net().eval()
    cal = quant.CalibrationSet(torch.randn(6, 2, 5, 5, generator=_gen(1)), torch.zeros(6, dtype=torch.long))
    q = quant.quantize(model, cal, quant.QuantConfig(format=fmt, act_grid=8, weight_grid=8))
    # `proj` as a split layer (two input groups, as a shortcut over cat([h, skip])): built from the float layer
    w = model.proj.weight.detach()
    split = quant.QuantLayer(model.proj, [weight_qparams(w[:, :2], fmt=fmt), weight_qparams(w[:, 2:], fmt=fmt)],
                             [act_qparams_from_range(-0.5, 2.0, fmt), act_qparams_from_range(-0.1, 3.0, fmt)],
                             fmt=fmt, split=2, name="proj")  # fmt: skip
    q.proj = split
    return model, q


@pytest.fixture(scope="module", params=["int8", "fp8"])
def saved(request, tmp_path_factory):
    model, q = _quantized(request.param)
    root = tmp_path_factory.mktemp(f"gq{request.param}") / "saved"
    quant.save_quantized(q, root, model_id="net", extra={"note": "x"})
    return model, q, root, request.param


def test_saved_files_hold_the_quantized_modules_fields(saved):
    """quant.safetensors and quant.json, read with safetensors and json, against the quantized module and the float
    model they came from (hashes and norms recomputed here as their docstrings define them)."""
    model, q, root, fmt = saved
    tensors = load_file(str(root / "quant.safetensors"))
    meta = json.loads((root / "quant.json").read_text())
    layers = quant.quant_layers(q)
    assert set(layers) == {"conv", "proj"}
    want_keys = {"conv.weight_q0", "conv.weight_scale0", "conv.bias", "proj.weight_q0", "proj.weight_q1",
                 "proj.weight_scale0", "proj.weight_scale1"}  # fmt: skip
    assert set(tensors) == want_keys
    storage = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]
    for name, layer in layers.items():
        for g in range(2 if layer.split else 1):
            codes = tensors[f"{name}.weight_q{g}"]
            assert codes.dtype == storage
            assert torch.equal(codes.view(torch.uint8), getattr(layer, f"weight_q{g}").view(torch.uint8))
            assert torch.equal(tensors[f"{name}.weight_scale{g}"], getattr(layer, f"weight_scale{g}"))
    assert torch.equal(tensors["conv.bias"], model.conv.bias.detach())
    assert meta["artifact"] == "fewstep-quant" and meta["version"] == 1 and meta["bits"] == 8
    assert meta["format"] == meta["config"]["format"] == fmt and meta["model_id"] == "net"
    assert meta["extra"] == {"note": "x"}
    with safe_open(str(root / "quant.safetensors"), "pt") as f:
        assert f.metadata()["save_id"] == meta["save_id"]
    assert meta["layers"]["conv"]["kind"] == "conv2d" and meta["layers"]["proj"]["kind"] == "linear"
    assert meta["layers"]["conv"]["split"] == 0 and meta["layers"]["proj"]["split"] == 2
    assert meta["layers"]["conv"]["shape"] == [6, 6, 3, 3] and meta["layers"]["proj"]["shape"] == [3, 6]
    for name, layer in layers.items():
        assert meta["layers"][name]["act"] == [{"scale": a.scale, "zero_point": a.zero_point} for a in layer.act]
        assert meta["layers"][name]["mode"] == "fake"
    assert meta["layers"]["proj"]["act"][0] != meta["layers"]["proj"]["act"][1]
    # the float model's identity: only the quantized layers' norms; hashes over the sorted state dict
    state = model.state_dict()
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name in sorted(state):
        arch.update(f"{name}:{tuple(state[name].shape)};".encode())
        weights.update(name.encode())
        weights.update(state[name].float().contiguous().numpy().tobytes())
    assert meta["model_arch_hash"] == arch.hexdigest()[:16] and meta["model_weights_hash"] == weights.hexdigest()[:16]
    assert set(meta["weight_norms"]) == set(meta["weight_projections"]) == {"conv", "proj"}
    for name in ("conv", "proj"):  # float64 norm of the float32 weight vs its float32 norm: 1e-6 relative
        w = model.get_submodule(name).weight.detach().double()
        assert meta["weight_norms"][name] == pytest.approx(float(w.norm()), rel=1e-6)
        # weight_projections' definition: 4 fixed +-1 vectors drawn from a generator seeded with the weight's size
        # (files saved earlier hold them: another draw would refuse every saved artifact), over the weight's norm
        flat = w.float().reshape(-1)
        signs = torch.randint(0, 2, (4, flat.numel()), generator=_gen(flat.numel()), dtype=torch.int8).float() * 2 - 1
        want = (signs.double() @ flat.double()) / flat.double().norm()
        assert meta["weight_projections"][name] == pytest.approx(want.tolist(), abs=1e-5)  # float32 matmul rounding


def test_loaded_model_equals_the_quantized_one_bit_for_bit(saved):
    """Loaded into a fresh copy of the float model: every stored tensor, quantizer and the output equal the
    in-memory quantized model's; the float model handed in stays float (inplace=False)."""
    model, q, root, fmt = saved
    fresh = copy.deepcopy(model)
    loaded = quant.load_quantized(fresh, root, mode="fake", model_id="net")
    assert not quant.quant_layers(fresh) and isinstance(fresh.conv, nn.Conv2d)
    for name, layer in quant.quant_layers(q).items():
        other = loaded.get_submodule(name)
        assert other.split == layer.split and other.act == layer.act and other.mode == "fake"
        for key, value in layer.state_dict().items():
            if torch.is_tensor(value):
                assert torch.equal(value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value,
                                   other.state_dict()[key].view(torch.uint8)
                                   if value.dtype == torch.float8_e4m3fn else other.state_dict()[key]), (name, key)
    x = torch.randn(3, 2, 5, 5, generator=_gen(7))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert loaded.fewstep_quant["layers"] == {"conv": {"split": 0}, "proj": {"split": 2}}
    assert loaded.fewstep_quant["fingerprint"]["projections"] == json.loads(
        (root / "quant.json").read_text())["weight_projections"]


def _set(path: list, value):
    def edit(meta):
        for key in path[:-1]:
            meta = meta[key]
        meta[path[-1]] = value
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_set(["layers", "proj", "split"], -1), r"layer 'proj': `split` must be an integer >= 0, got -1"),
    (_set(["layers", "conv", "split"], 3), r"layer 'conv': `act` must list 2 activation quantizer\(s\)"),
    (_set(["layers", "proj", "split"], 0), r"layer 'proj': `act` must list 1 activation quantizer\(s\)"),
    (_set(["weight_norms", "conv"], -1.0), r"`weight_norms` of layer 'conv' must be a finite number >= 0"),
    (_set(["weight_norms", "conv_in"], 1.0), r"`weight_norms` names 'conv_in', which is no quantized layer"),
    (_set(["weight_projections", "conv_in"], [0.0] * 4), r"`weight_projections` names 'conv_in', which is no "),
    (_set(["bits"], 16), r"`bits` must be 8 .* got 16"),
    (_set(["version"], 2), r"has artifact version 2; this fewstep reads version 1"),
    (_set(["layers", "conv", "shape"], [6, 6, 1, 1]), r"layer 'conv' weight has shape \[6, 6, 3, 3\], saved \[6, "),
    (_set(["model_arch_hash"], "0" * 16), r"architecture hash [0-9a-f]{16} != saved 0{16}"),
    (_set(["model_id"], "other"), r"saved for model 'other', but `model_id` is 'net'"),
    (_set(["save_id"], "0" * 32), r"come from different saves"),
])
def test_each_quant_json_field_altered_is_refused_by_name(saved, tmp_path, edit, message):
    model, _, root, _ = saved
    with pytest.raises(ValueError, match=message):
        quant.load_quantized(model, damaged_quant_copy(root, tmp_path, meta_edit=edit), model_id="net")


def test_model_id_and_strict_checks(saved, tmp_path):
    """A save without a model id loads under any id; strict=True compares the exact float32 weights (a change in a
    float boundary layer, which no norm covers)."""
    model, q, _, _ = saved
    quant.save_quantized(q, tmp_path / "anon")
    quant.load_quantized(model, tmp_path / "anon", model_id="whatever")
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.conv_in.bias += 1e-3
    quant.load_quantized(nudged, tmp_path / "anon")
    with pytest.raises(ValueError, match=r"weights hash [0-9a-f]{16} != saved [0-9a-f]{16}"):
        quant.load_quantized(nudged, tmp_path / "anon", strict=True)


def _edit_tensor(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


@pytest.mark.parametrize(("edit", "message"), [
    # a 25% larger scale: beyond the 2^-3 norm tolerance quantization stays within (artifacts._QUANT_NORM_RTOL)
    (_edit_tensor("conv.weight_scale0", lambda s: s * 1.25), r"layer 'conv''s stored weights times their scales "
                                                             r"have norm"),
    (_edit_tensor("proj.weight_scale1", lambda s: s * 1.5), r"layer 'proj''s stored weights times their scales "),
    (_edit_tensor("proj.weight_scale1", lambda s: torch.cat([s[:1] * 0, s[1:]])), r"layer 'proj''s weight_scale1 "),
    (_edit_tensor("proj.weight_q1", lambda c: c[:1]), r"layer 'proj''s weight_q1 has shape \(1, 4\), the model's "),
    (_edit_tensor("proj.weight_q1", lambda c: (-c.float()).to(c.dtype)), r"layer 'proj''s stored weights times "
                                                                        r"their scales are not the weights"),
    # bias 10% off: beyond bfloat16's rounding (2^-7 relative, artifacts._BIAS_RTOL)
    (_edit_tensor("conv.bias", lambda b: b * 1.1), r"layer 'conv''s bias differs from the model's by"),
    (_edit_tensor("conv.bias", lambda b: b.to(torch.int32)), r"layer 'conv''s bias must be \(6,\) finite floats, "
                                                             r"got a torch.int32"),
    (_edit_tensor("conv.weight_q0", lambda c: c.view(torch.uint8)), r"stores layer 'conv''s weights as torch.uint8"),
])
def test_each_stored_tensor_altered_is_refused_by_name(saved, tmp_path, edit, message):
    model, _, root, _ = saved
    with pytest.raises(ValueError, match=message):
        quant.load_quantized(model, damaged_quant_copy(root, tmp_path, tensor_edit=edit))


def test_a_layer_with_other_float_weights_is_refused(saved):
    """The quantized layers' float weights scaled by 1% (the norm, beyond its 2e-3 tolerance for half-precision
    loads) or permuted (same norm, other projections) belong to another model."""
    model, _, root, _ = saved
    scaled, permuted = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        scaled.conv.weight.mul_(1.01)
        permuted.conv.weight.copy_(permuted.conv.weight.flip(0))
    with pytest.raises(ValueError, match=r"layer 'conv' weight norm"):
        quant.load_quantized(scaled, root)
    with pytest.raises(ValueError, match=r"layer 'conv' has weights of the same norm but other values"):
        quant.load_quantized(permuted, root)
    smaller = copy.deepcopy(model)
    with torch.no_grad():
        smaller.conv.weight.mul_(0.99)  # a smaller norm is as foreign as a larger one
    with pytest.raises(ValueError, match=r"layer 'conv' weight norm"):
        quant.load_quantized(smaller, root)


def test_a_bfloat16_model_gets_the_saved_codes_scales_and_bias(saved):
    """Loaded into a bfloat16 copy of the float model (its weights and bias rounded), the quantized layers hold the
    saved tensors exactly -- the stored 8-bit weights, scales and float32 bias are the truth, not a re-rounding of
    the model's own."""
    model, q, root, _ = saved
    tensors = load_file(str(root / "quant.safetensors"))
    loaded = quant.load_quantized(copy.deepcopy(model).to(torch.bfloat16), root)
    conv = loaded.get_submodule("conv")
    assert not torch.equal(model.conv.bias.detach().bfloat16().float(), tensors["conv.bias"])  # rounding is visible
    assert conv.bias.dtype == torch.float32 and torch.equal(conv.bias, tensors["conv.bias"])
    for key in ("weight_q0", "weight_scale0"):
        assert torch.equal(getattr(conv, key).view(torch.uint8) if key == "weight_q0" else getattr(conv, key),
                           tensors[f"conv.{key}"].view(torch.uint8) if key == "weight_q0" else tensors[f"conv.{key}"])


def test_saving_into_a_file_path_is_a_value_error_naming_it(saved, tmp_path):
    _, q, _, _ = saved
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match=r"`out_dir` '.*taken' exists and is not a directory"):
        quant.save_quantized(q, target)
    assert target.read_text() == "not a folder"
