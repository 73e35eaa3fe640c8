"""FewstepPipeline among diffusers' own habits (found by an interop probe): a denoiser the user wrapped with
``torch.compile`` (``pipe.unet = torch.compile(pipe.unet)``, diffusers' recipe) is hosted like the plain one (the
family was read from the wrapper's class name, ``OptimizedModule``, and the pipeline refused as "not SD");
``quantized=`` or ``compile=`` on top of such a wrapper, or ``quantized=`` on an offloaded denoiser, is refused
naming the way out; ``compile`` values torch.compile itself refuses (unknown backend, inductor options) are
ValueErrors naming ``compile``; the wrapper answers ``to``/``device``/``dtype``/``components``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import SD3_FLOW, SD15_PNDM
from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
from test_fewstep_pipeline import _unet, _vae
from test_fewstep_pipeline_flow import _sd3_transformer
from test_fewstep_pipeline_flow import _vae as _flow_vae
from test_hub_configs import _embeds

from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.posterior import _is_sd


def _sd() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=_unet(), scheduler=PNDMScheduler.from_config(SD15_PNDM),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW),
        vae=_flow_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(fp: FewstepPipeline, mode: str = "eager", **kw) -> np.ndarray:
    fp._loop_mode = mode
    return fp(**kw, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(1)).images


def test_a_torch_compile_wrapped_unet_is_hosted_and_runs_through_the_wrapper():
    plain, wrapped = _sd(), _sd()
    calls = []

    def backend(gm, example_inputs):  # torch.compile's custom-backend contract: count compiles, run eagerly
        calls.append(1)
        return gm.forward

    wrapped.unet = torch.compile(wrapped.unet, backend=backend)
    assert type(wrapped.unet).__name__ == "OptimizedModule"
    assert FewstepPipeline.family_of(wrapped) == "sd" and _is_sd(wrapped)
    fp_plain = FewstepPipeline.from_pipe(plain, scheduler="dpm-solver++", guidance="cfg", guidance_scale=4.0)
    fp = FewstepPipeline.from_pipe(wrapped, scheduler="dpm-solver++", guidance="cfg", guidance_scale=4.0)
    reference = _images(fp_plain, **_embeds())
    np.testing.assert_allclose(_images(fp, **_embeds()), reference, atol=1e-6)  # same weights, same loop
    assert calls  # the loop called the user's compiled wrapper, not the module inside it
    np.testing.assert_allclose(_images(fp, "static", **_embeds()), reference, atol=1e-6)


def test_a_torch_compile_wrapped_sd3_transformer_is_hosted():
    plain, wrapped = _sd3(), _sd3()
    wrapped.transformer = torch.compile(wrapped.transformer, backend="eager")
    assert FewstepPipeline.family_of(wrapped) == "sd3"
    fp_plain = FewstepPipeline.from_pipe(plain, scheduler="flow-euler", guidance="cfg", guidance_scale=4.0)
    fp = FewstepPipeline.from_pipe(wrapped, scheduler="flow-euler", guidance="cfg", guidance_scale=4.0)
    np.testing.assert_allclose(_images(fp, **_embeds(True)), _images(fp_plain, **_embeds(True)), atol=1e-6)


@pytest.mark.parametrize("option, why", [
    ({"quantized": "some-dir"}, "its 8-bit copy would run uncompiled"),
    ({"compile": True}, "it would be compiled twice"),
])
def test_quantized_or_compile_on_a_compile_wrapper_is_refused(option, why):
    sd = _sd()
    sd.unet = torch.compile(sd.unet, backend="eager")
    with pytest.raises(ValueError, match=rf"the pipeline's UNet2DConditionModel is a torch.compile wrapper, and "
                                         rf"`{list(option)[0]}` cannot go on it \({why}\): give from_pipe the "
                                         r"uncompiled module \(pipe.unet = pipe.unet._orig_mod"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", **option)


@pytest.mark.parametrize("compile, message", [
    ({"backend": "nosuchbackend"}, r"`compile\['backend'\]` must be one of torch's backends \[.*'eager'.*\] \(or a "
                                   r"callable\), got 'nosuchbackend'"),
    ({"options": {"no_such_inductor_option": 1}},
     r"`compile\['options'\]` has 'no_such_inductor_option', not an inductor option \(all of them: "
     r"torch._inductor.list_options\(\)\)$"),
    ({"options": {"max_autotun": True}}, r"not an inductor option .*; did you mean \['max_autotune'"),
    ({"options": {"max_autotune": "x"}}, r"`compile`=.*was refused by torch.compile: .*max_autotune.*bool"),
])
def test_compile_values_torch_refuses_name_the_argument(compile, message):
    with pytest.raises(ValueError, match=message):
        FewstepPipeline.from_pipe(_sd(), scheduler="ddim", compile=compile)


def test_quantized_on_an_offloaded_denoiser_is_refused_by_name():
    """accelerate's cpu_offload leaves the weights on the meta device: the quantization's weight check failed with
    torch's "Cannot copy out of meta tensor" (found by the interop probe)."""
    accelerate = pytest.importorskip("accelerate")
    sd = _sd()
    accelerate.cpu_offload(sd.unet, execution_device=torch.device("cpu"))
    assert any(p.is_meta for p in sd.unet.parameters())
    with pytest.raises(ValueError, match=r"`quantized` needs the pipeline's denoiser weights .* offloaded \(on the "
                                         r"meta device"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized="any-dir")


