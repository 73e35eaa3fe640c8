"""diffusers schedulers backed by fewstep's solvers, and the registry the CLI uses.

``get(name)`` returns a scheduler class, ``names()`` lists the registered names; swap one into any
diffusers pipeline with ``pipe.scheduler = get("unipc").from_config(pipe.scheduler.config)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .base import FewstepScheduler, FewstepSchedulerOutput
from .dc_solver import FewstepDCSolverScheduler
from .ddim import FewstepDDIMScheduler
from .dpm_solver import FewstepDPMSolverScheduler
from .dpm_solver_v3 import FewstepDPMSolverV3Scheduler
from .flow_euler import FewstepFlowChefScheduler, FewstepFlowEulerScheduler
from .momentum import FewstepGHVBScheduler, FewstepHeavyBallScheduler
from .mrs import FewstepMRSScheduler
from .s3 import FewstepS3Scheduler
from .unipc import FewstepUniPCScheduler

__all__ = [
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "FewstepDDIMScheduler",
    "FewstepDPMSolverScheduler",
    "FewstepDPMSolverV3Scheduler",
    "FewstepUniPCScheduler",
    "FewstepHeavyBallScheduler",
    "FewstepGHVBScheduler",
    "FewstepMRSScheduler",
    "FewstepDCSolverScheduler",
    "FewstepS3Scheduler",
    "FewstepFlowEulerScheduler",
    "FewstepFlowChefScheduler",
    "PROCESSES",
    "process_of",
    "get",
    "names",
    "describe",
    "options",
    "from_config",
]

_REGISTRY: dict[str, type[FewstepScheduler]] = {
    "ddim": FewstepDDIMScheduler,
    "dpm-solver++": FewstepDPMSolverScheduler,
    "unipc": FewstepUniPCScheduler,
    "dpm-solver-v3": FewstepDPMSolverV3Scheduler,
    "hb": FewstepHeavyBallScheduler,
    "ghvb": FewstepGHVBScheduler,
    "mrs": FewstepMRSScheduler,
    "dc-solver": FewstepDCSolverScheduler,
    "s3": FewstepS3Scheduler,
    "flow-euler": FewstepFlowEulerScheduler,
    "flowchef": FewstepFlowChefScheduler,
}

#: what a sampler integrates: ordinary diffusion models (VP and flow configs alike), rectified-flow models only
#: (``flow-euler`` refuses VP configs), or mean-reverting (IR-SDE) restoration models, whose step also needs
#: the degraded image ``mu``.
PROCESSES = ("diffusion", "flow", "mean-reverting")


def process_of(name: str) -> str:
    """``"mean-reverting"`` for samplers of MR models (their ``step`` takes ``mu``), ``"flow"`` for flow-only
    samplers, else ``"diffusion"``."""
    return get(name).process


#: samplers that need an artifact to run (a searched schedule): not usable with their default config.
_NEED_ARTIFACT = {"s3", "dpm-solver-v3"}


def names(process: str | None = None, standalone: bool = False) -> list[str]:
    """Registered sampler names, in registration order; ``process`` filters by :data:`PROCESSES`;
    ``standalone=True`` drops samplers that cannot run without an artifact (``s3`` needs a schedule)."""
    if process is not None and process not in PROCESSES:
        raise ValueError(f"`process` must be one of {list(PROCESSES)} or None, got {process!r}")
    return [
        n for n in _REGISTRY
        if (process is None or process_of(n) == process) and not (standalone and n in _NEED_ARTIFACT)
    ]


def get(name: str) -> type[FewstepScheduler]:
    """The scheduler class registered under ``name`` (e.g. ``"dpm-solver++"``)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def describe(name: str) -> str:
    """The one-line description of a sampler: the first line of its class docstring."""
    doc = get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def options(name: str) -> list[str]:
    """The config options (``__init__`` arguments) of the sampler registered under ``name``."""
    params = inspect.signature(get(name).__init__).parameters
    return [p for p in params if p != "self" and params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def from_config(name: str, config: Mapping[str, Any], **overrides: Any) -> FewstepScheduler:
    """``get(name).from_config(config, **overrides)``, rejecting override names the sampler does not have.

    diffusers' ``from_config`` silently drops unknown keys; a misspelt option (``momentum_ordr=3.8``)
    would then sample with the default. Here it is an error that lists the valid options.
    """
    allowed = options(name)
    unknown = sorted(k for k in overrides if k not in allowed)
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {unknown}; its options are: {', '.join(allowed)}")
    return get(name).from_config(config, **overrides)
