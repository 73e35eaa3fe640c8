"""README.md's ```python blocks, extracted at test time and executed (offline, CPU) so they cannot rot silently.

Each block is found by an anchor (a distinctive piece of its text, never a line number) and run verbatim in a
namespace holding the names it assumes but does not define (``pipe``/``sd_pipe``: a tiny saved-and-reloaded SD
pipeline with a local tokenizer, ``flux_pipe``: a tiny Flux pipeline with tokenizers, ``prompt``, ``degraded``, ...).
The only edits are the per-block substitutions (CPU-sized counts), each asserted to apply, statements picked by
anchor where a block mixes CUDA-only and CPU lines (``PARTLY_RUN``), and FlowChef's commented-out inpainting lines,
run uncommented. Every README python block must be run or listed in ``SKIPPED`` with its reason: a new block fails
``test_every_readme_block_is_run_or_skipped``. A block that is wrong on the current API is an ``xfail(strict=True)``
test, which fails (XPASS) once the README is fixed.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import SDXL_EULER
from diffusers import EulerDiscreteScheduler, FluxPipeline, StableDiffusionPipeline
from diffusers.modular_pipelines import SequentialPipelineBlocks, StableDiffusionXLAutoBlocks
from PIL import Image
from test_fewstep_pipeline import _sdxl_embeds, sd_path, sdxl  # noqa: F401 - the tiny SD 1.5 / SDXL fixtures
from test_fewstep_pipeline_flow import text_pipes  # noqa: F401 - saved tiny SD3/Flux pipelines with tokenizers

import fewstep
from fewstep import samplers

README = Path(__file__).resolve().parents[1] / "README.md"

# anchors: a piece of text that occurs in exactly one README python block
API = 'pipe.scheduler = samplers.get("unipc").from_config(pipe.scheduler.config)'
SOLVERS = "from fewstep.solvers import VPSchedule, compile_plan, grids, sample_loop"
V3 = 'fewstep.load_default("digits-eps", sampler="dpm-solver-v3")'
DC = 'samplers.get("dc-solver").from_config('
MRS = 'swap_sampler(pipe, "mrs"'
GUIDANCE = "FewstepPipeline.from_pipe(flux_pipe"
MODULAR = "guider=CFGPlusPlusGuider("
SPEED = "cuda_graph=True"
FLOWCHEF = "from fewstep.pipelines.flowchef import"
POSTERIOR = "from fewstep.pipelines.posterior import posterior_sample"
QUANT = "quant.build_calibration_set("

RUN = [API, SOLVERS, V3, DC, MRS, GUIDANCE, MODULAR, SPEED, FLOWCHEF, POSTERIOR, QUANT]
#: blocks not run at all, with the reason (none at present)
SKIPPED: dict[str, str] = {}
#: blocks of which only some statements run, with the reason (checked in the block's test)
PARTLY_RUN = {
    SPEED: "its first three statements need CUDA (cuda_graph=True, .to('cuda'); quantized='sd15-w8a8' is no "
    "directory here); the fourth, ClassConditionalPipeline.from_pipe(..., compile=True), runs",
}


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def _block(anchor: str) -> str:
    found = [b for b in _python_blocks() if anchor in b]
    assert len(found) == 1, f"README anchor {anchor!r} is in {len(found)} python blocks, expected exactly 1"
    return found[0]


def _substituted(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert text.count(old) == 1, f"substitution {old!r} -> {new!r} no longer applies to the README block"
        text = text.replace(old, new)
    return text


def _statements(text: str, *anchors: str) -> str:
    """The block's top-level statements whose lines (trailing comments included) hold one of ``anchors``: whole
    lines as written, in order; each anchor must pick exactly one statement."""
    lines = text.splitlines()
    whole = ["\n".join(lines[s.lineno - 1 : s.end_lineno]) for s in ast.parse(text).body]
    picked = [s for s in whole if any(a in s for a in anchors)]
    for a in anchors:
        assert sum(a in s for s in picked) == 1, f"statement anchor {a!r} does not pick exactly one statement"
    return "\n".join(picked)


def _split(text: str, anchor: str) -> tuple[str, str]:
    """The block's text before the top-level statement whose lines hold ``anchor`` (exactly one), and from it on."""
    lines = text.splitlines()
    starts = [s.lineno - 1 for s in ast.parse(text).body if anchor in "\n".join(lines[s.lineno - 1 : s.end_lineno])]
    assert len(starts) == 1, f"split anchor {anchor!r} is in {len(starts)} statements, expected exactly 1"
    return "\n".join(lines[: starts[0]]), "\n".join(lines[starts[0] :])


