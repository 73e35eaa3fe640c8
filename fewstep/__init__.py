"""fewstep: few-step diffusion sampling on top of diffusers.

* ``fewstep.samplers`` -- diffusers schedulers (``get(name)``, ``names()``) backed by ``fewstep.solvers``;
* ``fewstep.solvers`` -- the math: schedules, grids, parameterizations and the unified multistep engine;
* ``fewstep.guidance`` -- guidance rules (CFG, CFG++, APG), diffusers guiders, inversion, posterior sampling;
* ``fewstep.pipelines`` -- ``FewstepPipeline`` (SD/SDXL/SD3/Flux), the class-conditional and mean-reverting
  pipelines and the embedded default models (``fewstep.load_default("digits-eps")``);
* ``fewstep.quant`` -- PTQ4DM-style W8A8 quantization (fake-quant reference, int8 / fp8 execution);
* ``fewstep.search`` / ``fewstep.calibrate`` -- S³ schedule search; EMS and DC-Solver calibration;
* ``fewstep.bench`` -- the exact Gaussian-mixture reference, metrics and benchmarks;
* ``fewstep.cli`` -- the ``fewstep`` command.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_default"]


def load_default(name: str = "digits-eps", **kwargs: Any) -> Any:
    """Load an embedded default model (see ``fewstep.pipelines.load_default``)."""
    from .pipelines.defaults import load_default as _load_default

    return _load_default(name, **kwargs)
