"""Fixes of the third CLI probe: flags silently ignored (posterior flags on FlowChef, a reference coarser than the
samplers), schedules of another model accepted, class lists refused for repeating, Ctrl-C while torch loads,
divergence errors that named Python arguments, help texts that disagreed with what the flags do."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import run_cli as _run

from fewstep.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
S3_ASSETS = ROOT / "fewstep" / "assets" / "s3"


def _usage(capsys, *args: str) -> str:
    code, err = _run(capsys, *args)
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def _subparser(command: str, target: str | None = None) -> argparse.ArgumentParser:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    if target is not None:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[target]
    return sub


def _help(command: str, flag: str, target: str | None = None) -> str | None:
    return next(a for a in _subparser(command, target)._actions if flag in a.option_strings).help


def _cli_env() -> dict:
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


# --- 2: posterior flags on the FlowChef path -------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sr", "inpaint", "classifier"])
def test_posterior_flags_are_refused_on_the_flowchef_path(capsys, tmp_path, task):
    """They were ignored (same image as without them, exit 0) on FlowChef's inverse tasks and classifier steering."""
    out = tmp_path / "a.png"
    line = _usage(capsys, "generate", "--model", "digits-flow", "--task", task, "--strength", "0.5", "--stsl-eta", "1",
                  "--posterior-step", "9", "--gluing", "0.3", "--steps", "4", "--num-images", "2", "--out", str(out))
    assert f"--posterior-step, --stsl-eta, --gluing, --strength are for posterior sampling, not --task {task}" in line
    assert "--flowchef-step" in line and not out.exists()
    line = _usage(capsys, "generate", "--model", "digits-flow", "--task", task, "--stsl-probes", "2", "--out", str(out))
    assert "--stsl-probes are for posterior sampling" in line


# --- 3: an s3 schedule of another model ------------------------------------------------------------------------------


def test_s3_schedule_of_another_model_is_refused_on_the_embedded_model(capsys, tmp_path):
    """analytic and digits-eps share the noise-schedule fingerprint: only the model name tells them apart."""
    from fewstep.pipelines.defaults import default_sampler_options

    assert default_sampler_options("digits-eps", "s3", with_schedule=True)["s3_model"] == "digits-eps"
    argv = ["generate", "--sampler", "s3", "--steps", "5", "--num-images", "2", "--quiet"]
    line = _usage(capsys, *argv, "--sampler-option", "s3_schedule=analytic", "--out", str(tmp_path / "x.png"))
    assert "searched for model 'analytic', not 'digits-eps'" in line
    assert not (tmp_path / "x.png").exists()
    # a schedule that records no model still runs; so does one whose model the user names with s3_model
    schedule = json.loads((S3_ASSETS / "digits-eps-nfe5.json").read_text())
    del schedule["metadata"]["model"]
    (tmp_path / "anon.json").write_text(json.dumps(schedule))
    for options in (["s3_schedule=" + str(tmp_path / "anon.json")], [], ["s3_schedule=analytic", "s3_model=analytic"]):
        out = tmp_path / f"ok{len(options)}.png"
        flags = [f for o in options for f in ("--sampler-option", o)]
        code, err = _run(capsys, *argv, *flags, "--out", str(out))
        assert code == 0 and out.is_file(), (options, err)


def test_s3_on_load_default_still_runs_the_shipped_schedule():
    import torch

    from fewstep.pipelines import load_default

    pipe = load_default("digits-eps", sampler="s3")
    assert pipe.scheduler.config.s3_model == "digits-eps"
    images = pipe([3, 7], num_inference_steps=4, output_type="pt").images
    assert torch.isfinite(images).all()


def test_search_refuses_an_init_schedule_of_another_model(capsys, tmp_path):
    """--init compared only the noise schedule, which analytic and digits-eps share; it is refused before the
    objective is built, and nothing is written."""
    out = tmp_path / "s.json"
    line = _usage(capsys, "search", "--model", "digits-eps", "--nfe", "4", "--init",
                  str(S3_ASSETS / "analytic-nfe4.json"), "--out", str(out))
    assert "nfe4.json' was searched for another model (analytic); this search is for --model digits-eps" in line
    line = _usage(capsys, "search", "--model", "analytic", "--nfe", "4", "--init",
                  str(S3_ASSETS / "digits-eps-nfe4.json"), "--out", str(out))
    assert "was searched for another model (digits-eps)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_search_warm_starts_from_a_schedule_that_records_no_model(capsys, tmp_path):
    schedule = json.loads((S3_ASSETS / "analytic-nfe4.json").read_text())
    del schedule["metadata"]["model"]
    (tmp_path / "anon.json").write_text(json.dumps(schedule))
    out = tmp_path / "s.json"
    code, err = _run(capsys, "search", "--model", "analytic", "--nfe", "4", "--budget", "8", "--quiet", "--init",
                     str(tmp_path / "anon.json"), "--out", str(out))
    assert code == 0 and out.is_file(), err


