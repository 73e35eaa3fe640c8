"""The FID/MSE-versus-NFE grid runner (`fewstep bench --out`): batch-size independence, resume, caching, CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_real_pipeline import tiny_sd  # noqa: F401 - fixture reused by the pipeline-directory test

from fewstep.bench import digits_eval, runner
from fewstep.bench.analytic_bench import run_analytic_bench
from fewstep.bench.runner import BenchConfig, parse_guidance, plot_results, reference_statistics, run_grid
from fewstep.cli import main

TINY = {"classes": [0, 1, 2], "num_per_class": 3, "reference_steps": 8, "guidance": ["cfg:3"]}


def _metrics(rows):
    return [(r["model"], r["sampler"], r["steps"], r["fd"], r["accuracy"], r["mse"]) for r in rows]


def test_rows_do_not_depend_on_batch_size(tmp_path):
    common = dict(models=["digits-eps"], samplers=["unipc"], steps=[4], **TINY)
    small = run_grid(BenchConfig(batch_size=7, **common), tmp_path / "b7", progress=False)
    large = run_grid(BenchConfig(batch_size=50, **common), tmp_path / "b50", progress=False)
    # Same seeds, same samples: only float32 rounding of batched convolutions differs (~1e-5 on a sample).
    for a, b in zip(_metrics(small), _metrics(large)):
        assert a[:3] == b[:3] and a[3:] == pytest.approx(b[3:], rel=1e-4)
    row = small[0]
    assert row["nfe"] == 4 and row["num_samples"] == 9 and row["rmse"] is None
    assert 0 <= row["accuracy"] <= 1 and row["fd"] > 0 and row["mse"] > 0 and row["seconds_per_image"] > 0


def test_resume_skips_finished_cells_and_rejects_other_configs(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    grid = dict(models=["digits-flow", "analytic"], samplers=["ddim"], num_samples=50, **TINY)
    first = run_grid(BenchConfig(steps=[3], **grid), out, progress=False)
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "results.md", "cache"}
    calls = []
    digits_run, analytic_run = runner._DigitsWorld.run, runner._run_analytic
    monkeypatch.setattr(runner._DigitsWorld, "run", lambda self, cell: calls.append(cell.key) or digits_run(self, cell))
    monkeypatch.setattr(runner, "_run_analytic", lambda cell, cfg: calls.append(cell.key) or analytic_run(cell, cfg))
    again = run_grid(BenchConfig(steps=[3, 5], **grid), out, progress=False)
    assert calls == ["digits-flow|ddim|5|cfg:3.0", "analytic|ddim|5|-"]  # the finished cells were skipped
    assert again[0] == first[0] and again[2] == first[1]
    assert [(r["model"], r["steps"]) for r in again] == [("digits-flow", 3), ("digits-flow", 5), ("analytic", 3),
                                                         ("analytic", 5)]
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["cells"]) == 4 and payload["config"]["num_per_class"] == 3
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,sampler,steps,nfe,guidance,guidance_scale,fd,accuracy,mse,rmse")
    assert len(csv_lines) == 5 and "| digits-flow | cfg 3 | ddim | 5 | 5 |" in (out / "results.md").read_text()
    calls.clear()
    run_grid(BenchConfig(steps=[3, 5], **grid), out, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="is from another configuration"):
        run_grid(BenchConfig(steps=[3], **{**grid, "num_per_class": 4}), out, progress=False)


def test_reference_statistics_are_cached(tmp_path, monkeypatch):
    mean, cov = reference_statistics("digits-eps", [0, 1, 2], tmp_path)
    files = list(tmp_path.glob("refstats-*.safetensors"))
    assert len(files) == 1 and mean.shape == (cov.shape[0],)
    monkeypatch.setattr(digits_eval, "classifier_features", lambda *a, **k: pytest.fail("recomputed the features"))
    mean2, cov2 = reference_statistics("digits-eps", [2, 1, 0], tmp_path)  # same key: class order does not matter
    assert (mean2 == mean).all() and (cov2 == cov).all()
    monkeypatch.undo()
    reference_statistics("digits-eps", [3], tmp_path)  # other classes: another file
    assert len(list(tmp_path.glob("refstats-*.safetensors"))) == 2


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"`models` has unknown value\(s\) \['sd15'\]; available: analytic"):
        BenchConfig(models=["sd15"])
    with pytest.raises(ValueError, match=r"`samplers` has unknown value\(s\) \['euler'\]; available: ddim"):
        BenchConfig(samplers=["euler"])
    with pytest.raises(ValueError, match=r"`steps` must hold integers >= 1"):
        BenchConfig(steps=[0])
    with pytest.raises(ValueError, match="unknown guidance rule 'cfx'"):
        parse_guidance("cfx:3")
    with pytest.raises(ValueError, match="scale 'x' is not a number"):
        parse_guidance("cfg:x")
    assert parse_guidance("cfgpp:0.5") == ("cfg++", 0.5)
    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, "):
        BenchConfig(seed=-1)
    with pytest.raises(ValueError, match=r"`schedule` must be one of \['vp', 'flow'\], got 've'"):
        BenchConfig(models=["analytic"], schedule="ve")
    with pytest.raises(ValueError, match=r"`seed` must be an integer .* got 1.5"):
        run_analytic_bench(seed=1.5)
    with pytest.raises(ValueError, match=r"`classes` must be distinct digits 0..9 \(at least one\), got \[11\]"):
        reference_statistics("digits-eps", [11])
    with pytest.raises(ValueError, match="cannot run 4 steps on digits-eps"):
        run_grid(BenchConfig(models=["digits-eps"], samplers=["flow-euler"], steps=[4], **TINY), "/tmp/unused-x",
                 progress=False)


_PLOT_ROWS = [{"model": "analytic", "guidance": None, "guidance_scale": None, "sampler": s, "nfe": n, "fd": 1.0 / n}
              for s in ("ddim", "unipc") for n in (5, 10, 20)]


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_results(_PLOT_ROWS, tmp_path / "fd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_other_metrics_and_names_the_extra_without_matplotlib(tmp_path, monkeypatch):
    """Needs no matplotlib (the `plot` extra, absent in CI, where test_plot_png skips): the metric is checked first,
    and a missing matplotlib (made missing here, installed or not) is an ImportError naming the extra."""
    with pytest.raises(ValueError, match="`metric` must be one of"):
        plot_results(_PLOT_ROWS, tmp_path / "x.png", metric="fid")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fewstep\[plot\]'"):
        plot_results(_PLOT_ROWS, tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_cli_grid_run_and_resume(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["bench", "--model", "digits-eps", "--samplers", "unipc,dpm-solver++", "--steps", "3",
            "--guidance", "cfg:3,cfg++:0.6", "--num-per-class", "1", "--classes", "0,1", "--reference-steps", "6",
            "--out", str(out), "--quiet", "--plot", "mse"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| digits-eps | cfg++ 0.6 | dpm-solver++ | 3 | 3 |" in text and "results.csv" in text
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 4
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert (out / "mse_vs_nfe.png").is_file()
    assert main(argv) == 0  # everything finished: a re-run only rewrites the tables
    assert "| digits-eps | cfg 3 | unipc | 3 | 3 |" in capsys.readouterr().out


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--model", "digits-eps"], "--model digits-eps runs a benchmark grid: give --out DIR"),
        (["bench", "--model", "analytic", "--guidance", "cfg:3"],
         "--guidance applies to the digits models and pipeline directories, not --model analytic"),
        # the analytic table ignored the pipeline-only options and --cache-dir
        (["bench", "--model", "analytic", "--prompts", "p.txt"], "--prompts applies to pipeline directories"),
        (["bench", "--model", "analytic", "--image-size", "64"], "--image-size applies to pipeline directories"),
        (["bench", "--model", "analytic", "--cache-dir", "c"], "--cache-dir is for a grid run (--out DIR)"),
        (["bench", "--model", "digits-eps", "--guidance", "cfx:3", "--out", "x"], "unknown guidance rule 'cfx'"),
        (["bench", "--model", "digits-eps", "--guidance", "cfg:a", "--out", "x"], "scale 'a' is not a number"),
        (["bench", "--model", "digits-eps,sd15", "--out", "x"], "unknown model(s) ['sd15']"),
        (["bench", "--model", "digits-eps", "--out", "x", "--json", "y.json"], "--json is for the analytic table"),
        (["bench", "--model", "digits-eps", "--out", "x", "--json", ""], "--json is for the analytic table"),
        (["bench", "--model", "digits-eps", "--out", "x", "--classes", "0,12"], "`classes` must be distinct digits"),
        (["bench", "--model", "digits-eps", "--out", "x", "--num-per-class", "0"], "expected an integer >= 1"),
        # found by probing: options no listed model uses were silently ignored in a grid run
        (["bench", "--model", "analytic", "--out", "x", "--num-per-class", "3"],
         "--num-per-class applies to the digits models and pipeline directories, not --model analytic"),
        (["bench", "--model", "analytic", "--out", "x", "--features", "inception"], "--features applies to"),
        (["bench", "--model", "digits-eps", "--out", "x", "--dim", "4"], "--dim applies to --model analytic"),
        (["bench", "--model", "digits-eps", "--out", "x", "--num-samples", "9"], "--num-samples applies to"),
        (["bench", "--model", "digits-eps", "--out", "x", "--prompts", "p.txt"], "--prompts applies to pipeline"),
        (["bench", "--model", "analytic", "--plot", "fd"], "--plot is for a grid run (--out DIR)"),
        # a metric no listed model reports fails before the run, not after it
        (["bench", "--model", "analytic", "--out", "x", "--plot", "accuracy"],
         "--plot accuracy: --model analytic reports ['fd', 'rmse']"),
        (["bench", "--model", "digits-eps", "--out", "x", "--plot", "rmse"], "reports ['accuracy', 'fd', 'mse']"),
    ],
)
def test_cli_grid_usage_errors_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


DIST_SCRIPT = """
import json, sys
from fewstep.bench.runner import BenchConfig, is_main_process, run_grid
cfg = BenchConfig(models=["digits-eps"], samplers=["unipc"], steps=[4], classes=[0, 1, 2], num_per_class=3,
                  reference_steps=8, guidance=["cfg:3"], batch_size=50)
