"""Findings of a systematic probe of the ``fewstep`` command line (flag x value matrix): empty output paths that
landed in the current directory, flags silently ignored or truncated, non-finite floats, raw out-of-memory
tracebacks, messages naming Python arguments instead of flags, and --help without the defaults."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from _helpers import run_cli
from PIL import Image

from fewstep._io import check_creatable_dir
from fewstep.cli import build_parser


def _usage(capsys, *args: str) -> str:
    """The single stderr line of a usage error (exit code 2)."""
    code, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every subcommand's own parser (``calibrate dc``, ``calibrate ems``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in action.choices.values():
            yield from _leaf_parsers(child)


# --- F1: an empty directory output is refused, not taken for the current directory -----------------------------------


@pytest.mark.parametrize("path", ["", "   "])
def test_check_creatable_dir_refuses_an_empty_path(path):
    with pytest.raises(ValueError, match="`--out` must be a directory path, got an empty string"):
        check_creatable_dir(path, "--out")


def test_empty_output_folders_are_refused(capsys, tmp_path, monkeypatch):
    """`quantize --out ''` and `bench --out ''` wrote their files into the current directory, exit 0."""
    monkeypatch.chdir(tmp_path)
    line = _usage(capsys, "quantize", "--out", "", "--samples", "2", "--steps", "2", "--quiet")
    assert line == "fewstep quantize: error: `--out` must be a directory path, got an empty string"
    bench = ["bench", "--model", "analytic", "--steps", "2", "--samplers", "ddim", "--num-samples", "10", "--quiet",
             "--plot", "none"]  # fmt: skip
    line = _usage(capsys, *bench, "--out", "")
    assert line == "fewstep bench: error: `--out` must be a directory path, got an empty string"
    line = _usage(capsys, *bench, "--out", str(tmp_path / "b"), "--cache-dir", "")
    assert line == "fewstep bench: error: `--cache-dir` must be a directory path, got an empty string"
    assert list(tmp_path.iterdir()) == []


# --- F2: an empty --cpr-out is refused, not skipped -------------------------------------------------------------------


def test_empty_cpr_out_is_refused(capsys, tmp_path):
    out = tmp_path / "c.safetensors"
    line = _usage(capsys, "calibrate", "dc", "--out", str(out), "--cpr-out", "", "--nfe", "3", "--guidance-scale", "1",
                  "--datapoints", "1", "--iters", "1", "--reference", "ddim:3", "--quiet")
    assert line == "fewstep calibrate dc: error: `--cpr-out` must be a file path, got an empty string"
    assert not out.exists()


# --- F3: float flags take finite numbers only -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "nan"])
def test_calibrate_dc_lr_must_be_finite(capsys, tmp_path, value):
    out = tmp_path / "c.safetensors"
    line = _usage(capsys, "calibrate", "dc", "--out", str(out), f"--lr={value}")
    assert f"argument --lr: expected a finite number, got '{value}'" in line
    assert not out.exists()


def test_no_float_flag_takes_plain_float():
    """`type=float` lets inf, 1e400 and nan through (they ended in JSON metadata as Infinity)."""
    plain = [f"{leaf.prog} {a.option_strings[0]}" for leaf in _leaf_parsers(build_parser()) for a in leaf._actions
             if a.type is float]  # fmt: skip
    assert plain == []


# --- F4: running out of memory is one line, exit code 1 ---------------------------------------------------------------

_CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 102400000000 bytes. Error code 12 (Cannot allocate memory)")


def test_cpu_out_of_memory_in_generate_is_one_line(capsys, tmp_path, monkeypatch):
    import fewstep.pipelines.generate as gen

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(_CPU_OOM)

    monkeypatch.setattr(gen, "generate", out_of_memory)
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "generate", "--num-images", "2", "--steps", "2", "--quiet", "--out", str(out))
    assert code == 1 and len(err) == 1, (code, err)
    assert err[0].startswith("fewstep generate: error: ran out of memory (RAM) (DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 102400000000 bytes.")  # fmt: skip
    assert "fewer images at once (--num-images)" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gpu_out_of_memory_names_the_gpu(capsys, monkeypatch):
    import fewstep.bench.analytic_bench as analytic

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nSee the documentation")

    monkeypatch.setattr(analytic, "run_analytic_bench", out_of_memory)
    code, err = run_cli(capsys, "bench", "--steps", "2", "--samplers", "ddim", "--quiet")
    assert code == 1 and len(err) == 1, (code, err)
    assert err[0].startswith("fewstep bench: error: ran out of GPU memory (CUDA out of memory. Tried to allocate "
                             "20.00 GiB.); use a smaller --batch-size")  # fmt: skip


def test_memory_error_in_a_bench_grid_leaves_no_folder(capsys, tmp_path, monkeypatch):
    import fewstep.bench.runner as runner

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 74.5 GiB for an array with shape (100000, 100000)")

    monkeypatch.setattr(runner, "run_grid", out_of_memory)
    out = tmp_path / "new" / "grid"
    code, err = run_cli(capsys, "bench", "--model", "analytic", "--steps", "2", "--samplers", "ddim", "--plot", "none",
                        "--quiet", "--out", str(out))
    assert code == 1 and len(err) == 1, (code, err)
    assert err[0].startswith("fewstep bench: error: ran out of memory (RAM) (Unable to allocate 74.5 GiB")
    assert not (tmp_path / "new").exists()


def test_other_runtime_errors_keep_their_traceback(capsys, monkeypatch):
    """Only out-of-memory errors are turned into a message: a real bug must still show where it happened."""
    import fewstep.bench.analytic_bench as analytic

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(analytic, "run_analytic_bench", bug)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        run_cli(capsys, "bench", "--steps", "2", "--samplers", "ddim", "--quiet")


# --- F5: a class list longer than the images is refused (a shorter one is cycled) -------------------------------------


def test_class_list_longer_than_the_images_is_refused(capsys, tmp_path):
    out = str(tmp_path / "a.png")
    line = _usage(capsys, "generate", "--steps", "2", "--num-images", "2", "--class", "3,3,7", "--quiet", "--out", out)
    assert "--class 3,3,7 lists 3 classes for 2 image(s) (--num-images 2): one class per image" in line
    line = _usage(capsys, "generate", "--steps", "2", "--class", "0,1,2,3,4,5,6,7,8,9,1", "--quiet", "--out", out)
    assert "lists 11 classes for 10 image(s) (--num-images 10, the default)" in line
    for task in ("classifier", "edit"):
        line = _usage(capsys, "generate", "--model", "digits-flow", "--task", task, "--steps", "2", "--num-images",
                      "1", "--class", "1,2", "--quiet", "--out", out)
        assert "--class 1,2 lists 2 classes for 1 image(s) (--num-images 1)" in line
    assert not (tmp_path / "a.png").exists()


def test_source_class_longer_than_the_source_tiles_is_refused(capsys, tmp_path):
    source = tmp_path / "src.png"
    Image.fromarray(np.zeros((16, 48), dtype=np.uint8)).save(source)  # 3 tiles of 16x16
    edit = ["generate", "--model", "digits-flow", "--task", "edit", "--steps", "2", "--source", str(source), "--quiet",
            "--out", str(tmp_path / "a.png")]  # fmt: skip
    line = _usage(capsys, *edit, "--source-class", "1,2,3,4")
    assert f"--source-class 1,2,3,4 lists 4 classes for the 3 tile(s) of --source {str(source)!r}" in line
    line = _usage(capsys, *edit, "--source-class", "1", "--class", "5,6,7,8")
    assert "--class 5,6,7,8 lists 4 classes for the 3 tile(s) of --source" in line
    assert not (tmp_path / "a.png").exists()


def test_a_shorter_class_list_is_still_cycled(capsys, tmp_path):
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "generate", "--steps", "2", "--num-images", "3", "--class", "7", "--quiet",
                        "--out", str(out))
    assert code == 0 and err == [] and out.exists()


# --- M1: messages name the flag, not the Python argument --------------------------------------------------------------


def test_steps_beyond_the_training_timesteps_name_the_flag(capsys, tmp_path):
    out = str(tmp_path / "a.png")
    line = _usage(capsys, "generate", "--steps", "1000000000000", "--num-images", "1", "--quiet", "--out", out)
    assert line == ("fewstep generate: error: --steps must be <= 1000 (the model's training timesteps), got "
                    "1000000000000")  # fmt: skip
    line = _usage(capsys, "generate", "--model", "digits-flow", "--task", "sr", "--steps", "2000", "--quiet", "--out",
                  out)
    assert "--steps must be <= 1000 (the model's training timesteps), got 2000" in line
    line = _usage(capsys, "generate", "--task", "sr", "--steps", "600", "--quiet", "--out", out)
    assert ("--steps 600 with --strength 0.5 (the default) runs the last 600 steps of a 1200-step schedule, more than "
            "the model's 1000 training timesteps") in line  # fmt: skip
    assert "num_inference_steps" not in line


@pytest.mark.parametrize("task", ["classifier", "edit"])
def test_class_ids_out_of_range_name_the_flag(capsys, tmp_path, task):
    """FlowChef's errors named its arguments (`labels`, `target_classes`)."""
    line = _usage(capsys, "generate", "--model", "digits-flow", "--task", task, "--steps", "2", "--num-images", "2",
                  "--class", "12", "--quiet", "--out", str(tmp_path / "a.png"))
    assert line == "fewstep generate: error: --class must list class ids in 0..9 (the model's classes), got 12"


