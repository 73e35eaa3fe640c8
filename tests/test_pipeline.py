"""The class-conditional pipeline and `fewstep generate`, on tiny random UNets saved and loaded back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from PIL import Image

from fewstep import samplers
from fewstep.cli import main
from fewstep.pipelines import ClassConditionalPipeline
from fewstep.pipelines.generate import image_grid


def _tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=11,
    )


@pytest.fixture(scope="module", params=["eps", "flow"])
def saved_pipeline(request, tmp_path_factory):
    """A tiny pipeline written with save_pretrained (safetensors) and read back with from_pretrained."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    if request.param == "eps":
        scheduler = DDPMScheduler(beta_schedule="linear", clip_sample=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ClassConditionalPipeline(unet=_tiny_unet(), scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    return path


def _load(path, sampler="unipc"):
    pipe = ClassConditionalPipeline.from_pretrained(path)
    pipe.scheduler = samplers.get(sampler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", samplers.names("diffusion", standalone=True))
def test_generation_is_deterministic_and_in_range(saved_pipeline, sampler):
    pipe = _load(saved_pipeline, sampler)
    a = pipe([3, 7], num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)).images
    b = pipe([3, 7], num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)).images
    c = pipe([3, 7], num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(6)).images
    assert a.shape == (2, 8, 8, 1) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_output_types_and_guidance_branches(saved_pipeline):
    pipe = _load(saved_pipeline)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pt = pipe([1], num_inference_steps=3, generator=g(), output_type="pt").images
    pil = pipe([1], num_inference_steps=3, generator=g(), output_type="pil").images
    npy = pipe([1], num_inference_steps=3, generator=g(), output_type="np").images
    assert pt.shape == (1, 1, 8, 8) and isinstance(pil[0], Image.Image)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), npy, atol=1e-6)
    cond_only = pipe([1], num_inference_steps=3, guidance_scale=1.0, generator=g()).images
    assert not np.allclose(cond_only, npy)
    as_array = pipe(np.array([1]), num_inference_steps=3, generator=g(), output_type="np").images
    np.testing.assert_array_equal(as_array, npy)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"class_labels": [10]}, r"class label 10 is out of range: this model has classes 0..9"),
        ({"class_labels": [-1]}, r"class label -1 is out of range"),
        ({"class_labels": [3.0]}, r"class labels must be ints, got 3.0 \(float\)"),
        ({"class_labels": []}, r"`class_labels` must be a non-empty list"),
        ({"class_labels": [1], "num_inference_steps": 0}, r"`num_inference_steps` must be an integer >= 1"),
        ({"class_labels": [1], "guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number >= 0"),
        ({"class_labels": [1], "output_type": "jpg"}, r"`output_type` must be one of \['np', 'pil', 'pt', 'latent'\]"),
        ({"class_labels": [1], "latents": torch.zeros(2, 1, 8, 8)},
         r"`latents` must be a floating tensor of shape \(1, 1, 8, 8\) .* got a torch.float32 tensor of shape"),
        ({"class_labels": [1], "latents": np.zeros((1, 1, 8, 8))}, r"`latents` must be a floating tensor of shape"),
        ({"class_labels": [1], "latents": torch.full((1, 1, 8, 8), float("nan"))},
         r"`latents` contain NaN or Inf \(the starting noise must be finite\)"),
    ],
)
def test_pipeline_bad_input(saved_pipeline, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _load(saved_pipeline)(**kwargs)


def test_pipeline_takes_numpy_scalars_like_python_numbers(saved_pipeline):
    pipe = _load(saved_pipeline)
    a = pipe([1], num_inference_steps=np.int64(2), guidance_scale=np.float32(2.0), output_type="pt",
             generator=torch.Generator().manual_seed(0)).images
    b = pipe([1], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
             generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)


def test_nan_is_reported_with_its_step(saved_pipeline):
    pipe = _load(saved_pipeline, "ddim")
    original = pipe.unet.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        if calls["n"] == 3:
            out.sample[0, 0, 0, 0] = float("nan")
        return out

    pipe.unet.forward = poisoned
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 2 of 5"):
        pipe([4], num_inference_steps=5)
    calls["n"] = 0
    images = pipe([4], num_inference_steps=5, check_finite=False).images
    assert images.shape == (1, 8, 8, 1)


def test_image_grid_upscales_and_tiles():
    images = np.random.default_rng(0).random((12, 8, 8, 1)).astype(np.float32)
    grid = image_grid(images, columns=5)
    assert grid.mode == "L"
    cell = 96 // 8 * 8
    assert grid.size == (5 * (cell + 2) + 2, 3 * (cell + 2) + 2)
    with pytest.raises(ValueError, match="non-empty NHWC"):
        image_grid(np.zeros((0, 8, 8, 1)))


def test_cli_generate_end_to_end_and_deterministic(saved_pipeline, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        code = main(["generate", "--model", str(saved_pipeline), "--sampler", "dpm-solver++", "--steps", "4",
                     "--num-images", "6", "--class", "3,7", "--seed", "11", "--quiet", "--out", str(out)])
        assert code == 0
    assert "NFE 4" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--class", "12"], "class label 12 is out of range"),
        (["--prompt", "a cat"], "`prompt` given to a class-conditional model"),
        (["--steps", "0"], "expected an integer >= 1"),
        (["--sampler", "euler"], "unknown sampler 'euler'"),
        (["--out", "/nonexistent-dir/x.png"], "directory '/nonexistent-dir' does not exist"),
        (["--out", "grid.jpg"], "must end in .png"),
        (["--dtype", "int8"], "invalid choice"),
    ],
)
def test_cli_generate_bad_input_exits_2_and_writes_nothing(saved_pipeline, tmp_path, monkeypatch, extra, message,
                                                           capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--model", str(saved_pipeline), "--steps", "2", "--quiet", "--out", str(tmp_path / "o.png")]
    try:
        code = main(argv + extra)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_unknown_model_lists_embedded(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "digits-eps, digits-flow" in capsys.readouterr().err