rows = run_grid(cfg, sys.argv[1], progress=False)
if is_main_process():
    print("ROWS" + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def two_processes(tiny_sd, tmp_path_factory):  # noqa: F811
    """Both two-process grids of this file (DIST_SCRIPT, then PIPE_DIST_SCRIPT on ``tiny_sd``) in ONE launch of two
    CPU processes (`torchrun --nproc_per_node 2`; a launch is ~30 s of start-up and imports; each grid's shares are
    checked: both processes ran and split its samples): each grid's output folder and the main process's rows."""
    from _helpers import launch_two_cpu_processes_each

    root = tmp_path_factory.mktemp("two_processes")
    bodies = {"digits": (DIST_SCRIPT, root / "two"), "pipeline": (PIPE_DIST_SCRIPT, root / "pipe_two", tiny_sd)}
    stdout = launch_two_cpu_processes_each(bodies, root)
    return {name: (bodies[name][1], json.loads(stdout[name].split("ROWS", 1)[1].splitlines()[0])) for name in bodies}


def test_two_cpu_processes_match_one(two_processes, tmp_path):
    """Two CPU processes (`torchrun --nproc_per_node 2`): samples split across processes and gathered."""
    folder, two = two_processes["digits"]
    one = run_grid(BenchConfig(models=["digits-eps"], samplers=["unipc"], steps=[4], batch_size=50, **TINY),
                   tmp_path / "one", progress=False)
    for a, b in zip(_metrics(two), _metrics(one)):
        assert a[:3] == b[:3] and a[3:] == pytest.approx(b[3:], rel=1e-4)
    assert json.loads((folder / "results.json").read_text())["cells"]


def test_inception_weights_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from fewstep.bench.inception import WEIGHTS_URL, find_inception_weights

    monkeypatch.delenv("FEWSTEP_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="pass the file with --inception-weights PATH") as info:
        find_inception_weights()
    assert WEIGHTS_URL in str(info.value) and "does not download" in str(info.value)
    with pytest.raises(FileNotFoundError, match="Inception-V3 FID weights not found"):
        run_grid(BenchConfig(models=["digits-eps"], samplers=["unipc"], steps=[2], feature_extractor="inception",
                             **TINY), tmp_path / "out", progress=False)
    argv = ["bench", "--model", "digits-eps", "--out", str(tmp_path / "o"), "--features", "inception",
            "--inception-weights", str(tmp_path / "nope.pth")]
    assert main(argv) == 2
    assert "Inception-V3 FID weights not found (given path" in capsys.readouterr().err
    assert main(["bench", "--model", "digits-eps", "--out", "x", "--inception-weights", "w.pth"]) == 2
    assert "--inception-weights needs --features inception" in capsys.readouterr().err


def test_inception_loads_a_pytorch_fid_state_dict(random_inception, tmp_path):
    import torch

    from fewstep.bench.inception import inception_features, load_inception

    net, weights = random_inception  # pytorch-fid's file: the state dict and its fc head (saved once per session)
    state = {**net.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    loaded = load_inception(weights)
    assert not loaded.training
    images = torch.rand(2, 1, 16, 16)
    feats = inception_features(loaded, images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and (feats >= 0).all()
    assert torch.allclose(feats, inception_features(net.eval(), images))
    # the extractor id (the reference-statistics cache key) follows the weights' content, not name and size
    from fewstep.bench.fid import inception_extractor

    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(other, tmp_path / weights.name)
    ids = [inception_extractor(folder / weights.name).id for folder in (weights.parent, tmp_path)]
    assert weights.stat().st_size == (tmp_path / weights.name).stat().st_size
    assert ids[0] != ids[1] and ids[0] == inception_extractor(weights).id
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"is not pytorch-fid's Inception-V3: missing \['Mixed_7c.branch_pool"):
        load_inception(tmp_path / "bad.pth")


def test_analytic_cells_match_the_analytic_table(tmp_path):
    from fewstep.bench.analytic_bench import run_analytic_bench

    rows = run_grid(BenchConfig(models=["analytic"], samplers=["unipc", "ddim"], steps=[5], num_samples=100),
                    tmp_path, progress=False)
    table, _ = run_analytic_bench(samplers=["unipc", "ddim"], steps=[5], num_samples=100, progress=False)
    assert [(r["sampler"], r["rmse"], r["fd"]) for r in rows] == [(t.sampler, t.rmse, t.fd) for t in table]
    assert all(r["guidance"] is None and r["mse"] is None and r["accuracy"] is None for r in rows)


# ----------------------------------------------------------------------------------------------------
# a diffusers pipeline directory with prompts from a file
def test_grid_on_a_text_to_image_pipeline_directory(tiny_sd, tmp_path, capsys):  # noqa: F811
    from fewstep.bench.runner import BenchConfig, run_grid
    from fewstep.cli import main

    config = BenchConfig(models=[str(tiny_sd)], samplers=["unipc", "ddim"], steps=[3, 8], guidance=[("cfg", 3.0)],
                         num_per_class=2, prompts=["a red square", "a blue circle"], reference_steps=30, batch_size=3)
    rows = run_grid(config, tmp_path / "sd", progress=False)
    by = {(r["sampler"], r["steps"]): r for r in rows}
    assert len(rows) == 4 and all(r["num_samples"] == 4 and r["fd"] is None for r in rows)
    assert by[("unipc", 8)]["mse"] < by[("unipc", 3)]["mse"]
    assert by[("unipc", 8)]["mse"] < by[("ddim", 8)]["mse"]
    again = run_grid(config, tmp_path / "sd", progress=False)  # resumable: nothing recomputed, same numbers
    assert [r["mse"] for r in again] == [r["mse"] for r in rows]
    with pytest.raises(ValueError, match="`prompts` must hold at least one prompt"):
        BenchConfig(models=[str(tiny_sd)], prompts=[])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    argv = ["bench", "--model", str(tiny_sd), "--prompts", str(prompts), "--samplers", "unipc", "--steps", "3",
            "--num-per-class", "1", "--reference-steps", "10", "--plot", "none", "--quiet", "--out",
            str(tmp_path / "cli")]
    assert main(argv) == 0
    assert (tmp_path / "cli" / "results.json").is_file() and "unipc" in capsys.readouterr().out
    # the default plot of a pipeline directory without inception features is its MSE (there is no FD to plot)
    argv[argv.index("--plot") + 1] = "fd"
    assert main(argv) == 2 and "--plot fd: --model" in capsys.readouterr().err
    from fewstep.cli import build_parser
    from fewstep.cli.bench import _check_applicable

    args = build_parser().parse_args(["bench", "--model", str(tiny_sd), "--out", "x"])
    _check_applicable(args, {"pipeline"})
    assert args.plot == "mse"
    code = main(["bench", "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    assert code == 2 and "or a diffusers pipeline directory" in capsys.readouterr().err


PIPE_DIST_SCRIPT = """
import json, sys
import torch
from fewstep.bench.fid import FeatureExtractor
from fewstep.bench.runner import BenchConfig, is_main_process, run_grid
def moments(x):
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) * 10
cfg = BenchConfig(models=[sys.argv[2]], samplers=["unipc"], steps=[3], guidance=[("cfg", 3.0)], num_per_class=3,
                  prompts=["a red square", "a blue circle"], reference_steps=6, batch_size=2,
                  feature_extractor=FeatureExtractor(moments, "moments"))
rows = run_grid(cfg, sys.argv[1], progress=False)
if is_main_process():
    print("ROWS" + json.dumps(rows))
"""


def test_pipeline_directory_two_cpu_processes_match_one(two_processes, tiny_sd, tmp_path):  # noqa: F811
    """Pipeline cells are split across processes too (per-sample seeds: the same samples), and
    so are the decodes and feature passes of the Frechet distance (each process featurises its share)."""
    from fewstep.bench.fid import FeatureExtractor
    from fewstep.bench.runner import BenchConfig, run_grid

    def moments(x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) * 10

    two = two_processes["pipeline"][1]
    one = run_grid(BenchConfig(models=[str(tiny_sd)], samplers=["unipc"], steps=[3], guidance=[("cfg", 3.0)],
                               num_per_class=3, prompts=["a red square", "a blue circle"], reference_steps=6,
                               batch_size=2, feature_extractor=FeatureExtractor(moments, "moments")),
                   tmp_path / "one", progress=False)
    assert len(two) == len(one) == 1 and two[0]["num_samples"] == one[0]["num_samples"] == 6
    assert two[0]["mse"] == pytest.approx(one[0]["mse"], rel=1e-4)
    assert one[0]["fd"] > 0 and two[0]["fd"] == pytest.approx(one[0]["fd"], rel=1e-3)


def test_grid_api_refuses_repeats_and_pipeline_cache_follows_the_weights(tmp_path):
    """Found by probing: through the API a repeated sampler/steps entry ran its cells several times (results.csv
    then disagreed with results.json); a pipeline folder whose weights were replaced reused the cached reference
    solve of the old weights (the cache key named the path only)."""
    from fewstep.bench.analytic_bench import run_analytic_bench
    from fewstep.bench.runner import _folder_fingerprint

    with pytest.raises(ValueError, match=r"`samplers` repeats \['ddim'\]"):
        BenchConfig(models=["analytic"], samplers=["ddim", "ddim"], steps=[3])
    with pytest.raises(ValueError, match=r"`steps` repeats \['3'\]"):
        BenchConfig(models=["analytic"], samplers=["ddim"], steps=[3, 3])
    with pytest.raises(ValueError, match=r"`samplers` repeats \['ddim'\]"):
        run_analytic_bench(samplers=["ddim", "ddim"], steps=[2], num_samples=10, progress=False)
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "w.safetensors"
    weights.write_bytes(b"old")
    before = _folder_fingerprint(folder)
    assert _folder_fingerprint(folder) == before
    weights.write_bytes(b"new weights")
    assert _folder_fingerprint(folder) != before


def test_damaged_cache_files_are_refused_by_name(tmp_path):
    """Found by probing: a reference solve of the wrong length broadcast into the MSE (exit 0, 8x off), a NaN one
    wrote MSE nan, a truncated one was a raw safetensors traceback."""
    from safetensors.torch import load_file, save_file

    cfg = BenchConfig(models=["digits-eps"], samplers=["ddim"], steps=[2], **TINY)
    run_grid(cfg, tmp_path / "first", cache_dir=tmp_path / "cache", progress=False)
    (ref,) = sorted((tmp_path / "cache").glob("refsolve-*.safetensors"))
    original = ref.read_bytes()
    from safetensors import safe_open

    with safe_open(str(ref), framework="pt") as f:
        meta = f.metadata()
    images = load_file(str(ref))["images"]
    for damaged, match in ((images[:1], "expected \\d+ rows"), (images * float("nan"), "damaged tensor 'images'")):
        save_file({"images": damaged.contiguous()}, str(ref), metadata=meta)
        with pytest.raises(ValueError, match=f"cache file .*refsolve-.* {match}.*delete it"):
            run_grid(cfg, tmp_path / f"run{len(match)}", cache_dir=tmp_path / "cache", progress=False)
    ref.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match="cache file .*refsolve-.* is not readable"):
        run_grid(cfg, tmp_path / "trunc", cache_dir=tmp_path / "cache", progress=False)