def test_the_wrapper_answers_to_device_dtype_and_components_as_a_diffusers_pipeline():
    """``fp.to``/``fp.device``/``fp.dtype``/``fp.components`` raised AttributeError (interop probe); ``to`` returns
    the wrapper (``fp = fp.to(...)`` keeps the fewstep loop) and moves the hosted modules."""
    sd = _sd()
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=4.0)
    assert fp.device == torch.device("cpu") and fp.dtype == torch.float32
    components = fp.components
    assert components["unet"] is sd.unet and type(components["scheduler"]).__name__ == "FewstepUniPCScheduler"
    assert fp.to(torch.float64) is fp
    assert fp.dtype == torch.float64 and sd.unet.dtype == torch.float64 and sd.vae.dtype == torch.float64
    assert _images(fp, **{k: v.double() for k, v in _embeds().items()}).dtype == np.float32  # runs in float64


def test_the_wrapper_forwards_what_it_lacks_to_the_hosted_pipeline():
    """A diffusers user reaches for ``fp.vae``, ``fp.enable_freeu()``, ``fp.scheduler = ...`` on the pipeline in
    hand: these raised AttributeError (or set a wrapper attribute the loop never read)."""
    sd = _sd()
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=4.0)
    assert fp.vae is sd.vae and fp.unet is sd.unet and fp.config is fp.pipe.config
    assert fp.encode_prompt.__self__ is fp.pipe and fp.vae_scale_factor == sd.vae_scale_factor
    assert "enable_attention_slicing" in dir(fp) and "denoiser" in dir(fp)
    with pytest.raises(AttributeError, match=r"no attribute 'transformer', nor has the StableDiffusionPipeline"):
        fp.transformer  # noqa: B018
    with pytest.raises(AttributeError, match=r"no attribute '_guidance_rescale'"):
        fp._guidance_rescale  # noqa: B018 (private names are not forwarded)
    fp.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert fp.pipe.unet.up_blocks[0].s1 == 0.9
    fp.disable_freeu()
    # assigning a component replaces it in the hosted pipeline (and its config), which the loop reads
    other = FewstepPipeline.from_pipe(sd, scheduler="unipc").scheduler
    fp.scheduler = other
    assert fp.pipe.scheduler is other and "scheduler" not in vars(fp)
    assert fp.pipe.config["scheduler"][1] == "FewstepUniPCScheduler"
    ref = FewstepPipeline.from_pipe(sd, scheduler=other, guidance="cfg", guidance_scale=4.0)
    np.testing.assert_array_equal(_images(fp, **_embeds()), _images(ref, **_embeds()))
    fp.guidance_note = "kept on the wrapper"  # not a component name: the wrapper's own attribute
    assert vars(fp)["guidance_note"] == "kept on the wrapper" and not hasattr(fp.pipe, "guidance_note")


def test_from_pipe_of_a_wrapper_hosts_its_pipeline():
    """``FewstepPipeline.from_pipe(fp, ...)`` (diffusers' from_pipe takes any pipeline) was refused as not SD; now it
    wraps the hosted pipeline again, with the wrapper's scheduler unless another is named."""
    sd = _sd()
    fp = FewstepPipeline.from_pipe(sd, scheduler="dpm-solver++", guidance="cfg", guidance_scale=4.0)
    again = FewstepPipeline.from_pipe(fp, guidance="cfg", guidance_scale=4.0)
    assert again.scheduler is fp.scheduler and again.unet is sd.unet
    np.testing.assert_array_equal(_images(again, **_embeds()), _images(fp, **_embeds()))
    assert type(FewstepPipeline.from_pipe(fp, scheduler="unipc").scheduler).__name__ == "FewstepUniPCScheduler"