def _run(code: str, ns: dict) -> dict:
    """Execute ``code`` in ``ns`` (and return it), with torch's global RNG seeded (restored after): the blocks draw
    their noise from it, so each run here is deterministic whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own example code
    return ns


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ---------------------------------------------------------------------------------------------------- fixtures
def _sd_pipe(path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe(text_pipes):  # noqa: F811
    pipe = FluxPipeline.from_pretrained(text_pipes["flux"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def degraded():
    from fewstep.datasets import load_digits_images
    from fewstep.pipelines import box_inpainting

    images, _ = load_digits_images(16, "test")
    return box_inpainting(images[:3], generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    """The quantization block, run once in a scratch directory (it saves ``digits-eps-w8a8`` there)."""
    root = tmp_path_factory.mktemp("readme-quant")
    code = _substituted(_block(QUANT), {
        "num_samples=256, steps=20": "num_samples=8, steps=4",
        'QuantConfig(metric="lp")': 'QuantConfig(metric="lp", act_grid=10, weight_grid=8)',  # range search: 10 s
    })
    with _cwd(root):
        ns = _run(code, {})
    return ns, root


# ---------------------------------------------------------------------------------------------------- coverage
def test_every_readme_block_is_run_or_skipped():
    covered = [_block(a) for a in [*RUN, *SKIPPED]]  # each anchor in exactly one block
    assert len(set(covered)) == len(covered), "two anchors pick the same README block"
    assert set(PARTLY_RUN) <= set(RUN) and not set(RUN) & set(SKIPPED)
    uncovered = [b.splitlines()[0] for b in _python_blocks() if b not in covered]
    assert not uncovered, f"README python blocks neither run here nor listed in SKIPPED (first lines): {uncovered}"


# ---------------------------------------------------------------------------------------------------- blocks
def test_api_in_five_lines(sd_path):  # noqa: F811
    code = _block(API)
    ns = {"pipe": _sd_pipe(sd_path), "prompt": "a digit seven"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _run(code, ns)
    assert isinstance(ns["image"], Image.Image) and ns["image"].size == (8, 8)
    # the printed list starts with the names the comment shows
    shown = re.search(r"print\(samplers\.names\(\)\)\s*# \[(.*), \.\.\.\]", code).group(1)
    assert ast.literal_eval(out.getvalue())[: shown.count(",") + 1] == ast.literal_eval(f"[{shown}]")
    assert isinstance(ns["pipe"].scheduler, samplers.get("hb")) and ns["pipe"].scheduler.config.momentum_order == 3.8
    with pytest.raises(ValueError, match=r"sampler 'hb' has no option\(s\) \['momentum_ordr'\]; its options are: "):
        samplers.from_config("hb", ns["pipe"].scheduler.config, momentum_ordr=3.8)  # "checked options"


def test_solver_core(sd_path):  # noqa: F811
    from fewstep.bench.analytic import default_mixture, exact_solution
    from fewstep.solvers import VPSchedule, grids

    pipe = _sd_pipe(sd_path)
    mixture = default_mixture(dim=2)
    schedule = VPSchedule.from_config(pipe.scheduler.config)
    first = grids.uniform_lambda_grid(schedule, 8)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = float(first.sigmas[0]) * noise + float(first.alphas[0]) * mixture.sample(64, torch.Generator().manual_seed(1))
    ns: dict = {"pipe": pipe, "x_T": x_T}

    def pair_fn(x, i):  # the exact denoiser of the mixture at the block's own grid point i
        return mixture.denoise(x, float(ns["grid"].alphas[i]), float(ns["grid"].sigmas[i]))

    ns["pair_fn"] = pair_fn
    _run(_block(SOLVERS), ns)
    exact = exact_solution(mixture, schedule, x_T, float(ns["grid"].timesteps[0]))
    assert ns["x0"].shape == x_T.shape
    assert (ns["x0"] - exact).square().mean().sqrt() < 0.05  # UniPC-2 at 8 steps on the exact model


def test_dpm_solver_v3_with_the_shipped_ems():
    ns = _run(_statements(_block(V3), "# shipped EMS"), {"fewstep": fewstep, "samplers": samplers})
    assert isinstance(ns["pipe"].scheduler, samplers.get("dpm-solver-v3"))
    assert ns["pipe"].scheduler.config.ems_file == "digits-eps"  # the shipped tables, by model name
    images = ns["pipe"]([3, 7], num_inference_steps=6, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_dpm_solver_v3_with_your_own_ems(sd_path, tmp_path):  # noqa: F811
    from fewstep.solvers import VPSchedule
    from fewstep.solvers.ems import EMS, save_ems

    sd_pipe = _sd_pipe(sd_path)
    # "your own EMS" for sd_pipe: tables on 17 points inside its schedule's lambda range, in the degenerate form
    # (l = 1, s = b = 0: DPM-Solver++), which `fewstep calibrate ems` would estimate (~10 s here: not needed)
    schedule = VPSchedule.from_config(sd_pipe.scheduler.config)
    lam = np.linspace(*schedule.lambda_(np.array([schedule.t_max, schedule.t_min])), 17)
    shape = (17, 4, 8, 8)
    save_ems(tmp_path / "sd15-ems.safetensors", EMS(lam, np.ones(shape), np.zeros(shape), np.zeros(shape)))
    ns = {"fewstep": fewstep, "samplers": samplers, "sd_pipe": sd_pipe}
    with _cwd(tmp_path):
        _run(_block(V3), ns)
    # the scheduler made from sd_pipe's config with sd_pipe's EMS belongs on sd_pipe, and samples there
    sched = sd_pipe.scheduler
    assert isinstance(sched, samplers.get("dpm-solver-v3")) and sched.config.solver_order == 2
    assert Path(sched.config.ems_file) == (tmp_path / "sd15-ems.safetensors").resolve()
    latents = sd_pipe("a digit", num_inference_steps=4, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    assert isinstance(ns["pipe"].scheduler, samplers.get("dpm-solver-v3"))  # the shipped-EMS line left alone
    assert ns["pipe"]([3], num_inference_steps=4, output_type="np").images.shape == (1, 16, 16, 1)


def test_dc_solver():
    ns = _run(_block(DC), {})
    sched = ns["pipe"].scheduler
    assert isinstance(sched, samplers.get("dc-solver")) and sched.config.dc_ratios_file
    assert ns["images"].shape == (2, 16, 16, 1) and ns["images"].min() >= 0 and ns["images"].max() <= 1
    # the comment's alternatives are accepted by the same scheduler
    cpr = samplers.get("dc-solver").from_config(ns["pipe"].scheduler.config, dc_model="digits-eps",
                                                dc_guidance_scale=3.0, dc_ratios_file=None, dc_cpr="digits-eps")
    assert cpr.config.dc_cpr
    with pytest.raises(ValueError, match=r"ratios`\[1\] = 0.0: ratios must be > 0 \(rho <= 0 puts the compensation"):
        samplers.get("dc-solver").from_config(ns["pipe"].scheduler.config, dc_ratios_file=None, dc_ratios=[1, 0, 1])


def test_mrs_restoration(degraded):
    ns = _run(_block(MRS), {"degraded": degraded})
    assert isinstance(ns["pipe"].scheduler, samplers.get("mrs"))
    assert ns["pipe"].scheduler.config.solver == "sde" and ns["pipe"].scheduler.config.solver_order == 1
    restored = ns["restored"]
    assert restored.shape == (3, 16, 16, 1) and restored.min() >= 0 and restored.max() <= 1
    # a restoration, not a copy of the input: the erased box is filled in
    assert np.abs(restored - (degraded.permute(0, 2, 3, 1).numpy() + 1) / 2).max() > 0.1


def test_guidance_rules_and_fewstep_pipeline(sd_path, flux_pipe):  # noqa: F811
    from diffusers import PNDMScheduler

    from fewstep.pipelines import FewstepPipeline

    sd_pipe = _sd_pipe(sd_path)
    # the tiny Flux pipeline's default size is 128 x 128 (4096 tokens, ~6 s on one CPU thread): 16 x 16 here
    code = _substituted(_block(GUIDANCE), {"embedded_guidance_scale=3.5)": "embedded_guidance_scale=3.5, height=16, "
                                                                           "width=16)"})
    digits_and_sd, flux = _split(code, "FewstepPipeline.from_pipe(flux_pipe")
    ns = _run(digits_and_sd, {"sd_pipe": sd_pipe})
    assert ns["images"].shape == (2, 16, 16, 1) and ns["images"].min() >= 0 and ns["images"].max() <= 1
    assert isinstance(ns["pipe"].scheduler, samplers.get("dpm-solver++"))
    fp = ns["fp"]
    assert isinstance(fp, FewstepPipeline) and fp.pipe.unet is sd_pipe.unet and fp.pipe.vae is sd_pipe.vae  # shared
    assert isinstance(fp.scheduler, samplers.get("unipc")) and isinstance(sd_pipe.scheduler, PNDMScheduler)
    assert isinstance(ns["image"], Image.Image) and ns["image"].size == (8, 8)
    ns["flux_pipe"] = flux_pipe
    _run(flux, ns)
    assert isinstance(ns["fp"], FewstepPipeline) and ns["fp"].pipe.transformer is flux_pipe.transformer
    assert isinstance(ns["fp"].scheduler, samplers.get("dpm-solver++"))
    assert isinstance(ns["image"], Image.Image) and ns["image"].size == (16, 16)
    # the comment: `mrs` on a flow model is refused with the list of samplers that fit
    with pytest.raises(ValueError, match=r"sampler 'mrs' .* cannot sample the flow-matching flux model; use one of: "
                                         r"ddim, dpm-solver\+\+, unipc"):
        FewstepPipeline.from_pipe(flux_pipe, scheduler="mrs")


@pytest.fixture(scope="module")
def modular(sdxl):  # noqa: F811
    """diffusers' SDXL denoise step as a modular pipeline (built from blocks: no hub download), on the tiny SDXL."""
    blocks = SequentialPipelineBlocks.from_blocks_dict({"denoise": StableDiffusionXLAutoBlocks().sub_blocks["denoise"]})
    pipe = blocks.init_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.update_components(unet=sdxl.unet, vae=sdxl.vae, scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER))
    return pipe


