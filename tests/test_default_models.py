"""The embedded default models ship inside the package, load offline and are good enough to use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fewstep
from fewstep.bench.digits_eval import evaluate_digits
from fewstep.datasets import load_digits_images
from fewstep.pipelines import DEFAULT_MODELS, ClassConditionalPipeline, default_model_path


@pytest.mark.parametrize("name", list(DEFAULT_MODELS))
def test_shipped_as_safetensors_and_small(name):
    path = default_model_path(name)
    weights = list(path.rglob("*.safetensors"))
    assert weights, f"{name} ships no safetensors"
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    assert sum(p.stat().st_size for p in path.rglob("*")) < 10 * 2**20


def test_unknown_default_model_lists_available():
    with pytest.raises(ValueError, match=r"unknown default model 'digits-ve'; available: digits-eps, digits-flow"):
        fewstep.load_default("digits-ve")



def test_classifier_refuses_a_sampler():
    with pytest.raises(ValueError, match=r"`sampler` does not apply to 'digits-classifier' .* got 'ddim'"):
        fewstep.load_default("digits-classifier", sampler="ddim")
    assert fewstep.load_default("digits-classifier", sampler=None).config.feature_dim > 0


def test_classifier_accuracy_on_held_out_digits():
    classifier = fewstep.load_default("digits-classifier")
    images, labels = load_digits_images(16, "test")
    with torch.no_grad():
        accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.97
    assert classifier.features(images[:4]).shape == (4, classifier.config.feature_dim)


@pytest.mark.parametrize("name", ["digits-eps", "digits-flow"])
def test_load_and_four_step_generation_is_deterministic(name):
    pipe = fewstep.load_default(name, sampler="dpm-solver++")
    assert isinstance(pipe, ClassConditionalPipeline)
    assert pipe.scheduler.is_flow == (name == "digits-flow")
    run = lambda: pipe([0, 5, 9], num_inference_steps=4, generator=torch.Generator().manual_seed(3)).images  # noqa: E731
    a, b = run(), run()
    assert a.shape == (3, 16, 16, 1) and np.array_equal(a, b)
    # the generic diffusers entry point resolves fewstep's pipeline class
    from diffusers import DiffusionPipeline

    again = DiffusionPipeline.from_pretrained(default_model_path(name))
    assert isinstance(again, ClassConditionalPipeline) and again.unet.config.num_class_embeds == 11


@pytest.mark.parametrize("name", ["digits-eps", "digits-flow"])
def test_guided_samples_are_recognized_as_their_class(name):
    """Guidance alignment at 20 NFE, CFG 3: the classifier recognizes >= 90% of the samples."""
    pipe = fewstep.load_default(name, sampler="unipc")
    classifier = fewstep.load_default("digits-classifier")
    quality = evaluate_digits(pipe, classifier, num_per_class=10, steps=20, guidance_scale=3.0, progress=False)
    assert quality.accuracy >= 0.90, quality
    assert quality.fd < 20 * quality.fd_floor + 5.0, quality


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [0, 1]."""
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean()))


def test_mean_reverting_model_restores_the_erased_box():
    """digits-mr at 10 NFE (DPM-Solver++ on z = (x - mu)/lam) beats the degraded input by a clear PSNR margin."""
    from fewstep.pipelines import box_inpainting

    pipe = fewstep.load_default("digits-mr", sampler="dpm-solver++")
    images, _ = load_digits_images(16, "test")
    clean = images[:64]
    mu = box_inpainting(clean, generator=torch.Generator().manual_seed(0))
    restored = pipe(mu, num_inference_steps=10, generator=torch.Generator().manual_seed(1), output_type="pt").images
    truth, degraded = (clean + 1) / 2, (mu + 1) / 2
    assert _psnr(restored, truth) > _psnr(degraded, truth) + 3.0


def test_readme_generate_command_on_the_embedded_default(tmp_path, capsys):
    """`fewstep generate --out samples.png` (the README's first command) with the shipped digits-eps."""
    from PIL import Image

    from fewstep.cli import main

    out = tmp_path / "samples.png"
    assert main(["generate", "--sampler", "dpm-solver-v3", "--steps", "8", "--num-images", "10", "--quiet",
                 "--out", str(out)]) == 0
    assert "NFE 8" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.mode == "L" and grid.size[0] > 10 * 16 * 4


def test_held_out_digits_checks_its_offset():
    from fewstep.datasets import held_out_digits

    for offset in (-5, 400):
        with pytest.raises(ValueError, match=rf"`offset` must be an integer in \[0, 358\] .* got {offset}"):
            held_out_digits(3, offset=offset)
    assert held_out_digits(3, offset=356)[0].shape[0] == 3
