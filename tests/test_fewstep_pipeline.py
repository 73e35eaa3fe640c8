"""FewstepPipeline.from_pipe around tiny random SD1.5- and SDXL-shaped pipelines (saved and reloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import SD15_PNDM, SDXL_EULER
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from test_real_pipeline import _byte_level_vocab
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fewstep import guidance, samplers
from fewstep.cli import main
from fewstep.pipelines import FewstepPipeline

RULES = {"cfg": 4.0, "cfg++": 0.7, "apg": 4.0}


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=8, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )  # fmt: skip


def _unet(**extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp-sd")
    (root / "tok").mkdir()
    _byte_level_vocab(root / "tok")
    tokenizer = CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(),
        scheduler=PNDMScheduler.from_config(SD15_PNDM), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def sd(sd_path):
    loaded = StableDiffusionPipeline.from_pretrained(sd_path)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    torch.manual_seed(0)
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER), add_watermarker=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("fp-sdxl") / "pipe"
    pipe.save_pretrained(path)
    loaded = StableDiffusionXLPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _sdxl_embeds(n=1):
    g = torch.Generator().manual_seed(3)
    return {
        "prompt_embeds": torch.randn(n, 5, 16, generator=g),
        "negative_prompt_embeds": torch.randn(n, 5, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(n, 8, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(n, 8, generator=g),
    }


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cfg_matches_the_base_pipeline_with_the_same_scheduler(sd):
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=5.0)
    assert fp.pipe.unet is sd.unet and fp.pipe.vae is sd.vae  # shared, not copied
    assert isinstance(sd.scheduler, PNDMScheduler)  # the base pipeline is left alone
    ours = fp("a digit seven", num_inference_steps=5, generator=_gen(), output_type="np").images
    base = StableDiffusionPipeline.from_pipe(sd, scheduler=samplers.get("unipc").from_config(sd.scheduler.config))
    base.set_progress_bar_config(disable=True)
    theirs = base("a digit seven", num_inference_steps=5, guidance_scale=5.0, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("sampler", samplers.names("diffusion", standalone=True))
def test_every_rule_and_sampler_runs_3_steps(request, family, sampler):
    base = request.getfixturevalue(family)
    fp = FewstepPipeline.from_pipe(base, scheduler=sampler)
    kw = {"prompt": "a digit"} if family == "sd" else _sdxl_embeds()
    latents = {}
    for name, scale in RULES.items():
        out = fp(**kw, num_inference_steps=3, guidance=name, guidance_scale=scale, generator=_gen(1),
                 output_type="latent").images  # fmt: skip
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        latents[name] = out
    assert (latents["cfg"] - latents["cfg++"]).abs().max() > 1e-5 and (latents["cfg"] - latents["apg"]).abs().max() > 0


def test_output_types_generator_and_callback(sdxl):
    fp = FewstepPipeline.from_pipe(sdxl, scheduler="dpm-solver++", guidance=guidance.APG(guidance_scale=3.0))
    kw = _sdxl_embeds()
    pil = fp(**kw, num_inference_steps=3, generator=_gen()).images
    npy = fp(**kw, num_inference_steps=3, generator=_gen(), output_type="np").images
    pt = fp(**kw, num_inference_steps=3, generator=_gen(), output_type="pt").images
    other = fp(**kw, num_inference_steps=3, generator=_gen(9), output_type="np").images
    assert isinstance(pil[0], Image.Image) and npy.shape == (1, 8, 8, 3) and pt.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), npy, atol=1e-6)
    assert not np.allclose(npy, other)
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return {"latents": tensors["latents"] * 0} if i == 2 else {}

    zero = fp(**kw, num_inference_steps=3, generator=_gen(), output_type="latent", callback_on_step_end=callback)
    assert [s[0] for s in seen] == [0, 1, 2] and torch.equal(zero.images, torch.zeros(1, 4, 8, 8))


def test_bad_input(sd):
    with pytest.raises(ValueError, match=r"guidance 'cfg\+\+' needs a fewstep scheduler .* got PNDMScheduler"):
        FewstepPipeline.from_pipe(sd, guidance="cfg++")
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    with pytest.raises(ValueError, match=r"`guidance_scale` must be a finite number in \[0, 1\] for CFG\+\+.*got 3"):
        fp("x", guidance="cfg++", guidance_scale=3)
    with pytest.raises(ValueError, match=r"`output_type` must be one of \['pil', 'np', 'pt', 'latent'\]"):
        fp("x", output_type="jpg")
    with pytest.raises(ValueError, match=r"`callback_on_step_end_tensor_inputs` \['noise_pred'\] not supported"):
        fp("x", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"])
    with pytest.raises(ValueError, match="supports SD 1.x/2.x and SDXL"):
        FewstepPipeline.from_pipe(object())


@pytest.mark.parametrize("kw,message", [
    # found by probing: ignored, a bare conversion error, a character-by-character list, an AttributeError, a
    # TypeError after step 0, a torch "negative dimension" error, and wrong-shape latents accepted silently
    ({"embedded_guidance_scale": 50.0}, r"`embedded_guidance_scale` feeds the guidance embedding of Flux .* is sd"),
    ({"callback_on_step_end_tensor_inputs": "latents", "callback_on_step_end": lambda *a: {}},
     r"`callback_on_step_end_tensor_inputs` must be a list of names, e.g. \['latents'\], got 'latents'"),
    ({"callback_on_step_end_tensor_inputs": None, "callback_on_step_end": lambda *a: {}},  # was "not iterable"
     r"`callback_on_step_end_tensor_inputs` must be a list of names, e.g. \['latents'\], got None"),
    ({"generator": "x"}, r"`generator` must be a torch.Generator or a list of them .* got str 'x'"),
    ({"generator": [torch.Generator(), 3]}, r"`generator` must be a torch.Generator .* got int 3"),
    ({"callback_on_step_end": 3}, r"`callback_on_step_end` must be callable .* got int"),
    ({"height": -8}, r"`height` must be an integer >= 1, got -8"),
    ({"width": 8.5}, r"`width` must be an integer >= 1, got 8.5"),
    ({"latents": torch.zeros(1, 4, 4, 4)},
     r"`latents` must be a floating tensor of shape \(1, 4, 8, 8\) .* got a torch.float32 tensor of shape "
     r"\(1, 4, 4, 4\)"),
])
def test_call_arguments_are_checked_by_name(sd, kw, message):
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=3.0)
    calls = []
    hook = fp.pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            fp("x", num_inference_steps=2, output_type="latent", **kw)
    finally:
        hook.remove()
    assert not calls  # refused before any model call


def test_guidance_rescale_zero_is_neutral_for_every_rule(sd):
    """diffusers' default ``guidance_rescale=0.0`` was an error with a rule other than CFG."""
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="apg", guidance_scale=3.0)
    run = lambda **kw: fp("x", num_inference_steps=2, generator=_gen(), output_type="latent", **kw).images  # noqa: E731
    assert torch.equal(run(guidance_rescale=0.0), run())
    with pytest.raises(ValueError, match="`guidance_rescale` is a setting of the cfg rule"):
        run(guidance_rescale=0.5)


