"""Mutation gaps (round 10a) in the digits data set, the digits classifier and the class-conditional pipeline: each
checked against an independent reference (scikit-learn's own digits, a bilinear resize written in numpy, the
classifier's forward pass written from its docstring with torch.nn.functional on the shipped weights, diffusers'
pipeline conventions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

N_DIGITS = 1797  # scikit-learn's digits


@pytest.fixture(scope="module")
def sk_digits():
    """scikit-learn's digits: ``(images [N, 8, 8] float64 in 0..16, targets [N], {image bytes: index})``; all 1797
    scans are distinct, so an image identifies its scan."""
    from sklearn.datasets import load_digits

    data = load_digits()
    index = {img.astype(np.float64).tobytes(): k for k, img in enumerate(data.images)}
    assert len(index) == N_DIGITS
    return data.images.astype(np.float64), data.target.astype(np.int64), index


def _scan_indices(images: torch.Tensor, index: dict) -> list[int]:
    """The scikit-learn index of each 8x8 model-space image: [-1, 1] maps back to ink 0..16 exactly
    (k / 16 * 2 - 1 is exact in float32 for k = 0..16)."""
    ink = ((images[:, 0].double() + 1) / 2 * 16).numpy()
    return [index[np.round(a, 6).tobytes()] for a in ink]


def _bilinear_half_pixel(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (torch's align_corners=False, PIL/OpenCV's convention), in numpy: output
    pixel i samples the input at (i + 0.5) * in / out - 0.5, clamped to the first pixel below 0."""
    n = img.shape[0]
    src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    rows = img[i0] * (1 - w)[:, None] + img[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def test_digits_at_native_resolution_are_sklearns_scans_with_their_labels(sk_digits):
    """Resolution 8: every image is a scikit-learn scan (ink / 16 * 2 - 1: background -1, full ink +1, not
    transposed), its label that scan's target; test + train partition all 1797 scans, the test split holding
    round(test_fraction * 1797) of them (0.2 -> 359 by default, 0.1 -> 180: 179.7 rounds up)."""
    from fewstep.datasets import load_digits_images

    sk_images, sk_targets, index = sk_digits
    seen = []
    for split, size in (("test", 359), ("train", N_DIGITS - 359)):
        images, labels = load_digits_images(8, split)
        assert images.shape == (size, 1, 8, 8) and images.dtype == torch.float32 and labels.dtype == torch.int64
        idx = _scan_indices(images, index)
        # exact: the mapping of 0..16 to [-1, 1] is exact in float32
        np.testing.assert_array_equal(images[:, 0].numpy(), (sk_images[idx] / 16 * 2 - 1).astype(np.float32))
        np.testing.assert_array_equal(labels.numpy(), sk_targets[idx])
        seen += idx
    assert sorted(seen) == list(range(N_DIGITS))
    assert load_digits_images(8, "all")[0].shape[0] == N_DIGITS
    assert load_digits_images(8, "test", test_fraction=0.1)[0].shape[0] == 180
    assert load_digits_images(8, "train", test_fraction=0.1)[0].shape[0] == N_DIGITS - 180


def test_digits_split_follows_its_seed(sk_digits):
    """The split is fixed by ``seed``: the same seed gives the same test scans, another seed other ones (two random
    359-of-1797 subsets coincide with probability ~0)."""
    from fewstep.datasets import load_digits_images

    _, _, index = sk_digits
    a = set(_scan_indices(load_digits_images(8, "test", seed=0)[0], index))
    b = set(_scan_indices(load_digits_images(8, "test", seed=0)[0], index))
    c = set(_scan_indices(load_digits_images(8, "test", seed=1)[0], index))
    assert a == b and a != c and len(a & c) < 200  # expected overlap 359 * 0.2 = 72


def test_digits_upsampling_is_half_pixel_bilinear(sk_digits):
    """Resolution 16 (the default) and 12: a numpy bilinear resize (half-pixel centres) of the scan the 8x8 split
    holds at the same position. Tolerance 1e-6: float32 rounding of values in [-1, 1]."""
    from fewstep.datasets import load_digits_images

    sk_images, _, index = sk_digits
    idx = _scan_indices(load_digits_images(8, "test")[0][:20], index)
    for size in (16, 12):
        images, labels = load_digits_images(size, "test") if size != 16 else load_digits_images(split="test")
        assert images.shape[1:] == (1, size, size)
        ref = np.stack([_bilinear_half_pixel(sk_images[k] / 16, size) * 2 - 1 for k in idx])
        np.testing.assert_allclose(images[:20, 0].numpy(), ref, rtol=0, atol=1e-6)
    assert load_digits_images()[0].shape[1:] == (1, 16, 16)  # default resolution 16, split "train"
    assert load_digits_images()[0].shape[0] == N_DIGITS - 359


def test_held_out_digits_are_the_test_split_with_their_own_labels(sk_digits):
    """``held_out_digits(n, size, offset)``: test-split digits ``offset..offset + n - 1`` (size 16 by default), each
    with the label of its own scan (checked on scikit-learn's targets at size 8)."""
    from fewstep.datasets import held_out_digits, load_digits_images

    _, sk_targets, index = sk_digits
    images, labels = held_out_digits(5, size=8, offset=7)
    test_images, _ = load_digits_images(8, "test")
    torch.testing.assert_close(images, test_images[7:12], rtol=0, atol=0)
    np.testing.assert_array_equal(labels.numpy(), sk_targets[_scan_indices(images, index)])
    assert held_out_digits(2)[0].shape == (2, 1, 16, 16)


def test_to_unit_range_maps_and_clamps():
    from fewstep.datasets import to_unit_range

    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.25])
    torch.testing.assert_close(to_unit_range(x), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]), rtol=0, atol=0)


