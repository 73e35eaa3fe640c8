"""An image depends only on its own generator, not on the other images of its batch (diffusers' convention), also
with a fake-quantized UNet; and swapping a sampler into a pipeline loaded with dpm-solver-v3 (found by probing)."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep import quant
from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.swap import swap_sampler


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def calibrated():
    pipe = fewstep.load_default("digits-eps", sampler="unipc")
    pipe.set_progress_bar_config(disable=True)
    cal = quant.build_calibration_set(pipe, num_samples=12, steps=6, method="uniform", num_steps_kept=3, seed=1)
    return pipe, cal


@pytest.fixture(scope="module")
def quantized(calibrated):
    pipe, cal = calibrated
    return pipe, quant.quantize(pipe.unet, cal, quant.QuantConfig(metric="mse"))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fake_quant_images_do_not_depend_on_the_rest_of_the_batch(quantized, calibrated, fmt):
    """Fake quantization (the reference numerics, FewstepPipeline's default quant mode) computed its float op in
    float32, whose summation order changes with the batch size; the next layer's rounding turned that ~5e-7 into a
    whole quantization step, so an image changed with its batch by up to 0.2 (in [0, 1]). Now as int8: exactly
    the same image, alone or in any batch. (fp8: coarser range-search grids than the default 100 / 80, a third of
    the quantization time; with float32 accumulation its images still differ with the batch, by ~0.03.)"""
    pipe, qunet = quantized
    if fmt == "fp8":
        config = quant.QuantConfig(format="fp8", metric="mse", act_grid=15, weight_grid=10)
        qunet = quant.quantize(pipe.unet, calibrated[1], config)
    fp = FewstepPipeline.from_pipe(pipe, guidance="cfg", guidance_scale=3.0, quantized=qunet, quant_mode="fake")
    kw = dict(num_inference_steps=4, output_type="pt")
    labels = [3, 7, 1]
    batch = fp(class_labels=labels, generator=[_gen(k) for k in range(3)], **kw).images
    alone = torch.cat([fp(class_labels=[c], generator=[_gen(k)], **kw).images for k, c in enumerate(labels)])
    assert torch.equal(batch, alone)
    other = fp(class_labels=[3, 2, 9, 9], generator=[_gen(0), _gen(5), _gen(6), _gen(7)], **kw).images
    assert torch.equal(other[0], batch[0])


def test_fake_quant_float64_accumulation_keeps_the_layer_output_dtype(quantized):
    """The float64 accumulation is internal: a layer returns its input's dtype, and gradients still flow (DPS)."""
    _, qunet = quantized
    layer = next(m for m in qunet.modules() if isinstance(m, quant.QuantLayer) and m.kind == "conv2d")
    layer.set_mode("fake")
    x = torch.randn(2, layer.in_channels, 8, 8, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer(x.detach().half()).dtype == torch.float16


def test_swapping_a_sampler_into_a_dpm_solver_v3_digits_flow_pipeline():
    """load_default stated dpm-solver-v3's default ``time_grid`` explicitly on digits-flow, so a sampler swapped in
    from that config (``swap_sampler`` / ``from_config``) carried ``uniform_time`` and failed on the flow model; a
    config that does carry it now gets an error saying where it came from."""
    pipe = fewstep.load_default("digits-flow", sampler="dpm-solver-v3")
    pipe.set_progress_bar_config(disable=True)
    swap_sampler(pipe, "unipc")
    assert pipe.scheduler.config.time_grid == "spacing"
    want = fewstep.load_default("digits-flow", sampler="unipc")
    want.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[3], num_inference_steps=4, output_type="pt")
    torch.testing.assert_close(pipe(**kw, generator=_gen(0)).images, want(**kw, generator=_gen(0)).images)
    swap_sampler(pipe, "unipc", time_grid="uniform_time")
    with pytest.raises(ValueError, match="supports time_grid='spacing' only, got 'uniform_time' .*dpm-solver-v3"):
        pipe(**kw, generator=_gen(0))
