"""Regression tests of a probe of the benchmark runner, its caches, metrics inputs and scripts: each test failed
before its fix (stale cached statistics and results, cell keys rounding the guidance scale, numpy integers in the
configuration, the Inception weights error, the benchmark scripts' arguments and JSON output)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from _helpers import load_script

from fewstep.bench import runner
from fewstep.bench.fid import FeatureExtractor
from fewstep.bench.runner import BenchConfig, Cell, reference_statistics, run_grid
from fewstep.pipelines.defaults import default_model_path


# ---- fake pipeline directories: the runner's bookkeeping without running a diffusers pipeline ----------------------
def _fake_pipeline(folder, weights: bytes):
    """A folder the runner takes for a diffusers pipeline (``model_index.json`` and a scheduler config), with a
    stand-in weights file."""
    src = default_model_path("digits-eps")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "model_index.json", folder / "model_index.json")
    shutil.copy(src / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    (folder / "unet").mkdir(exist_ok=True)
    (folder / "unet" / "weights.bin").write_bytes(weights)
    return str(folder)


class _FakeWorld:
    """Stands in for ``_PipelineWorld``: the MSE of a cell is the weights file's first byte (what a stale row
    would show) plus the guidance scale."""

    runs: list[str] = []

    def __init__(self, model, config, progress, cache_dir=None, extractor=None):
        from pathlib import Path

        self.byte = (Path(model) / "unet" / "weights.bin").read_bytes()[0]

    def run(self, cell):
        _FakeWorld.runs.append(cell.key)
        return {"nfe": cell.steps, "fd": None, "accuracy": None, "mse": float(self.byte) + cell.guidance_scale,
                "rmse": None, "seconds_per_image": 0.0, "num_samples": 2}


def _pipeline_config(*models, guidance=(("cfg", 3.0),)):
    return BenchConfig(models=list(models), samplers=["ddim"], steps=[2], guidance=list(guidance), num_per_class=1,
                       prompts=["a", "b"], reference_steps=4)


def test_rewritten_pipeline_weights_are_another_configuration(tmp_path, monkeypatch):
    """Found by probing: weights re-saved into the same pipeline directory reused the rows of the old weights from
    results.json. The fingerprint now holds each directory's files; rows of other directories stay usable."""
    monkeypatch.setattr(runner, "_PipelineWorld", _FakeWorld)
    _FakeWorld.runs = []
    p1 = _fake_pipeline(tmp_path / "p1", b"\x01" * 8)
    out = tmp_path / "out"
    first = run_grid(_pipeline_config(p1), out, progress=False)
    assert first[0]["mse"] == 4.0
    stored = json.loads((out / "results.json").read_text())["config"]
    assert stored["pipelines"] == {p1: runner._folder_fingerprint(p1)}
    # a second directory joins the grid: the first's row is reused, both fingerprints are kept
    p2 = _fake_pipeline(tmp_path / "p2", b"\x02" * 8)
    _FakeWorld.runs = []
    both = run_grid(_pipeline_config(p1, p2), out, progress=False)
    assert [r["mse"] for r in both] == [4.0, 5.0] and _FakeWorld.runs == [f"{p2}|ddim|2|cfg:3.0"]
    assert set(json.loads((out / "results.json").read_text())["config"]["pipelines"]) == {p1, p2}
    run_grid(_pipeline_config(p2), out, progress=False)  # p1's fingerprint stays in the file
    assert set(json.loads((out / "results.json").read_text())["config"]["pipelines"]) == {p1, p2}
    # new weights in p1: its stored rows are of other weights -> refused, naming the directory
    _fake_pipeline(tmp_path / "p1", b"\x09" * 9)
    with pytest.raises(ValueError, match=rf"holds rows of pipeline directory \['{p1}'\] whose files differ from "
                                         r"when they were stored .*use another output directory"):
        run_grid(_pipeline_config(p1), out, progress=False)
    assert run_grid(_pipeline_config(p1), tmp_path / "fresh", progress=False)[0]["mse"] == 12.0
    # only model_index.json and its component folders count: results written into the folder change nothing
    before = runner._folder_fingerprint(p2)
    (tmp_path / "p2" / "bench-out").mkdir()
    (tmp_path / "p2" / "bench-out" / "results.json").write_text("{}")
    (tmp_path / "p2" / "notes.txt").write_text("x")
    assert runner._folder_fingerprint(p2) == before
    (tmp_path / "p2" / "scheduler" / "scheduler_config.json").write_text("{}")
    assert runner._folder_fingerprint(p2) != before
    # results files without the built-in models' pipelines entry keep their configuration
    assert "pipelines" not in BenchConfig(models=["analytic"], samplers=["ddim"], steps=[2]).fingerprint()