def test_classifier_forward_is_the_documented_network_on_the_shipped_weights():
    """The shipped ``digits-classifier`` against its docstring written with torch.nn.functional on the raw safetensors:
    two stages of (3x3 conv pad 1, GroupNorm(8), SiLU) x2 + 2x2 max pooling, global average pooling, Linear + SiLU
    (the features), Linear (the logits). Tolerance 1e-5: float32 rounding, logits of order 10."""
    from safetensors.torch import load_file

    import fewstep
    from fewstep.pipelines import default_model_path

    w = load_file(str(default_model_path("digits-classifier") / "diffusion_pytorch_model.safetensors"))
    model = fewstep.load_default("digits-classifier")
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def stage(h, convs):
        for conv, norm in convs:
            h = F.conv2d(h, w[f"body.{conv}.weight"], w[f"body.{conv}.bias"], padding=1)
            h = F.silu(F.group_norm(h, 8, w[f"body.{norm}.weight"], w[f"body.{norm}.bias"], eps=1e-5))
        return F.max_pool2d(h, 2)

    h = stage(stage(x, [(0, 1), (3, 4)]), [(7, 8), (10, 11)])
    feats = F.silu(h.mean(dim=(2, 3)) @ w["feature.1.weight"].T + w["feature.1.bias"])
    logits = feats @ w["head.weight"].T + w["head.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), feats, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# ClassConditionalPipeline on a tiny random UNet (null class = the last id, 10)
DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}


def _unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=11,
    )  # fmt: skip


def _pipe(unet, sampler="ddim"):
    from fewstep import samplers
    from fewstep.pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(unet=unet, scheduler=samplers.get(sampler).from_config(DDPM))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny():
    return _unet()


def test_class_labels_as_tensors_numpy_scalars_and_bools(tiny):
    """Labels as a (2-D) torch tensor or a numpy integer scalar mean the same labels as a list of ints (one image per
    entry, in order); a bool inside the list is no class id (as a bool scalar is not)."""
    pipe = _pipe(tiny)
    kw = dict(num_inference_steps=2, output_type="latent")
    ref = pipe([1, 2, 3, 0], latents=_latents(), **kw).images
    got = pipe(torch.tensor([[1, 2], [3, 0]]), latents=_latents(), **kw).images
    assert got.shape == (4, 1, 8, 8) and torch.equal(got, ref)
    one = pipe(np.int64(3), latents=_latents(1), **kw).images
    assert torch.equal(one, pipe([3], latents=_latents(1), **kw).images)
    assert pipe.check_class_labels(np.int16(7)) == [7] and pipe.check_class_labels(torch.tensor(4)) == [4]
    labels = pipe.check_class_labels([np.int64(2), 5])  # documented: a list of (Python) ints
    assert labels == [2, 5] and all(type(c) is int for c in labels)
    for bad in ([True], [1, False]):
        with pytest.raises(ValueError, match="class labels must be ints, got (True|False) \\(bool\\)"):
            pipe.check_class_labels(bad)


def test_call_state_follows_diffusers_meaning_of_guidance(tiny):
    """diffusers' ``do_classifier_free_guidance`` is ``guidance_scale > 1``: CFG at scale 1 (the conditional model
    alone) is no guidance; ``num_timesteps`` is the call's number of steps. A fresh pipeline has run no guidance."""
    pipe = _pipe(tiny)
    assert not pipe.do_classifier_free_guidance and not pipe.interrupt
    pipe([1], 3, guidance_scale=1.0, output_type="latent")
    assert (pipe.guidance_scale, pipe.do_classifier_free_guidance, pipe.num_timesteps) == (1.0, False, 3)
    pipe([1], 2, guidance_scale=1.5, output_type="latent")
    assert (pipe.guidance_scale, pipe.do_classifier_free_guidance, pipe.num_timesteps) == (1.5, True, 2)