def test_pipelines_with_extra_model_inputs_are_refused(sd):
    """A ControlNet pipeline or an inpainting UNet would run wrong (the ControlNet ignored) or fail inside the model
    in a text-to-image loop: refused with what to do instead."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionInpaintPipeline

    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 16))
    cn_pipe = StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)
    with pytest.raises(ValueError, match="StableDiffusionControlNetPipeline has a ControlNet, whose residuals"):
        FewstepPipeline.from_pipe(cn_pipe, scheduler="unipc")
    nine = UNet2DConditionModel.from_config({**sd.unet.config, "in_channels": 9})  # SD inpainting's UNet
    inpaint = StableDiffusionInpaintPipeline(**{**sd.components, "unet": nine})
    with pytest.raises(ValueError, match=r"UNet2DConditionModel takes 9 input channels for 4 output channels"):
        FewstepPipeline.from_pipe(inpaint, scheduler="unipc")
    # the same components as an img2img pipeline are text-to-image components: hosted
    assert FewstepPipeline.from_pipe(StableDiffusionInpaintPipeline(**sd.components), scheduler="unipc").family == "sd"


def test_scale_override_keeps_the_rule_kind(sd):
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg++", guidance_scale=0.2)
    run = lambda **kw: fp("x", num_inference_steps=3, generator=_gen(), output_type="latent", **kw).images  # noqa: E731
    assert torch.equal(run(guidance_scale=0.9), run(guidance="cfg++", guidance_scale=0.9))
    assert not torch.equal(run(), run(guidance_scale=0.9))


def test_cli_generate_text_to_image_with_guidance(sd_path, tmp_path, capsys):
    out = tmp_path / "sd.png"
    args = ["generate", "--model", str(sd_path), "--prompt", "a digit", "--steps", "3", "--num-images", "2",
            "--sampler", "dpm-solver++", "--quiet", "--out", str(out)]  # fmt: skip
    assert main([*args, "--guidance", "apg", "--guidance-scale", "4"]) == 0 and out.is_file()
    assert "x2 (apg)" in capsys.readouterr().out


def test_diffusers_scheduler_runs_raw_cfg_like_diffusers(sd):
    """With the base pipeline's own (PNDM) scheduler, CFG + guidance_rescale runs on the raw output as diffusers."""
    fp = FewstepPipeline.from_pipe(sd, guidance=guidance.CFG(5.0, guidance_rescale=0.7))
    ours = fp("a digit", num_inference_steps=4, generator=_gen(), output_type="np").images
    theirs = sd("a digit", num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.7, generator=_gen(),
                output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    plain = sd("a digit", num_inference_steps=4, guidance_scale=5.0, generator=_gen(), output_type="np").images
    assert not np.allclose(plain, theirs, atol=1e-4)
    # diffusers' per-call argument does the same on a plain cfg pipeline; other rules refuse it
    per_call = FewstepPipeline.from_pipe(sd, guidance_scale=5.0)
    again = per_call("a digit", num_inference_steps=4, guidance_rescale=0.7, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(again, theirs, atol=1e-6)
    with pytest.raises(ValueError, match="`guidance_rescale` is a setting of the cfg rule .* rule is 'apg'"):
        per_call("a digit", num_inference_steps=1, guidance="apg", guidance_scale=3.0, guidance_rescale=0.5)


def _unet_batches(module) -> list:
    seen: list = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


def test_cfg_at_scale_at_most_one_runs_the_conditional_model_alone_as_diffusers(sd):
    """diffusers' text-to-image pipelines turn CFG off at guidance_scale <= 1 (turbo models use 0): one branch,
    the prompt kept. (The class-conditional digits pipelines keep w literally: tests/test_guided_pipeline.py.)"""
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc")
    stock = type(sd)(**{**sd.components, "scheduler": samplers.get("unipc").from_config(sd.scheduler.config)})
    stock.set_progress_bar_config(disable=True)
    for w in (0.0, 0.5):
        seen = _unet_batches(sd.unet)
        ours = fp("a seven", guidance_scale=w, num_inference_steps=3, generator=_gen(), output_type="np").images
        assert seen == [1, 1, 1]
        theirs = stock("a seven", guidance_scale=w, num_inference_steps=3, generator=_gen(), output_type="np").images
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
        sd.unet._forward_pre_hooks.clear()


def test_per_call_scale_keeps_the_rules_other_settings_and_defaults_follow_diffusers(sd, sdxl):
    rescaled = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance=guidance.CFG(5.0, guidance_rescale=0.7))
    run = lambda p, **kw: p("x", num_inference_steps=3, generator=_gen(), output_type="latent", **kw).images  # noqa: E731
    assert torch.equal(run(rescaled), run(rescaled, guidance_scale=5.0))  # the rescale is kept
    apg = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance=guidance.APG(4.0, eta=1.0, norm_threshold=None,
                                                                                momentum=0.0))  # fmt: skip
    assert torch.equal(run(apg), run(apg, guidance_scale=4.0))
    wide = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance=guidance.CFGPlusPlus(0.5, allow_extrapolation=True))
    run(wide, guidance_scale=1.5)  # still allowed to extrapolate
    assert FewstepPipeline.from_pipe(sdxl, scheduler="ddim").guidance.guidance_scale == 5.0  # diffusers' SDXL default
    assert FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg").guidance.guidance_scale == 7.5
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance_scale=7.5)
    assert torch.equal(run(fp), run(fp, guidance="cfg"))  # "cfg" without a scale: the family default, not 3


