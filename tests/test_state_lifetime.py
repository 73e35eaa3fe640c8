"""State that must not outlive a call (found by probing long-lived processes): the caller's module flags, pipeline
progress-bar settings, library progress bars and the global RNG after an in-process ``fewstep`` command, the process
umask while writing, and the key under which a captured CUDA-graph step is reused."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import fewstep
from fewstep import quant
from fewstep._io import atomic_write
from fewstep.cli import main
from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.generate import generate
from fewstep.pipelines.graph_step import module_state_key


def test_a_flowchef_classifier_task_leaves_the_callers_parameter_flags():
    """``make_task("classifier", classifier=clf)`` set ``requires_grad=False`` on every parameter of the caller's
    classifier for good (a model being fine-tuned silently stopped training); steering needs gradients with respect
    to x0_hat only."""
    from fewstep.pipelines.flowchef import make_task

    clf = fewstep.load_default("digits-classifier").requires_grad_(True)
    task = make_task("classifier", labels=[3, 7], classifier=clf)
    assert all(p.requires_grad for p in clf.parameters())
    x0 = torch.zeros(2, 1, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(task.cost(x0).sum(), x0)
    assert grad.abs().sum() > 0 and all(p.grad is None for p in clf.parameters())


def test_ems_estimation_restores_the_unets_training_flag():
    """EMS estimation runs the UNet in eval mode; the caller's ``training`` flags come back, also after an error."""
    from fewstep.calibrate.ems import class_conditional_ems

    pipe = fewstep.load_default("digits-eps", sampler="ddim")
    pipe.unet.train()
    pipe.unet.conv_in.eval()  # a mixed state is restored module by module
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    class_conditional_ems(pipe, "digits-eps", num_samples=4, num_intervals=3, batch_size=4, progress=False)
    hook.remove()
    assert seen and not any(seen)  # estimated in eval mode
    assert pipe.unet.training and not pipe.unet.conv_in.training

    def fail(module, args):
        raise RuntimeError("injected")

    hook = pipe.unet.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="injected"):
        class_conditional_ems(pipe, "digits-eps", num_samples=4, num_intervals=3, batch_size=4, progress=False)
    hook.remove()
    assert pipe.unet.training and not pipe.unet.conv_in.training


def test_generate_gives_the_pipeline_back_its_progress_bar_settings():
    """``generate(progress=...)`` rewrote the caller's ``_progress_bar_config`` for good: later plain ``pipe(...)``
    calls showed a "sampling" bar (or none)."""
    pipe = fewstep.load_default("digits-eps")
    pipe.set_progress_bar_config(disable=True, leave=False)
    generate(pipe, num_images=1, steps=2, progress=True)
    assert pipe._progress_bar_config == {"disable": True, "leave": False}
    fresh = fewstep.load_default("digits-eps")
    fresh.__dict__.pop("_progress_bar_config", None)
    generate(fresh, num_images=1, steps=2, progress=False)
    assert "_progress_bar_config" not in fresh.__dict__


