"""Model output <-> (x0, eps): round trips, the forward process, diffusers' conversions, bad names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fewstep.solvers.parameterization import PREDICTION_TYPES, from_pair, normalize_prediction_type, to_pair
from fewstep.solvers.schedules import VPSchedule

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
_VP = VPSchedule.from_config(DDPMScheduler(**SD).config)
VP_COEFFS = [tuple(float(v) for v in _VP.alpha_sigma(t)) for t in (0.0, 250.5, 999.0)] + [(0.6, 0.8)]
FLOW_COEFFS = [(1.0 - s, s) for s in (1e-3, 0.3, 0.75, 0.999)]
VP_KINDS = ["epsilon", "sample", "v_prediction"]
FLOW_KINDS = ["flow", "flow_prediction", "epsilon", "sample", "v_prediction"]


def _pair(seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=g, dtype=dtype), torch.randn(2, 3, 4, 4, generator=g, dtype=dtype)


def _cases():
    for alpha, sigma in VP_COEFFS:
        for kind in VP_KINDS:
            yield pytest.param(kind, alpha, sigma, id=f"vp-{kind}-a{alpha:.3g}")
    for alpha, sigma in FLOW_COEFFS:
        for kind in FLOW_KINDS:
            yield pytest.param(kind, alpha, sigma, id=f"flow-{kind}-s{sigma:.3g}")


@pytest.mark.parametrize("kind,alpha,sigma", list(_cases()))
def test_from_pair_then_to_pair_recovers_x0_and_eps(kind, alpha, sigma):
    x0, eps = _pair()
    x = alpha * x0 + sigma * eps
    output = from_pair(x0, eps, alpha, sigma, kind)
    got_x0, got_eps = to_pair(output, x, alpha, sigma, kind)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind,alpha,sigma", list(_cases()))
def test_to_pair_is_consistent_with_the_forward_process(kind, alpha, sigma):
    """For any output, the pair satisfies x = alpha x0 + sigma eps and maps back to the same output."""
    x, output = _pair(1)
    x0, eps = to_pair(output, x, alpha, sigma, kind)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(from_pair(x0, eps, alpha, sigma, kind), output, rtol=0, atol=1e-10)


def test_from_pair_definitions():
    x0, eps = _pair(2)
    a, s = 0.6, 0.8
    assert from_pair(x0, eps, a, s, "epsilon") is eps
    assert from_pair(x0, eps, a, s, "sample") is x0
    torch.testing.assert_close(from_pair(x0, eps, a, s, "v_prediction"), a * eps - s * x0, rtol=0, atol=0)
    torch.testing.assert_close(from_pair(x0, eps, 0.3, 0.7, "flow"), eps - x0, rtol=0, atol=0)


def test_flow_prediction_is_an_alias_of_flow():
    x, output = _pair(3)
    assert normalize_prediction_type("flow_prediction") == "flow"
    for a, b in zip(to_pair(output, x, 0.4, 0.6, "flow"), to_pair(output, x, 0.4, 0.6, "flow_prediction"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x0, eps = _pair(4)
    torch.testing.assert_close(from_pair(x0, eps, 0.4, 0.6, "flow_prediction"), from_pair(x0, eps, 0.4, 0.6, "flow"))


@pytest.mark.parametrize("t", [0, 1, 400, 999])
def test_forward_process_and_velocity_match_diffusers(t):
    reference = DDPMScheduler(**SD)
    x0, eps = _pair(5)
    alpha, sigma = (float(v) for v in _VP.alpha_sigma(float(t)))
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long)
    torch.testing.assert_close(reference.add_noise(x0, eps, timesteps), alpha * x0 + sigma * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        reference.get_velocity(x0, eps, timesteps), from_pair(x0, eps, alpha, sigma, "v_prediction"), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("kind", VP_KINDS)
def test_x0_matches_ddim_pred_original_sample(kind):
    reference = DDIMScheduler(prediction_type=kind, clip_sample=False, set_alpha_to_one=False, **SD)
    reference.set_timesteps(10)
    x, output = _pair(6)
    for t in reference.timesteps[[0, 4, 9]]:
        alpha, sigma = (float(v) for v in _VP.alpha_sigma(float(t)))
        expected = reference.step(output, t, x).pred_original_sample
        x0, _ = to_pair(output, x, alpha, sigma, kind)
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtype_is_kept(kind, dtype):
    x, output = _pair(7, dtype)
    x0, eps = to_pair(output, x, 0.6, 0.8, kind)
    assert x0.dtype == dtype and eps.dtype == dtype
    assert from_pair(x0, eps, 0.6, 0.8, kind).dtype == dtype


def test_scalar_coefficients_broadcast_like_numpy_floats():
    x0, eps = _pair(8)
    alpha, sigma = _VP.alpha_sigma(500.0)  # numpy float64 0-d arrays
    out = from_pair(x0, eps, float(alpha), float(sigma), "v_prediction")
    got, _ = to_pair(out, float(alpha) * x0 + float(sigma) * eps, float(alpha), float(sigma), "v_prediction")
    np.testing.assert_allclose(got.numpy(), x0.numpy(), atol=1e-12)


@pytest.mark.parametrize("bad", ["eps", "v", "Epsilon", "", "flow-prediction"])
def test_bad_prediction_type_lists_allowed_values(bad):
    x0, eps = _pair(9)
    for call in (
        lambda: normalize_prediction_type(bad),
        lambda: to_pair(x0, eps, 0.6, 0.8, bad),
        lambda: from_pair(x0, eps, 0.6, 0.8, bad),
    ):
        with pytest.raises(ValueError, match="prediction_type") as info:
            call()
        message = str(info.value)
        assert repr(bad) in message
        for allowed in PREDICTION_TYPES:
            assert f"'{allowed}'" in message
