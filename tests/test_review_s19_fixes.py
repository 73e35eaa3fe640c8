"""Valid inputs that session 19's new checks refused, found by reviewing that change: integer 0-d tensors as a guided
step's index, 0-d arrays as numbers, 0-d tensors as a histogram's range (``Histogram(x.min(), x.max())``), sets of
exclude patterns, a set of callback tensor names; and the messages: a bound shown rounded next to the refused value,
a string ``nfes``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from test_guided_pipeline import _pipe, _unet

from fewstep import guidance, samplers
from fewstep._checks import check_number
from fewstep.calibrate.dc import calibrate_class_conditional
from fewstep.pipelines import FewstepPipeline
from fewstep.quant import Histogram, QuantConfig
from fewstep.quant.quantize import quantizable_layers

DDPM = DDPMScheduler(beta_schedule="scaled_linear").config


def _guided(index_of) -> torch.Tensor:
    sched = samplers.get("dpm-solver++").from_config(DDPM)
    sched.set_timesteps(4)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i, t in enumerate(sched.timesteps):
        x = guidance.guided_step(sched, guidance.CFG(3.0), 0.3 * x, 0.2 * x, t, x, index_of(i))
    return x


def test_guided_step_takes_integer_index_tensors_and_names_other_types():
    reference = _guided(lambda i: None)
    assert _guided(lambda i: torch.tensor(i)).equal(reference)
    assert _guided(lambda i: np.int64(i)).equal(reference)
    for bad in (True, 0.0, torch.tensor(0.0), torch.tensor([0, 1]), "0", torch.tensor(0, device="meta")):
        with pytest.raises(ValueError, match=r"`index` must be an integer \(a model call's index .*got "):
            _guided(lambda i, bad=bad: bad)


@pytest.mark.parametrize("value, expected", [(np.array(0.75), 0.75), (np.array(3), 3.0)])
def test_check_number_reads_zero_dim_real_arrays(value, expected):
    assert check_number("x", value, 0) == expected


@pytest.mark.parametrize("value", [torch.tensor(2.5), torch.tensor(True), np.array(True), np.array([1.0]),
                                   np.array(float("nan")), np.array("1"), np.array(-1.0)])
def test_check_number_refuses_tensors_and_other_arrays_naming_them(value):
    """A tensor is refused, not read: reading it would sync the device (a tensor ``eta`` in DDIM's ``step``)."""
    with pytest.raises(ValueError, match=r"`x` must be a finite number >= 0, got (tensor|array)\("):
        check_number("x", value, 0)


def test_a_refused_value_is_never_shown_next_to_a_bound_rounded_past_it():
    high = 4.605037213407804
    with pytest.raises(ValueError, match=r"in \[-5, 4\.605037213407804\], got 4\.605037213407805"):
        check_number("lambda_end", 4.605037213407805, -5.0, high)
    with pytest.raises(ValueError, match=r"in \[0, 1\.5\], got 2"):  # short forms stay short
        check_number("x", 2, 0, 1.5)


def test_histogram_takes_tensor_scalars():
    x = torch.linspace(-2.0, 3.0, 11)
    h = Histogram(x.min(), x.max(), bins=16)
    assert (h.lo, h.hi) == (-2.0, 3.0)


def test_exclude_patterns_may_be_any_collection_but_not_a_string():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert list(quantizable_layers(model, exclude={"0", "2"})) == ["1"]
    assert list(quantizable_layers(model, exclude=(p for p in ["1"]))) == ["0", "2"]  # a generator, read once
    assert QuantConfig(exclude=frozenset({"0"})).validate().exclude == ["0"]
    with pytest.raises(ValueError, match="`exclude` must be a list of fnmatch patterns .* got 'conv_in'"):
        quantizable_layers(model, exclude="conv_in")


def test_callback_tensor_names_may_be_a_set():
    pipe = FewstepPipeline(_pipe(_unet(), "ddim"), guidance.CFG(3.0))
    seen = []

    def callback(p, i, t, tensors):
        seen.append(sorted(tensors))
        return {}

    pipe(class_labels=[1], num_inference_steps=2, output_type="latent", callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs={"latents"}, generator=torch.Generator().manual_seed(0))
    assert seen == [["latents"], ["latents"]]


@pytest.mark.parametrize("nfes, scales, match", [
    ("digits-eps", [3.0], r"`nfes` must be a non-empty list of integers >= 1, got 'digits-eps'"),
    ([4, 2.5], [3.0], r"`nfes\[1\]` must be an integer >= 1, got 2.5"),
    ([4], [3.0, -1.0], r"`guidance_scales\[1\]` must be a finite number >= 0, got -1.0"),
    ([4], 3.0, r"`guidance_scales` must be a non-empty list of finite numbers >= 0, got 3.0"),
])
def test_calibrate_names_a_bad_nfe_or_scale_list(nfes, scales, match):
    with pytest.raises(ValueError, match=match):
        calibrate_class_conditional(None, nfes, scales)
