"""FewstepPipeline.from_pipe around tiny random SD3- and Flux-shaped pipelines (saved and reloaded).

The sampling tests pass ``prompt_embeds``/``pooled_prompt_embeds`` (no text encoders); the CLI test builds
offline tokenizers (a byte-level CLIP vocab, a character-level T5 unigram vocab) and tiny text encoders.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _helpers import FLUX_FLOW, SD3_FLOW, SD15_PNDM
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image
from test_real_pipeline import _byte_level_vocab
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from fewstep import samplers
from fewstep.cli import main
from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.fewstep_pipeline import flow_shift_mu

RULES = {"cfg": 4.0, "cfg++": 0.7, "apg": 4.0}
#: every registered sampler that integrates a flow model (flowchef needs a cost: not wired here)
FLOW_SAMPLERS = [n for n in samplers.names("diffusion", standalone=True) + samplers.names("flow") if n != "flowchef"]
SIZE = 16  # image side; the tiny VAE does not downsample for SD3 (scale factor 1) nor for Flux


def _vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=4, sample_size=SIZE, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), shift_factor=0.1, scaling_factor=1.5,
    )  # fmt: skip


def _saved(tmp_path_factory, name: str, pipe, cls, **none_modules):
    path = tmp_path_factory.mktemp(name) / "pipe"
    pipe.save_pretrained(path)
    loaded = cls.from_pretrained(path, **none_modules)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW), vae=_vae(4),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )  # fmt: skip
    absent = {f"{m}{k}": None for m in ("text_encoder", "tokenizer") for k in ("", "_2", "_3")}
    return _saved(tmp_path_factory, "fp-sd3", pipe, StableDiffusion3Pipeline, **absent)


def _flux_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


@pytest.fixture(scope="module", params=[True, False], ids=["flux-dev", "flux-schnell"])
def flux(request, tmp_path_factory):
    torch.manual_seed(0)
    pipe = FluxPipeline(
        transformer=_flux_transformer(request.param), scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW),
        vae=_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip
    absent = {f"{m}{k}": None for m in ("text_encoder", "tokenizer") for k in ("", "_2")}
    return _saved(tmp_path_factory, "fp-flux", pipe, FluxPipeline, **absent)


def _embeds(n: int = 1, seq: int = 6) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "prompt_embeds": torch.randn(n, seq, 16, generator=g),
        "negative_prompt_embeds": torch.randn(n, seq, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(n, 8, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(n, 8, generator=g),
    }


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pos(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if "negative" not in k}


def _calls(module: torch.nn.Module) -> list:
    seen: list = []
    module.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["hidden_states"].shape[0]),
                                 with_kwargs=True)  # fmt: skip
    return seen


def test_sd3_cfg_matches_the_stock_pipeline(sd3):
    fp = FewstepPipeline.from_pipe(sd3, scheduler="flow-euler", guidance="cfg", guidance_scale=5.0)
    assert fp.pipe.transformer is sd3.transformer and fp.pipe.vae is sd3.vae  # shared, not copied
    assert isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler) and fp.is_flow
    assert fp.scheduler.prediction_type == "flow"
    kw = _embeds()
    ours = fp(**kw, height=SIZE, width=SIZE, num_inference_steps=4, generator=_gen(), output_type="np").images
    theirs = sd3(**kw, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=5.0, generator=_gen(),
                 output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert ours.shape == (1, SIZE, SIZE, 3)
    # the base pipeline's own (diffusers) scheduler: raw CFG on the velocity, as diffusers
    same = FewstepPipeline.from_pipe(sd3, guidance_scale=5.0)
    again = same(**kw, height=SIZE, width=SIZE, num_inference_steps=4, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(again, theirs, atol=1e-6)


def test_flux_matches_the_stock_pipeline(flux):
    distilled = flux.transformer.config.guidance_embeds
    kw = _embeds()
    run = dict(height=SIZE, width=SIZE, num_inference_steps=4, output_type="np")
    fp = FewstepPipeline.from_pipe(flux, scheduler="flow-euler")  # default: the guidance embedding, no uncond pass
    assert fp.guidance is None and fp.pipe.transformer is flux.transformer
    calls = _calls(flux.transformer)
    ours = fp(**_pos(kw), generator=_gen(), **run).images
    assert calls == [1] * 4
    theirs = flux(**_pos(kw), guidance_scale=3.5, generator=_gen(), **run).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    if distilled:  # only a guidance-distilled model reads it; without the embedding (schnell) it is refused
        other = fp(**_pos(kw), embedded_guidance_scale=7.0, generator=_gen(), **run).images
        assert not np.allclose(other, ours, atol=1e-6)
    else:
        with pytest.raises(ValueError, match=r"which this Flux transformer does not have \(guidance_embeds=False"):
            fp(**_pos(kw), embedded_guidance_scale=7.0, generator=_gen(), **run)
    # true CFG: a rule asked for explicitly, with a negative prompt (two transformer calls per step)
    calls.clear()
    ours = fp(**kw, guidance="cfg", guidance_scale=4.0, generator=_gen(), **run).images
    assert calls == [1] * 8
    theirs = flux(**kw, true_cfg_scale=4.0, guidance_scale=3.5, generator=_gen(), **run).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # callbacks see diffusers' `current_timestep` (it was None throughout), in both loop modes
    for mode in ("eager", "static"):
        fp._loop_mode = mode
        seen, stock = [], []

        def record(into):
            return lambda p, i, t, x: into.append(p.current_timestep) or {}

        fp(**_pos(kw), generator=_gen(), **run, callback_on_step_end=record(seen))
        flux(**_pos(kw), guidance_scale=3.5, generator=_gen(), **run, callback_on_step_end=record(stock))
        assert [float(t) for t in seen] == pytest.approx([float(t) for t in stock], abs=1e-3)
        assert len(seen) == 4 and fp.pipe.current_timestep is None
    fp._loop_mode = "eager"
    # the base pipeline's own scheduler
    keep = FewstepPipeline.from_pipe(flux, guidance_scale=3.5)
    np.testing.assert_allclose(keep(**_pos(kw), generator=_gen(), **run).images,
                               flux(**_pos(kw), generator=_gen(), **run).images, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_every_rule_and_flow_sampler_runs_3_steps(sd3, flux, sampler):
    kw = _embeds()
    for family, base in (("sd3", sd3), ("flux", flux)):
        fp = FewstepPipeline.from_pipe(base, scheduler=sampler)
        shape = (1, 4, SIZE, SIZE) if family == "sd3" else (1, (SIZE // 2) ** 2, 16)
        latents = {}
        for name, scale in RULES.items():
            out = fp(**kw, height=SIZE, width=SIZE, num_inference_steps=3, guidance=name, guidance_scale=scale,
                     generator=_gen(1), output_type="latent").images  # fmt: skip
            assert out.shape == shape and torch.isfinite(out).all(), (family, name)
            latents[name] = out
        assert (latents["cfg"] - latents["cfg++"]).abs().max() > 1e-5
        assert (latents["cfg"] - latents["apg"]).abs().max() > 0
        if family == "flux":
            out = fp(**_pos(kw), height=SIZE, width=SIZE, num_inference_steps=3, generator=_gen(1),
                     output_type="latent").images  # fmt: skip
            assert out.shape == shape and torch.isfinite(out).all()


def test_flux_dynamic_shift_mu(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = flux.scheduler.config
    for seq in (64, 256, 1024, 4096):
        assert flow_shift_mu(seq, cfg) == pytest.approx(calculate_shift(seq, 256, 4096, 0.5, 1.15), abs=1e-12)
    fp = FewstepPipeline.from_pipe(flux, scheduler="dpm-solver++")
    fp(**_pos(_embeds()), height=SIZE, width=SIZE, num_inference_steps=3, output_type="latent")
    ref = samplers.get("dpm-solver++").from_config(cfg)
    ref.set_timesteps(3, mu=flow_shift_mu((SIZE // 2) ** 2, cfg))
    torch.testing.assert_close(fp.scheduler.timesteps, ref.timesteps)
    ref.set_timesteps(3, mu=flow_shift_mu(4096, cfg))
    assert not torch.allclose(fp.scheduler.timesteps, ref.timesteps)


def test_output_types_and_callback(flux):
    fp = FewstepPipeline.from_pipe(flux, scheduler="unipc", guidance="apg", guidance_scale=3.0)
    kw = {**_embeds(), "height": SIZE, "width": SIZE, "num_inference_steps": 3}
    pil = fp(**kw, generator=_gen()).images
    npy = fp(**kw, generator=_gen(), output_type="np").images
    pt = fp(**kw, generator=_gen(), output_type="pt").images
    assert isinstance(pil[0], Image.Image) and npy.shape == (1, SIZE, SIZE, 3) and pt.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), npy, atol=1e-6)
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(i)
        return {"latents": tensors["latents"] * 0} if i == 2 else {}

    zero = fp(**kw, generator=_gen(), output_type="latent", callback_on_step_end=callback).images
    assert seen == [0, 1, 2] and torch.equal(zero, torch.zeros_like(zero))
    two = fp(**kw, num_images_per_prompt=2, generator=_gen(), output_type="latent").images
    assert two.shape == (2, (SIZE // 2) ** 2, 16) and not torch.allclose(two[0], two[1])


def test_sd3_batches_prompts_and_images(sd3):
    fp = FewstepPipeline.from_pipe(sd3, scheduler="unipc", guidance="cfg++", guidance_scale=0.5)
    latents = torch.randn(4, 4, SIZE, SIZE, generator=_gen())
    embeds = _embeds(2)
    out = fp(**embeds, height=SIZE, width=SIZE, num_inference_steps=2, num_images_per_prompt=2, latents=latents,
             output_type="latent").images  # fmt: skip
    assert out.shape == (4, 4, SIZE, SIZE) and torch.isfinite(out).all()
    # rows 2p, 2p + 1 are prompt p's images (diffusers' order): each prompt alone on its latents gives them (measured
    # equal to the bit; rows [p0, p1, p0, p1] are 0.1 off, another prompt's negative embeddings 0.004)
    for p in range(2):
        alone = fp(**{k: v[p:p + 1] for k, v in embeds.items()}, height=SIZE, width=SIZE, num_inference_steps=2,
                   num_images_per_prompt=2, latents=latents[2 * p:2 * p + 2], output_type="latent").images  # fmt: skip
        torch.testing.assert_close(out[2 * p:2 * p + 2], alone, rtol=0, atol=1e-6)


def test_incompatible_samplers_fail_clearly(sd3, flux):
    # flowchef is a flow sampler too, but not offered: it needs a cost (set_cost) before it can run
    compatible = ", ".join(samplers.names("diffusion", standalone=True) + ["flow-euler"])
    assert FewstepPipeline.family_of(sd3) == "sd3" and FewstepPipeline.family_of(flux) == "flux"
    assert FewstepPipeline.family_of(object()) is None and FewstepPipeline.supports(flux)
    for base in (sd3, flux):
        with pytest.raises(ValueError, match=r"sampler 'mrs' \(mean-reverting\) cannot sample .*use one of: "
                                             + compatible.replace("+", r"\+")):  # fmt: skip
            FewstepPipeline.from_pipe(base, scheduler="mrs")
    for scheduler in (samplers.get("ddim").from_config(SD15_PNDM), DDIMScheduler.from_config(SD15_PNDM)):
        with pytest.raises(ValueError, match="flow-matching model; scheduler .* cannot sample it"):
            FewstepPipeline.from_pipe(sd3, scheduler=scheduler)
    fp = FewstepPipeline.from_pipe(flux, scheduler="flow-euler")
    with pytest.raises(ValueError, match="true CFG on Flux needs `negative_prompt`"):
        fp(**_pos(_embeds()), height=SIZE, width=SIZE, num_inference_steps=2, guidance="cfg++", guidance_scale=0.5)


def _clip(root, projection: bool):
    """A byte-level CLIP tokenizer and a tiny CLIP text encoder (hidden 8; with a 4-d projection if asked)."""
    root.mkdir(exist_ok=True)
    _byte_level_vocab(root)
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=4,
    )  # fmt: skip
    return tokenizer, (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config))


def _t5():
    """A character-level T5 unigram tokenizer (no sentencepiece file) and a tiny T5 encoder (d_model 16)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=16, num_layers=1,
                                      num_heads=2, relative_attention_num_buckets=8))  # fmt: skip
    return tokenizer, encoder


