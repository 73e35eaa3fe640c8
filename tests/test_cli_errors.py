"""Usage errors of the ``fewstep`` command found by probing it: one line on stderr, exit code 2 (1 for a run that
diverged), no traceback and no file or folder left behind."""

from __future__ import annotations

import os

import pytest

from fewstep.cli import main


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _usage(capsys, *args: str) -> str:
    """The single stderr line of a usage error (argparse's own included)."""
    try:
        code, err = _run(capsys, *args)
    except SystemExit as exc:  # argparse exits by itself
        code, err = exc.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def test_argparse_errors_are_one_line(capsys, tmp_path):
    line = _usage(capsys, "generate", "--steps", "abc", "--out", str(tmp_path / "x.png"))
    assert line == ("fewstep generate: error: argument --steps: expected an integer, got 'abc' "
                    "(see fewstep generate --help)")
    line = _usage(capsys, "generate", "--seed", str(10**23), "--out", str(tmp_path / "x.png"))
    assert "argument --seed: must be an integer in [0, 2**63 - 1]" in line
    assert "error: argument" in _usage(capsys, "calibrate", "dc", "--nfe", "x", "--out", "a.safetensors")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a directory root cannot write to)")
def test_outputs_where_no_file_can_be_created_fail_before_any_work(capsys):
    """os.access says yes to root for /proc; the check creates and removes a probe file instead."""
    assert "`--out` '/proc/x.png': cannot create files in '/proc'" in _usage(capsys, "generate", "--out", "/proc/x.png")
    assert "`--state` '/proc/st.json'" in _usage(capsys, "search", "--model", "analytic", "--nfe", "3", "--state",
                                                 "/proc/st.json", "--out", "/tmp/fewstep-never.json")  # fmt: skip
    assert "`--out` '/proc/benchx'" in _usage(capsys, "bench", "--model", "digits-eps", "--out", "/proc/benchx")


def test_empty_and_mistyped_outputs(capsys, tmp_path):
    assert "`--out` must be a file path, got an empty string" in _usage(capsys, "generate", "--out", "")
    line = _usage(capsys, "calibrate", "dc", "--out", str(tmp_path / "r.png"))
    assert "--out" in line and "must end in .safetensors" in line
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize(("content", "match"), [
    ("{}", "must be a JSON object with the pipeline's \"_class_name\""),
    ("[]", "must be a JSON object"),
    ('{"_class_name": "NoSuchPipeline"}', "names pipeline class 'NoSuchPipeline', which neither diffusers"),
])  # fmt: skip
def test_malformed_pipeline_directories(capsys, tmp_path, content, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(content)
    assert match in _usage(capsys, "generate", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_flags_that_would_be_ignored_are_refused(capsys, tmp_path):
    out = str(tmp_path / "x.png")
    line = _usage(capsys, "generate", "--task", "inpaint", "--posterior", "dps", "--sampler", "unipc", "--out", out)
    assert "--sampler do not apply to posterior sampling" in line
    line = _usage(capsys, "generate", "--task", "sr", "--sampler-option", "solver_order=3", "--out", out)
    assert "--sampler-option do not apply to posterior sampling" in line
    line = _usage(capsys, "generate", "--model", "digits-flow", "--task", "inpaint", "--guidance", "apg", "--out", out)
    assert "--guidance apg does not apply to FlowChef --task inpaint" in line
    assert "--quant-mode need --quant DIR" in _usage(capsys, "generate", "--quant-mode", "int8", "--out", out)
    bench = ["bench", "--model", "digits-eps", "--out", str(tmp_path / "b")]
    assert "--schedule applies to --model analytic" in _usage(capsys, *bench, "--schedule", "flow")
    assert "--image-size applies to pipeline directories" in _usage(capsys, *bench, "--image-size", "64")
    assert not (tmp_path / "b").exists()


def test_a_failed_bench_leaves_no_empty_folder(capsys, tmp_path):
    line = _usage(capsys, "bench", "--model", "digits-eps", "--features", "inception", "--inception-weights",
                  str(tmp_path / "nope.pth"), "--num-per-class", "1", "--steps", "2", "--out", str(tmp_path / "b"))
    assert "weights not found" in line and not (tmp_path / "b").exists()


def test_diverged_images_are_not_written(capsys, tmp_path):
    out = tmp_path / "x.png"
    code, err = _run(capsys, "generate", "--model", "digits-flow", "--task", "inpaint", "--flowchef-step", "1e300",
                     "--steps", "2", "--num-images", "2", "--quiet", "--out", str(out))  # fmt: skip
    assert code == 1 and len(err) == 1 and "hold NaN/Inf (the sampling diverged" in err[0]
    assert not out.exists()


def test_dc_ratio_files_default_to_the_digits_cfg_scale(capsys, tmp_path):
    from pathlib import Path

    import fewstep

    shipped = sorted((Path(fewstep.__file__).parent / "assets" / "dc-solver").glob("*ratios*.safetensors"))
    if not shipped:
        pytest.skip("no shipped DC ratio table")
    ratios = shipped[0]
    out = tmp_path / "x.png"
    code, err = _run(capsys, "generate", "--sampler", "dc-solver", "--steps", "5", "--num-images", "2", "--quiet",
                     "--sampler-option", f"dc_ratios_file={ratios}", "--out", str(out))  # fmt: skip
    assert code == 0 and out.is_file(), err
