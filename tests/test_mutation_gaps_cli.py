"""Mutation gaps of the command line (``fewstep/cli``): what each flag hands the library, checked against an
independent reference -- the pipeline called directly with the same arguments (the PNG grid decoded tile by tile),
the defaults README and ``--help`` document, and the exit codes the CLI promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.guidance import APG, CFG
from fewstep.pipelines.swap import swap_sampler

SIDE, SCALE, PAD = 16, 6, 2  # digits tiles are 16x16; image_grid upscales to >= 96 px cells with a 2 px border


class _Stop(Exception):
    """Raised by a spy once it has recorded what the CLI handed the library (nothing expensive runs)."""


def _tiles(path, n: int, columns: int) -> np.ndarray:
    """The ``n`` 16x16 uint8 tiles of a PNG grid, row-major over ``columns`` columns, read back independently of
    ``image_grid``: cell k sits at (2 + r * 98, 2 + c * 98) and is a nearest-neighbour x6 upscale."""
    img = np.asarray(Image.open(path))
    cell = SIDE * SCALE + PAD
    rows = -(-n // columns)
    assert img.shape == (rows * cell + PAD, columns * cell + PAD)
    out = []
    for k in range(n):
        r, c = divmod(k, columns)
        block = img[PAD + r * cell:PAD + r * cell + SIDE * SCALE, PAD + c * cell:PAD + c * cell + SIDE * SCALE]
        tile = block[::SCALE, ::SCALE]
        assert np.array_equal(block, np.kron(tile, np.ones((SCALE, SCALE), dtype=np.uint8)))
        out.append(tile)
    return np.stack(out).astype(np.int64)


def _as_uint8(images) -> np.ndarray:
    """NHWC (or NCHW one-channel) floats in [0, 1] -> the uint8 levels a PNG stores."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    a = np.asarray(images, dtype=np.float64)
    a = a[..., 0] if a.shape[-1] == 1 else a[:, 0]
    return np.round(np.clip(a, 0, 1) * 255).astype(np.int64)


def _digits(sampler: str, labels, steps: int, seed: int, guidance, **options) -> np.ndarray:
    """The reference: the embedded digits-eps pipeline called directly (no ``fewstep.pipelines.generate``)."""
    pipe = swap_sampler(fewstep.load_default("digits-eps", sampler=None), sampler, **options)
    pipe.set_progress_bar_config(disable=True)
    return _as_uint8(pipe(class_labels=list(labels), num_inference_steps=steps, guidance=guidance,
                          generator=torch.Generator().manual_seed(seed), output_type="np").images)


# Tolerance: the CLI and the reference run the same float32 computation on the same batch; one grey level covers a
# rounding flip at .5. Every flag checked below moves some pixel by >= 100 levels (a wrong wiring is no near miss).
LEVELS = 1


def test_generate_flags_reach_the_pipeline(tmp_path, capsys):
    """--sampler, --sampler-option, --steps, --num-images, --class (cycled), --seed, --guidance, --guidance-scale
    and --guidance-option each reach the run: the grid equals the pipeline called with the same arguments."""
    out = tmp_path / "g.png"
    assert main(["generate", "--sampler", "unipc", "--sampler-option", "solver_order=1", "--steps", "3",
                 "--num-images", "3", "--class", "4,7", "--seed", "123", "--guidance", "apg", "--guidance-scale", "5",
                 "--guidance-option", "eta=0.5", "--quiet", "--out", str(out)]) == 0
    got = _tiles(out, 3, 3)
    want = _digits("unipc", [4, 7, 4], 3, 123, APG(guidance_scale=5.0, eta=0.5), solver_order=1)
    assert np.abs(got - want).max() <= LEVELS
    assert "3 images, sampler unipc, NFE 3 x2 (apg)" in capsys.readouterr().out