def test_base_pipeline_input_checks_run(sd):
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    with pytest.raises(ValueError, match="`height` and `width` have to be divisible by 8 but are 12 and 16"):
        fp("x", height=12, width=16, num_inference_steps=2)
    with pytest.raises(ValueError, match="Cannot forward both `negative_prompt`"):
        fp("x", negative_prompt="y", negative_prompt_embeds=torch.zeros(1, 77, 16), num_inference_steps=2)


def test_callbacks_see_the_pipeline_state_and_can_interrupt(sd):
    """diffusers callbacks read pipe.num_timesteps / guidance_scale / do_classifier_free_guidance and may set
    pipe._interrupt; PipelineCallback objects bring their own tensor inputs; a callback that changes a tensor's
    shape (diffusers' CFG cutoff) is a clear error."""
    from diffusers.callbacks import SDCFGCutoffCallback

    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance_scale=5.0)
    seen = {}

    def spy(pipe, i, t, tensors):
        seen.update(n=pipe.num_timesteps, w=pipe.guidance_scale, cfg=pipe.do_classifier_free_guidance)
        if i == 1:
            pipe._interrupt = True
        return {}

    calls = _unet_batches(sd.unet)
    fp("x", num_inference_steps=4, generator=_gen(), output_type="latent", callback_on_step_end=spy)
    sd.unet._forward_pre_hooks.clear()
    assert seen == {"n": 4, "w": 5.0, "cfg": True} and len(calls) == 2  # steps 2 and 3 skipped
    again = fp("x", num_inference_steps=4, generator=_gen(), output_type="latent").images  # interrupt is per call
    assert torch.isfinite(again).all()
    with pytest.raises(ValueError, match=r"returned `prompt_embeds` of shape \(1, 77, 16\) at step 2; the loop"):
        fp("x", num_inference_steps=4, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))


