"""The embedded default models ship inside the package, load offline and are good enough to use."""

from __future__ import annotations

import json

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


def test_digits_flow_samples_with_its_own_diffusers_scheduler():
    """Found by probing: the shipped digits-flow folder (FlowMatchEulerDiscreteScheduler) crashed in the class loop:
    that scheduler has no `scale_model_input` (diffusers' flow pipelines never call it)."""
    pipe = fewstep.load_default("digits-flow", sampler=None)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    ours = pipe(class_labels=[3], num_inference_steps=4, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    euler = fewstep.load_default("digits-flow", sampler="flow-euler")(
        class_labels=[3], num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(ours, euler, atol=1e-4)  # fewstep's flow-euler is diffusers' Euler


def test_mean_reverting_pipeline_checks_the_measurement():
    """Found by probing: [0, 1], uint8 or bool degraded images were restored silently (8 dB instead of 26); an empty
    batch failed inside GroupNorm."""
    pipe = fewstep.load_default("digits-mr", sampler="mrs")
    from fewstep.datasets import held_out_digits, to_unit_range

    mu = held_out_digits(2)[0]
    for bad in (mu[:0], (to_unit_range(mu) * 255).round().to(torch.uint8), mu > 0):
        with pytest.raises(ValueError, match="`measurement` must be a floating NCHW tensor of N >= 1"):
            pipe(bad, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"must hold images in \[-1, 1\].*got values in \[-1, 3"):
        pipe(mu * 2 + 1, num_inference_steps=2)
    with pytest.warns(UserWarning, match="were \\[0, 1\\] images passed"):
        pipe(to_unit_range(mu), num_inference_steps=2)


def test_bool_class_labels_are_refused():
    pipe = fewstep.load_default("digits-eps")
    for labels in (True, False):
        with pytest.raises(ValueError, match="class labels must be ints|`class_labels` must be"):
            pipe.check_class_labels(labels)


@pytest.mark.parametrize("kwargs, match", [
    ({"torch_dtype": "float16"}, "`torch_dtype` must be a floating torch.dtype"),
    ({"torch_dtype": torch.int8}, "`torch_dtype` must be a floating torch.dtype"),
    ({"device": "bogus"}, "`device` must be a torch device"),
])
@pytest.mark.parametrize("name", ["digits-eps", "digits-classifier"])
def test_load_default_checks_device_and_dtype(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fewstep.load_default(name, sampler=None, **kwargs)


def test_digits_dataset_helpers_check_their_arguments():
    from fewstep.datasets import held_out_digits, load_digits_images, to_unit_range

    for fraction in (1e-4, 0.9999):
        with pytest.raises(ValueError, match="each split needs at least one"):
            load_digits_images(16, "test", test_fraction=fraction)
    with pytest.raises(ValueError, match="`test_fraction` must be a finite number in \\(0, 1\\)"):
        load_digits_images(16, "test", test_fraction="0.2")
    for seed in (None, 1.5, "0", -1):
        with pytest.raises(ValueError, match="`seed` must be an integer"):
            load_digits_images(16, "test", seed=seed)
    with pytest.raises(ValueError, match="`size` must be"):
        held_out_digits(3, size=4)
    with pytest.raises(TypeError, match="`images` must be a torch.Tensor"):
        to_unit_range([0.0])


def test_training_script_reports_the_mean_loss_of_short_runs_and_writes_elsewhere(tmp_path):
    """Found by probing: `final_loss` divided the last 500 losses by 500 even when fewer ran (25x too small for a
    20-step run); every trial run overwrote the shipped model (now `--out-root`)."""
    from _helpers import load_script

    train = load_script("train_digits")
    assert train._recent_mean([1.0, 3.0]) == 2.0 and train._recent_mean([1.0] * 600) == 1.0
    out = train.train_diffusion("digits-eps", 2, 4, 2e-3, "cpu", 0, tmp_path)
    recipe = json.loads((out / "training.json").read_text())
    assert out == tmp_path / "digits-eps" and recipe["final_loss"] > 0.1