def test_generate_defaults_are_the_documented_ones(tmp_path):
    """README/--help: default sampler unipc, 10 images cycling classes 0-9 in one row of 10, seed 0, CFG scale 3,
    float32 weights."""
    out = tmp_path / "d.png"
    assert main(["generate", "--steps", "3", "--quiet", "--out", str(out)]) == 0
    got = _tiles(out, 10, 10)
    want = _digits("unipc", range(10), 3, 0, CFG(3.0))  # 3 steps: at 2, UniPC and DPM-Solver++ coincide
    assert np.abs(got - want).max() <= LEVELS


def test_generate_parser_defaults_match_the_help_text():
    """The documented defaults of `fewstep generate` (README and --help: steps 10, seed 0, float32, auto device,
    samples.png, digits-eps)."""
    from fewstep.cli import build_parser

    args = build_parser(["generate"]).parse_args(["generate"])
    assert (args.steps, args.seed, args.dtype, args.device, args.out, args.model) == (
        10, 0, "float32", "auto", "samples.png", "digits-eps")


def _spy(monkeypatch, target: str, record: dict):
    """Replace ``target`` (module path + attribute) by a function that records its arguments and stops the run."""
    def spy(*args, **kwargs):
        record.update(kwargs, _args=args, _rng=torch.randn(4))
        raise _Stop

    monkeypatch.setattr(target, spy)


def _run_until_stopped(argv) -> None:
    with pytest.raises(_Stop):
        main(argv)


def test_generate_dc_solver_ratio_lookup_defaults_to_this_runs_scale_and_model(monkeypatch, tmp_path):
    """README: with dc_ratios_file/dc_cpr, `dc_guidance_scale` and `dc_model` default to --guidance-scale (CFG's
    3 when not given) and --model."""
    seen: dict = {}
    _spy(monkeypatch, "fewstep.pipelines.generate.load_model", seen)
    argv = ["generate", "--sampler", "dc-solver", "--sampler-option", "dc_cpr=digits-eps", "--quiet",
            "--out", str(tmp_path / "x.png")]
    _run_until_stopped(argv)
    assert seen["sampler_options"] == {"dc_cpr": "digits-eps", "dc_guidance_scale": 3.0, "dc_model": "digits-eps"}
    _run_until_stopped([*argv, "--guidance-scale", "5"])
    assert seen["sampler_options"]["dc_guidance_scale"] == 5.0


def test_bench_analytic_table_hands_over_the_flags_and_documented_defaults(monkeypatch):
    """--help: analytic defaults schedule vp, 2000 samples, dimension 2, seed 0, steps 5,10,20; given values win."""
    seen: dict = {}
    _spy(monkeypatch, "fewstep.bench.analytic_bench.run_analytic_bench", seen)
    _run_until_stopped(["bench", "--quiet"])
    assert (seen["schedule"], seen["num_samples"], seen["dim"], seen["seed"], list(seen["steps"])) == (
        "vp", 2000, 2, 0, [5, 10, 20])
    _run_until_stopped(["bench", "--schedule", "flow", "--num-samples", "30", "--dim", "3", "--seed", "9",
                        "--steps", "4,6", "--quiet"])
    assert (seen["schedule"], seen["num_samples"], seen["dim"], seen["seed"], list(seen["steps"])) == (
        "flow", 30, 3, 9, [4, 6])


def test_bench_grid_config_has_the_documented_defaults(monkeypatch, tmp_path, capsys):
    """--help: digits grid defaults guidance cfg:3, 20 per class, classes 0-9, batch 250, 200 reference steps,
    digits-classifier features."""
    seen: dict = {}
    _spy(monkeypatch, "fewstep.bench.runner.run_grid", seen)
    _run_until_stopped(["bench", "--model", "digits-eps", "--steps", "4", "--quiet", "--out", str(tmp_path / "b")])
    config = seen["_args"][0]
    assert (config.guidance, config.num_per_class, config.classes, config.batch_size, config.reference_steps,
            config.feature_extractor, config.steps, config.seed) == (
        [("cfg", 3.0)], 20, list(range(10)), 250, 200, "digits-classifier", [4], 0)
    # --help: the reference solve needs more steps than the largest --steps (200 = the default is refused)
    assert _exit(["bench", "--model", "digits-eps", "--steps", "200", "--quiet", "--out", str(tmp_path / "c")]) == 2
    assert "--reference-steps 200 (the default): the many-step reference solve needs more steps" in (
        capsys.readouterr().err)
    plotted: list = []
    monkeypatch.setattr("fewstep.bench.runner.run_grid", lambda *args, **kwargs: [])
    monkeypatch.setattr("fewstep.bench.runner.format_markdown", lambda rows: "")
    monkeypatch.setattr("fewstep.bench.runner.plot_results", lambda rows, target, metric: plotted.append(metric))
    assert main(["bench", "--model", "analytic", "--steps", "4", "--quiet", "--out", str(tmp_path / "a")]) == 0
    assert plotted == ["fd"]  # --help: --plot defaults to fd where a model reports it (analytic: rmse and fd)