def test_return_dict_false_gives_a_tuple_as_diffusers(tiny):
    pipe = _pipe(tiny)
    out = pipe([1, 2], 2, latents=_latents(2), output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert torch.equal(out[0], pipe([1, 2], 2, latents=_latents(2), output_type="pt").images)


def test_from_pipe_without_compile_runs_a_replaced_unet(tiny):
    """Without ``compile`` nothing is bound to the old module: after ``pipe.unet = other`` the pipeline samples with
    ``other``, exactly as a pipeline built on ``other``."""
    from fewstep.pipelines import ClassConditionalPipeline

    new = ClassConditionalPipeline.from_pipe(_pipe(tiny))
    other = _unet(seed=1)
    new.unet = other
    kw = dict(class_labels=[1, 2], num_inference_steps=2, latents=_latents(2), output_type="latent")
    assert torch.equal(new(**kw).images, _pipe(other)(**kw).images)


def test_from_pipe_quantized_module_and_compile_run_the_compiled_quantized_copy(tiny, monkeypatch):
    """``quantized=<module>`` with ``compile``: the pipeline's UNet is the quantized module and the loop calls its
    compiled wrapper (torch.compile stubbed by a recording pass-through: the check is on which module is compiled
    and called, not on dynamo); the output equals the same quantized module run uncompiled."""
    from fewstep import quant
    from fewstep.pipelines import ClassConditionalPipeline

    g = torch.Generator().manual_seed(2)
    cal = quant.CalibrationSet(sample=torch.randn(4, 1, 8, 8, generator=g), timestep=torch.linspace(950, 20, 4),
                               class_labels=torch.arange(4) % 11)  # fmt: skip
    qmodule = quant.quantize(tiny, cal, quant.QuantConfig(act_grid=10, weight_grid=10))
    compiled, calls = [], []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return lambda *a, **k: calls.append(1) or module(*a, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)
    base = _pipe(tiny)
    kw = dict(class_labels=[1, 2], num_inference_steps=2, latents=_latents(2), output_type="latent")
    new = ClassConditionalPipeline.from_pipe(base, quantized=qmodule, compile={"backend": "eager"})
    assert new.unet is qmodule and compiled == [qmodule] and base.unet is tiny
    out = new(**kw).images
    assert calls and torch.equal(out, ClassConditionalPipeline.from_pipe(base, quantized=qmodule)(**kw).images)


def test_from_pipe_of_another_pipeline_keeps_its_progress_bar_config(tiny):
    """From a non-fewstep pipeline (diffusers' DDPMPipeline over the same UNet) the new pipeline takes over its
    progress-bar settings, as ``FewstepPipeline.from_pipe`` does."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from fewstep.pipelines import ClassConditionalPipeline

    ddpm = DDPMPipeline(unet=tiny, scheduler=DDPMScheduler.from_config(DDPM))
    ddpm.set_progress_bar_config(disable=True, desc="x")
    new = ClassConditionalPipeline.from_pipe(ddpm)
    assert new._progress_bar_config == {"disable": True, "desc": "x"} and new.unet is tiny


# ---------------------------------------------------------------------------------------------------------------
# PSNR / SSIM input contract
def test_metrics_refuse_non_nchw_tensors_and_windows_taller_or_wider_than_the_image():
    """A CHW image (or a 5-D batch) is no NCHW batch: psnr would silently score each channel as an image. SSIM's
    window must fit both sides: a 5 x 20 image has no 7 x 7 window (a ValueError naming it, not torch's conv
    error), while 7 x 20 has 14 window positions."""
    from fewstep.bench.image_metrics import psnr, ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, 8, generator=g, dtype=torch.float64)
    for a in (x, x[None, None]):
        for fn in (psnr, ssim):
            with pytest.raises(ValueError, match="must be NCHW tensors of one shape"):
                fn(a, a)
    for shape in ((1, 1, 5, 20), (1, 1, 20, 5)):
        with pytest.raises(ValueError, match="smaller than `win_size` 7"):
            ssim(torch.zeros(shape), torch.zeros(shape))
    assert ssim(torch.zeros(1, 1, 7, 20), torch.zeros(1, 1, 7, 20)).item() == pytest.approx(1.0, abs=1e-12)
