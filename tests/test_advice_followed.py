"""Error messages whose advice, followed literally, must work (probe 23b): the peft-LoRA ``exclude`` list of
``quantize`` names every adapter layer at once, ``flowchef_sample`` points at ``class_labels`` when they set the batch
and defaults ``num_images`` to the task's batch, and ``fewstep generate`` lists every task / quant mode it accepts."""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep import quant
from fewstep.cli import main

CFG = dict(act_grid=5, weight_grid=5, bins=16)


# ------------------------------------------------------------------------------------------------ quant + peft LoRA
def _lora_unet(targets):
    peft = pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4).eval()
    unet.add_adapter(peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    return unet


def _calibration() -> quant.CalibrationSet:
    gen = torch.Generator().manual_seed(0)
    return quant.CalibrationSet(torch.randn(4, 4, 8, 8, generator=gen), torch.randint(0, 1000, (4,), generator=gen),
                                encoder_hidden_states=torch.randn(4, 5, 16, generator=gen))


def _adapters(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(getattr(m, "base_layer", None), torch.nn.Module)]


@pytest.mark.parametrize("targets", [
    ["to_q", "to_k"],  # 16 adapter layers, the probe's case: compact '*.to_q.*' patterns
    r".*up_blocks.*attn\d\.to_(q|k|v)",  # 12, up blocks only: down/mid to_q stay quantized
    ["down_blocks.0.resnets.0.conv1", "up_blocks.1.attentions.1.proj_out"],  # 2 adapters: one pattern each
])
def test_the_exclude_advice_names_every_adapter_layer_and_quantizing_with_it_works(targets, tmp_path):
    unet = _lora_unet(targets)
    adapters = _adapters(unet)
    with pytest.raises(ValueError, match=rf"leave all {len(adapters)} adapter layer\(s\) and their factors in float "
                                         r"with exclude=\[.*\] \(your exclude plus the adapter layers; such a "
                                         r"quantization runs in memory only: load_quantized and FewstepPipeline"
                                         r"\(quantized=\.\.\.\) refuse a model carrying peft adapters") as info:
        quant.quantize(unet, _calibration(), quant.QuantConfig(**CFG))
    assert "pipe.fuse_lora(); pipe.unload_lora_weights()" in str(info.value)  # the primary advice stays
    exclude = ast.literal_eval(re.search(r"exclude=(\[.*?\])", str(info.value)).group(1))
    q = quant.quantize(unet, _calibration(), quant.QuantConfig(**CFG, exclude=exclude))  # one try is enough
    # exactly what the default exclude plus one '<adapter>.*' per adapter layer quantizes
    explicit = quant.quantize(unet, _calibration(),
                              quant.QuantConfig(**CFG, exclude=[*quant.BOUNDARY_LAYERS, *(f"{a}.*" for a in adapters)]))
    assert sorted(quant.quant_layers(q)) == sorted(quant.quant_layers(explicit))
    assert not any(n.startswith(a) for n in quant.quant_layers(q) for a in adapters)
    with torch.no_grad():
        assert torch.isfinite(q(**next(_calibration().batches(2))).sample).all()
    # the message's caveat is true: the saved quantization does not load onto the LoRA'd model
    quant.save_quantized(q, tmp_path / "q")
    with pytest.raises(ValueError, match=r"is a peft .* adapter layer \(a LoRA\)"):
        quant.load_quantized(unet, tmp_path / "q")


def test_the_exclude_advice_keeps_the_callers_own_patterns():
    unet = _lora_unet(["to_q"])
    with pytest.raises(ValueError, match=r"exclude=\['conv_in', 'down_blocks\.1\.\*', ") as info:
        quant.quantizable_layers(unet, exclude=["conv_in", "down_blocks.1.*"])
    exclude = ast.literal_eval(re.search(r"exclude=(\[.*?\])", str(info.value)).group(1))
    layers = quant.quantizable_layers(unet, exclude=exclude)
    assert "conv_out" in layers and not any(n.startswith("down_blocks.1.") or n == "conv_in" for n in layers)


# ------------------------------------------------------------------------------------------------ flowchef_sample
@pytest.fixture(scope="module")
def flow_pipe():
    import fewstep

    pipe = fewstep.load_default("digits-flow", sampler="flow-euler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint_task():
    from fewstep.datasets import held_out_digits
    from fewstep.pipelines.flowchef import make_task

    return make_task("inpaint", torch.as_tensor(held_out_digits(4)[0]))


def test_flowchef_class_labels_mismatch_points_at_class_labels(flow_pipe, inpaint_task):
    from fewstep.pipelines.flowchef import flowchef_sample

    message = (r"`class_labels` holds 2 labels \(one image each; `num_images` is not used when `class_labels` is "
               r"given\), but the 'inpaint' task holds 4 measurements: pass 4 class_labels \(one per measurement\), "
               r"or class_labels=None")
    for extra in ({}, {"num_images": 4}):  # num_images=4 (the old advice) changes nothing
        with pytest.raises(ValueError, match=message):
            flowchef_sample(flow_pipe, inpaint_task, class_labels=[1, 2], num_inference_steps=2, **extra)
    assert flowchef_sample(flow_pipe, inpaint_task, class_labels=[1, 2, 3, 4], num_inference_steps=2).shape[0] == 4
    assert flowchef_sample(flow_pipe, inpaint_task, class_labels=None, num_inference_steps=2).shape[0] == 4


def test_flowchef_num_images_defaults_to_the_tasks_batch(flow_pipe, inpaint_task):
    from fewstep.pipelines.flowchef import flowchef_sample, make_task

    assert flowchef_sample(flow_pipe, inpaint_task, num_inference_steps=2).shape[0] == 4
    labels = make_task("classifier", labels=[3, 7, 1])
    assert flowchef_sample(flow_pipe, labels, num_inference_steps=2).shape[0] == 3
    with pytest.raises(ValueError, match=r"`num_images` must be an integer >= 1, got None: pass num_images=N"):
        flowchef_sample(flow_pipe, None, num_inference_steps=2)
    assert flowchef_sample(flow_pipe, None, num_images=2, num_inference_steps=2).shape[0] == 2


# ------------------------------------------------------------------------------------------------ fewstep generate
def _error(capsys, *argv) -> str:
    assert main(["generate", *argv, "--quiet"]) == 2
    return capsys.readouterr().err


def _ok(capsys, *argv) -> None:
    code = main(["generate", *argv, "--num-images", "2", "--steps", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


def test_posterior_without_task_lists_every_posterior_task_and_each_runs(tmp_path, capsys):
    from fewstep.pipelines.posterior import POSTERIOR_TASKS

    out = str(tmp_path / "o.png")
    err = _error(capsys, "--posterior", "dps", "--out", out)
    match = re.search(r"--posterior need --task (\S+) \(posterior sampling, on a VP model such as digits-eps\)", err)
    assert match, err
    tasks = match.group(1).split("|")
    assert set(tasks) == set(POSTERIOR_TASKS) and {"random-inpaint", "sr-bicubic", "motion-deblur"} <= set(tasks)
    for task in tasks:
        _ok(capsys, "--posterior", "dps", "--task", task, "--out", out)


def test_sampler_flowchef_lists_every_flowchef_task_and_each_runs(tmp_path, capsys):
    out = str(tmp_path / "o.png")
    err = _error(capsys, "--sampler", "flowchef", "--out", out)
    match = re.search(r"use --model digits-flow --task (\S+) \(FlowChef picks its sampler itself\)", err)
    assert match, err
    tasks = match.group(1).split("|")
    assert "edit" in tasks and "classifier" in tasks
    for task in tasks:
        _ok(capsys, "--sampler", "flowchef", "--model", "digits-flow", "--task", task, "--out", out)


@pytest.mark.parametrize("model", ["digits-eps", "digits-flow"])
def test_measurement_without_task_lists_the_models_inverse_tasks_and_each_runs(model, tmp_path, capsys):
    from fewstep.guidance.operators import make_operator

    out = str(tmp_path / "o.png")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(blank)
    err = _error(capsys, "--model", model, "--measurement", str(blank), "--out", out)
    match = re.search(rf"with --model {model} add --task (\S+)", err)
    assert match, err
    tasks = match.group(1).split("|")
    assert ("motion-deblur" in tasks) == (model == "digits-eps")
    for task in tasks:
        low = make_operator(task, size=16).output_shape((1, 1, 16, 16))[-1]
        y = tmp_path / f"{task}.png"
        Image.fromarray((np.random.default_rng(0).random((low, 2 * low)) * 255).astype(np.uint8)).save(y)
        code = main(["generate", "--model", model, "--task", task, "--measurement", str(y), "--steps", "2",
                     "--out", out, "--quiet"])
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()


def test_quant_mode_of_the_wrong_format_lists_every_usable_mode_and_each_runs(tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--out", str(q), "--samples", "4", "--steps", "2", "--calib", "uniform", "--quiet"]) == 0
    capsys.readouterr()
    out = str(tmp_path / "o.png")
    err = _error(capsys, "--quant", str(q), "--quant-mode", "fp8", "--out", out)
    match = re.search(rf"--quant-mode fp8 needs fp8 parameters; {re.escape(repr(str(q)))} holds int8 "
                      r"\(use --quant-mode (.*)\)", err)
    assert match, err
    modes = re.split(r", | or ", match.group(1))
    assert modes == ["auto", "fake", "int8", "dequant"]
    for mode in modes:
        _ok(capsys, "--quant", str(q), "--quant-mode", mode, "--out", out)