def test_save_pretrained_writes_the_hosted_pipeline_and_refuses_a_quantized_denoiser(tmp_path):
    """``fp.save_pretrained`` saves what ``fp.pipe.save_pretrained`` saves (reloaded with the fewstep scheduler);
    with a quantized UNet diffusers would write 8-bit layers that reload as random weights: refused, naming
    ``save_quantized``."""
    from fewstep import quant

    sd = _sd()
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=4.0)
    fp.save_pretrained(tmp_path / "full")
    back = StableDiffusionPipeline.from_pretrained(tmp_path / "full", safety_checker=None, text_encoder=None,
                                                   tokenizer=None, feature_extractor=None, image_encoder=None)
    assert type(back.scheduler).__name__ == "FewstepUniPCScheduler"
    reloaded = FewstepPipeline.from_pipe(back, guidance="cfg", guidance_scale=4.0)
    # the same weights, reloaded: float rounding at most
    np.testing.assert_allclose(_images(reloaded, **_embeds()), _images(fp, **_embeds()), atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    calibration = quant.CalibrationSet(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 900]),
                                       encoder_hidden_states=torch.randn(2, 5, 16, generator=gen))
    qunet = quant.quantize(sd.unet, calibration, quant.QuantConfig(act_grid=5, weight_grid=5, bins=16))
    qfp = FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized=qunet)
    with pytest.raises(ValueError, match=r"its unet is quantized.*save_quantized\(<pipeline>\.unet, DIR\)"):
        qfp.save_pretrained(tmp_path / "quantized")
    assert not (tmp_path / "quantized").exists()


def test_class_conditional_save_pretrained_refuses_a_quantized_unet(tmp_path):
    """``ClassConditionalPipeline.from_pipe(pipe, quantized=q).save_pretrained`` wrote the 8-bit layers under names
    ``UNet2DModel`` does not know: reloaded, the UNet had random weights (NaN outputs on the digits model)."""
    from test_guided_pipeline import DDPM, _pipe
    from test_guided_pipeline import _unet as _class_unet

    from fewstep import quant
    from fewstep.pipelines import ClassConditionalPipeline

    base = _pipe(_class_unet(), "ddim", DDPM)
    gen = torch.Generator().manual_seed(0)
    calibration = quant.CalibrationSet(torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([100, 900]),
                                       class_labels=torch.tensor([1, 10]))
    q = ClassConditionalPipeline.from_pipe(
        base, quantized=quant.quantize(base.unet, calibration, quant.QuantConfig(act_grid=5, weight_grid=5, bins=16)))
    with pytest.raises(ValueError, match=r"its unet is quantized"):
        q.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match=r"its unet is quantized"):
        FewstepPipeline.from_pipe(q, guidance="cfg").save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    base.save_pretrained(tmp_path / "full")  # full precision: saved and reloaded as diffusers does
    back = ClassConditionalPipeline.from_pretrained(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(back.unet.state_dict().values(), base.unet.state_dict().values()))


def test_the_compile_wrapper_advice_names_the_transformer_on_sd3_and_works():
    """On SD3 the advice said ``pipe.unet = pipe.unet._orig_mod``: SD3 has no ``unet`` (advice probe)."""
    sd3 = _sd3()
    sd3.transformer = torch.compile(sd3.transformer, backend="eager")
    with pytest.raises(ValueError, match=r"\(pipe\.transformer = pipe\.transformer\._orig_mod\)"):
        FewstepPipeline.from_pipe(sd3, scheduler="flow-euler", compile={"backend": "eager"})
    sd3.transformer = sd3.transformer._orig_mod  # the advice, literally
    fp = FewstepPipeline.from_pipe(sd3, scheduler="flow-euler", compile={"backend": "eager"})
    assert fp.denoiser is not sd3.transformer


def test_every_sampler_a_flow_message_offers_runs_on_sd3():
    """The "use one of" lists for flow models offered ``flowchef``, which then refuses to run without a cost
    (advice probe); each listed sampler must run the SD3 pipeline as built."""
    from diffusers import FlowMatchEulerDiscreteScheduler as Euler

    sd3 = _sd3()
    with pytest.raises(ValueError, match=r"use one of: (.*)$") as info:
        FewstepPipeline.from_pipe(sd3, scheduler="mrs")
    offered = info.value.args[0].rsplit("use one of: ", 1)[1].split(", ")
    assert "flowchef" not in offered and {"flow-euler", "unipc"} <= set(offered)
    with pytest.raises(ValueError, match=r"use one of: (.*)$") as info:
        FewstepPipeline.from_pipe(sd3, scheduler=Euler.from_config(sd3.scheduler.config), guidance="apg")
    assert info.value.args[0].rsplit("use one of: ", 1)[1].split(", ") == offered
    for name in offered:
        fp = FewstepPipeline.from_pipe(sd3, scheduler=name, guidance="apg")
        assert np.isfinite(_images(fp, **_embeds(True))).all(), name
