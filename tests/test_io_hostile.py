"""Outputs under hostile conditions (found by probing): a full disk, two runs into one folder, an output that is an
input, output paths that cannot be written found out only after the work, undecodable or damaged artifacts, Ctrl-C
while the command line starts, and an output that is a symbolic link."""

from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import run_cli as _run

from fewstep._io import atomic_write
from fewstep.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- 1: a full disk while writing an output ----------------------------------------------------------------------


def test_atomic_write_names_the_file_on_a_full_disk(tmp_path):
    """The writer's OSError (and safetensors' own error type, which is no OSError) comes back as an OSError that
    names the output; the temporary file is removed."""
    from safetensors import SafetensorError

    target = tmp_path / "out.json"
    with pytest.raises(OSError, match=r"cannot write '.*out\.json': No space left on device") as info:
        atomic_write(target, _full_disk)
    assert info.value.errno == errno.ENOSPC

    def safetensors_full(p):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError, match=r"cannot write '.*out\.json': No space left on device") as info:
        atomic_write(target, safetensors_full)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_cli_full_disk_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """`fewstep search` on a full disk: one line naming the file and the OS error, exit 1 (not a usage error)."""
    monkeypatch.setattr(Path, "write_text", _full_disk)
    out = tmp_path / "s.json"
    code, err = _run(capsys, "search", "--model", "analytic", "--nfe", "3", "--budget", "2", "--quiet",
                     "--out", str(out))
    assert code == 1 and len(err) == 1, (code, err)
    assert err[0].startswith("fewstep search: error: cannot write '") and "No space left on device" in err[0]
    assert str(tmp_path) in err[0] and list(tmp_path.iterdir()) == []


def _tiny_quantized():
    from torch import nn

    from fewstep import quant

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, sample, timestep, **kwargs):
            return self.b(torch.relu(self.a(sample)))

    torch.manual_seed(0)
    calibration = quant.CalibrationSet(sample=torch.randn(4, 1, 4, 4), timestep=torch.arange(4))
    return quant.quantize(Tiny(), calibration, quant.QuantConfig(act_grid=5, weight_grid=5, exclude=[]))


