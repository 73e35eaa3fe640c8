"""fewstep: few-step diffusion sampling on top of diffusers.

* ``fewstep.samplers`` -- diffusers schedulers (``get(name)``, ``names()``) backed by
* ``fewstep.solvers`` -- the math: schedules, grids, parameterizations and the unified multistep engine;
* ``fewstep.bench`` -- the exact Gaussian-mixture reference and metrics.
"""

__version__ = "0.1.0"
