"""``fewstep.quant.quantize`` on a UNet carrying peft LoRA adapter layers (diffusers' ``add_adapter`` /
``load_lora_weights``): refused before any calibration work, unfused or fused-but-not-unloaded, with the advice
that works (fuse, unload, then quantize). peft is not a dependency of fewstep: these tests need it installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep import quant

peft = pytest.importorskip("peft")

CFG = dict(act_grid=5, weight_grid=5, bins=16)
ADVICE = r"pipe\.fuse_lora\(\); pipe\.unload_lora_weights\(\) .*fuse_lora alone keeps the adapter layers.*then quantize"


def _unet() -> nn.Module:
    """A tiny SD-shaped UNet (cross-attention Linears, resnet Conv2ds), as tests/test_quant.py builds one."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4).eval()


def _calibration() -> quant.CalibrationSet:
    gen = torch.Generator().manual_seed(0)
    return quant.CalibrationSet(torch.randn(4, 4, 8, 8, generator=gen), torch.randint(0, 1000, (4,), generator=gen),
                                encoder_hidden_states=torch.randn(4, 5, 16, generator=gen))


def _with_lora(unet: nn.Module, targets: list[str]) -> nn.Module:
    torch.manual_seed(5)  # init_lora_weights=False: a LoRA that changes the output (B is not zero)
    unet.add_adapter(peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    return unet


@pytest.mark.parametrize("targets, layer, kind", [
    (["to_q", "to_k", "to_v", "to_out.0"], "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "Linear"),
    (["conv1"], "down_blocks.0.resnets.0.conv1", "Conv2d"),
])
def test_unfused_peft_lora_is_refused_before_any_calibration_forward(targets, layer, kind):
    """The probe's defect: the LoRA factors were quantized and the result crashed in peft on its first forward."""
    unet = _with_lora(_unet(), targets)
    forwards = []
    unet.register_forward_pre_hook(lambda *_: forwards.append(1))
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=rf"layer '{layer}' is a peft {kind} adapter layer \(unfused LoRA.*{ADVICE}"):
        quant.quantize(unet, _calibration(), quant.QuantConfig(**CFG))
    with pytest.raises(ValueError, match=rf"layer '{layer}' is a peft {kind} adapter layer \(unfused LoRA"):
        quant.quantizable_layers(unet, exclude=[])
    assert forwards == []  # fail fast: no calibration (nor skip-split) forward ran
    assert not any(isinstance(m, quant.QuantLayer) for m in unet.modules())
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_fused_but_still_wrapped_peft_lora_is_refused_naming_lora():
    """``fuse_lora`` alone merges the weights but keeps peft's wrappers (and their lora_A/lora_B): quantize failed
    with an unrelated "calibration forward never reached ... exclude them" after the whole calibration."""
    unet = _with_lora(_unet(), ["to_q", "to_k", "to_v", "to_out.0"])
    unet.fuse_lora()
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ValueError, match=rf"layer '{layer}' is a peft Linear adapter layer \(fused but still "
                                         rf"wrapped LoRA.*{ADVICE}"):
        quant.quantize(unet, _calibration(), quant.QuantConfig(**CFG))


def test_the_advised_path_fuse_then_unload_quantizes_a_model_that_runs():
    base = _unet()
    cal = _calibration()
    batch = next(cal.batches(2))
    unet = _with_lora(_unet(), ["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    with torch.no_grad():
        base_out, lora_out = base(**batch).sample, unet(**batch).sample
    unet.fuse_lora()
    unet.unload_lora()  # what pipe.unload_lora_weights() does to the UNet
    assert not any(hasattr(m, "base_layer") for m in unet.modules())
    with torch.no_grad():
        fused_out = unet(**batch).sample
    torch.testing.assert_close(fused_out, lora_out, atol=1e-5, rtol=1e-5)  # the LoRA is in the weights now
    q = quant.quantize(unet, cal, quant.QuantConfig(**CFG))
    names = quant.quant_layers(q)
    assert names and not any("lora_" in n or "base_layer" in n for n in names)
    with torch.no_grad():
        q_out = q(**batch).sample
    assert torch.isfinite(q_out).all()
    # the quantized model follows the LoRA'd weights, not the base ones
    assert (q_out - fused_out).norm() < 0.25 * (base_out - fused_out).norm()


def test_excluding_a_peft_layer_and_all_its_adapters_keeps_it_in_float():
    """``exclude`` as the message gives it leaves the wrapper, its base layer and its factors in float; excluding the
    wrapper's name alone would still quantize its lora_A/lora_B, and is refused."""
    layer = "down_blocks.0.resnets.0.conv1"
    unet = _with_lora(_unet(), [layer])
    message = rf"layer '{layer}' is a peft Conv2d adapter layer .*exclude=\['{layer}\.\*'\]"
    with pytest.raises(ValueError, match=message):
        quant.quantizable_layers(unet, exclude=[layer])
    q = quant.quantize(unet, _calibration(), quant.QuantConfig(**CFG, exclude=[f"{layer}.*"]))
    assert not any(n.startswith(layer) for n in quant.quant_layers(q))
    assert type(q.get_submodule(layer)).__module__.startswith("peft.")
    batch = next(_calibration().batches(2))
    with torch.no_grad():
        assert torch.isfinite(q(**batch).sample).all()