def test_source_class_out_of_range_names_the_flag(capsys, tmp_path):
    source = tmp_path / "src.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(source)
    line = _usage(capsys, "generate", "--model", "digits-flow", "--task", "edit", "--steps", "2", "--source",
                  str(source), "--source-class", "11", "--quiet", "--out", str(tmp_path / "a.png"))
    assert "--source-class must list class ids in 0..9 (the model's classes), got 11" in line


def test_ems_grid_flags_are_named(capsys, tmp_path):
    out = str(tmp_path / "e.safetensors")
    line = _usage(capsys, "calibrate", "ems", "--intervals", "1", "--samples", "4", "--out", out, "--quiet")
    assert "argument --intervals: expected an integer >= 2, got 1" in line
    small = ["calibrate", "ems", "--samples", "4", "--intervals", "2", "--out", out, "--quiet"]
    line = _usage(capsys, *small, "--t-start", "-5")
    assert line == ("fewstep calibrate ems: error: need 0.0 <= --t-end < --t-start <= 999.0, got --t-start=-5.0, "
                    "--t-end=0.0")  # fmt: skip
    line = _usage(capsys, *small, "--t-start", "10", "--t-end", "500")
    assert "got --t-start=10.0, --t-end=500.0" in line and "t_start" not in line
    assert not (tmp_path / "e.safetensors").exists()


