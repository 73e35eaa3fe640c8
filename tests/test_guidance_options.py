"""Guidance rules' other arguments: ``guidance.make``, ``generate`` and ``fewstep generate --guidance-option``."""

from __future__ import annotations

import numpy as np
import pytest
from test_real_pipeline import tiny_sd  # noqa: F401 - the tiny SD pipeline directory fixture

from fewstep import guidance
from fewstep.cli import main
from fewstep.pipelines.generate import generate, load_model


def test_make_passes_options_and_refuses_unknown_ones():
    rule = guidance.make("apg", 5.0, eta=0.5, momentum=0.0)
    assert (rule.guidance_scale, rule.eta, rule.momentum) == (5.0, 0.5, 0.0)
    assert guidance.make("cfgpp", history="unconditional").history == "unconditional"
    assert guidance.make("cfg", guidance_rescale=0.7).guidance_rescale == 0.7
    assert guidance.rule_options("cfg++") == ["allow_extrapolation", "history"]
    with pytest.raises(ValueError, match=r"guidance rule 'cfg' has no options 'eta', 'momentum'; its options: "
                                         r"guidance_rescale \(its scale is make's `guidance_scale` argument\)"):
        guidance.make("cfg", 3.0, momentum=0.0, eta=1.0)
    with pytest.raises(ValueError, match=r"`eta` must be a finite number >= 0, got -1"):
        guidance.make("apg", eta=-1)
    with pytest.raises(ValueError, match=r"^`eta` given together with a guidance rule object \(APG\(.*\); set it on "
                                         r"the rule instead"):
        guidance.make(guidance.APG(), eta=1.0)
    with pytest.raises(ValueError, match=r"^`guidance_scale`=2.0, `eta` given together .*; set them on the rule"):
        guidance.make(guidance.APG(), 2.0, eta=1.0)


def test_generate_applies_the_options_on_the_digits_model():
    pipe = load_model("digits-eps", "unipc")
    run = dict(num_images=3, steps=4, seed=1, progress=False)
    default = generate(pipe, guidance="apg", **run).images
    options = generate(pipe, guidance="apg", guidance_options={"momentum": 0.0, "eta": 0.5}, **run).images
    rule = generate(pipe, guidance=guidance.APG(momentum=0.0, eta=0.5), **run).images
    assert np.array_equal(options, rule) and not np.allclose(options, default)
    with pytest.raises(ValueError, match=r"guidance rule 'cfg' has no option 'history'"):
        generate(pipe, guidance="cfg", guidance_options={"history": "unconditional"}, **run)
    with pytest.raises(ValueError, match=r"`guidance_options` must be a dict of the rule's arguments, got \['eta'\]"):
        generate(pipe, guidance="apg", guidance_options=["eta"], **run)
    with pytest.raises(ValueError, match=r"`guidance_options` must not hold `guidance_scale`; pass it as"):
        generate(pipe, guidance="apg", guidance_options={"guidance_scale": 5.0}, **run)
    restoration = load_model("digits-mr", "mrs")
    with pytest.raises(ValueError, match=r"a restoration \(mean-reverting\) model is guided by its measurement"):
        generate(restoration, guidance="apg", guidance_options={"eta": 0.5}, num_images=1, steps=2, progress=False)


def test_generate_applies_the_options_on_a_text_to_image_pipeline(tiny_sd):  # noqa: F811
    pipe = load_model(str(tiny_sd), "dpm-solver++")
    run = dict(num_images=1, steps=4, seed=0, prompt="a digit", progress=False, guidance_scale=0.6)
    guided = generate(pipe, guidance="cfg++", **run).images
    unconditional = generate(pipe, guidance="cfg++", guidance_options={"history": "unconditional"}, **run).images
    rule = generate(pipe, guidance="cfg++", guidance_options={"history": "unconditional"},
                    **{**run, "guidance_scale": None})  # the rule's default scale (0.6) with the option
    assert not np.allclose(guided, unconditional) and np.array_equal(unconditional, rule.images)


@pytest.mark.parametrize(("argv", "message"), [
    (["--guidance", "cfg", "--guidance-option", "eta=1"],
     "--guidance cfg: guidance rule 'cfg' has no option 'eta'; its options: guidance_rescale"),
    (["--guidance", "apg", "--guidance-option", "eta=1", "--guidance-option", "eta=2"],
     "--guidance-option eta given twice"),
    (["--guidance", "apg", "--guidance-option", "eta"], "expected KEY=VALUE"),
    (["--guidance", "apg", "--guidance-option", "guidance_scale=5"],
     "--guidance-option guidance_scale: give the scale as --guidance-scale"),
    (["--task", "inpaint", "--posterior", "dps", "--guidance-option", "eta=1"],
     "--guidance-option do not apply to posterior sampling"),
    (["--model", "digits-flow", "--task", "inpaint", "--guidance-option", "eta=1"],
     "--guidance-option sets a guidance rule's options; FlowChef --task inpaint runs no guidance rule"),
])
def test_cli_guidance_option_usage_errors(argv, message, tmp_path, capsys):
    out = tmp_path / "x.png"
    try:
        code = main(["generate", "--steps", "2", "--num-images", "1", "--quiet", "--out", str(out), *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_cli_guidance_option_reaches_the_rule(tmp_path, capsys):
    out = tmp_path / "x.png"
    main(["generate", "--steps", "3", "--num-images", "2", "--quiet", "--guidance", "apg", "--guidance-option",
          "momentum=0", "--guidance-option", "norm_threshold=null", "--out", str(out)])
    assert out.is_file() and "x2 (apg)" in capsys.readouterr().out
