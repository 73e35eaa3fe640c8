"""Mutation gaps (second round) in graph mode's static step (``fewstep/pipelines/graph_step.py``) and the
quantization artifacts' tolerances (``fewstep/quant/artifacts.py``).

The static pair conversion is checked against the forward definitions of each prediction type (x = alpha x0 +
sigma eps and the model output written from x0 and eps), off the variance-preserving line where alpha^2 + sigma^2
!= 1; the static loop against the eager loop where a reused run meets a plan of another kind, and its returned
latents against a later call. The artifacts are damaged by an amount computed here (norm, projections from
``weight_projections``' docstring definition, bias offset) that lies between the documented tolerance and a
looser one, so a looser tolerance would let it through.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import damaged_quant_copy
from test_mutation_gaps_graph_artifacts import _embeds, _gen, _quantized, _run, _sched, _tiny_sd

from fewstep import quant
from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.denoiser import prepare_denoiser
from fewstep.pipelines.graph_step import module_state_key, static_pair


# ------------------------------------------------------------------------------------------ static pair conversion
@pytest.mark.parametrize(("kind", "alpha", "sigma"), [
    ("epsilon", 0.6, 0.5), ("sample", 0.6, 0.5),
    ("v_prediction", 0.6, 0.5),  # alpha^2 + sigma^2 = 0.61: e.g. ddim with v_prediction on a flow grid
    ("v_prediction", 0.8, 0.6),  # on the VP line
    ("flow", 0.7, 0.3),  # rectified flow: alpha = 1 - sigma
])
def test_static_pair_inverts_each_prediction_types_definition(kind, alpha, sigma):
    """From x = alpha x0 + sigma eps and the model output of each type (eps; x0; v = alpha eps - sigma x0;
    flow velocity u = eps - x0), the static conversion recovers (x0, eps)."""
    g = _gen(5)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "flow": eps - x0}[kind]
    a, s = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    got_x0, got_eps = static_pair(kind, out, x, a, s, a * a + s * s)
    # float64 round-off on O(1) values: 1e-12
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- static loop
@pytest.fixture(scope="module")
def sd():
    return _tiny_sd()


def test_a_static_result_is_not_overwritten_by_the_next_call(sd):
    """The latents a static run returns are the caller's: the next call (same shapes, the buffers reused) must not
    write into them."""
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=3.0)
    kw = dict(**_embeds(3), num_inference_steps=2)
    first = _run(fp, "static", 1, **kw)
    kept = first.clone()
    second = _run(fp, "static", 2, **kw)
    assert not torch.equal(second, kept)  # the second call did produce other latents
    assert torch.equal(first, kept)
    assert torch.equal(first, _run(fp, "eager", 1, **kw))


def test_switching_between_an_sde_and_an_ode_plan_of_one_shape_equals_eager(sd):
    """dpm-solver++ 2M and its SDE variant have coefficient tables of one shape: a call with the other one must not
    reuse a run built for the other kind (the SDE's noise buffers or their absence), and equals the eager loop."""
    kw = dict(**_embeds(3), num_inference_steps=3)
    sde = _sched(sd, "dpm-solver++", algorithm_type="sde-dpmsolver++", solver_order=2)
    ode = _sched(sd, "dpm-solver++", algorithm_type="dpmsolver++", solver_order=2)
    fp = FewstepPipeline.from_pipe(sd, scheduler=sde, guidance="cfg", guidance_scale=3.0)
    results = {}
    for name, scheduler in [("sde", sde), ("ode", ode), ("sde", sde)]:
        fp.pipe.scheduler = scheduler
        static = _run(fp, "static", **kw)
        eager = _run(fp, "eager", **kw)
        assert torch.equal(static, eager), name
        results[name] = eager
    assert not torch.equal(results["sde"], results["ode"])  # the noise does enter the SDE's result


# ------------------------------------------------------------------------------------------- artifact tolerances
def _projections(w: torch.Tensor) -> torch.Tensor:
    """``weight_projections`` as its docstring defines it: 4 +-1 vectors from a generator seeded with the size."""
    flat = w.detach().double().reshape(-1)
    signs = torch.randint(0, 2, (4, flat.numel()), generator=_gen(flat.numel()), dtype=torch.int8).double() * 2 - 1
    return (signs @ flat) / flat.norm()


def _dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric dequantization: code times its row's scale."""
    return codes.double() * scale.double().reshape(-1, *[1] * (codes.dim() - 1))


@pytest.fixture(scope="module", params=["int8", "fp8"])
def saved(request, tmp_path_factory):
    model, q = _quantized(request.param)
    root = tmp_path_factory.mktemp(f"gqb{request.param}") / "saved"
    quant.save_quantized(q, root)
    return model, q, root


def test_stored_weights_15_percent_too_large_are_refused(saved, tmp_path):
    """artifacts: quantization moves the norm of the stored weights times their scales by less than 2^-3; scales
    15% larger (beyond it, projections unchanged by a uniform factor) mean a damaged file."""
    model, q, root = saved
    w_hat = _dequant(q.conv.weight_q0.float(), q.conv.weight_scale0) * 1.15
    w = model.conv.weight.detach().double()
    assert abs(float(w_hat.norm() / w.norm()) - 1) > 2.0**-3
    damaged = damaged_quant_copy(root, tmp_path, tensor_edit=lambda t: t.__setitem__(
        "conv.weight_scale0", t["conv.weight_scale0"] * 1.15))
    with pytest.raises(ValueError, match=r"layer 'conv''s stored weights times their scales have norm"):
        quant.load_quantized(model, damaged)


def test_stored_weights_with_one_output_channel_negated_are_refused(saved, tmp_path):
    """One output channel's codes negated: the norm is unchanged, the projections move by more than the 0.25
    quantization stays within (but by less than 1: a tolerance of 1 would let it pass)."""
    model, q, root = saved
    w_hat = _dequant(q.conv.weight_q0.float(), q.conv.weight_scale0)
    flipped = w_hat.clone()
    flipped[4] *= -1
    shift = float((_projections(flipped) - _projections(model.conv.weight)).abs().max())
    assert 0.25 < shift < 1.0, shift

    def negate_row(t):
        codes = t["conv.weight_q0"].float()
        codes[4] *= -1
        t["conv.weight_q0"] = codes.to(t["conv.weight_q0"].dtype)

    with pytest.raises(ValueError, match=r"layer 'conv''s stored weights times their scales are not the weights"):
        quant.load_quantized(model, damaged_quant_copy(root, tmp_path, tensor_edit=negate_row))


def test_a_float_model_with_one_weight_negated_is_refused(saved):
    """The float model's largest conv weight negated: same norm, projections moved by ~0.2 -- beyond the 2e-2 that
    half-precision rounding stays within -- so the quantization belongs to other weights."""
    model, _, root = saved
    other = copy.deepcopy(model)
    with torch.no_grad():
        flat = other.conv.weight.view(-1)
        flat[flat.abs().argmax()] *= -1
    shift = float((_projections(other.conv.weight) - _projections(model.conv.weight)).abs().max())
    assert 0.05 < shift < 0.5, shift
    with pytest.raises(ValueError, match=r"layer 'conv' has weights of the same norm but other values"):
        quant.load_quantized(other, root)


@pytest.mark.parametrize("edit", [
    lambda b: b * 1.03,  # 3% off everywhere: beyond bfloat16's 2^-8 rounding (tolerance 2^-7), far inside 2^-2
    lambda b: torch.cat([b[:1] + b.norm(), b[1:]]),  # one element off by the whole norm, the rest exact
], ids=["scaled", "one-element"])
def test_a_saved_bias_off_by_more_than_rounding_is_refused(saved, tmp_path, edit):
    model, _, root = saved
    bias = model.conv.bias.detach().double()
    assert float((edit(bias) - bias).norm()) > 2.0**-7 * float(bias.norm())
    damaged = damaged_quant_copy(root, tmp_path, tensor_edit=lambda t: t.__setitem__(
        "conv.bias", edit(t["conv.bias"])))
    with pytest.raises(ValueError, match=r"layer 'conv''s bias differs from the model's by"):
        quant.load_quantized(model, damaged)


def test_a_quantized_module_checks_the_pipelines_weights_as_its_saved_folder_does(saved):
    """A quantized module handed to a pipeline is checked against the pipeline's float denoiser on the same layers
    as its saved folder (whose quant.json records only the quantized layers' norms and projections): a float
    boundary layer that differs (``conv_in``, carried by the quantized module itself) passes both, a quantized
    layer that differs is refused by both."""
    model, q, root = saved
    boundary, quantized_layer = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        boundary.conv_in.weight.mul_(2.0)
        quantized_layer.conv.weight.mul_(2.0)
    quant.load_quantized(boundary, root)  # the reference: the folder's checks
    assert prepare_denoiser(boundary, quantized=q)[0] is q
    with pytest.raises(ValueError, match=r"layer 'conv' weight norm"):
        quant.load_quantized(quantized_layer, root)
    with pytest.raises(ValueError, match=r"layer 'conv' weight norm"):
        prepare_denoiser(quantized_layer, quantized=q)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_module_state_key_follows_a_quantized_layers_mode_without_derived_tensors(fmt):
    """A captured step bakes in each quantized layer's execution mode (module_state_key's docstring): switching
    ``fake`` <-> ``dequant`` builds no derived tensors, so only the mode itself tells the two apart."""
    _, q = _quantized(fmt)
    fake = module_state_key(q)
    quant.set_mode(q, "dequant")
    assert all(not layer._derived for layer in quant.quant_layers(q).values())  # (no tensor address changes)
    dequant = module_state_key(q)
    assert dequant != fake
    quant.set_mode(q, "fake")
    assert module_state_key(q) == fake


def test_a_denoiser_changed_in_place_gets_a_new_static_run():
    """The static run's cache key includes the denoiser's state (module_state_key): weights replaced in place (a
    LoRA fused, a reload) must not find the old run -- a captured step would replay on the old storage -- and the
    result equals the eager loop with the new weights."""
    pipe = _tiny_sd()
    fp = FewstepPipeline.from_pipe(pipe, scheduler="ddim", guidance="cfg", guidance_scale=3.0)
    kw = dict(**_embeds(3), num_inference_steps=2)
    before = _run(fp, "static", **kw)
    run = fp._graph_cache[1]
    _run(fp, "static", **kw)
    assert fp._graph_cache[1] is run  # nothing changed: the run is reused
    with torch.no_grad():
        pipe.unet.conv_in.weight.data = pipe.unet.conv_in.weight.data * 1.5
    static = _run(fp, "static", **kw)
    assert fp._graph_cache[1] is not run
    assert torch.equal(static, _run(fp, "eager", **kw)) and not torch.equal(static, before)
