"""Test helpers: real pipelines' scheduler configs and a tiny deterministic denoiser."""

from __future__ import annotations

import torch

# Scheduler configs as real pipelines ship them (scheduler/scheduler_config.json), trimmed of metadata.
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_DDIM_V = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD3_FLOW = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
FLUX_FLOW = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
REAL_CONFIGS = {"sd15": SD15_PNDM, "sd21": SD21_DDIM_V, "sdxl": SDXL_EULER, "sd3": SD3_FLOW, "flux": FLUX_FLOW}


class TinyDenoiser(torch.nn.Module):
    """A smooth nonlinear stand-in for a UNet: deterministic, cheap, time dependent."""

    def __init__(self, numel: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(numel, numel, generator=g, dtype=torch.float64) / (3 * numel**0.5))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=torch.float64, device=x.device) / 1000.0
        flat = x.reshape(x.shape[0], -1).to(self.weight.dtype)
        out = torch.tanh(flat @ self.weight) * (0.5 + tt) + 0.1 * flat
        return out.reshape(x.shape).to(x.dtype)



def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (scripts import their siblings, e.g. ``_args``, so the scripts folder
    goes on ``sys.path`` as when a script is run)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "scripts"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- two real CPU processes ------------------------------------------------------------------------------------------
_SHARE_SPY = '''
import sys
import fewstep._dist as _dist
_state = _dist.distributed_state()
assert _state is not None, "not under a distributed launch"
_split = _dist.split_samples


def _spy(n, make):
    def share(indices):
        print(f"SHARE {_state.process_index}/{_state.num_processes} {len(indices)} of {n}", flush=True)
        return make(indices)
    return _split(n, share)


# Modules imported from here on (fewstep.bench.runner's `from .._dist import split_samples`, fewstep.search's
# call-time import) take the spy from fewstep._dist; one that already holds its own reference is patched too
# (importing fewstep.bench.runner here only for that cost every process ~15 s of imports).
_dist.split_samples = _spy
for _module in [m for name, m in list(sys.modules.items()) if name.startswith("fewstep.")]:
    if getattr(_module, "split_samples", None) is _split:
        _module.split_samples = _spy
'''


def _torchrun_two_cpu_processes(script, *args, timeout: int = 300):
    """Run the file ``script`` under ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo) with ``args``; checks
    that it succeeded and returns the result."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_shares(stdout: str) -> None:
    """Both processes made a share (``SHARE rank/world k of n`` lines of the spy) and each split covered its ``n``
    samples once."""
    import re

    shares = re.findall(r"SHARE (\d)/(\d) (\d+) of (\d+)", stdout)
    assert {(r, w) for r, w, _, _ in shares} == {("0", "2"), ("1", "2")}, stdout[-2000:]
    made: dict[int, int] = {}
    for _, _, k, n in shares:
        made[int(n)] = made.get(int(n), 0) + int(k)
    assert all(total % n == 0 for n, total in made.items())  # every split: its n samples, once per split


def launch_two_cpu_processes(script_body: str, tmp_path, *args, timeout: int = 300):
    """Run ``script_body`` in two CPU processes (``torchrun --standalone --nproc_per_node 2``; gloo) with ``args``,
    after a preamble that reports every share of ``fewstep._dist.split_samples`` as ``SHARE rank/world k of n``.
    Checks that both processes ran and that each split covered its ``n`` samples once; returns the result."""
    script = tmp_path / "two_processes.py"
    script.write_text(_SHARE_SPY + script_body)
    result = _torchrun_two_cpu_processes(script, *args, timeout=timeout)
    check_shares(result.stdout)
    return result


_EACH_BODY = '''
import contextlib
import json
import pathlib

for _name, _path, _args in json.loads(pathlib.Path(sys.argv[1]).read_text()):
    sys.argv[1:] = _args
    _stdout = pathlib.Path(_path).with_name(f"{_name}.stdout{_state.process_index}")
    with open(_stdout, "w") as _file, contextlib.redirect_stdout(_file):
        try:
            exec(compile(pathlib.Path(_path).read_text(), _path, "exec"), {"__name__": "__main__", "sys": sys,
                                                                           "_state": _state})
        except SystemExit as _exc:  # a CLI body's sys.exit(main(...)): only a failure ends the launch
            if _exc.code not in (0, None):
                raise
    print(_stdout.read_text(), end="", flush=True)
'''


def launch_two_cpu_processes_each(bodies: dict[str, tuple], folder, timeout: int = 600) -> dict[str, str]:
    """Run several ``launch_two_cpu_processes`` script bodies one after the other in ONE launch of two CPU processes
    (a launch costs ~30 s of process start-up and imports): ``bodies`` maps a name to ``(script_body, *args)``;
    each body runs in a fresh namespace (``sys``, ``_state``) with ``sys.argv[1:] = args``, in the same processes,
    so each also starts where the previous one left the processes (a body that drifted them out of step hangs or
    fails the next). Checks, per body, that both processes made a share and each split covered its samples once;
    returns each body's stdout (process 0's, then process 1's; lines of one process in order)."""
    import json

    plan = []
    for name, (body, *args) in bodies.items():
        path = folder / f"{name}.py"
        path.write_text(body)
        plan.append([name, str(path), [str(a) for a in args]])
    (folder / "bodies.json").write_text(json.dumps(plan))
    script = folder / "two_processes.py"
    script.write_text(_SHARE_SPY + _EACH_BODY)
    _torchrun_two_cpu_processes(script, folder / "bodies.json", timeout=timeout)
    out = {}
    for name in bodies:
        out[name] = "".join((folder / f"{name}.stdout{rank}").read_text() for rank in (0, 1))
        check_shares(out[name])
    return out


CLI_BODY = '''
from fewstep.cli import main
sys.exit(main(sys.argv[1:]))
'''


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    """``fewstep ARGS`` in this process: its exit code (argparse's own ``SystemExit`` included) and the non-empty
    lines it printed to stderr."""
    from fewstep.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def damaged_quant_copy(root, tmp_path, meta_edit=None, tensor_edit=None):
    """A copy of the saved quantization folder ``root`` under ``tmp_path / "damaged"`` with ``meta_edit(meta)``
    applied to its ``quant.json`` and ``tensor_edit(tensors)`` to its ``quant.safetensors`` (header kept)."""
    import json
    import pathlib
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = pathlib.Path(tmp_path) / "damaged"
    shutil.copytree(root, out)
    if meta_edit is not None:
        meta = json.loads((out / "quant.json").read_text())
        meta_edit(meta)
        (out / "quant.json").write_text(json.dumps(meta))
    if tensor_edit is not None:
        with safe_open(str(out / "quant.safetensors"), "pt") as f:
            header = dict(f.metadata())
        tensors = load_file(str(out / "quant.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(out / "quant.safetensors"), metadata=header)
    return out
