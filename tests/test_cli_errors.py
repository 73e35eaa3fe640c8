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
    assert "lower --flowchef-step (got 1e+300)" in err[0]  # the flag, not the library's "step size"
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


@pytest.mark.parametrize("argv,message", [
    # found by the second CLI probe: each ran (flags silently ignored, repeated cells, wrong DC scale), or printed a
    # traceback, or named an internal parameter instead of the flag
    (["bench", "--samplers", "ddim,ddim"], "argument --samplers: 'ddim,ddim' repeats ddim; give each value once"),
    (["bench", "--steps", "2,2,3"], "argument --steps: '2,2,3' repeats 2"),
    (["bench", "--model", "digits-eps", "--guidance", "cfg:3,cfg:3.0", "--out", "o"], "repeats cfg:3"),
    (["bench", "--model", "digits-eps", "--classes", "0", "--num-per-class", "1", "--out", "o"],
     "--num-per-class 1 x --classes 1: the digits metrics need at least 2 samples per cell"),
    (["bench", "--samplers", "dpm-solver-v3"], "dpm-solver-v3 needs EMS tables estimated for this mixture"),
    (["generate", "--device", "mps", "--out", "{tmp}/x.png"], "--device 'mps' (mps) is not supported here"),
    (["generate", "--device", "meta", "--out", "{tmp}/x.png"], "--device 'meta' (meta) is not supported here"),
    (["generate", "--flowchef-step", "1", "--out", "{tmp}/x.png"], "--flowchef-step: FlowChef options, for --model"),
    (["generate", "--model", "digits-flow", "--flowchef-optimizer", "adam", "--out", "{tmp}/x.png"],
     "--flowchef-optimizer: FlowChef options"),
    (["generate", "--noise-std", "0.5", "--out", "{tmp}/x.png"], "--noise-std adds noise to the measurement of an "
                                                                 "inverse task"),
    (["generate", "--measurement", "{tmp}/m.png", "--out", "{tmp}/x.png"],
     "--measurement without --task is for the restoration model digits-mr"),
    (["generate", "--sampler", "flowchef", "--out", "{tmp}/x.png"], "use --model digits-flow --task"),
    (["generate", "--sampler", "dc-solver", "--sampler-option", "dc_cpr=digits-eps", "--guidance", "apg",
      "--out", "{tmp}/x.png"], "with --guidance apg this run has no CFG scale to look them up by"),
    (["search", "--model", "analytic", "--nfe", "3", "--guidance-scale", "7", "--out", "{tmp}/s.json"],
     "--guidance-scale: for --model digits-eps"),
    (["search", "--nfe", "3", "--guidance-scale", "-1", "--out", "{tmp}/s.json"], "argument --guidance-scale"),
    (["calibrate", "ems", "--sample-steps", "5", "--out", "{tmp}/e.safetensors"],
     "--sample-steps: for text-to-image models (with --prompts)"),
    (["calibrate", "ems", "--t-start", "nan", "--out", "{tmp}/e.safetensors"], "argument --t-start"),
    (["quantize", "--quiet", "--exclude", "nomatch*", "--out", "{tmp}/q"],
     "--exclude 'nomatch*' matches no layer of digits-eps"),
])
def test_second_probe_usage_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    line = _usage(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_bench_refuses_a_results_file_that_is_not_one(capsys, tmp_path):
    import json

    out = tmp_path / "b"
    argv = ["bench", "--quiet", "--model", "digits-eps", "--num-per-class", "1", "--classes", "0,1",
            "--reference-steps", "3", "--plot", "none", "--samplers", "ddim", "--steps", "2", "--out", str(out)]
    for payload in ([], {"cells": [1, 2]}, {"config": {}, "cells": {"k": {"fd": "oops"}}}):
        out.mkdir(exist_ok=True)
        (out / "results.json").write_text(json.dumps(payload))
        assert "is not a fewstep bench results file" in _usage(capsys, *argv)


def test_ctrl_c_is_one_line_and_exit_130(capsys, tmp_path, monkeypatch):
    """Ctrl-C printed a KeyboardInterrupt traceback (outputs are atomic, so nothing half-written is left)."""
    from fewstep import cli

    build = cli.build_parser

    def interrupted(args):
        raise KeyboardInterrupt

    def parser_with_interrupted_generate(*args):
        parser = build(*args)
        for action in parser._subparsers._group_actions:
            action.choices["generate"].set_defaults(func=interrupted)
        return parser

    monkeypatch.setattr(cli, "build_parser", parser_with_interrupted_generate)
    assert main(["generate", "--out", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err.strip() == "fewstep generate: interrupted"


def test_analytic_exact_floor_does_not_depend_on_the_sampler_list():
    from fewstep.bench.analytic_bench import run_analytic_bench

    floors = [run_analytic_bench(samplers=s, steps=[2], num_samples=50, progress=False)[1]["exact_fd"]
              for s in (["ddim"], ["ddim", "unipc"])]
    assert floors[0] == floors[1]