def test_modular_pipeline_guider(modular):
    from fewstep.guidance.guiders import CFGPlusPlusGuider

    _run(_block(MODULAR), {"pipe": modular, "samplers": samplers, "CFGPlusPlusGuider": CFGPlusPlusGuider})
    assert isinstance(modular.scheduler, samplers.get("ddim")) and isinstance(modular.guider, CFGPlusPlusGuider)
    latents = modular(**_sdxl_embeds(), height=16, width=16, num_inference_steps=4, output="latents",
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


def test_speed_options_cpu_statement(quant_run):
    """The block's first three statements need CUDA (``cuda_graph=True``, ``.to("cuda")``; ``quantized="sd15-w8a8"``
    is no file here either); the last one, ``ClassConditionalPipeline.from_pipe(..., quantized="digits-eps-w8a8",
    compile=True)``, runs on CPU on the directory the quantization block saved (compilation is lazy: not run)."""
    from fewstep.pipelines import ClassConditionalPipeline
    from fewstep.quant.modules import QuantLayer

    _, root = quant_run
    block = _block(SPEED)
    code = _statements(block, "ClassConditionalPipeline.from_pipe(")
    not_run = _split(block, "ClassConditionalPipeline.from_pipe(")[0]
    lines = not_run.splitlines()
    for stmt in ast.parse(not_run).body:  # each needs CUDA, or is the call of the CUDA-graphed pipeline
        text = "\n".join(lines[stmt.lineno - 1 : stmt.end_lineno])
        assert "cuda_graph=True" in text or text.startswith("images = fp("), f"a CPU statement is not run: {text}"
    with _cwd(root):
        ns = _run(code, {"ClassConditionalPipeline": ClassConditionalPipeline, "load_default": fewstep.load_default})
    pipe = ns["pipe"]
    assert isinstance(pipe, ClassConditionalPipeline)
    assert any(isinstance(m, QuantLayer) for m in pipe.unet.modules())
    assert isinstance(pipe._denoiser, torch._dynamo.eval_frame.OptimizedModule)  # the torch.compile'd call


def test_flowchef():
    from fewstep.pipelines.flowchef import inpainting_fill

    code = _substituted(_block(FLOWCHEF), {"[:10]": "[:4]", "num_images=10, num_inference_steps=20":
                                           "num_images=4, num_inference_steps=6"})
    ns = _run(code, {})
    images, truth = ns["images"], ns["truth"]
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    assert isinstance(ns["sched"], samplers.get("flowchef")) and ns["sched"].config.flowchef_inner_steps == 2
    losses = ns["task"].cost(images)
    assert losses.shape == (4,) and bool((losses < ns["task"].cost(-torch.ones_like(truth))).all())
    # the commented-out inpainting lines run as written (inpainting_fill: from fewstep.pipelines.flowchef)
    commented = re.findall(r"^# (inpaint = .*|flowchef_sample\(pipe, inpaint.*|\s+propagate=.*)$", code, flags=re.M)
    assert len(commented) == 3, commented
    inpaint = _substituted("\n".join(commented), {
        "flowchef_sample(pipe, inpaint": "out = flowchef_sample(pipe, inpaint",
        "num_images=10, num_inference_steps=10": "num_images=4, num_inference_steps=4",
    })
    ns["inpainting_fill"] = inpainting_fill
    _run(inpaint, ns)
    assert ns["out"].shape == (4, 1, 16, 16) and torch.isfinite(ns["out"]).all()


@pytest.fixture(scope="module")
def posterior_run():
    code = _substituted(_block(POSTERIOR), {"held_out_digits(8)": "held_out_digits(2)",
                                            "num_inference_steps=10": "num_inference_steps=4"})
    return _run(code, {})


def test_posterior_sampling(posterior_run):
    from fewstep.guidance.operators import make_operator

    out, op = posterior_run["out"], posterior_run["op"]
    assert out.images.shape == (2, 1, 16, 16) and torch.isfinite(out.images).all()
    assert out.nfe > 4  # the trace probes are denoiser evaluations too
    assert op.measure(out.images).shape == posterior_run["y"].shape == (2, 1, 8, 8)
    listed = re.search(r"^op = make_operator\(.*\)\s+# (.*)$", _block(POSTERIOR), flags=re.M).group(1).split(", ")
    assert "sr" in listed and len(listed) == 6
    for name in listed:  # the comment's operators exist under those names and measure the images
        assert make_operator(name, 16).measure(out.images).shape[:2] == (2, 1), name


def test_posterior_images_range_is_as_the_readme_says(posterior_run):
    """The README said 'NCHW in [-1, 1]': the images are the model range, not clipped (-1.05 .. 1.09 with the
    block's own sizes)."""
    claims_range = "# NCHW in [-1, 1]" in _block(POSTERIOR)
    images = posterior_run["out"].images
    assert not claims_range or (images.min() >= -1 and images.max() <= 1)


def test_quantization(quant_run):
    from fewstep.quant.modules import QuantLayer

    ns, root = quant_run
    assert (root / "digits-eps-w8a8").is_dir()
    saved, loaded = ns["pipe"].unet, ns["qunet"]  # the quantized module in the pipeline, and the one loaded back
    assert saved is not ns["float_unet"] and loaded is not saved
    layers = [m for m in loaded.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.mode == "int8" for m in layers)
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 20])
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, class_labels=labels).sample, saved(x, t, class_labels=labels).sample,
                                   rtol=0, atol=0)  # fmt: skip
    images = ns["pipe"]([3, 7], num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