@pytest.fixture(scope="module")
def text_pipes(tmp_path_factory):
    """Saved SD3 and Flux (guidance-distilled) pipelines with tokenizers and text encoders."""
    root = tmp_path_factory.mktemp("fp-text")
    torch.manual_seed(0)
    tok1, te1 = _clip(root / "clip1", projection=True)
    tok2, te2 = _clip(root / "clip2", projection=True)
    tok3, te3 = _t5()
    sd3 = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW),
        vae=_vae(4), text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
        tokenizer_3=tok3,
    )  # fmt: skip
    sd3.save_pretrained(root / "sd3")
    tok, te = _clip(root / "clip3", projection=False)
    # Flux pools CLIPTextModel's pooler output: hidden size 8 = pooled_projection_dim
    flux = FluxPipeline(
        transformer=_flux_transformer(True), scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW),
        vae=_vae(4), text_encoder=te, tokenizer=tok, text_encoder_2=te3, tokenizer_2=tok3,
    )  # fmt: skip
    flux.save_pretrained(root / "flux")
    return {"sd3": root / "sd3", "flux": root / "flux"}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_generate_with_prompts(text_pipes, family, tmp_path, capsys):
    out = tmp_path / f"{family}.png"
    args = ["generate", "--model", str(text_pipes[family]), "--prompt", "a digit", "--steps", "2",
            "--num-images", "2", "--sampler", "dpm-solver++", "--quiet", "--out", str(out)]  # fmt: skip
    assert main([*args, "--guidance", "apg", "--guidance-scale", "4"]) == 0 and out.is_file()
    assert "x2 (apg)" in capsys.readouterr().out
    assert main([*args, "--sampler", "flow-euler"]) == 0
    # the NFE note counts the unconditional branch only where it runs: Flux's default cfg is its guidance embedding
    assert (" x2 (cfg)" in capsys.readouterr().out) == (family == "sd3")
    assert main([*args, "--sampler", "mrs"]) == 2
    err = capsys.readouterr().err
    assert "sampler 'mrs' is for mean-reverting" in err and "compatible samplers: ddim, " in err and "flow-euler" in err