def test_search_defaults_and_flags_reach_the_objective_and_the_search(monkeypatch, tmp_path):
    """--help: digits-eps search at CFG 3 with 20 samples per class; --seed and --no-predictor reach the search."""
    from fewstep.search import objectives

    seen: dict = {}

    class ObjectiveSpy:
        name = objectives.DigitsObjective.name

        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise _Stop

    monkeypatch.setattr(objectives, "DigitsObjective", ObjectiveSpy)
    _run_until_stopped(["search", "--nfe", "4", "--quiet", "--out", str(tmp_path / "s.json")])
    assert (seen["guidance_scale"], seen["num_per_class"]) == (3.0, 20)
    _spy(monkeypatch, "fewstep.search.search", seen)
    _run_until_stopped(["search", "--model", "analytic", "--nfe", "3", "--seed", "5", "--no-predictor", "--quiet",
                        "--out", str(tmp_path / "a.json")])
    assert (seen["seed"], seen["use_predictor"], seen["_args"][2]) == (5, False, 40)  # budget default 40


def test_quantize_defaults_and_flags_reach_calibration_and_config(monkeypatch, tmp_path):
    """README: lp metric with p = 2.4, conv_in/conv_out kept in float on top of --exclude; --guidance-scale and
    --seed reach the calibration set."""
    from fewstep import quant

    configs: list = []
    real = quant.QuantConfig

    def config_spy(**kwargs):
        configs.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(quant, "QuantConfig", config_spy)
    seen: dict = {}
    _spy(monkeypatch, "fewstep.quant.build_calibration_set", seen)
    _run_until_stopped(["quantize", "--guidance-scale", "1.5", "--seed", "4", "--steps", "3", "--samples", "2",
                        "--quiet", "--out", str(tmp_path / "q")])
    assert (configs[-1]["metric"], configs[-1]["p"], configs[-1]["format"]) == ("lp", 2.4, "int8")
    assert set(configs[-1]["exclude"]) == {"conv_in", "conv_out"}
    assert (seen["guidance_scale"], seen["seed"], seen["steps"], seen["num_samples"], seen["method"]) == (
        1.5, 4, 3, 2, "ndtc")
    _run_until_stopped(["quantize", "--ndtc-mean", "0.5", "--steps", "3", "--samples", "2", "--quiet",
                        "--out", str(tmp_path / "q")])  # README: NDTC mean in [0, 0.5] (<= T/2)
    assert seen["ndtc_mean"] == 0.5