# --- 4: class lists repeat -------------------------------------------------------------------------------------------


def test_class_lists_may_repeat_grid_lists_may_not(capsys, tmp_path):
    args = _subparser("generate").parse_args(["--class", "8,8,1", "--source-class", "3,3,7"])
    assert args.classes == [8, 8, 1] and args.source_classes == [3, 3, 7]
    out = tmp_path / "c.png"
    code, err = _run(capsys, "generate", "--class", "3,3,7", "--steps", "2", "--num-images", "3", "--quiet", "--out",
                     str(out))
    assert code == 0 and out.is_file(), err
    assert "'2,2' repeats 2" in _usage(capsys, "bench", "--steps", "2,2")
    assert "'0,0' repeats 0" in _usage(capsys, "bench", "--classes", "0,0")


def test_edit_with_repeated_source_and_target_classes(capsys, tmp_path):
    import numpy as np
    from PIL import Image

    src = tmp_path / "src.png"  # two 16x16 tiles, both labelled 3, each turned into an 8
    Image.fromarray(np.zeros((16, 32), dtype="uint8")).save(src)
    out = tmp_path / "e.png"
    code, err = _run(capsys, "generate", "--model", "digits-flow", "--task", "edit", "--source", str(src),
                     "--source-class", "3,3", "--class", "8,8", "--steps", "2", "--quiet", "--out", str(out))
    assert code == 0 and out.is_file(), err


# --- 5: Ctrl-C while the subcommands import torch ---------------------------------------------------------------------


def test_importing_the_cli_imports_no_torch():
    code = ("import sys\nimport fewstep.cli\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "from fewstep.cli import main\n"
            "for argv in (['--help'], ['bench', '--help'], ['search', '--help'], ['calibrate', 'dc', '--help']):\n"
            "    assert main(argv) == 0, argv\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout and "--reference-steps" in proc.stdout


def test_interrupt_while_the_parser_is_built_is_one_line(capsys, monkeypatch):
    from fewstep import cli

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    for argv, line in ((["generate", "--out", "x.png"], "fewstep generate: interrupted"),
                       (["--version"], "fewstep: interrupted")):
        try:
            code = main(argv)
        except KeyboardInterrupt:  # not pytest's own Ctrl-C: the test fails instead of ending the session
            pytest.fail(f"{argv}: KeyboardInterrupt escaped main()")
        assert code == 130 and capsys.readouterr().err.strip() == line


def _interrupt_while_torch_imports(out) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "fewstep.cli", "generate", "--steps", "50",
                             "--quiet", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_cli_env(), cwd=out.parent)  # fmt: skip
    try:
        for line in proc.stderr:
            if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip().split(".")[0] == "torch":
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    return code, rest


def test_sigint_while_torch_imports_is_one_line(tmp_path):
    """The signal is sent once ``-X importtime`` reports the first torch module: torch is then being imported,
    which the command line now does inside ``main``'s handler. (A third-party module's bare ``except:`` at import
    time can swallow the KeyboardInterrupt before it reaches fewstep -- seen once on a loaded machine: the run then
    completes, exit 0 -- so such a run is tried again, up to three times.)"""
    out = tmp_path / "x.png"
    for _ in range(3):
        code, rest = _interrupt_while_torch_imports(out)
        if code != 0:
            break
        out.unlink(missing_ok=True)
    lines = [line for line in rest.splitlines() if line.strip() and not line.startswith("import time:")]
    assert code == 130 and lines == ["fewstep generate: interrupted"], (code, lines)
    assert not out.exists()


# --- 7: divergence errors name the flags ----------------------------------------------------------------------------


def test_divergence_errors_name_the_flags(capsys, tmp_path):
    out = tmp_path / "x.png"
    code, err = _run(capsys, "generate", "--task", "sr", "--posterior-step", "1e30", "--steps", "3", "--num-images",
                     "2", "--quiet", "--out", str(out))
    assert code == 1 and len(err) == 1, err
    assert "stsl produced NaN/Inf; lower --posterior-step (got 1e+30)" in err[0] and "step_size" not in err[0]
    code, err = _run(capsys, "generate", "--task", "sr", "--posterior", "psld", "--posterior-step", "1e30", "--steps",
                     "3", "--num-images", "2", "--quiet", "--out", str(out))
    assert code == 1 and len(err) == 1 and "--posterior-step (got 1e+30) or --gluing (got 0.1)" in err[0], err
    code, err = _run(capsys, "generate", "--guidance-scale", "1e30", "--steps", "3", "--num-images", "2", "--quiet",
                     "--out", str(out))
    assert code == 1 and len(err) == 1, err
    assert "NaN/Inf at step" in err[0] and "(--sampler unipc)" in err[0]
    assert "lower --guidance-scale (got 1e+30)" in err[0] and "check_finite" not in err[0]
    assert not out.exists()


