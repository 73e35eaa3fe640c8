"""Regression tests of a probe of ``fewstep bench``'s resumable results folders: each test failed before its fix
(embedded-model weights not part of the configuration or the caches, near-duplicate scales accepted across a
resume, settings of models that do not run refusing a new model kind, one pipeline directory spelled two ways,
both processes of a distributed analytic table writing, a diverging pipeline cell aborting the grid, empty parent
folders left by a refused run)."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_bench_probe_fixes import _fake_pipeline, _FakeWorld
from test_real_pipeline import tiny_sd  # noqa: F401 - the tiny SD pipeline directory fixture

from fewstep.bench import runner
from fewstep.bench.runner import BenchConfig, reference_statistics, run_grid
from fewstep.cli import main
from fewstep.pipelines import defaults


class _FakeDigits:
    """Stands in for ``_DigitsWorld`` (the bookkeeping, not the sampling): the MSE of a cell is its scale."""

    runs: list[str] = []

    def __init__(self, model, config, cache_dir, progress, extractor=None):
        pass

    def run(self, cell):
        _FakeDigits.runs.append(cell.key)
        return {"nfe": cell.steps, "fd": 1.0, "accuracy": 0.5, "mse": cell.guidance_scale, "rmse": None,
                "seconds_per_image": 0.0, "num_samples": 2}


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """A copy of the embedded digits-eps and classifier the package reads instead of its own (to retrain them)."""
    root = tmp_path / "assets"
    for name in ("digits-eps", "digits-classifier"):
        shutil.copytree(defaults.default_model_path(name), root / name)
    monkeypatch.setattr(defaults, "_ASSETS", root)
    return root


def _digits(**kw):
    settings = {"models": ["digits-eps"], "samplers": ["ddim"], "steps": [2], "classes": [0, 1], "num_per_class": 1,
                "reference_steps": 4, "guidance": [("cfg", 3.0)], **kw}
    return BenchConfig(**settings)


def _retrain(folder: Path) -> None:
    """What scripts/train_digits.py leaves: other files under the same name (another size: no stale memo)."""
    notes = folder / "training.json"
    notes.write_text(notes.read_text() + "\n ")


# ---- 2: the embedded models' files are part of the configuration and of the cache keys ----------------------------
def test_retrained_embedded_model_is_another_configuration(assets, tmp_path, monkeypatch):
    """Found by probing: retraining digits-eps in place (or an upgrade) reused its stored rows; the results
    configuration named the model only."""
    monkeypatch.setattr(runner, "_DigitsWorld", _FakeDigits)
    out = tmp_path / "out"
    run_grid(_digits(), out, progress=False)
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["embedded"] == {"digits-eps": runner._embedded_digest("digits-eps")}
    assert config["classifier"] == runner._embedded_digest("digits-classifier")
    _retrain(assets / "digits-eps")
    with pytest.raises(ValueError, match=r"holds rows of embedded model \['digits-eps'\] whose files differ from when "
                                         r"they were stored \(retrained"):
        run_grid(_digits(), out, progress=False)
    _FakeDigits.runs = []
    run_grid(_digits(), tmp_path / "fresh", progress=False)
    _retrain(assets / "digits-classifier")  # the classifier scores every digits row
    with pytest.raises(ValueError, match=r"is from another configuration: classifier \(digest of the shipped "
                                         r"digits-classifier's files\): stored \"[0-9a-f]{16}\", this run "):
        run_grid(_digits(), tmp_path / "fresh", progress=False)
    # a results file written before the digests: they are adopted (its rows reused), and recorded from now on
    payload = json.loads((tmp_path / "fresh" / "results.json").read_text())
    del payload["config"]["embedded"], payload["config"]["classifier"]
    (tmp_path / "fresh" / "results.json").write_text(json.dumps(payload))
    _FakeDigits.runs = []
    run_grid(_digits(), tmp_path / "fresh", progress=False)
    assert _FakeDigits.runs == []
    config = json.loads((tmp_path / "fresh" / "results.json").read_text())["config"]
    assert config["classifier"] == runner._embedded_digest("digits-classifier") and "digits-eps" in config["embedded"]


def test_reference_caches_follow_the_embedded_files(assets, tmp_path):
    """Found by probing: the digits reference-solve cache key and the shipped classifier's statistics key held only
    the model's name, so a retrained model was scored against the old model's reference solve."""
    cache = tmp_path / "cache"
    reference_statistics("digits-eps", [0, 1], cache)
    _retrain(assets / "digits-classifier")
    reference_statistics("digits-eps", [0, 1], cache)
    assert len(list(cache.glob("refstats-*.safetensors"))) == 2
    solves = []

    def world():
        w = object.__new__(runner._DigitsWorld)
        w.config, w.cache_dir, w.references, w._use = _digits(), cache, {}, lambda rule, scale: None
        w.objective = SimpleNamespace(model="digits-eps", model_config=runner._model_config("digits-eps", w.config))
        w.generate = lambda sched, steps: (solves.append(steps) or torch.full((2, 1, 4, 4), float(len(solves))), 0.0)
        return w

    first = world().reference("cfg", 3.0)
    assert torch.equal(world().reference("cfg", 3.0), first) and solves == [4]  # cached
    _retrain(assets / "digits-eps")
    assert not torch.equal(world().reference("cfg", 3.0), first) and solves == [4, 4]


# ---- 3: near-duplicate scales across a resume ---------------------------------------------------------------------
def test_near_duplicate_scales_are_refused_across_a_resume(tmp_path, monkeypatch, capsys):
    """Found by probing: `fewstep bench` refuses cfg:3,cfg:3.0000004 in one run, but across a resume (--guidance
    cfg:3, then cfg:3.0000004 into the same --out) both were stored: two rows reading "cfg 3". The API keeps them
    apart as two rows unless asked to refuse (test_bench_probe_fixes: cells are keyed by the exact scale)."""
    monkeypatch.setattr(runner, "_DigitsWorld", _FakeDigits)
    out = tmp_path / "out"
    run_grid(_digits(), out, progress=False)
    _FakeDigits.runs = []
    with pytest.raises(ValueError, match=r"`guidance` cfg:3.0000004 is a near-duplicate of the stored scale 3.0 of "
                                         r"'cfg' in results file .*results.json' \(both print as cfg 3\)"):
        run_grid(_digits(guidance=[("cfg", 3.0000004)]), out, progress=False, refuse_near_duplicates=True)
    assert _FakeDigits.runs == [] and len(json.loads((out / "results.json").read_text())["cells"]) == 1
    run_grid(_digits(guidance=[("cfg", 3.0), ("cfg", 3.001), ("apg", 3.0000004)]), out, progress=False,
             refuse_near_duplicates=True)
    assert len(_FakeDigits.runs) == 2
    argv = ["bench", "--model", "digits-eps", "--samplers", "ddim", "--steps", "2", "--classes", "0,1",
            "--num-per-class", "1", "--reference-steps", "4", "--quiet", "--plot", "none", "--out", str(out)]
    assert main([*argv, "--guidance", "cfg:3.0000004"]) == 2
    assert "near-duplicate of the stored scale 3.0" in capsys.readouterr().err
    assert main([*argv, "--guidance", "cfg:3"]) == 0 and len(_FakeDigits.runs) == 2


# ---- 4: settings of kinds that do not run -------------------------------------------------------------------------
def test_another_model_kind_joins_a_results_folder(tmp_path, monkeypatch):
    """Found by probing: analytic rows, then digits-eps with --num-per-class 2 into the same folder was refused
    ("from another configuration") by the digits settings the analytic run had stored, printing two whole JSONs."""
    monkeypatch.setattr(runner, "_DigitsWorld", _FakeDigits)
    out = tmp_path / "out"
    analytic = dict(models=["analytic"], samplers=["ddim"], steps=[2], num_samples=20)
    run_grid(BenchConfig(**analytic), out, progress=False)
    config = json.loads((out / "results.json").read_text())["config"]
    assert set(config) == {"seed", "analytic"}
    _FakeDigits.runs = []
    run_grid(_digits(num_per_class=2), out, progress=False)
    run_grid(_digits(num_per_class=2), out, progress=False)  # resumed: nothing runs twice
    assert len(_FakeDigits.runs) == 1
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["num_per_class"] == 2 and config["analytic"]["num_samples"] == 20  # describes both kinds' rows
    # a setting of a kind with rows in both is compared, and the message names it with both values
    with pytest.raises(ValueError, match=r"is from another configuration: num_per_class: stored 2, this run 3; use "
                                         r"another output directory or the same settings$"):
        run_grid(_digits(num_per_class=3), out, progress=False)
    with pytest.raises(ValueError, match=r"another configuration: analytic: stored \{\"schedule\": \"vp\", "
                                         r"\"num_samples\": 20, \"dim\": 2\}, this run \{.*\"num_samples\": 30"):
        run_grid(BenchConfig(**{**analytic, "num_samples": 30}), out, progress=False)
    with pytest.raises(ValueError, match=r"another configuration: seed: stored 0, this run 1;"):
        run_grid(BenchConfig(**analytic, seed=1), out, progress=False)


def test_results_files_of_the_flat_configuration_stay_loadable(tmp_path, monkeypatch):
    """A results file of earlier versions stores every setting (digits, analytic, prompts); only those of kinds with
    rows are compared."""
    monkeypatch.setattr(runner, "_DigitsWorld", _FakeDigits)
    out = tmp_path / "out"
    analytic = BenchConfig(models=["analytic"], samplers=["ddim"], steps=[2], num_samples=20)
    run_grid(analytic, out, progress=False)
    payload = json.loads((out / "results.json").read_text())
    payload["config"] = {"classes": list(range(10)), "num_per_class": 20, "seed": 0, "reference": "dpm-solver++:200",
                         "feature_extractor": "digits-classifier",
                         "analytic": {"schedule": "vp", "num_samples": 20, "dim": 2},
                         "prompts": hashlib.sha256(b"").hexdigest()[:16], "image_size": None}
    (out / "results.json").write_text(json.dumps(payload))
    run_grid(analytic, out, progress=False)  # its analytic rows are still found
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 1
    _FakeDigits.runs = []
    run_grid(_digits(num_per_class=2), out, progress=False)  # the stored digits settings concern no row
    assert len(_FakeDigits.runs) == 1


# ---- 5: one pipeline directory spelled two ways -------------------------------------------------------------------
def test_one_pipeline_directory_spelled_two_ways_is_one_model(tmp_path, monkeypatch):
    """Found by probing: --model sd1/pipe,./sd1/pipe ran every cell twice, and a rerun spelling the folder another
    way re-ran every finished cell. Pipeline directories are now keyed by their resolved path."""
    from fewstep.cli._common import _model_list

    monkeypatch.setattr(runner, "_PipelineWorld", _FakeWorld)
    monkeypatch.chdir(tmp_path)
    pipe = Path(_fake_pipeline(tmp_path / "sd1" / "pipe", b"\x01" * 8)).resolve()
    with pytest.raises(argparse.ArgumentTypeError, match=rf"'sd1/pipe,./sd1/pipe' repeats {pipe}; give each value"):
        _model_list("sd1/pipe,./sd1/pipe")
    assert _model_list("./sd1/pipe,analytic") == [str(pipe), "analytic"]
    with pytest.raises(ValueError, match=r"`models` repeats"):
        BenchConfig(models=["sd1/pipe", str(pipe)], prompts=["a"])

    def config(model):
        return BenchConfig(models=[model], samplers=["ddim"], steps=[2], num_per_class=1, prompts=["a"],
                           reference_steps=4)

    _FakeWorld.runs = []
    rows = run_grid(config("sd1/pipe"), "out", progress=False)
    assert rows[0]["model"] == str(pipe) and _FakeWorld.runs == [f"{pipe}|ddim|2|cfg:3.0"]
    run_grid(config("./sd1/pipe"), "out", progress=False)
    run_grid(config(str(pipe)), "out", progress=False)
    assert len(_FakeWorld.runs) == 1
    # a results file of an earlier version keyed the folder as it was spelled: re-keyed, still found
    payload = json.loads(Path("out/results.json").read_text())
    payload["cells"] = {"sd1/pipe|ddim|2|cfg:3.0": {**rows[0], "model": "sd1/pipe"}}
    payload["config"]["pipelines"] = {"sd1/pipe": payload["config"]["pipelines"][str(pipe)]}
    Path("out/results.json").write_text(json.dumps(payload))
    assert run_grid(config("./sd1/pipe"), "out", progress=False)[0]["model"] == str(pipe)
    assert len(_FakeWorld.runs) == 1
    assert list(json.loads(Path("out/results.json").read_text())["cells"]) == [f"{pipe}|ddim|2|cfg:3.0"]


# ---- 6: the analytic table under a distributed launch -------------------------------------------------------------
def test_analytic_table_is_printed_and_written_by_the_main_process_only(tmp_path, capsys, monkeypatch):
    """Found by probing: under ``torchrun --nproc_per_node 2`` both processes printed the table and wrote --json."""
    from fewstep import _dist

    argv = ["bench", "--model", "analytic", "--steps", "3", "--samplers", "unipc", "--num-samples", "50", "--quiet"]
    monkeypatch.setattr(_dist, "is_main_process", lambda: False)
    assert main([*argv, "--json", str(tmp_path / "t.json")]) == 0
    assert main([*argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out == captured.err == "" and not (tmp_path / "t.json").exists()
    monkeypatch.setattr(_dist, "is_main_process", lambda: True)
    assert main([*argv, "--json", str(tmp_path / "t.json")]) == 0
    assert "unipc" in capsys.readouterr().out and json.loads((tmp_path / "t.json").read_text())["rows"]


# ---- 7b: a diverging pipeline cell is scored, not fatal -----------------------------------------------------------
def test_diverging_pipeline_cell_is_scored_and_the_grid_goes_on(tiny_sd, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Found by probing: a pipeline-directory cell that diverged stopped the grid with the API's advice "pass
    check_finite=False" (no CLI flag), on every rerun; the digits models score divergence (NaN replaced) instead.
    Now the cell is scored and counts its diverged samples; a diverged reference solve names the setting to lower."""
    from fewstep.pipelines import FewstepPipeline

    original = FewstepPipeline.__call__

    def diverging(self, *args, **kwargs):  # the 2-step sampler blows up on the first sample of every batch
        out = original(self, *args, **kwargs)
        if kwargs["num_inference_steps"] == 2:
            assert kwargs["check_finite"] is False
            bad = torch.zeros_like(out.images, dtype=torch.bool)
            bad[0] = True
            out.images = torch.where(bad, torch.tensor(float("nan")), out.images)
        return out

    monkeypatch.setattr(FewstepPipeline, "__call__", diverging)
    config = BenchConfig(models=[str(tiny_sd)], samplers=["ddim"], steps=[2, 3], guidance=[("cfg", 3.0)],
                         num_per_class=2, prompts=["a red square"], reference_steps=6, batch_size=1)
    rows = run_grid(config, tmp_path / "out", progress=False)
    assert [(r["steps"], r["diverged"]) for r in rows] == [(2, 2), (3, 0)]
    assert all(0 < r["mse"] < float("inf") for r in rows)
    assert "| 2 | 2 | - | - | " in runner.format_markdown(rows) and "(2/2 diverged)" in runner.format_markdown(rows)
    json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert run_grid(config, tmp_path / "out", progress=False) == rows  # resumed, nothing recomputed
    monkeypatch.undo()
    # a reference solve that diverges makes every MSE of its setting meaningless: one line naming the flag
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    argv = ["bench", "--model", str(tiny_sd), "--prompts", str(prompts), "--samplers", "ddim", "--steps", "2",
            "--guidance", "cfg:1e38", "--num-per-class", "1", "--reference-steps", "3", "--quiet", "--plot", "none",
            "--out", str(tmp_path / "huge")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "(ddim, 3 steps) at guidance cfg 1e+38 diverged" not in err and "dpm-solver++, 3 steps" in err
    assert "lower the guidance scale (--guidance cfg:1e+38)" in err and "check_finite" not in err


# ---- 7c: a refused run leaves no folder behind ---------------------------------------------------------------------
def test_refused_grid_leaves_no_parent_folders(tmp_path, capsys, monkeypatch):
    """Found by probing: `--out nest/a/b` with a cell that cannot run failed after making the folders and left an
    empty nest/a."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--model", "analytic", "--samplers", "s3", "--steps", "3", "--num-samples", "20", "--quiet",
            "--plot", "none", "--out", "nest/a/b"]
    assert main(argv) == 2 and "cannot run 3 steps on analytic" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot run 3 steps"):
        run_grid(BenchConfig(models=["analytic"], samplers=["s3"], steps=[3]), "api/a/b", progress=False)
    assert list(tmp_path.iterdir()) == []
    # a failure after the folders were made: the CLI removes all it created, parents included
    monkeypatch.setattr(runner, "_run_analytic", lambda cell, cfg: (_ for _ in ()).throw(ValueError("boom")))
    argv[argv.index("s3")] = "ddim"
    assert main([*argv, "--cache-dir", "c/d"]) == 2 and "boom" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