def test_calibrate_flags_reach_the_library_and_the_run_is_seeded(monkeypatch, tmp_path):
    """calibrate dc: --order/--base/--variable reach the scheduler overrides, the documented defaults the search,
    and the run's torch RNG is seeded with --seed; calibrate ems: default JVP batch 256 (--help)."""
    seen: dict = {}
    _spy(monkeypatch, "fewstep.calibrate.dc.calibrate_class_conditional", seen)
    _run_until_stopped(["calibrate", "dc", "--order", "3", "--seed", "6", "--quiet",
                        "--out", str(tmp_path / "d.safetensors")])
    assert seen["scheduler_overrides"] == {"dc_base": "unipc", "dc_order": 3, "dc_variable": "t"}
    assert (list(seen["_args"][1]), list(seen["_args"][2]), seen["datapoints"], seen["reference"], seen["iters"],
            seen["lr"], seen["objective"], seen["seed"]) == ([5, 6, 8, 10], [1.0, 3.0, 7.0], 10, "ddim:200", 40, 0.1,
                                                            "next", 6)
    assert torch.equal(seen["_rng"], torch.randn(4, generator=torch.Generator().manual_seed(6)))  # torch.manual_seed(6)
    _spy(monkeypatch, "fewstep.calibrate.ems.class_conditional_ems", seen)
    _run_until_stopped(["calibrate", "ems", "--quiet", "--out", str(tmp_path / "e.safetensors")])
    assert (seen["batch_size"], seen["num_samples"], seen["num_intervals"], seen["probes"]) == (256, 1024, 64, 1)
    _spy(monkeypatch, "fewstep.calibrate.dc.calibrate_class_conditional", seen)
    seen.clear()  # --help: the reference needs at least as many steps as the largest --nfe (equal is enough)
    _run_until_stopped(["calibrate", "dc", "--reference", "ddim:10", "--nfe", "5,10", "--quiet",
                        "--out", str(tmp_path / "d.safetensors")])
    assert seen["reference"] == "ddim:10"


