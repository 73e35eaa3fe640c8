"""Graph mode's cache key follows the host state a denoiser's forward bakes into a captured step (found by an
interop probe): FreeU's factors on the UNet's up blocks, peft's LoRA scales / active / merged / disabled adapters
(``fuse_lora`` merges in place: the weights keep their addresses), and the train/eval mode. Before, the cached
step was replayed after ``enable_freeu``, ``set_adapters``, ``disable_lora`` or ``fuse_lora``, so a captured
graph kept the old factors (or ran a fused LoRA's branch on top of the merged weights). On the CPU the step runs
uncaptured (``_loop_mode = "static"``), so what is checked is that the cached run is rebuilt, and that the static
step then gives the eager loop's images. Also: a quantization put on a LoRA'd denoiser is refused naming the LoRA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fewstep_pipeline import _unet
from test_pipeline_interop import _sd

from fewstep import quant
from fewstep.pipelines import FewstepPipeline

# two adapters on one UNet (as diffusers' load_lora_weights does for a second LoRA): peft's notice, expected here
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def _embeds() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"prompt_embeds": torch.randn(1, 5, 16, generator=g),
            "negative_prompt_embeds": torch.randn(1, 5, 16, generator=g)}


def _images(fp: FewstepPipeline, mode: str) -> np.ndarray:
    fp._loop_mode = mode
    return fp(**_embeds(), num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(1)).images


def _check_change_recaptures(fp: FewstepPipeline, change) -> None:
    """The static step is cached while nothing changes; ``change`` rebuilds it; the rebuilt step gives the eager
    loop's images (bit for bit, as for every static step on the CPU) and differs from before the change."""
    before = _images(fp, "static")
    key, run = fp._graph_cache
    _images(fp, "static")
    assert fp._graph_cache[1] is run  # nothing changed: the cached step (the captured graph on a GPU) is replayed
    change()
    after = _images(fp, "static")
    assert fp._graph_cache[1] is not run and fp._graph_cache[0] != key
    np.testing.assert_array_equal(after, _images(fp, "eager"))
    assert np.abs(after - before).max() > 1e-3  # the change changes the images: a replay would have been wrong


def test_freeu_switched_on_changed_and_off_rebuilds_the_cached_step():
    sd = _sd()
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=4.0)
    _check_change_recaptures(fp, lambda: sd.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4))
    _check_change_recaptures(fp, lambda: sd.enable_freeu(s1=0.9, s2=0.2, b1=1.6, b2=1.4))
    _check_change_recaptures(fp, sd.disable_freeu)


def test_train_mode_is_part_of_the_key():
    """Dropout is baked into a captured step as the mode it was captured in."""
    from fewstep.pipelines.graph_step import module_state_key

    unet = _unet().eval()
    key = module_state_key(unet)
    unet.down_blocks[0].train()
    assert module_state_key(unet) != key
    unet.down_blocks[0].eval()
    assert module_state_key(unet) == key


def _lora_sd():
    peft = pytest.importorskip("peft")
    sd = _sd()
    for name in ("a", "b"):
        torch.manual_seed(5 if name == "a" else 6)  # init_lora_weights=False: adapters that change the output
        sd.unet.add_adapter(peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False), adapter_name=name)  # fmt: skip
    sd.set_adapters(["a"])
    return sd


def test_peft_lora_reweighted_switched_disabled_and_fused_rebuilds_the_cached_step():
    sd = _lora_sd()
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=4.0)
    _check_change_recaptures(fp, lambda: sd.set_adapters(["a"], adapter_weights=[0.3]))  # peft's `scaling`
    _check_change_recaptures(fp, lambda: sd.set_adapters(["b"]))  # the active adapter
    _check_change_recaptures(fp, sd.disable_lora)  # the disabled flag
    sd.enable_lora()
    _images(fp, "static")
    key, run = fp._graph_cache
    ptrs = [p.data_ptr() for p in sd.unet.parameters()]
    sd.fuse_lora()  # merged in place: same addresses, and the merged adapter must no longer run its branch
    assert [p.data_ptr() for p in sd.unet.parameters()] == ptrs
    fused = _images(fp, "static")
    assert fp._graph_cache[1] is not run and fp._graph_cache[0] != key
    np.testing.assert_array_equal(fused, _images(fp, "eager"))


def test_a_quantization_is_not_put_on_a_lora_denoiser(tmp_path):
    sd = _lora_sd()
    plain = _sd()
    gen = torch.Generator().manual_seed(0)
    cal = quant.CalibrationSet(torch.randn(4, 4, 16, 16, generator=gen), torch.randint(0, 1000, (4,), generator=gen),
                               encoder_hidden_states=torch.randn(4, 5, 16, generator=gen))  # fmt: skip
    qunet = quant.quantize(plain.unet, cal, quant.QuantConfig(act_grid=5, weight_grid=5, bins=16))
    quant.save_quantized(qunet, tmp_path / "q")
    lora = (r"layer '[\w.]+' is a peft Linear adapter layer \(a LoRA\)"
            r".*pipe\.fuse_lora\(\); pipe\.unload_lora_weights\(\)")
    with pytest.raises(ValueError, match=r"quantization saved for model .* cannot be put on this model: " + lora):
        quant.load_quantized(sd.unet, tmp_path / "q")
    with pytest.raises(ValueError, match=r"quantization saved for model .* cannot be put on this model: " + lora):
        FewstepPipeline.from_pipe(sd, quantized=tmp_path / "q")
    with pytest.raises(ValueError, match=r"`quantized` \(a module\) cannot be put on this model: " + lora):
        FewstepPipeline.from_pipe(sd, quantized=qunet)
    FewstepPipeline.from_pipe(plain, quantized=qunet)  # the same module fits the model it was made from


def test_module_state_key_visits_each_module_once_and_ends_on_cycles():
    """The key's own walk (not ``modules()``, for speed) visits a shared child once, as ``modules()`` does, in the
    same order, and ends on a module that holds its parent."""
    from fewstep.pipelines.graph_step import module_state_key

    shared = torch.nn.Linear(2, 2)
    seq = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(2, 3))
    seq.add_module("again", shared)
    expected = []
    for sub in seq.modules():
        expected += [p.data_ptr() for p in sub._parameters.values()] + [sub.training]
    assert module_state_key(seq) == tuple(expected)
    seq[2].parent = seq  # a cycle: modules() stops on it too
    assert len(module_state_key(seq)) == len(expected)