def test_sd_outputs_carry_the_safety_flags_as_diffusers(sd):
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    out = fp("x", num_inference_steps=np.int64(2), num_images_per_prompt=np.int64(1), output_type="np")
    assert out.nsfw_content_detected is None and out.images.shape == (1, 8, 8, 3)
    images, nsfw = fp("x", num_inference_steps=2, output_type="np", return_dict=False)
    assert nsfw is None and images.shape == (1, 8, 8, 3)


def test_sdxl_decodes_a_float16_vae_in_float32_as_diffusers(sdxl):
    """SDXL's VAE overflows in float16; with ``force_upcast`` the decode runs in float32 and the shared VAE goes back
    to float16 afterwards (StableDiffusionXLPipeline's behaviour)."""
    vae = AutoencoderKL.from_config({**sdxl.vae.config, "force_upcast": True}).to(torch.float16)
    pipe = StableDiffusionXLPipeline(**{**sdxl.components, "vae": vae})
    fp = FewstepPipeline.from_pipe(pipe, scheduler="ddim")
    dtypes = []
    vae.decoder.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    image = fp(**_sdxl_embeds(), num_inference_steps=2, generator=_gen(), output_type="np").images
    assert dtypes == [torch.float32] and vae.dtype == torch.float16 and np.isfinite(image).all()