def test_results_without_directory_fingerprints_are_not_trusted(tmp_path, monkeypatch):
    """A results file written before the fingerprint (no ``pipelines`` entry) holds rows of unknown weights."""
    monkeypatch.setattr(runner, "_PipelineWorld", _FakeWorld)
    p1 = _fake_pipeline(tmp_path / "p1", b"\x01" * 8)
    out = tmp_path / "out"
    run_grid(_pipeline_config(p1), out, progress=False)
    payload = json.loads((out / "results.json").read_text())
    del payload["config"]["pipelines"]
    (out / "results.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"whose files differ from when they were stored \(weights re-saved, or a "
                                         r"results file written before fewstep recorded pipeline folders\)"):
        run_grid(_pipeline_config(p1), out, progress=False)


def test_guidance_scales_are_keyed_exactly(tmp_path, monkeypatch):
    """Found by probing: cell keys rounded the scale with ``:g``, so cfg 3.0000004 reused the row of cfg 3 (and
    both in one grid collided). Keys now hold ``repr`` of the scale; results files with the old keys are re-keyed
    from their rows, so their finished cells are still skipped."""
    assert Cell("m", "ddim", 2, "cfg", 3.0).key == "m|ddim|2|cfg:3.0"
    assert Cell("m", "ddim", 2, "cfg", 3.0000004).key == "m|ddim|2|cfg:3.0000004"
    assert Cell("m", "ddim", 2, "cfg", 3).key == "m|ddim|2|cfg:3.0"
    monkeypatch.setattr(runner, "_PipelineWorld", _FakeWorld)
    _FakeWorld.runs = []
    p1 = _fake_pipeline(tmp_path / "p1", b"\x00" * 8)
    out = tmp_path / "out"
    assert run_grid(_pipeline_config(p1), out, progress=False)[0]["mse"] == 3.0
    rows = run_grid(_pipeline_config(p1, guidance=[("cfg", 3.0000004)]), out, progress=False)
    assert rows[0]["guidance_scale"] == 3.0000004 and rows[0]["mse"] == 3.0000004
    assert len(_FakeWorld.runs) == 2
    # an earlier version's file: the row of scale 3.0 under the key "…|cfg:3" -> still found, not recomputed
    payload = json.loads((out / "results.json").read_text())
    payload["cells"] = {f"{p1}|ddim|2|cfg:3": payload["cells"][f"{p1}|ddim|2|cfg:3.0"]}
    (out / "results.json").write_text(json.dumps(payload))
    _FakeWorld.runs = []
    again = run_grid(_pipeline_config(p1, guidance=[("cfg", 3.0), ("cfg", 3.5)]), out, progress=False)
    assert _FakeWorld.runs == [f"{p1}|ddim|2|cfg:3.5"] and again[0]["mse"] == 3.0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert sorted(cells) == [f"{p1}|ddim|2|cfg:3.0", f"{p1}|ddim|2|cfg:3.5"]  # re-keyed, no duplicate row


def test_near_duplicate_guidance_scales_are_refused():
    with pytest.raises(ValueError, match=r"`guidance` holds near-duplicate scales of 'cfg': 3.0 and 3.0000004 "
                                         r"\(both print as cfg 3\)"):
        BenchConfig(guidance=[("cfg", 3.0), ("cfg", 3.0000004)])
    with pytest.raises(ValueError, match="near-duplicate scales of 'apg'"):
        BenchConfig(guidance=["apg:2.5", "apg:2.5000001"])
    BenchConfig(guidance=[("cfg", 3.0), ("cfg", 3.001), ("apg", 3.0)])  # distinct in print, or other rules


def test_numpy_integers_are_stored_as_python_ints(tmp_path):
    """Found by probing: numpy integers passed validation but were stored as they were: seed=np.int64(3) crashed in
    torch.Generator.manual_seed, dim/num_per_class at the JSON dump after the work."""
    config = BenchConfig(models=["analytic"], samplers=["ddim"], steps=[np.int64(2)], num_samples=np.int64(50),
                         dim=np.int64(2), seed=np.int64(3), num_per_class=np.int32(2), batch_size=np.int64(10),
                         reference_steps=np.int16(4), image_size=None)
    for name in ("num_samples", "dim", "seed", "num_per_class", "batch_size", "reference_steps"):
        value = getattr(config, name)
        assert type(value) is int, (name, type(value))
    assert type(config.steps[0]) is int
    rows = run_grid(config, tmp_path / "out", progress=False)
    assert rows[0]["rmse"] > 0 and json.loads((tmp_path / "out" / "results.json").read_text())["config"]["seed"] == 3
    assert type(BenchConfig(models=["analytic"], image_size=np.int64(16)).image_size) is int


def test_reference_solve_statistics_are_keyed_by_the_pipeline_files(tmp_path):
    """Found by probing: the decoded reference-solve statistics were keyed by a hash of the latents only, so a new
    VAE in the folder (same latents) reused the old decoder's statistics (FD 15.3 instead of ~0)."""
    calls = []
    world = object.__new__(runner._PipelineWorld)
    latents = torch.arange(24, dtype=torch.float64).reshape(3, 8)
    world.folder_stats, world.solve_stats, world.cache_dir, world.image_hw = None, {}, tmp_path, (8, 8)
    world.extractor = FeatureExtractor(lambda x: x, "id:0")
    world.reference = lambda rule, scale: latents

    def features(lat, offset):
        calls.append(offset)
        return lat[:, :4] + offset

    world.files_id, world.features = "vae-one", lambda lat: features(lat, 0.0)
    first = world.reference_stats("cfg", 3.0)
    world.files_id, world.features, world.solve_stats = "vae-two", lambda lat: features(lat, 1.0), {}
    second = world.reference_stats("cfg", 3.0)
    assert calls == [0.0, 1.0] and np.allclose(second[0], first[0] + 1.0)
    world.files_id, world.solve_stats = "vae-one", {}
    assert np.array_equal(world.reference_stats("cfg", 3.0)[0], first[0]) and calls == [0.0, 1.0]  # cached


def test_reference_statistics_of_another_classifier_are_not_the_default_ones(tmp_path):
    """Found by probing: ``classifier=`` cached under the key of the shipped classifier, so a modified classifier
    got the shipped one's statistics from the cache. The key now holds a digest of its weights."""
    from fewstep.pipelines import load_default

    default, _ = reference_statistics("digits-eps", [0, 1], tmp_path)
    clf = load_default("digits-classifier")
    with torch.no_grad():
        for p in clf.parameters():
            p.mul_(1.5)
    cached, _ = reference_statistics("digits-eps", [0, 1], tmp_path, classifier=clf)
    uncached, _ = reference_statistics("digits-eps", [0, 1], None, classifier=clf)
    assert np.allclose(cached, uncached) and not np.allclose(cached, default)
    assert len(list(tmp_path.glob("refstats-*.safetensors"))) == 2
    assert runner._module_digest(clf) != runner._module_digest(load_default("digits-classifier"))


def test_reference_statistics_argument_errors(tmp_path):
    """With a custom Inception and a cache, ``inception_id`` names its weights (it was keyed ``inception:None``)."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="`inception_id` must name the weights of `inception` .* got None"):
        reference_statistics("digits-eps", [0, 1], tmp_path, inception=net)
    with pytest.raises(ValueError, match="give at most one of `classifier`, `inception` and `extractor`.*got "
                                         "`classifier` and `extractor`"):
        reference_statistics("digits-eps", [0], tmp_path, classifier=net, extractor=FeatureExtractor(net, "x"))
    with pytest.raises(ValueError, match="`inception_id` must be a non-empty string .* got ''"):
        reference_statistics("digits-eps", [0], tmp_path, inception=net, inception_id="")
    with pytest.raises(ValueError, match="`inception_id` 'abc' names the weights of `inception`, which is not given"):
        reference_statistics("digits-eps", [0], tmp_path, inception_id="abc")
    with pytest.raises(TypeError, match="`classifier` must be a digits classifier"):
        reference_statistics("digits-eps", [0], tmp_path, classifier="digits-classifier")
    assert not list(tmp_path.iterdir())


def test_garbage_inception_weights_file_is_one_clear_line(tmp_path):
    """Found by probing: the error embedded torch's multi-line advice to retry with weights_only=False."""
    from fewstep.bench.inception import load_inception

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage\n")
    with pytest.raises(ValueError) as info:
        load_inception(bad)
    text = str(info.value)
    assert "\n" not in text and "weights_only` set to `False`" not in text
    assert text.startswith(f"`inception_weights` {str(bad)!r} is not a PyTorch checkpoint")


# ---- the benchmark scripts -----------------------------------------------------------------------------------------
def _parse_error(module, argv, capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        module.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(argv[0]) and ": error: " in err[-1]  # argparse's one line after the usage
    return err[-1]


@pytest.mark.parametrize("argv,expected", [
    (["--mse-samples", "0"], "argument --mse-samples: expected an integer >= 1, got 0"),
    (["--mse-samples", "x"], "argument --mse-samples: expected an integer, got 'x'"),
    (["--nfe", "5", "1"], "argument --nfe: expected an integer >= 2, got 1"),
    (["--converged-nfe", "0"], "argument --converged-nfe: expected an integer >= 1, got 0"),
    (["--samples", "10", "--mse-samples", "20"], "argument --mse-samples: 20 exceeds --samples 10"),
])
def test_bench_dc_arguments_are_checked_before_any_work(argv, expected, capsys, monkeypatch):
    bench_dc = load_script("bench_dc")
    monkeypatch.setattr(bench_dc, "bench_analytic", lambda *a, **k: pytest.fail("ran before checking arguments"))
    assert expected in _parse_error(bench_dc, ["bench_dc.py", *argv], capsys, monkeypatch)


@pytest.mark.parametrize("argv,expected", [
    (["--num-per-class", "0"], "argument --num-per-class: expected an integer >= 1, got 0"),
    (["--floor-sets", "-1"], "argument --floor-sets: expected an integer >= 0, got -1"),
    (["--reference-steps", "1"], "argument --reference-steps: expected an integer >= 2, got 1"),
    (["--reference-steps", "2.5"], "argument --reference-steps: expected an integer, got '2.5'"),
])
def test_bench_s3_arguments_are_checked_before_any_work(argv, expected, capsys, monkeypatch):
    bench_s3 = load_script("bench_s3")
    monkeypatch.setattr(bench_s3, "heldout_analytic", lambda *a, **k: pytest.fail("ran before checking arguments"))
    assert expected in _parse_error(bench_s3, ["bench_s3.py", "heldout", *argv], capsys, monkeypatch)


def test_bench_dc_json_is_written_atomically(tmp_path, capsys, monkeypatch):
    """A value JSON cannot hold (here a numpy float) used to leave a truncated file in place of an earlier one."""
    bench_dc = load_script("bench_dc")
    target = tmp_path / "dc.json"
    target.write_text('{"earlier": "run"}\n')
    rows = [{"nfe": 25, "cfg": 3.0, "sampler": "unipc", "fd": np.float32(1.5)}]
    monkeypatch.setattr(bench_dc, "converged_fd", lambda args: rows)
    monkeypatch.setattr(bench_dc.torch, "set_num_threads", lambda n: None)  # keep this process's threads
    monkeypatch.setattr(sys, "argv", ["bench_dc.py", "--converged-only", "--json", str(target)])
    with pytest.raises(TypeError, match="not JSON serializable"):
        bench_dc.main()
    assert target.read_text() == '{"earlier": "run"}\n' and [p.name for p in tmp_path.iterdir()] == ["dc.json"]
    rows[0]["fd"] = 1.5
    bench_dc.main()
    assert json.loads(target.read_text())["converged"] == rows