# ----------------------------------------------------------------------------------------------------
# FlowChef inside FewstepPipeline: a latent cost (Flux-style inpainting on latents) and a pixel cost through the VAE
def _steered(pipe, cost_for, steps=6, **extra):
    scheduler = samplers.from_config("flowchef", pipe.scheduler.config, flowchef_step_size=0.8,
                                     flowchef_inner_steps=2)
    fp = FewstepPipeline.from_pipe(pipe, scheduler=scheduler, guidance="cfg", guidance_scale=2.0)
    fp.scheduler.set_cost(cost_for(fp))
    calls = _calls(pipe.transformer)
    kw = {**_embeds(), "height": SIZE, "width": SIZE, "num_inference_steps": steps, "generator": _gen(),
          "output_type": "latent", **extra}
    steered = fp(**kw).images
    nfe = len(calls)
    plain = FewstepPipeline.from_pipe(pipe, scheduler="flow-euler", guidance="cfg", guidance_scale=2.0)(**kw).images
    return steered, plain, nfe


def test_flowchef_with_a_latent_cost_in_sd3_keeps_nfe_and_pulls_the_kept_region(sd3):
    target = torch.randn(1, 4, SIZE, SIZE, generator=_gen(7))
    keep = torch.zeros_like(target)
    keep[..., : SIZE // 4, :] = 1.0

    def cost_for(fp):
        return lambda x0_hat: 0.5 * (keep * (x0_hat - target)).pow(2).flatten(1).sum(1)  # GD step 0.8: stable

    steered, plain, calls = _steered(sd3, cost_for)
    assert calls == 6  # one (batched CFG) transformer call per step: NFE unchanged
    err = lambda z: (keep * (z - target)).pow(2).sum().item()  # noqa: E731
    assert err(steered) < 0.3 * err(plain), (err(steered), err(plain))


def test_flowchef_with_a_pixel_cost_through_the_vae(sd3, flux):
    from fewstep.guidance.operators import Inpainting
    from fewstep.pipelines.flowchef import decoded_cost
    from fewstep.solvers.flowchef import measurement_cost

    for pipe in (sd3, flux):
        mask = torch.zeros(1, 3, SIZE, SIZE)
        mask[..., : SIZE // 2, :] = 1.0
        y = torch.full((1, 3, SIZE, SIZE), 0.5) * mask
        op = Inpainting(mask)
        pixel = measurement_cost(op, y)

        def cost_for(fp, pixel=pixel):
            return decoded_cost(fp, pixel, SIZE, SIZE)

        steered, plain, _ = _steered(pipe, cost_for)
        fp = FewstepPipeline.from_pipe(pipe, scheduler="flow-euler", guidance="cfg", guidance_scale=2.0)
        with torch.no_grad():
            loss = [pixel(fp.decode_flow_latents(z, SIZE, SIZE)).item() for z in (steered, plain)]
        assert loss[0] < 0.7 * loss[1], loss
    with pytest.raises(ValueError, match="needs a FewstepPipeline around an SD3 or Flux pipeline"):
        decoded_cost(object(), pixel, SIZE, SIZE)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_benchmark_grid_on_flow_pipeline_directories(text_pipes, family, tmp_path):
    """`fewstep bench` on an SD3/Flux directory: per-sample seeds (batch-size independent), MSE to a reference."""
    from fewstep.bench.runner import BenchConfig, run_grid

    def grid(batch_size, out):
        config = BenchConfig(models=[str(text_pipes[family])], samplers=["flow-euler", "unipc"], steps=[2, 6],
                             guidance=[("cfg", 3.0)], num_per_class=2, prompts=["a cat", "a dog"], reference_steps=20,
                             batch_size=batch_size, image_size=SIZE)
        return run_grid(config, tmp_path / out, progress=False)

    rows = grid(4, "a")
    by = {(r["sampler"], r["steps"]): r["mse"] for r in rows}
    assert by[("flow-euler", 6)] < by[("flow-euler", 2)] and all(r["num_samples"] == 4 for r in rows)
    again = grid(3, "b")
    for r, s in zip(rows, again):
        assert s["mse"] == pytest.approx(r["mse"], rel=1e-4)


def test_joint_attention_kwargs_reach_the_transformer_and_cross_attention_kwargs_are_refused(sd3, flux):
    """SD3 and Flux take diffusers' ``joint_attention_kwargs`` (attention-processor arguments, LoRA ``scale``) on
    every transformer call, both CFG branches included; the UNet families' name is a clear error."""
    for pipe, guidance in ((sd3, "cfg"), (flux, "cfg")):
        fp = FewstepPipeline.from_pipe(pipe, scheduler="flow-euler", guidance=guidance, guidance_scale=3.0)
        seen: list = []
        handle = pipe.transformer.register_forward_hook(
            lambda m, args, kwargs, out, seen=seen: seen.append(kwargs.get("joint_attention_kwargs")),
            with_kwargs=True)
        encode, scales = fp.pipe.encode_prompt, []

        def spy(*args, encode=encode, scales=scales, **kwargs):  # the stock pipelines pass the LoRA scale too
            scales.append(kwargs.get("lora_scale"))
            return encode(*args, **kwargs)

        fp.pipe.encode_prompt = spy
        try:
            fp(**_embeds(), height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent",
               joint_attention_kwargs={"scale": 0.7})  # fmt: skip
        finally:
            handle.remove()
            del fp.pipe.encode_prompt
        assert seen and all(k == {"scale": 0.7} for k in seen), seen
        assert scales and all(v == 0.7 for v in scales), scales
        with pytest.raises(ValueError, match="`cross_attention_kwargs` is for UNet pipelines; .* takes "
                                             "`joint_attention_kwargs`"):
            fp(**_embeds(), height=SIZE, width=SIZE, num_inference_steps=1, cross_attention_kwargs={"scale": 1.0})
    fp = FewstepPipeline.from_pipe(flux, scheduler="flow-euler")
    with pytest.raises(ValueError, match="`clip_skip` applies to SD, SDXL and SD3"):
        fp(**_pos(_embeds()), height=SIZE, width=SIZE, num_inference_steps=1, clip_skip=1)


def test_user_latents_are_checked_for_sd3_and_flux(sd3, flux):
    """Found by probing: SD3 took latents of another size silently (a smaller image) and Flux failed deep inside the
    transformer; both now check shape and type as the SD path does."""
    side = 2 * (SIZE // (2 * flux.vae_scale_factor))  # Flux packs 2x2 patches of the latent image
    for pipe, bad, good_shape in (
        (sd3, torch.randn(1, 4, 3, 3), (1, sd3.transformer.config.in_channels, SIZE // sd3.vae_scale_factor,
                                        SIZE // sd3.vae_scale_factor)),
        (flux, torch.randn(1, 16, 16, 16), (1, (side // 2) ** 2, flux.transformer.config.in_channels)),
    ):
        fp = FewstepPipeline.from_pipe(pipe, scheduler="flow-euler")
        embeds = _embeds() if pipe is sd3 else _pos(_embeds())  # SD3 runs CFG: it needs the negative embeddings
        kw = {**embeds, "height": SIZE, "width": SIZE, "num_inference_steps": 2, "output_type": "latent"}
        wanted = f"`latents` must be a floating tensor of shape {good_shape}"
        for latents in (bad, torch.zeros(good_shape, dtype=torch.int64)):
            with pytest.raises(ValueError, match=re.escape(wanted)):
                fp(**kw, latents=latents)
        out = fp(**kw, latents=torch.randn(good_shape, generator=_gen())).images
        assert torch.isfinite(out).all()
        # diffusers' SD3/Flux skip their generator-list check when latents are given; the generators still drive
        # an SDE sampler's noise, so a list of another length silently dropped (or shared) generators
        for n in (2, 3):
            with pytest.raises(ValueError, match=rf"`generator` is a list of {n} generators, but the batch has 1 "):
                fp(**kw, latents=torch.randn(good_shape, generator=_gen()), generator=[_gen(i) for i in range(n)])


def test_wrapper_exposes_diffusers_call_properties(flux):
    fp = FewstepPipeline.from_pipe(flux, scheduler="flow-euler", guidance="cfg", guidance_scale=4.0)
    fp(**_embeds(), height=SIZE, width=SIZE, num_inference_steps=3, output_type="latent")
    # Flux's `guidance_scale` is its embedding's scale, also under true CFG (diffusers' FluxPipeline with
    # true_cfg_scale=4 reports 3.5; found by a probe: the wrapper reported the rule's scale)
    assert fp.num_timesteps == 3 and fp.guidance_scale == 3.5 and fp.do_classifier_free_guidance
    assert fp.interrupt is False
    if flux.transformer.config.guidance_embeds:
        fp(**_embeds(), height=SIZE, width=SIZE, num_inference_steps=3, output_type="latent",
           embedded_guidance_scale=2.0)  # fmt: skip
        assert fp.guidance_scale == 2.0


def test_pair_rules_on_a_diffusers_flow_scheduler_list_the_flow_samplers(flux):
    """Found by a probe: the message listed the VP samplers only, without flow-euler (which runs APG on Flux)."""
    with pytest.raises(ValueError, match=r"guidance 'apg' needs a fewstep scheduler .*got "
                                         r"FlowMatchEulerDiscreteScheduler; use one of: .*flow-euler"):
        FewstepPipeline.from_pipe(flux, guidance="apg")


def test_wrapper_says_guided_for_cfgpp_and_per_step_scales(sd3):
    """Found by review: the wrapper's do_classifier_free_guidance used diffusers' scale > 1 test, so CFG++ (lam
    <= 1) and per-step CFG scales (reported as 1) said False although both branches ran."""
    from fewstep import guidance as rules

    kw = {**_embeds(), "height": SIZE, "width": SIZE, "num_inference_steps": 3, "output_type": "latent"}
    for rule in (rules.CFGPlusPlus(0.6), rules.CFG([7.0, 5.0, 3.0])):
        fp = FewstepPipeline.from_pipe(sd3, scheduler="flow-euler", guidance=rule)
        fp(**kw)
        assert fp.do_classifier_free_guidance and fp.last_call_guided


def test_an_underflowing_or_overflowing_mu_is_named():
    from fewstep import samplers

    sched = samplers.get("flow-euler")(use_dynamic_shifting=True)
    for mu in (-800.0, 710.0):
        with pytest.raises(ValueError, match="`mu` \\(the log of the dynamic shift\\) must be a finite number in"):
            sched.set_timesteps(4, mu=mu)


def test_image_to_image_siblings_are_hosted_as_text_to_image(sd3, flux):
    """Found by a probe: SD3 and Flux img2img pipelines passed ``from_pipe`` and then failed every call (their
    ``check_inputs`` takes a ``strength``); they run as their text-to-image siblings."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    run = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="np")
    cases = ((sd3, StableDiffusion3Img2ImgPipeline, _embeds()), (flux, FluxImg2ImgPipeline, _pos(_embeds())))
    for base, cls, kw in cases:
        modules = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
        expected = FewstepPipeline.from_pipe(base, scheduler="flow-euler")(**kw, generator=_gen(), **run).images
        fp = FewstepPipeline.from_pipe(cls(**modules), scheduler="flow-euler")
        assert type(fp.pipe) is type(base) and fp.pipe.transformer is base.transformer
        np.testing.assert_array_equal(fp(**kw, generator=_gen(), **run).images, expected)
