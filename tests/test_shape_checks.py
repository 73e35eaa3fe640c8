"""Shape checks a probe found missing: ``mrs``'s ``step`` and ``ddim_invert`` broadcast model outputs of the wrong shape
(a batch of one for two, a doubled CFG batch), and a split ``QuantLayer`` conv failed on unbatched input in its float
modes."""

from __future__ import annotations

import re

import pytest
import torch
from _helpers import SD3_FLOW, SD15_PNDM, SD21_DDIM_V
from torch import nn

from fewstep import guidance, quant, samplers
from fewstep.guidance.inversion import ddim_invert
from fewstep.quant.kernels import fp8_supported
from fewstep.quant.quantizers import act_qparams_from_range, weight_qparams

SHAPE = (2, 4, 6, 8)


# ------------------------------------------------------------------------------------------------------------- mrs
def _mrs(steps: int = 4, **kwargs):
    sched = samplers.get("mrs")(stationary_std=0.5, **kwargs)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("solver", ["ode", "sde", "euler-maruyama"])
def test_mrs_step_refuses_an_output_for_one_sample_of_two(solver):
    torch.manual_seed(0)
    x, mu = torch.randn(SHAPE), torch.randn(SHAPE)
    sched = _mrs(solver=solver)
    msg = re.escape("`model_output` must have the shape of `sample` (2, 4, 6, 8), got (1, 4, 6, 8): one output per "
                    "sample")
    with pytest.raises(ValueError, match=msg):
        sched.step(torch.randn(1, 4, 6, 8), sched.timesteps[0], x, mu=mu)
    # refused before the step began: the same step then runs, and gives what a fresh scheduler gives
    out = torch.randn(SHAPE)
    got = sched.step(out, sched.timesteps[0], x, mu=mu, generator=torch.Generator().manual_seed(1)).prev_sample
    ref = _mrs(solver=solver).step(out, sched.timesteps[0], x, mu=mu,
                                   generator=torch.Generator().manual_seed(1)).prev_sample
    assert got.shape == SHAPE
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_mrs_step_refuses_an_unsplit_cfg_batch_with_the_hint():
    torch.manual_seed(0)
    x, mu = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    sched = _mrs()
    msg = (re.escape("`model_output` must have the shape of `sample` (1, 4, 6, 8), got (2, 4, 6, 8)")
           + ".*combine the guidance halves first")
    with pytest.raises(ValueError, match=msg):
        sched.step(torch.randn(2, 4, 6, 8), sched.timesteps[0], x, mu=mu)


def test_mrs_step_still_checks_mu():
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    sched = _mrs()
    with pytest.raises(ValueError, match=re.escape("`mu` must have the sample's shape (2, 4, 6, 8), got (1, 4, 6, 8)")):
        sched.step(torch.randn(SHAPE), sched.timesteps[0], x, mu=torch.randn(1, 4, 6, 8))
    with pytest.raises(ValueError, match="`mu` is required"):
        sched.step(torch.randn(SHAPE), sched.timesteps[0], x)


# ------------------------------------------------------------------------------------------------------- inversion
CONFIGS = {"eps": SD15_PNDM, "v": SD21_DDIM_V, "flow": SD3_FLOW}


def _ddim(config):
    sched = samplers.get("ddim").from_config(config, clip_sample=False)
    sched.set_timesteps(4)
    return sched


@pytest.mark.parametrize("which", ["out_cond", "out_uncond"])
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("bad_shape", [(1, 4, 6, 8), (2, 2, 6, 8), (2, 4, 6)])
def test_ddim_invert_refuses_outputs_not_of_the_images_shape(kind, which, bad_shape):
    torch.manual_seed(0)
    images = torch.randn(SHAPE)

    def model_fn(x, t):
        good, bad = 0.1 * x, torch.randn(bad_shape)
        return (bad, good) if which == "out_cond" else (good, bad)

    msg = re.escape(f"`model_fn`'s `{which}` must have the shape of `images` (2, 4, 6, 8), got {bad_shape}: one "
                    "output per image")
    with pytest.raises(ValueError, match=msg):
        ddim_invert(model_fn, images, _ddim(CONFIGS[kind]), guidance.CFG(3.0))


def test_ddim_invert_hints_at_a_doubled_batch_and_learned_variance():
    torch.manual_seed(0)
    images = torch.randn(SHAPE)
    sched = _ddim(SD21_DDIM_V)
    doubled = lambda x, t: (torch.cat([x, x]), torch.cat([x, x]))  # noqa: E731
    msg = re.escape("`model_fn`'s `out_cond` must have the shape of `images` (2, 4, 6, 8), got (4, 4, 6, 8): it holds "
                    "twice the images' batch: return the conditional and unconditional halves separately")
    with pytest.raises(ValueError, match=msg):
        ddim_invert(doubled, images, sched, guidance.CFG(3.0))
    variance = lambda x, t: (torch.cat([x, x], 1), x)  # noqa: E731
    msg = re.escape("got (2, 8, 6, 8): it has twice the images' channels (8 vs 4)") + ".*out_cond\\[:, :4\\]"
    with pytest.raises(ValueError, match=msg):
        ddim_invert(variance, images, sched, guidance.CFG(3.0))
    with pytest.raises(TypeError, match="`model_fn`'s `out_uncond` must be a torch.Tensor of the images' shape, got "
                                        "list"):
        ddim_invert(lambda x, t: (x, [0.0]), images, sched, guidance.CFG(3.0))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_ddim_invert_runs_with_outputs_of_the_images_shape(kind):
    torch.manual_seed(0)
    images = torch.randn(SHAPE)
    out = ddim_invert(lambda x, t: (0.1 * x, 0.05 * x), images, _ddim(CONFIGS[kind]), guidance.CFG(3.0))
    assert out.shape == SHAPE and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------- quant
def _conv_layer(fmt: str, split: int, mode: str) -> quant.QuantLayer:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    w = conv.weight.detach()
    parts = [w] if not split else [w[:, :split], w[:, split:]]
    return quant.QuantLayer(conv, [weight_qparams(p, fmt=fmt) for p in parts],
                            [act_qparams_from_range(-3.0, 3.0, fmt) for _ in parts], fmt=fmt, split=split, mode=mode)


_MODES = [("int8", "fake"), ("int8", "dequant"), ("int8", "int8"), ("fp8", "fake"), ("fp8", "dequant")]
if fp8_supported("cpu"):
    _MODES.append(("fp8", "fp8"))


@pytest.mark.parametrize("split", [0, 5])
@pytest.mark.parametrize("fmt,mode", _MODES)
def test_quant_conv_takes_unbatched_input_in_every_mode(fmt, mode, split):
    """As nn.Conv2d: an unbatched (C, H, W) input gives the batched call's result, squeezed (a split layer narrowed
    dim 1, the height, in the float modes)."""
    layer = _conv_layer(fmt, split, mode)
    x = torch.randn(8, 9, 10, generator=torch.Generator().manual_seed(1))
    got = layer(x)
    assert got.shape == (6, 9, 10)
    torch.testing.assert_close(got, layer(x.unsqueeze(0)).squeeze(0), rtol=0, atol=0)