def test_execution_device_is_cached_until_a_component_moves_or_gains_an_offload_hook(sd, monkeypatch):
    """FewstepPipeline asks diffusers for the execution device (a walk over every submodule) only when a
    component is replaced, moved or hooked; the answer always equals diffusers' own."""
    from types import SimpleNamespace

    from fewstep.pipelines.execution_device import module_key

    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    base = fp.pipe
    calls = []
    cls = type(base)
    original = cls._execution_device
    monkeypatch.setattr(cls, "_execution_device", property(lambda p: calls.append(1) or original.fget(p)))
    assert fp._exec_device() == torch.device("cpu") and fp._exec_device() == torch.device("cpu")
    assert len(calls) == 1
    fp(prompt_embeds=torch.randn(1, 77, 16), negative_prompt_embeds=torch.randn(1, 77, 16), num_inference_steps=2,
       output_type="latent")  # fmt: skip
    assert len(calls) == 1  # the call reused it

    # accelerate-style offload hooks on every component: diffusers then answers their execution device
    hooked = [m for m in (base.vae, base.text_encoder, base.unet)]
    keys = [module_key(m) for m in hooked]
    try:
        for m in hooked:
            m._hf_hook = SimpleNamespace(execution_device=torch.device("meta"))
        assert [module_key(m) for m in hooked] != keys
        assert fp._exec_device() == base._execution_device == torch.device("meta")
        assert len(calls) == 3
    finally:
        for m in hooked:
            del m._hf_hook
    assert fp._exec_device() == torch.device("cpu") and len(calls) == 4

    # a replaced component (same device) is a new key too
    fp.pipe.vae = _vae()
    assert fp._exec_device() == torch.device("cpu") and len(calls) == 5
    fp.pipe.vae = sd.vae