# --- 8: help texts ----------------------------------------------------------------------------------------------------


def test_help_texts_agree_with_the_flags():
    from fewstep.cli.bench import APPLIES

    assert "pipeline directories" in _help("bench", "--model")
    for key, kinds in APPLIES.items():  # a help that names the models it is for names all of them
        text = _help("bench", "--" + key.replace("_", "-")) or ""
        if "digits models" in text and "pipeline" in kinds:
            assert "pipeline directories" in text, key
    assert "digits-flow" in _help("calibrate", "--model", "ems")
    assert "--task edit" in _help("generate", "--class")
    assert _help("search", "--seed") and _help("generate", "--dtype")
    assert ">= 2" in _help("search", "--nfe")


def test_search_nfe_type_matches_its_help(capsys, tmp_path):
    line = _usage(capsys, "search", "--model", "analytic", "--nfe", "1", "--out", str(tmp_path / "s.json"))
    assert "argument --nfe: expected an integer >= 2, got 1" in line


# --- 9: the bench reference is finer than the samplers ---------------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "5", "--reference-steps", "2"], "--reference-steps 2: the many-step reference solve needs more steps "
                                                  "than the largest --steps (5)"),
    (["--steps", "3,5", "--reference-steps", "5"], "--reference-steps 5: "),
    (["--steps", "250"], "--reference-steps 200 (the default): the many-step reference solve needs more steps than "
                         "the largest --steps (250)"),
])  # fmt: skip
def test_bench_refuses_a_reference_no_finer_than_the_samplers(capsys, tmp_path, extra, message):
    line = _usage(capsys, "bench", "--model", "digits-eps", *extra, "--out", str(tmp_path / "b"))
    assert message in line
    assert not (tmp_path / "b").exists()


# --- 10: scripts/eval_digits.py --num-per-class ---------------------------------------------------------------------


def test_eval_digits_refuses_one_sample_per_class(capsys, monkeypatch):
    """The script run as ``python scripts/eval_digits.py --num-per-class 1`` runs it (``__main__``, its folder first
    on ``sys.path``), in this process: a subprocess spent ~30 s importing torch and diffusers for a usage error."""
    import runpy

    script = ROOT / "scripts" / "eval_digits.py"
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), "--num-per-class", "1"])
    with pytest.raises(SystemExit) as info:  # any other exception (a traceback) fails the test
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith("argument --num-per-class: expected an integer >= 2, got 1"), err


@pytest.mark.parametrize("argv,message", [
    (["--sampler", "foo"], "unknown sampler 'foo'; available: ddim"),
    (["--model", "digits-flow", "--sampler", "mrs"], "mrs"),
    (["--guidance-scale", "nan"], "`guidance_scale` must be a finite number >= 0, got nan"),
    (["--sampler", "s3", "--steps", "5", "7"], "schedule for NFE 7"),  # refused before NFE 5 runs
])  # fmt: skip
def test_eval_digits_bad_values_are_usage_errors(argv, message, capsys, monkeypatch):
    """An unknown --sampler (or one that does not fit the model, or a NaN scale) ended in a traceback."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import eval_digits
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    steps = [] if "--steps" in argv else ["--steps", "2"]
    monkeypatch.setattr(sys, "argv", ["eval_digits.py", *steps, "--num-per-class", "2", *argv])
    with pytest.raises(SystemExit) as info:
        eval_digits.main()
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was evaluated
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("eval_digits.py: error: ") and message in line


def test_bench_names_models_by_the_embedded_list_not_a_prefix():
    """A pipeline directory called ``digits-sd`` was taken for an embedded digits model (``--prompts`` refused)."""
    from fewstep.cli.bench import _model_kind

    assert [_model_kind(m) for m in ("analytic", "digits-eps", "digits-flow", "digits-sd", "/x/digits-eps2")] == [
        "analytic", "digits", "digits", "pipeline", "pipeline"]


@pytest.mark.parametrize("value", ["", "  "])
def test_bench_json_empty_path_is_a_usage_error(capsys, value):
    """``--json ''`` was silently ignored (nothing written, exit 0)."""
    message = _usage(capsys, "bench", "--model", "analytic", "--steps", "5", "--json", value)
    assert f"--json must be a file path or '-' (stdout), got {value!r}" in message


def test_a_closed_output_pipe_ends_quietly(capsys, monkeypatch):
    """`fewstep list | head -1` ended in a BrokenPipeError traceback: the reader closing the pipe now ends the
    command quietly with the shell's SIGPIPE status (141), no traceback and no message."""

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no file descriptor")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["list"]) == 141
    assert capsys.readouterr().err == ""