def test_in_process_cli_leaves_progress_bars_and_returns_usage_errors(tmp_path, capsys):
    """``main`` in a process (a notebook): ``--quiet`` turned diffusers' progress bars off for the rest of the
    process; argparse's usage errors raised SystemExit although ``main`` documents a returned 2 (0 for --help)."""
    diffusers_logging.enable_progress_bar()
    assert main(["generate", "--steps", "2", "--num-images", "1", "--quiet", "--out", str(tmp_path / "g.png")]) == 0
    assert diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:  # bars the caller turned off stay off
        assert main(["generate", "--steps", "2", "--num-images", "1", "--quiet", "--out", str(tmp_path / "g.png")]) == 0
        assert not diffusers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
    assert main(["generate", "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["--help"]) == 0
    assert main(["generate", "--no-such-flag"]) == 2
    capsys.readouterr()


def test_calibrate_dc_leaves_the_global_rng_stream(tmp_path, capsys):
    """``fewstep calibrate dc`` seeded the global torch RNG (``torch.manual_seed(--seed)``) in the caller's
    process; the run is seeded as before, inside a forked RNG."""
    args = ["calibrate", "dc", "--nfe", "3", "--guidance-scale", "1", "--datapoints", "2", "--reference", "ddim:4",
            "--iters", "2", "--quiet"]  # fmt: skip
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    assert main([*args, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert torch.equal(torch.random.get_rng_state(), before)
    assert main([*args, "--out", str(tmp_path / "b.safetensors")]) == 0  # still seeded: the same ratios
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()


def test_atomic_write_reads_the_umask_without_changing_it(tmp_path, monkeypatch):
    """``atomic_write`` read the umask by setting it to 0 and back; a thread creating a file in between got mode
    0666 whatever the umask. It now never calls ``os.umask`` and still gives ``0666 & ~umask``."""
    old = os.umask(0o077)
    try:
        calls = []
        real_umask = os.umask
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
        errors = []

        def other_thread():
            for k in range(200):
                path = tmp_path / f"private{k}"
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o666)
                os.close(fd)
                if path.stat().st_mode & 0o777 != 0o600:
                    errors.append(oct(path.stat().st_mode & 0o777))

        thread = threading.Thread(target=other_thread)
        thread.start()
        for k in range(50):
            atomic_write(tmp_path / f"out{k}.txt", lambda p: p.write_text("x"))
        thread.join()
        assert calls == [] and errors == []
        assert (tmp_path / "out0.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_module_state_key_follows_in_place_changes_of_a_shared_quantized_unet():
    """A captured CUDA-graph step reads the denoiser's tensors by address and bakes in its kernels, but the cache
    key named the module by ``id`` only: another pipeline over the same quantized UNet switching its mode (or
    rebuilding its derived int8 tensors) left the first one replaying stale kernels on freed memory. The key now
    follows the module's storage, quantized modes and attention processors."""
    pipe = fewstep.load_default("digits-eps", sampler="unipc")
    cal = quant.build_calibration_set(pipe, num_samples=6, steps=4, method="uniform", num_steps_kept=2, seed=1)
    qunet = quant.quantize(pipe.unet, cal, quant.QuantConfig(metric="mse"))
    fp1 = FewstepPipeline.from_pipe(pipe, quantized=qunet, quant_mode="int8")
    key = module_state_key(fp1._model)
    assert module_state_key(fp1._model) == key  # stable while nothing changes: the graph is replayed
    FewstepPipeline.from_pipe(pipe, quantized=qunet, quant_mode="int8")  # rebuilds the derived int8 tensors
    rebuilt = module_state_key(fp1._model)
    assert rebuilt != key
    FewstepPipeline.from_pipe(pipe, quantized=qunet, quant_mode="fake")  # switches fp1's module to fake
    assert module_state_key(fp1._model) not in (key, rebuilt)
    unet = fewstep.load_default("digits-eps").unet
    before = module_state_key(unet)
    with torch.no_grad():
        unet.conv_in.weight.data = unet.conv_in.weight.data.clone()  # weights replaced (a LoRA fused, a reload)
    assert module_state_key(unet) != before


def test_overlapping_blocks_of_two_threads_restore_the_callers_flags():
    """Found by a probe: two posterior-sampling runs over one UNet in two threads left every parameter frozen for
    good (run B saved run A's override as the caller's flag). Blocks that overlap without nesting (A enters, B
    enters, A leaves, B leaves) keep the override while any of them runs and restore the caller's own flags after."""
    from fewstep.pipelines.grad_state import eval_mode, frozen_parameters

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net[0].bias.requires_grad_(False)  # a caller's own mixed flags
    net.train()
    net[1].eval()
    a, b = frozen_parameters(net), frozen_parameters(net)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not any(p.requires_grad for p in net.parameters())  # B still runs: still frozen
    b.__exit__(None, None, None)
    assert net[0].weight.requires_grad and not net[0].bias.requires_grad
    a, b = eval_mode(net), eval_mode(net)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not any(m.training for m in net.modules())  # B still runs: still in eval mode
    b.__exit__(None, None, None)
    assert net.training and net[0].training and not net[1].training


def test_a_nested_block_applies_its_override_again():
    """Review: with the refcount, a nested block only counted itself, so a body that changed the flag back left the
    inner block without its override."""
    from fewstep.pipelines.grad_state import eval_mode, frozen_parameters

    net = torch.nn.Linear(2, 2)
    with eval_mode(net):
        net.train()
        with eval_mode(net):
            assert not net.training
    assert net.training
    with frozen_parameters(net):
        net.weight.requires_grad_(True)
        with frozen_parameters(net):
            assert not net.weight.requires_grad
    assert net.weight.requires_grad