class _GainProcessor:
    """An attention processor with an extra argument (what ``cross_attention_kwargs`` feeds), scaling the output."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.base = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * gain


def test_clip_skip_and_cross_attention_kwargs_match_the_base_pipeline(sd, monkeypatch):
    """diffusers' per-call model arguments reach the UNet's attention processors (the same images as
    StableDiffusionPipeline with the same scheduler, not those of the defaults) and the prompt encoder (clip_skip,
    the LoRA scale: forwarded to the base pipeline's encode_prompt; diffusers' SD clip_skip and its LoRA scale
    without peft need a CLIPTextModel with `text_model`, which transformers 5 dropped, so they fail in diffusers'
    own pipeline here too)."""
    sd.unet.set_attn_processor(_GainProcessor())
    try:
        fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=4.0)
        base = StableDiffusionPipeline.from_pipe(sd, scheduler=samplers.get("ddim").from_config(sd.scheduler.config))
        base.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=3, output_type="np")
        extra = dict(cross_attention_kwargs={"gain": 0.5})
        ours = fp("a digit seven", generator=_gen(), **kw, **extra).images
        theirs = base("a digit seven", guidance_scale=4.0, generator=_gen(), **kw, **extra).images
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
        plain = fp("a digit seven", generator=_gen(), **kw).images
        assert np.abs(plain - ours).max() > 1e-4
        seen = []
        encode = type(fp.pipe).encode_prompt
        monkeypatch.setattr(type(fp.pipe), "encode_prompt", lambda self, *a, **k: seen.append(k) or encode(
            self, *a, **{**k, "clip_skip": None, "lora_scale": None}))
        fp("a digit seven", generator=_gen(), clip_skip=1, cross_attention_kwargs={"scale": 0.7}, **kw)
        assert seen[-1]["clip_skip"] == 1 and seen[-1]["lora_scale"] == 0.7
        # graph mode's cache key follows the attention kwargs (a LoRA scale is baked into a captured step)
        fp._loop_mode = "static"
        fp("a digit seven", generator=_gen(), **kw, **extra)
        key = fp._graph_cache[0]
        fp("a digit seven", generator=_gen(), **kw, cross_attention_kwargs={"gain": 0.7})
        assert fp._graph_cache[0] != key
    finally:
        from diffusers.models.attention_processor import AttnProcessor2_0

        sd.unet.set_attn_processor(AttnProcessor2_0())


def test_model_kwargs_of_another_family_are_refused(sd):
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    emb = {"prompt_embeds": torch.randn(1, 77, 16), "num_inference_steps": 1, "output_type": "latent"}
    with pytest.raises(ValueError, match="`joint_attention_kwargs` is for transformer pipelines; sd takes "
                                         "`cross_attention_kwargs`"):
        fp(**emb, joint_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match="`cross_attention_kwargs` must be a dict"):
        fp(**emb, cross_attention_kwargs=[("scale", 0.5)])
    with pytest.raises(ValueError, match=r"`clip_skip` must be an integer >= 0, got -1"):
        fp(**emb, clip_skip=-1)


def test_sdxl_unet_calibrates_from_a_pipeline_run_and_quantizes(sdxl):
    """Found by probing: SDXL's UNet could not be quantized (the calibration set had no place for its
    `added_cond_kwargs`; diffusers failed inside get_aug_embed). A recorded run keeps text_embeds / time_ids
    for both CFG branches, and the quantized UNet drops into FewstepPipeline."""
    from fewstep import quant

    fp = FewstepPipeline.from_pipe(sdxl, scheduler="ddim", guidance="cfg", guidance_scale=3.0)
    steps = 3
    records = quant.record_denoiser_inputs(
        sdxl.unet, lambda: fp(**_sdxl_embeds(1), num_inference_steps=steps, output_type="latent"), steps,
        want=lambda d: torch.tensor([0]))
    cal = quant.calibration_from_records(records, {"method": "test"})
    assert len(cal) == 2 * steps and set(cal.added_cond_kwargs) == {"text_embeds", "time_ids"}
    assert cal.added_cond_kwargs["time_ids"].shape == (2 * steps, 6)
    q = quant.quantize(sdxl.unet, cal, quant.QuantConfig(act_grid=10, weight_grid=5))
    assert quant.quant_layers(q)
    batch = next(cal.batches(2))
    with torch.no_grad():
        ref, got = sdxl.unet(**batch).sample, q(**batch).sample
    assert float((got - ref).norm() / ref.norm()) < 0.2
    out = FewstepPipeline.from_pipe(sdxl, scheduler="ddim", guidance="cfg", guidance_scale=3.0, quantized=q)(
        **_sdxl_embeds(1), num_inference_steps=2, output_type="latent").images
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"`added_cond_kwargs\['time_ids'\]` has 1 rows, `sample` has 2"):
        quant.CalibrationSet(batch["sample"], batch["timestep"], added_cond_kwargs={"time_ids": torch.zeros(1, 6)})
    with pytest.raises(ValueError, match=r"CalibrationSet `timestep` must be a tensor with one row per network input "
                                         r"\(2\), got a 0-d tensor"):
        quant.CalibrationSet(batch["sample"], torch.tensor(500.0))


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_guidance_rescale_on_a_v_prediction_model_matches_diffusers(sd, sampler, mode):
    """Found by probing: with a fewstep scheduler the cfg rule rescaled eps, while diffusers rescales the raw output:
    on SD 2.x v-prediction models (the case guidance_rescale was made for) the rescale was 4-9x weaker. It now
    rescales the raw output of the model's type, in the eager loop and in the static (CUDA-graph) step alike."""
    from _helpers import SD21_DDIM_V

    def stock_with(rescale):
        base = StableDiffusionPipeline(**{**sd.components, "scheduler": samplers.get(sampler).from_config(SD21_DDIM_V)})
        base.set_progress_bar_config(disable=True)
        return base("a digit", num_inference_steps=5, guidance_scale=7.5, guidance_rescale=rescale, generator=_gen(),
                    output_type="latent").images

    fp = FewstepPipeline.from_pipe(sd, scheduler=samplers.get(sampler).from_config(SD21_DDIM_V),
                                   guidance=guidance.CFG(7.5, guidance_rescale=0.7))
    if mode == "static":
        fp._loop_mode = "static"
    ours = fp("a digit", num_inference_steps=5, generator=_gen(), output_type="latent").images
    theirs, plain = stock_with(0.7), stock_with(0.0)
    assert (theirs - plain).abs().max() > 1e-2  # the rescale moves the result
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_rescale_pair_keeps_x_t_and_rescales_the_raw_output():
    from fewstep.guidance.rules import rescale_coefficients, rescale_pair, rescale_to_std

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for kind in ("epsilon", "sample", "v_prediction", "flow"):
        a, s = (0.6, 0.8) if kind != "flow" else (0.3, 0.7)
        guided, cond = [(x0, (x_t - a * x0) / s) for x0 in (torch.randn(2, 3, 4, 4, generator=g, dtype=x_t.dtype)
                                                              for _ in range(2))]
        coefficients = rescale_coefficients(a, s, kind)
        x0, eps = rescale_pair(guided, cond, 0.7, coefficients)
        c_x0, c_eps = coefficients[:2]
        torch.testing.assert_close(a * x0 + s * eps, x_t)
        expected = rescale_to_std(c_x0 * guided[0] + c_eps * guided[1], c_x0 * cond[0] + c_eps * cond[1], 0.7)
        torch.testing.assert_close(c_x0 * x0 + c_eps * eps, expected)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++", "unipc"])