def test_failed_quantized_save_removes_the_folders_it_made(tmp_path, monkeypatch):
    """`fewstep quantize --out DIR` on a full disk left the empty DIR it had created."""
    import safetensors.torch
    from safetensors import SafetensorError

    from fewstep import quant

    model = _tiny_quantized()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(OSError, match=r"cannot write '.*quant\.safetensors': No space left on device"):
            quant.save_quantized(model, tmp_path / "new" / "q")
    assert list(tmp_path.iterdir()) == []
    with monkeypatch.context() as m:  # quant.json fails: the new tensors alone are no save either
        m.setattr(Path, "write_text", _full_disk)
        with pytest.raises(OSError, match=r"cannot write '.*quant\.json'"):
            quant.save_quantized(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that existed is kept
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(OSError):
            quant.save_quantized(model, tmp_path / "kept")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert quant.save_quantized(model, tmp_path / "kept").is_dir()  # and a save that works still works


# --- 2: two bench runs into one --out ----------------------------------------------------------------------------

BENCH = ["bench", "--model", "analytic", "--samplers", "ddim", "--steps", "2", "--num-samples", "20", "--quiet",
         "--plot", "none"]


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl.flock")
def test_a_second_bench_into_the_same_out_is_refused(tmp_path, capsys, monkeypatch):
    """Two runs into one --out each rewrote results.json with their own rows: one run's rows were lost."""
    import fcntl

    from fewstep.bench import runner

    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out / runner.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
    try:
        code, err = _run(capsys, *BENCH, "--out", str(out))
    finally:
        os.close(held)
    assert code == 2 and err == [f"fewstep bench: error: another fewstep bench is writing results to {str(out)!r}; "
                                 "wait for it or use another --out"]
    assert [p.name for p in out.iterdir()] == [runner.LOCK_FILE]  # (the test's own lock file) no results written
    (out / runner.LOCK_FILE).unlink()

    # while a run computes, a second one (here from within the first) is refused; the lock file is no result
    seen = []
    real_run = runner._run_analytic

    def run_and_try_a_second(cell, config):
        seen.append(sorted(p.name for p in out.iterdir()))
        with pytest.raises(ValueError, match="another fewstep bench is writing results to"):
            runner.run_grid(runner.BenchConfig(models=["analytic"], samplers=["unipc"], steps=[2], num_samples=20),
                            out, progress=False)
        return real_run(cell, config)

    monkeypatch.setattr(runner, "_run_analytic", run_and_try_a_second)
    assert main([*BENCH, "--out", str(out)]) == 0
    assert seen == [[runner.LOCK_FILE]]
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md"]
    assert list(json.loads((out / "results.json").read_text())["cells"]) == ["analytic|ddim|2|-"]


def test_a_grid_refused_after_its_folder_was_made_leaves_none(tmp_path, monkeypatch):
    """The output folder is made (to hold the lock) before the stored results are read: a run that fails from
    there to its first written row removes the folders it made, the lock file included."""
    from fewstep.bench import runner

    def broken(*args):
        raise ValueError("refused")

    monkeypatch.setattr(runner, "check_same_on_all_processes", broken)
    with pytest.raises(ValueError, match="refused"):
        runner.run_grid(runner.BenchConfig(models=["analytic"], samplers=["ddim"], steps=[2], num_samples=20),
                        tmp_path / "a" / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- 3: --out equal to an input file -----------------------------------------------------------------------------


def test_generate_refuses_an_out_that_is_its_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meas = tmp_path / "meas.png"
    meas.write_bytes(b"not overwritten")
    (tmp_path / "link.png").symlink_to(meas)
    for args, flag in ((["--model", "digits-flow", "--task", "inpaint", "--measurement", "meas.png"], "--measurement"),
                       (["--model", "digits-eps", "--task", "sr", "--posterior", "dps", "--measurement", "meas.png"],
                        "--measurement"),
                       (["--model", "digits-mr", "--measurement", "meas.png"], "--measurement"),
                       (["--model", "digits-flow", "--task", "edit", "--source", "meas.png", "--source-class", "1"],
                        "--source")):
        for out in ("./meas.png", str(meas), "link.png"):
            code, err = _run(capsys, "generate", "--steps", "2", "--quiet", *args, "--out", out)
            assert code == 2 and len(err) == 1, (args, out, err)
            assert f"--out {out!r} is the {flag} file 'meas.png'" in err[0]
    assert meas.read_bytes() == b"not overwritten" and (tmp_path / "link.png").is_symlink()


def test_search_refuses_an_out_or_state_that_is_an_init_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("init.json").write_text("{}")
    base = ["search", "--model", "analytic", "--nfe", "3", "--budget", "2", "--quiet", "--init", "init.json"]
    code, err = _run(capsys, *base, "--out", "./init.json")
    assert code == 2 and err == ["fewstep search: error: --out './init.json' is the --init file 'init.json': writing "
                                 "it would destroy that input; give --out another path"]
    code, err = _run(capsys, *base, "--out", "s.json", "--state", "init.json")
    assert code == 2 and "--state 'init.json' is the --init file 'init.json'" in err[0]
    Path("s.json").write_text("[]")  # an earlier result, and a link to it as the state
    os.symlink("s.json", "state-link.json")
    code, err = _run(capsys, *base, "--out", "s.json", "--state", "state-link.json")
    assert code == 2 and "--state 'state-link.json' is the --out file" in err[0]
    assert Path("init.json").read_text() == "{}" and Path("s.json").read_text() == "[]"
    assert sorted(os.listdir()) == ["init.json", "s.json", "state-link.json"]


# --- 4: the benchmark scripts write their JSON atomically ----------------------------------------------------------

SCRIPTS = ("bench_mrs", "bench_momentum", "bench_flowchef", "bench_v3")


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_scripts_write_json_atomically(name):
    """open(path, "w") truncated an existing results file first, and a failed dump left a partial one."""
    tree = ast.parse((ROOT / "scripts" / f"{name}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert not [n for n in calls if n.func.id == "open"], f"scripts/{name}.py writes with open()"
    assert [n for n in calls if n.func.id == "atomic_write"], f"scripts/{name}.py does not use atomic_write"


def test_bench_flowchef_keeps_an_existing_json_on_a_full_disk(tmp_path, monkeypatch):
    import argparse

    from _helpers import load_script

    bench = load_script("bench_flowchef")
    target = tmp_path / "rows.json"
    target.write_text("[]\n")
    args = argparse.Namespace(json=str(target), plot=None, num_images=1, flowchef_steps=2, dps_steps=2, repeats=1,
                              noise_std=0.0, seed=0, threads=1)
    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        bench._finish(args, [])
    monkeypatch.undo()
    assert target.read_text() == "[]\n" and [p.name for p in tmp_path.iterdir()] == ["rows.json"]
    bench._finish(args, [])
    assert json.loads(target.read_text())["rows"] == []


# --- 5: bench output paths checked before any cell runs ----------------------------------------------------------


def test_bench_checks_the_cache_folder_and_results_files_first(tmp_path, capsys, monkeypatch):
    from fewstep.bench import runner

    def no_cell(*args, **kwargs):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(runner, "_DigitsWorld", no_cell)
    monkeypatch.setattr(runner, "_run_analytic", no_cell)
    out = tmp_path / "cf"
    out.mkdir()
    (out / "cache").write_text("")
    digits = ["bench", "--model", "digits-eps", "--samplers", "ddim", "--steps", "2", "--num-per-class", "2",
              "--classes", "0,1", "--reference-steps", "5", "--plot", "none", "--quiet", "--out", str(out)]
    code, err = _run(capsys, *digits)
    assert code == 2 and err == [f"fewstep bench: error: --out {str(out)!r}: its cache folder {str(out / 'cache')!r} "
                                 "exists and is not a directory; remove it or give --cache-dir"]
    with pytest.raises(ValueError, match=r"`out_dir` .*cf': its cache folder .*cache' exists and is not a directory"):
        runner.run_grid(runner.BenchConfig(models=["digits-eps"], samplers=["ddim"], steps=[2], num_per_class=2,
                                           classes=[0, 1], reference_steps=5), out, progress=False)
    (out / "cache").unlink()
    (out / "results.json").mkdir()
    code, err = _run(capsys, *BENCH, "--out", str(out))
    assert code == 2 and len(err) == 1 and err[0].startswith(f"fewstep bench: error: --out {str(out)!r}: ")
    assert "results.json' exists and is not a regular file" in err[0]
    with pytest.raises(ValueError, match=r"`out_dir` .*results.json' exists and is not a regular file"):
        runner.run_grid(runner.BenchConfig(models=["analytic"], samplers=["ddim"], steps=[2], num_samples=20), out,
                        progress=False)
    assert [p.name for p in out.iterdir()] == ["results.json"]


# --- 6: undecodable JSON artifacts --------------------------------------------------------------------------------


def test_undecodable_results_and_quant_metadata_name_the_file(tmp_path, capsys):
    from fewstep.quant.artifacts import read_metadata

    out = tmp_path / "ud"
    out.mkdir()
    (out / "results.json").write_bytes(b"\xff\xfe\x00")
    code, err = _run(capsys, *BENCH, "--out", str(out))
    assert code == 2 and len(err) == 1
    assert f"results file {str(out / 'results.json')!r} is not valid JSON" in err[0]
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "quant.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "q" / "quant.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"quant\.json' is not valid JSON"):
        read_metadata(tmp_path / "q")


# --- 7: a damaged EMS checkpoint ----------------------------------------------------------------------------------


def test_damaged_ems_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fewstep.solvers.ems_estimate import EMSAccumulator

    good = tmp_path / "ck"
    EMSAccumulator(np.linspace(-3, 3, 5), (1, 2, 2), {"settings": {}}).save(good)
    with safe_open(str(good), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cases = {
        "nolam": ({k: v for k, v in tensors.items() if k != "lambdas"}, header, "it lacks the tensor.s. lambdas"),
        "badmeta": (tensors, {**header, "meta": "{bad"}, "its `meta` header is not valid JSON"),
        "listmeta": (tensors, {**header, "meta": "[1]"}, "its `meta` header must be a JSON object"),
        "shortbatches": ({**tensors, "batches": tensors["batches"][:2].clone()}, header, r"`batches` must be an "
                         r"integer tensor \[5\]"),
        "shortsums": ({**tensors, "sums": tensors["sums"][:3].clone()}, header, r"`sums` must be a float tensor"),
    }
    for name, (t, h, message) in cases.items():
        save_file(t, str(tmp_path / name), metadata=h)
        with pytest.raises(ValueError, match=rf"EMS checkpoint '.*{name}' is damaged: {message}"):
            EMSAccumulator.load(tmp_path / name)
    assert EMSAccumulator.load(good).batches.shape == (5,)


def test_ems_checkpoint_with_fewer_grid_points_than_its_settings(tmp_path):
    """Consistent tensors of fewer grid points than the checkpoint's settings say gave an IndexError traceback."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fewstep.solvers.ems_estimate import estimate_ems
    from fewstep.solvers.schedules import VPSchedule

    schedule = VPSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                       "beta_schedule": "linear", "prediction_type": "epsilon"})
    data = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))

    def eps_fn(x, lam, dl):
        return 0.5 * x * torch.exp(-dl)

    ckpt = tmp_path / "ck"
    kwargs = dict(num_intervals=3, batch_size=4, checkpoint=ckpt, progress=False)
    estimate_ems(eps_fn, data, schedule, **kwargs)
    with safe_open(str(ckpt), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k)[:2].clone() for k in f.keys()}  # 2 of 4 grid points
    save_file(tensors, str(ckpt), metadata=header)
    with pytest.raises(ValueError, match=r"checkpoint '.*ck' is damaged: it holds 2 grid points of samples \[2\], its "
                                         r"settings say 4"):
        estimate_ems(eps_fn, data, schedule, **kwargs)


# --- 8: Ctrl-C while fewstep.cli imports ------------------------------------------------------------------------


def test_importing_the_cli_imports_nothing_heavy():
    code = ("import sys\nimport fewstep.cli as cli\n"
            "loaded = sorted(m for m in ('numpy', 'argparse', 'torch') if m in sys.modules)\n"
            "assert not loaded, loaded\n"
            "from fewstep.cli import UsageError, build_parser, main\n"
            "from fewstep.cli._common import UsageError as common\n"
            "import argparse\n"
            "assert UsageError is common and issubclass(cli._Parser, argparse.ArgumentParser)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr


def test_ctrl_c_while_numpy_imports_is_one_line(tmp_path):
    """The README promises one line and exit 130 for Ctrl-C while the modules load: numpy was imported by
    `import fewstep.cli` itself, outside main's error handling. The interrupt is raised by an import hook."""
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numpy':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from fewstep.cli import main\n"
            "sys.exit(main(['generate', '--out', 'x.png']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 130 and proc.stderr == "fewstep generate: interrupted\n", proc.stderr


# --- 9: an output that is a symbolic link ------------------------------------------------------------------------


def test_atomic_write_writes_through_a_symbolic_link(tmp_path):
    """os.replace renamed the new file over the link: the link became a regular file, its target kept old data."""
    real = tmp_path / "elsewhere" / "real.json"
    real.parent.mkdir()
    real.write_text("old")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "link.json"
    link.symlink_to(os.path.relpath(real, link.parent))
    assert atomic_write(link, lambda p: p.write_text("new")) == link
    assert link.is_symlink() and real.read_text() == "new" and link.read_text() == "new"
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.json"]
    assert sorted(p.name for p in link.parent.iterdir()) == ["link.json"]
    with pytest.raises(OSError, match=r"cannot write '.*link\.json'"):  # a failed write keeps the target as it was
        atomic_write(link, _full_disk)
    assert real.read_text() == "new" and sorted(p.name for p in real.parent.iterdir()) == ["real.json"]
    (tmp_path / "dangling.json").symlink_to(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="broken link"):  # still refused
        atomic_write(tmp_path / "dangling.json", lambda p: p.write_text("x"))