def test_generate_restoration_grid_puts_each_measurement_above_its_restoration(tmp_path):
    """digits-mr with --measurement: a grid of min(n, 10) columns, the file's tiles (top row, as given) above the
    pipeline's restorations of them (the MRS sampler called directly with the same seed and steps)."""
    tiles = np.random.default_rng(0).integers(0, 256, (6, SIDE, SIDE)).astype(np.uint8)
    measurement, out = tmp_path / "m.png", tmp_path / "r.png"
    Image.fromarray(np.concatenate(list(tiles), axis=1)).save(measurement)
    assert main(["generate", "--model", "digits-mr", "--sampler", "mrs", "--steps", "2", "--seed", "3",
                 "--measurement", str(measurement), "--quiet", "--out", str(out)]) == 0
    got = _tiles(out, 12, 6)
    assert np.abs(got[:6] - tiles).max() <= LEVELS  # uint8 -> [-1, 1] -> [0, 1] -> uint8: at most a rounding flip
    pipe = swap_sampler(fewstep.load_default("digits-mr", sampler=None), "mrs")
    pipe.set_progress_bar_config(disable=True)
    mu = torch.from_numpy(tiles.astype(np.float32) / 255)[:, None] * 2 - 1
    want = pipe(mu, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert np.abs(got[6:] - _as_uint8(want)).max() <= LEVELS


def test_generate_posterior_flags_reach_the_inverse_task_and_the_grid(monkeypatch, tmp_path):
    """--task/--posterior/--posterior-step/--gluing/--noise-std/--seed/--num-images/--steps reach
    ``run_inverse_task``; the grid shows the degraded inputs (top row) above the restorations."""
    from types import SimpleNamespace

    calls: list = []
    rng = np.random.default_rng(1)
    images, degraded = (torch.from_numpy(rng.uniform(-1, 1, (3, 1, SIDE, SIDE)).astype(np.float32)) for _ in "ab")

    def fake(pipe, task, method, **kwargs):
        calls.append(dict(kwargs, task=task, method=method))
        return SimpleNamespace(images=images, degraded=degraded, metrics={}, nfe=2, seconds=0.0)

    monkeypatch.setattr("fewstep.pipelines.posterior.run_inverse_task", fake)
    out = tmp_path / "p.png"
    common = ["generate", "--task", "inpaint", "--steps", "3", "--num-images", "3", "--seed", "4", "--quiet"]
    assert main([*common, "--posterior", "psld", "--posterior-step", "0.5", "--gluing", "0.2", "--noise-std", "0.1",
                 "--out", str(out)]) == 0
    call = calls[-1]
    assert (call["task"], call["num_images"], call["steps"], call["seed"], call["noise_std"]) == ("inpaint", 3, 3, 4,
                                                                                                0.1)
    assert (call["method"].name, call["method"].step_size, call["method"].gluing) == ("psld", 0.5, 0.2)
    want = np.concatenate([_as_uint8((degraded + 1) / 2), _as_uint8((images + 1) / 2)])
    assert np.abs(_tiles(out, 6, 3) - want).max() <= LEVELS
    assert main([*common, "--out", str(out)]) == 0  # README: the default posterior sampler is STSL
    assert calls[-1]["method"].name == "stsl"


def test_generate_flowchef_flags_reach_run_task_and_run_edit(monkeypatch, tmp_path):
    """FlowChef on digits-flow: --seed/--steps/--num-images/--class/--noise-std/--gaussian-fill and the steering
    flags reach ``run_task``; --task edit uses README's default masked-guidance scale 4 and --seed."""
    from fewstep.pipelines import flowchef

    seen: dict = {}
    _spy(monkeypatch, "fewstep.pipelines.flowchef.run_task", seen)
    out = str(tmp_path / "f.png")
    _run_until_stopped(["generate", "--model", "digits-flow", "--task", "inpaint", "--steps", "3", "--num-images",
                        "2", "--seed", "5", "--noise-std", "0.05", "--gaussian-fill", "--flowchef-step", "0.7",
                        "--flowchef-inner-steps", "2", "--flowchef-steered-steps", "3", "--flowchef-optimizer", "adam",
                        "--quiet", "--out", out])
    config = seen["config"]
    assert (seen["_args"][1], seen["num_images"], seen["steps"], seen["seed"], seen["noise_std"],
            seen["gaussian_fill"]) == ("inpaint", 2, 3, 5, 0.05, True)
    assert (config.step_size, config.inner_steps, config.steered_steps, config.optimizer) == (0.7, 2, 3, "adam")
    _run_until_stopped(["generate", "--model", "digits-flow", "--task", "classifier", "--class", "3,8", "--steps",
                        "2", "--num-images", "2", "--quiet", "--out", out])
    assert (seen["_args"][1], seen["classes"]) == ("classifier", [3, 8])
    assert seen["config"] == flowchef.DEFAULT_CONFIGS["classifier"]  # no flag given: the task's defaults
    _spy(monkeypatch, "fewstep.pipelines.flowchef.run_edit", seen)
    _run_until_stopped(["generate", "--model", "digits-flow", "--task", "edit", "--class", "3", "--steps", "2",
                        "--num-images", "2", "--seed", "8", "--quiet", "--out", out])
    assert (seen["guidance_scale"], seen["seed"], seen["target_classes"], seen.get("edit_size", 12)) == (4.0, 8, [3],
                                                                                                         12)
    _run_until_stopped(["generate", "--model", "digits-flow", "--task", "edit", "--edit-size", "16", "--steps", "2",
                        "--num-images", "1", "--quiet", "--out", out])  # --edit-size <= 16: the whole digit
    assert seen["edit_size"] == 16


def _exit(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own exits, should main ever let one through
        return exc.code


@pytest.mark.parametrize(("argv", "ok"), [
    (["generate", "--seed", str(2**63 - 1)], True), (["generate", "--seed", str(2**63)], False),
    (["generate", "--seed", "-1"], False),
    (["generate", "--posterior-step", "0"], True), (["generate", "--noise-std", "0"], True),
    (["generate", "--noise-std", "-0.1"], False), (["generate", "--steps", "1"], True),
    (["generate", "--steps", "0"], False),
    (["quantize", "--out", "q", "--guidance-scale", "0"], True), (["quantize", "--out", "q", "--ndtc-std", "0"], True),
    (["quantize", "--out", "q", "--guidance-scale", "-1"], False),
    (["calibrate", "dc", "--out", "d.safetensors", "--guidance-scale", "0,1"], True),
    (["calibrate", "dc", "--out", "d.safetensors", "--nfe", "3"], True),
    (["calibrate", "dc", "--out", "d.safetensors", "--nfe", "2"], False),
    (["calibrate", "ems", "--out", "e.safetensors", "--intervals", "2"], True),
    (["calibrate", "ems", "--out", "e.safetensors", "--intervals", "1"], False),
    (["search", "--out", "s.json", "--nfe", "2"], True), (["search", "--out", "s.json", "--nfe", "1"], False),
    (["bench", "--classes", "0"], True), (["bench", "--steps", "5,5"], False),
    (["generate", "--guidance-scale", "inf"], False), (["generate", "--guidance-scale", "nan"], False),
])
def test_documented_value_bounds_are_inclusive_where_the_help_says_so(argv, ok, capsys):
    """--help/README bounds: seeds in [0, 2**63 - 1], numbers >= 0 (0 allowed), --steps >= 1, --nfe >= 3 (dc) / >= 2
    (search), --intervals >= 2, axis lists without repeats. Parsed by ``build_parser`` (argparse exits 2 on a bad
    value, with one line naming the flag)."""
    from fewstep.cli import build_parser

    parser = build_parser([argv[0]])
    if ok:
        parser.parse_args(argv)
    else:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"fewstep {argv[0]}")


def test_flowchef_class_ids_are_checked_against_the_models_ten_classes(tmp_path, capsys):
    """digits-flow has classes 0-9: --class 10 is a usage error naming the range (exit 2), --class 9 runs."""
    argv = ["generate", "--model", "digits-flow", "--task", "classifier", "--steps", "1", "--num-images", "1",
            "--quiet", "--out", str(tmp_path / "c.png")]
    assert _exit([*argv, "--class", "10"]) == 2
    assert "--class must list class ids in 0..9 (the model's classes), got 10" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(("error", "code", "text"), [
    (FloatingPointError("NaN at step 2"), 1, "fewstep generate: error: NaN at step 2"),
    (KeyboardInterrupt(), 130, "fewstep generate: interrupted"),
    (ValueError("bad value"), 2, "fewstep generate: error: bad value"),
    (MemoryError("Unable to allocate 3 GiB"), 1, "ran out of memory (RAM) (Unable to allocate 3 GiB); generate fewer"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), 1, "ran out of GPU memory (CUDA out of memory."),
    (OSError(28, "No space left on device", "/x.png"), 1, "fewstep generate: error: No space left on device: '/x.png'"),
])
def test_exit_codes_and_one_line_messages(monkeypatch, tmp_path, capsys, error, code, text):
    """The module docstring of fewstep.cli: 2 usage error, 1 a failed run (diverged, out of memory -- GPU or RAM
    named --, OS error), 130 Ctrl-C; each one line on stderr."""
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("fewstep.pipelines.generate.load_model", fail)
    assert main(["generate", "--quiet", "--out", str(tmp_path / "x.png")]) == code
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1


