"""A saved quantization's two files belong together (one save id), so an interrupted re-save is refused."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import fewstep
from fewstep import quant


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = fewstep.load_default("digits-eps", sampler="ddim")
    calibration = quant.build_calibration_set(pipe, num_samples=4, steps=3, method="uniform", num_steps_kept=2,
                                              seed=0)
    qmodel = quant.quantize(pipe.unet, calibration, quant.QuantConfig(act_grid=5, weight_grid=5))
    root = tmp_path_factory.mktemp("quant")
    quant.save_quantized(qmodel, root / "a", model_id="digits-eps")
    quant.save_quantized(qmodel, root / "b", model_id="digits-eps")
    return pipe, root


def test_files_of_two_saves_are_refused(saved, tmp_path):
    """Found in review: quant.safetensors and quant.json were renamed into place one after the other, so a save
    interrupted between them (into a folder holding an earlier quantization) left two quantizations mixed."""
    pipe, root = saved
    ids = [json.loads((root / d / "quant.json").read_text())["save_id"] for d in ("a", "b")]
    assert ids[0] != ids[1] and all(len(i) == 32 for i in ids)
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "a", mixed)
    shutil.copyfile(root / "b" / "quant.safetensors", mixed / "quant.safetensors")
    with pytest.raises(ValueError, match=r"quant.safetensors' and quant.json in '.*mixed' come from different saves"):
        quant.load_quantized(pipe.unet, mixed)
    quant.load_quantized(pipe.unet, root / "a")  # each save alone loads


def test_saves_from_before_the_save_id_still_load(saved, tmp_path):
    pipe, root = saved
    old = tmp_path / "old"
    shutil.copytree(root / "a", old)
    meta = json.loads((old / "quant.json").read_text())
    del meta["save_id"]
    (old / "quant.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"come from different saves"):  # new tensors beside an id-less quant.json:
        quant.load_quantized(pipe.unet, old)  # a re-save over an older fewstep's folder, interrupted
    with safe_open(old / "quant.safetensors", "pt") as f:  # an older fewstep's save: no id in either file
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del header["save_id"]
    save_file(tensors, old / "quant.safetensors", metadata=header)
    assert quant.quant_layers(quant.load_quantized(pipe.unet, old))