# --- M2: errors name the subcommand -----------------------------------------------------------------------------------


def test_unknown_options_point_at_the_subcommand_help(capsys, tmp_path):
    line = _usage(capsys, "generate", "--bogus-flag", "--out", str(tmp_path / "a.png"))
    assert line == "fewstep generate: error: unrecognized arguments: --bogus-flag (see fewstep generate --help)"
    line = _usage(capsys, "calibrate", "dc", "--out", str(tmp_path / "c.safetensors"), "extra")
    assert line == "fewstep calibrate dc: error: unrecognized arguments: extra (see fewstep calibrate dc --help)"


def test_calibrate_errors_name_the_full_subcommand(capsys, tmp_path):
    line = _usage(capsys, "calibrate", "dc", "--out", str(tmp_path / "c.bin"))
    assert line.startswith("fewstep calibrate dc: error: --out ")
    line = _usage(capsys, "calibrate", "ems", "--out", str(tmp_path / "e.npz"))
    assert line.startswith("fewstep calibrate ems: error: --out ")


# --- M3: --help shows every default -----------------------------------------------------------------------------------


def test_help_shows_every_default():
    missing = [f"{leaf.prog} {a.option_strings[0]} (default {a.default!r})" for leaf in _leaf_parsers(build_parser())
               for a in leaf._actions
               if a.option_strings and not a.required and a.default not in (None, False, argparse.SUPPRESS)
               and "default" not in (a.help or "")]  # fmt: skip
    assert missing == []


def test_help_of_flags_whose_default_is_none_but_set_in_code():
    actions = {(leaf.prog, s): a for leaf in _leaf_parsers(build_parser()) for a in leaf._actions
               for s in a.option_strings}  # fmt: skip
    assert "(default 0.5)" in actions["fewstep generate", "--strength"].help
    samplers = actions["fewstep bench", "--samplers"].help
    assert "default: all" not in samplers
    from fewstep import samplers as sampler_registry

    assert f"default: {', '.join(sampler_registry.names('diffusion', standalone=True))};" in samplers
    assert "dpm-solver-v3 when every --model ships its EMS" in samplers and "s3 runs only when named" in samplers
