"""fewstep: few-step diffusion sampling on top of diffusers.

* ``fewstep.samplers`` -- diffusers schedulers (``get(name)``, ``names()``) backed by
* ``fewstep.solvers`` -- the math: schedules, grids, parameterizations and the unified multistep engine;
* ``fewstep.pipelines`` -- the class-conditional pipeline and the embedded default models
  (``fewstep.load_default("digits-eps")``);
* ``fewstep.bench`` -- the exact Gaussian-mixture reference, metrics and benchmarks.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_default"]


def load_default(name: str = "digits-eps", **kwargs: Any) -> Any:
    """Load an embedded default model (see ``fewstep.pipelines.load_default``)."""
    from .pipelines.defaults import load_default as _load_default

    return _load_default(name, **kwargs)
