"""Frechet distance for diffusers pipeline directories (`fewstep bench --reference-images`): reference statistics
from a folder or from the reference solves, any feature extractor, the cache, and the error messages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_real_pipeline import tiny_sd  # noqa: F401 - the tiny SD pipeline directory fixture

from fewstep.bench import runner
from fewstep.bench.fid import FeatureExtractor, folder_statistics, image_set_digest, list_reference_images
from fewstep.bench.runner import BenchConfig, run_grid
from fewstep.cli import main

PROMPTS = ["a red square", "a blue circle"]


def tiny_extractor(name: str = "tiny-conv", seed: int = 0) -> FeatureExtractor:
    """An Inception-shaped stand-in: strided conv, ReLU, average pool, linear head; 6-d features."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 6))
    return FeatureExtractor(lambda x: 100 * net(x), f"{name}:{seed}")


def _config(model, extractor, **kw) -> BenchConfig:
    base = dict(models=[str(model)], samplers=["dpm-solver++", "ddim"], steps=[2, 12], guidance=[("cfg", 3.0)],
                num_per_class=4, prompts=PROMPTS, reference_steps=12, batch_size=8, feature_extractor=extractor)
    return BenchConfig(**{**base, **kw})


def _write_images(folder, images01: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images01):
        array = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{k:03d}.png")


def _fd(rows, sampler, steps):
    return next(r["fd"] for r in rows if r["sampler"] == sampler and r["steps"] == steps)