def test_v_prediction_rescale_is_bit_identical_in_the_static_step(sd, sampler):
    """Found by review: the static step computed the raw-output rescale's coefficients in float32 from the table's
    alpha/sigma while the eager rule used host float64 (2e-6 apart); they are now host columns of the step table."""
    from _helpers import SD21_DDIM_V

    fp = FewstepPipeline.from_pipe(sd, scheduler=samplers.get(sampler).from_config(SD21_DDIM_V),
                                   guidance=guidance.CFG(5.0, guidance_rescale=0.7))
    eager = fp("a digit", num_inference_steps=4, generator=_gen(), output_type="latent").images
    fp._loop_mode = "static"
    static = fp("a digit", num_inference_steps=4, generator=_gen(), output_type="latent").images
    assert torch.equal(eager, static)


def test_guidance_distilled_unets_are_refused(sd):
    """Found by probing: an LCM UNet (time_cond_proj_dim) was hosted with two CFG branches and no `timestep_cond`:
    sampled wrongly (max difference 8 to the LCM pipeline)."""
    lcm = StableDiffusionPipeline(**{**sd.components, "unet": _unet(time_cond_proj_dim=8)})
    with pytest.raises(ValueError, match="does not host guidance-distilled UNets .*time_cond_proj_dim=8"):
        FewstepPipeline.from_pipe(lcm)