def test_guidance_alias_and_step_limit(monkeypatch, tmp_path):
    """`--guidance cfgpp` is CFG++ (the alias); --steps equal to the model's training timesteps is allowed (the
    bound is <=), one more is a usage error."""
    from fewstep.cli import build_parser

    assert build_parser(["generate"]).parse_args(["generate", "--guidance", "cfgpp"]).guidance == "cfg++"
    seen: dict = {}
    _spy(monkeypatch, "fewstep.pipelines.generate.generate", seen)
    limit = fewstep.load_default("digits-eps", sampler=None).scheduler.config.num_train_timesteps
    argv = ["generate", "--num-images", "1", "--quiet", "--out", str(tmp_path / "x.png")]
    _run_until_stopped([*argv, "--steps", str(limit)])
    assert seen["steps"] == limit
    assert main([*argv, "--steps", str(limit + 1)]) == 2


def test_a_failed_write_leaves_no_file(monkeypatch, tmp_path, capsys):
    """Outputs are written atomically: an OS error while the PNG is written (a full disk) is exit code 1 and leaves
    neither the file nor a half-written one."""
    from PIL import Image as PILImage

    real_save = PILImage.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # the bytes land, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", failing_save)
    out = tmp_path / "x.png"
    assert main(["generate", "--steps", "1", "--num-images", "1", "--quiet", "--out", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
