"""fewstep schedulers inside diffusers' own StableDiffusionPipeline (tiny random components, saved with
save_pretrained and loaded with from_pretrained -- the real loading path, offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers import SD15_PNDM
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fewstep import samplers
from fewstep.cli import main


def _byte_level_vocab(path) -> None:
    """A minimal CLIP BPE vocabulary: every byte symbol, with and without the end-of-word mark, no merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]  # GPT-2 byte symbols
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    _byte_level_vocab(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD15_PNDM), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _run(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a digit seven", num_inference_steps=6, guidance_scale=5.0, height=8, width=8,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("name,diffusers_cls", [("dpm-solver++", DPMSolverMultistepScheduler),
                                                 ("unipc", UniPCMultistepScheduler)])
def test_swapped_scheduler_matches_diffusers_inside_stable_diffusion(tiny_sd, name, diffusers_cls):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    pipe.scheduler = diffusers_cls.from_config(pipe.scheduler.config)
    expected = _run(pipe)
    pipe.scheduler = samplers.get(name).from_config(pipe.scheduler.config)
    got = _run(pipe)
    assert got.shape == (1, 8, 8, 3) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_every_sampler_runs_in_stable_diffusion_and_round_trips(tiny_sd, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    outputs = {}
    for name in samplers.names("diffusion"):
        pipe.scheduler = samplers.get(name).from_config(pipe.scheduler.config)
        outputs[name] = _run(pipe)
        assert np.isfinite(outputs[name]).all()
    assert not np.allclose(outputs["ddim"], outputs["unipc"])
    # a pipeline saved with a fewstep scheduler keeps its config (class resolution is diffusers' job)
    pipe.scheduler.save_pretrained(tmp_path)
    reloaded = samplers.get("unipc").from_pretrained(tmp_path)
    assert reloaded.config.solver_order == pipe.scheduler.config.solver_order


def test_cli_generate_with_a_local_text_to_image_pipeline(tiny_sd, tmp_path, capsys):
    out = tmp_path / "sd.png"
    code = main(["generate", "--model", str(tiny_sd), "--prompt", "a digit", "--steps", "3", "--num-images", "2",
                 "--sampler", "unipc", "--quiet", "--out", str(out)])
    assert code == 0 and out.is_file()
    assert "NFE 3" in capsys.readouterr().out
    code = main(["generate", "--model", str(tiny_sd), "--class", "3", "--quiet", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "use --prompt" in capsys.readouterr().err