def test_pipeline_fd_to_reference_solves_and_to_a_folder_of_them(tiny_sd, tmp_path):  # noqa: F811
    extractor = tiny_extractor()
    config = _config(tiny_sd, extractor)
    rows = run_grid(config, tmp_path / "solve", progress=False)
    assert all(r["fd"] is not None and math.isfinite(r["fd"]) for r in rows)
    # the reference sampler at the reference steps reproduces the reference samples: FD 0; few steps: far away
    assert _fd(rows, "dpm-solver++", 12) < 1e-9
    assert _fd(rows, "ddim", 2) > _fd(rows, "ddim", 12) > 1e-6
    assert json.loads((tmp_path / "solve" / "results.json").read_text())["config"]["feature_extractor"] == "tiny-conv:0"
    # the decoded reference solves written as 8-bit PNGs: the same FD up to the rounding to 8 bits
    world = runner._PipelineWorld(str(tiny_sd), config, progress=False, extractor=extractor)
    images = world.decoder.decode_latents(world.reference("cfg", 3.0).float())
    assert images.shape == (8, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
    _write_images(tmp_path / "ref", images)
    folder_rows = run_grid(_config(tiny_sd, extractor, reference_images=str(tmp_path / "ref")), tmp_path / "folder",
                           progress=False)
    assert _fd(folder_rows, "ddim", 2) == pytest.approx(_fd(rows, "ddim", 2), rel=0.05)
    assert _fd(folder_rows, "dpm-solver++", 12) < 0.01 * _fd(rows, "ddim", 2)
    assert [r["mse"] for r in folder_rows] == [r["mse"] for r in rows]  # the MSE does not depend on the FD reference
    assert len(list((tmp_path / "folder" / "cache").glob("refstats-*.safetensors"))) == 1


def test_decode_latents_matches_the_pt_output(tiny_sd):  # noqa: F811
    from diffusers import DiffusionPipeline

    from fewstep.pipelines import FewstepPipeline

    pipe = FewstepPipeline.from_pipe(DiffusionPipeline.from_pretrained(tiny_sd), scheduler="unipc", guidance="cfg",
                                     guidance_scale=3.0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, num_inference_steps=3)
    latents = pipe(generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="latent", **kw).images
    images = pipe(generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt", **kw).images
    assert pipe.default_image_size() == 8
    torch.testing.assert_close(pipe.decode_latents(latents), images.float())


def test_folder_statistics_are_cached_by_extractor_images_and_size(tmp_path):
    folder, cache = tmp_path / "ref", tmp_path / "cache"
    _write_images(folder, torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    extractor = tiny_extractor()
    mean, cov = folder_statistics(folder, extractor, (8, 8), cache)
    assert mean.shape == (6,) and cov.shape == (6, 6) and len(list(cache.iterdir())) == 1

    def fail(images):
        raise AssertionError("recomputed the reference features")

    same = FeatureExtractor(fail, extractor.id)  # same id and images: read from the cache, nothing decoded
    mean2, cov2 = folder_statistics(folder, same, (8, 8), cache)
    assert (mean2 == mean).all() and (cov2 == cov).all()
    folder_statistics(folder, tiny_extractor(seed=1), (8, 8), cache)  # another extractor: another file
    assert len(list(cache.iterdir())) == 2
    digest = image_set_digest(list_reference_images(folder))
    _write_images(folder, torch.zeros(1, 3, 8, 8))  # an image changed: another digest, recomputed
    assert image_set_digest(list_reference_images(folder)) != digest
    with pytest.raises(AssertionError, match="recomputed"):
        folder_statistics(folder, same, (8, 8), cache)


def test_reference_folder_errors_name_the_problem(tmp_path):
    extractor = tiny_extractor()
    with pytest.raises(ValueError, match=r"`reference_images` '.*nope' is not a directory; give a folder"):
        folder_statistics(tmp_path / "nope", extractor)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"holds 0 image file\(s\); the Frechet distance needs at least 2 \(.bmp"):
        folder_statistics(tmp_path / "empty", extractor)
    _write_images(tmp_path / "one", torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"holds 1 image file\(s\)"):
        folder_statistics(tmp_path / "one", extractor)
    mixed = tmp_path / "mixed"
    _write_images(mixed, torch.rand(2, 3, 8, 8))
    Image.new("RGB", (16, 12)).save(mixed / "999.png")
    with pytest.raises(ValueError, match=r"mixes image sizes: 000.png is 8x8, 999.png is 12x16 \(height x width\)"):
        folder_statistics(mixed, extractor)
    big = tmp_path / "big"
    _write_images(big, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"holds 16x16 images but the generated images are 8x8 .* --image-size"):
        folder_statistics(big, extractor, (8, 8))
    (big / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"'.*broken.png' is not a readable image"):
        folder_statistics(big, extractor)
    # a truncated file: its header reads (the size check passes), its pixels do not
    cut = tmp_path / "cut"
    _write_images(cut, torch.rand(2, 3, 16, 16))
    data = (cut / "001.png").read_bytes()
    (cut / "001.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"'.*001.png' is not a readable image"):
        folder_statistics(cut, extractor)


def test_16_bit_reference_images_keep_their_values(tmp_path):
    """A 16-bit greyscale PNG is scaled by 65535 (PIL's RGB conversion clipped it to white)."""
    from fewstep.bench.fid import _load_batches

    folder = tmp_path / "deep"
    folder.mkdir()
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    for k in range(2):
        Image.fromarray(values).save(folder / f"{k}.png")
    assert Image.open(folder / "0.png").mode.startswith("I")
    batch = next(_load_batches(list_reference_images(folder), 2))
    expected = torch.tensor(values / 65535.0, dtype=torch.float32)
    assert batch.shape == (2, 3, 2, 2) and torch.allclose(batch[1, 2], expected, atol=1e-6)


def test_extractor_and_config_errors(tiny_sd, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="`id` must be a non-empty string"):
        FeatureExtractor(lambda x: x, "")
    with pytest.raises(TypeError, match="`fn` must be callable"):
        FeatureExtractor(None, "x")
    with pytest.raises(ValueError, match=r"returned torch.Size\(\[2, 3, 8, 8\]\) for 2 images; it must return"):
        FeatureExtractor(lambda x: x, "identity")(torch.rand(2, 3, 8, 8))
    model, ref = str(tiny_sd), tmp_path / "ref"
    _write_images(ref, torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="`feature_extractor` must be one of .* or a FeatureExtractor, got 'clip'"):
        BenchConfig(models=[model], prompts=PROMPTS, feature_extractor="clip")
    with pytest.raises(ValueError, match="needs image features: feature_extractor='inception'"):
        BenchConfig(models=[model], prompts=PROMPTS, reference_images=str(ref))
    with pytest.raises(ValueError, match="is for diffusers pipeline directories among `models`"):
        BenchConfig(models=["digits-eps"], feature_extractor=tiny_extractor(), reference_images=str(ref))
    with pytest.raises(ValueError, match="holds 0 image file"):
        BenchConfig(models=[model], prompts=PROMPTS, feature_extractor=tiny_extractor(), reference_images=str(tmp_path))
    with pytest.raises(ValueError, match=r"needs at least 2 samples per cell: 1 prompt\(s\) x `num_per_class` 1"):
        BenchConfig(models=[model], prompts=PROMPTS[:1], num_per_class=1, feature_extractor=tiny_extractor())
    big = tmp_path / "big"
    _write_images(big, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="holds 16x16 images but the generated images are 8x8"):
        run_grid(_config(tiny_sd, tiny_extractor(), reference_images=str(big)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.json").exists()  # refused before any cell ran


def test_cli_pipeline_fd_with_inception_weights_and_reference_images(tiny_sd, random_inception, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    """The real path: a random-weights Inception-V3 saved as pytorch-fid's file, PNG reference images."""
    monkeypatch.delenv("FEWSTEP_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    prompts, ref = tmp_path / "prompts.txt", tmp_path / "ref"
    prompts.write_text("a red square\n")
    _write_images(ref, torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    argv = ["bench", "--model", str(tiny_sd), "--prompts", str(prompts), "--samplers", "ddim", "--steps", "2",
            "--num-per-class", "2", "--reference-steps", "4", "--features", "inception", "--reference-images",
            str(ref), "--plot", "none", "--quiet", "--out", str(tmp_path / "out")]
    assert main(argv) == 2  # no weights yet: says how to supply them, runs nothing
    assert "pass the file with --inception-weights PATH" in capsys.readouterr().err
    _, weights = random_inception  # pytorch-fid's file, saved once per session
    assert main([*argv, "--inception-weights", str(weights)]) == 0
    assert "| ddim | 2 | 2 |" in capsys.readouterr().out
    row = json.loads((tmp_path / "out" / "results.json").read_text())["cells"].popitem()[1]
    assert math.isfinite(row["fd"]) and row["fd"] >= 0 and row["num_samples"] == 2
    no_features = [a for a in argv if a not in ("--features", "inception")]
    assert main([*no_features[:-1], str(tmp_path / "o2")]) == 2
    assert "needs image features" in capsys.readouterr().err


def test_frechet_distance_of_singular_covariances_matches_the_nuclear_norm_form():
    """Fewer samples than features (every pipeline FD with Inception): C = A^T A / (n - 1) for centered features A,
    so tr (C_1 C_2)^{1/2} is the nuclear norm of A B^T / (n - 1) -- an independent closed form."""
    from fewstep.bench.metrics import feature_statistics, frechet_distance

    g = np.random.default_rng(0)
    a, b = g.normal(size=(6, 300)), g.normal(size=(6, 300)) * 1.5 + 0.2
    (m1, c1), (m2, c2) = feature_statistics(a), feature_statistics(b)
    ac, bc = a - m1, b - m2
    nuclear = np.linalg.svd(ac @ bc.T / 5, compute_uv=False).sum()
    expected = (m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * nuclear
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="`cov2` must be a symmetric covariance matrix"):
        frechet_distance(m1[:2], np.eye(2), m2[:2], np.array([[1.0, 0.5], [0.0, 1.0]]))


def test_any_extractor_also_serves_the_digits_models(tmp_path):
    """Grayscale digits reach the extractor as RGB; its id keys the results and the reference statistics."""
    grid = dict(models=["digits-eps"], samplers=["unipc"], steps=[4], classes=[0, 1, 2], num_per_class=3,
                reference_steps=8, guidance=["cfg:3"])
    default = run_grid(BenchConfig(**grid), tmp_path / "classifier", progress=False)
    seen = []
    extractor = tiny_extractor()
    spy = FeatureExtractor(lambda x: seen.append(x.shape) or extractor.fn(x), extractor.id)
    rows = run_grid(BenchConfig(feature_extractor=spy, **grid), tmp_path / "tiny", progress=False)
    assert seen and all(s[1] == 3 for s in seen)
    assert rows[0]["mse"] == default[0]["mse"] and rows[0]["accuracy"] == default[0]["accuracy"]
    assert rows[0]["fd"] != default[0]["fd"] and rows[0]["fd"] > 0
    assert json.loads((tmp_path / "tiny" / "results.json").read_text())["config"]["feature_extractor"] == "tiny-conv:0"
    assert len(list((tmp_path / "tiny" / "cache").glob("refstats-*.safetensors"))) == 2  # classifier + tiny-conv


def test_folder_statistics_checks_the_size_argument(tmp_path):
    """Found by probing: size="88" was read as (8, 8) and reported as "holds 8x8 images but the generated images are
    8x8", and size=8 raised a bare TypeError; numpy batch sizes were refused as "must be an integer ... got
    np.int64(2)"."""
    folder = tmp_path / "ref"
    _write_images(folder, torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    extractor = tiny_extractor()
    for size in ("88", 8, (8,), (8, 8, 3), (8.0, 8), (0, 8), (True, 8), [8, None]):
        with pytest.raises(ValueError, match=r"`size` must be None or a \(height, width\) pair of integers >= 1, "
                                             r"e\.g\. \(8, 8\); got"):
            folder_statistics(folder, extractor, size)
    mean, _ = folder_statistics(folder, extractor, (np.int64(8), 8))
    for size in ([8, 8], torch.Size([8, 8]), None):
        np.testing.assert_array_equal(folder_statistics(folder, extractor, size)[0], mean)
    numpy_batch = FeatureExtractor(extractor.fn, extractor.id, np.int64(2))
    assert numpy_batch.batch_size == 2 and type(numpy_batch.batch_size) is int
    np.testing.assert_allclose(folder_statistics(folder, numpy_batch, (8, 8))[0], mean, rtol=1e-6, atol=1e-6)


def test_float_and_32_bit_tiff_reference_images(tmp_path):
    """Found by probing: a 32-bit float TIFF (PIL mode F) went through PIL's 8-bit RGB conversion and read as black;
    float images are intensities in [0, 1], kept as they are; other values, and 32-bit integer images beyond
    16 bits, are refused naming the file and the mode."""
    from fewstep.bench.fid import _load_batches

    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    good = tmp_path / "float"
    good.mkdir()
    for k in range(2):
        Image.fromarray(values * (1 - 0.5 * k)).save(good / f"{k}.tif")
    assert Image.open(good / "0.tif").mode == "F"
    batch = next(_load_batches(list_reference_images(good), 2))
    assert batch.shape == (2, 3, 2, 2) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0, 1], torch.from_numpy(values))
    torch.testing.assert_close(batch[1, 0], torch.from_numpy(values * 0.5))

    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(values).save(bad / "0.tif")
    Image.fromarray(values * 255).save(bad / "1.tif")
    with pytest.raises(ValueError, match=r"'.*1.tif' is a 32-bit float image \(PIL mode F\) with values in \[0, 255\]; "
                                         r"float images must hold intensities in \[0, 1\]"):
        folder_statistics(bad, tiny_extractor())

    deep = tmp_path / "int32"
    deep.mkdir()
    for k in range(2):
        Image.fromarray(np.array([[0, 70_000 * k]], dtype=np.int32)).save(deep / f"{k}.tif")
    assert Image.open(deep / "1.tif").mode == "I"
    with pytest.raises(ValueError, match=r"'.*1.tif' is a 32-bit integer image \(PIL mode I\) with values in "
                                         r"\[0, 70000\]; only 0..65535"):
        folder_statistics(deep, tiny_extractor())