def test_sd_ignores_the_vae_latent_statistics_as_stable_diffusion_does(sd):
    """StableDiffusionPipeline decodes with the scaling factor only; SDXL's pipeline also applies a VAE's
    latents_mean/std. The SD family applied them too (0.22 off the stock images)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config({**sd.vae.config, "latents_mean": [0.5, -0.5, 0.2, 0.1],
                                     "latents_std": [2.0, 0.5, 1.0, 1.5]})
    vae.load_state_dict(sd.vae.state_dict())
    base = StableDiffusionPipeline(**{**sd.components, "vae": vae, "scheduler": samplers.get("ddim")()})
    base.set_progress_bar_config(disable=True)
    fp = FewstepPipeline.from_pipe(base, guidance_scale=4.0)
    ours = fp("a digit", num_inference_steps=3, generator=_gen(), output_type="np").images
    theirs = base("a digit", num_inference_steps=3, guidance_scale=4.0, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("prompt", [123, [], ["a digit", 3]])
def test_bad_prompts_are_named(sd, prompt):
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    with pytest.raises(ValueError, match="`prompt` must be a string or a non-empty list of strings"):
        fp(prompt, num_inference_steps=1)


def test_sdxl_callbacks_read_denoising_end(sdxl):
    fp = FewstepPipeline.from_pipe(sdxl, scheduler="ddim")
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(pipe.denoising_end)
        return {}

    fp(**_sdxl_embeds(), num_inference_steps=2, output_type="latent", callback_on_step_end=callback)
    assert seen == [None, None]


def test_image_to_image_and_inpainting_siblings_are_hosted_as_text_to_image(sd, sdxl):
    """Found by a probe: ``from_pipe`` accepted img2img/inpainting pipelines, whose own ``check_inputs`` and
    ``prepare_latents`` (an image, a ``strength``) then failed every call with a TypeError. They are hosted as their
    text-to-image sibling over the same modules; an SDXL refiner (aesthetic-score UNet) is refused."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    run = dict(num_inference_steps=3, output_type="np")
    expected = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="apg", guidance_scale=4.0)(
        "a cat", generator=_gen(), **run).images
    for cls in (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline):
        sibling = cls(**sd.components, requires_safety_checker=False)
        fp = FewstepPipeline.from_pipe(sibling, scheduler="unipc", guidance="apg", guidance_scale=4.0)
        assert type(fp.pipe) is StableDiffusionPipeline and fp.pipe.unet is sd.unet and fp.pipe.vae is sd.vae
        np.testing.assert_array_equal(fp("a cat", generator=_gen(), **run).images, expected)
        assert type(sibling) is cls  # the caller's pipeline is left as it was
    modules = {k: sdxl.components[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                               "unet", "scheduler")}  # fmt: skip
    expected = FewstepPipeline.from_pipe(sdxl, scheduler="dpm-solver++")(**_sdxl_embeds(), generator=_gen(),
                                                                          **run).images  # fmt: skip
    sibling = StableDiffusionXLImg2ImgPipeline(**modules, add_watermarker=False)
    fp = FewstepPipeline.from_pipe(sibling, scheduler="dpm-solver++")
    assert type(fp.pipe) is StableDiffusionXLPipeline
    np.testing.assert_array_equal(fp(**_sdxl_embeds(), generator=_gen(), **run).images, expected)
    refiner = StableDiffusionXLImg2ImgPipeline(**modules, add_watermarker=False, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match=r"StableDiffusionXLImg2ImgPipeline has requires_aesthetics_score=True \(an "
                                         r"SDXL refiner"):
        FewstepPipeline.from_pipe(refiner, scheduler="dpm-solver++")


def test_hosted_sdxl_img2img_keeps_its_watermark_choice(sdxl, monkeypatch):
    """Review: ``add_watermarker`` is an SDXL ``__init__`` argument diffusers does not register, so the text-to-image
    sibling fell back to "watermark when invisible-watermark is installed" (simulated here)."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl as sdxl_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module
    from diffusers import StableDiffusionXLImg2ImgPipeline

    class Marker:
        def apply_watermark(self, images):
            return images

    for module in (sdxl_module, img2img_module):
        monkeypatch.setattr(module, "is_invisible_watermark_available", lambda: True)
        monkeypatch.setattr(module, "StableDiffusionXLWatermarker", Marker, raising=False)
    modules = {k: sdxl.components[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                               "unet", "scheduler")}  # fmt: skip
    for add in (False, True):
        sibling = StableDiffusionXLImg2ImgPipeline(**modules, add_watermarker=add)
        assert (sibling.watermark is not None) is add
        hosted = FewstepPipeline.from_pipe(sibling, scheduler="ddim")
        assert type(hosted.pipe) is StableDiffusionXLPipeline and (hosted.pipe.watermark is not None) is add


def test_config_fixes_of_a_new_scheduler_survive_from_config(sd):
    """Found by a probe: the ``steps_offset = 1`` given to a new scheduler was written past ``register_to_config``,
    so the key stayed in ``_use_default_values`` and ``from_config(fp.scheduler.config)`` dropped it again."""
    ddim = samplers.get("ddim")()
    fp = FewstepPipeline.from_pipe(sd, scheduler=ddim)
    assert fp.scheduler.config.steps_offset == 1
    again = samplers.get("ddim").from_config(fp.scheduler.config)
    assert again.config.steps_offset == 1
    again.set_timesteps(5)
    fp.scheduler.set_timesteps(5)
    assert torch.equal(again.timesteps, fp.scheduler.timesteps)
