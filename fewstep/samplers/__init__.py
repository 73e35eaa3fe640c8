"""diffusers schedulers backed by fewstep's solvers, and the registry the CLI uses.

``get(name)`` returns a scheduler class, ``names()`` lists the registered names; swap one into any
diffusers pipeline with ``pipe.scheduler = get("unipc").from_config(pipe.scheduler.config)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .base import FewstepScheduler, FewstepSchedulerOutput
from .ddim import FewstepDDIMScheduler
from .dpm_solver import FewstepDPMSolverScheduler
from .momentum import FewstepGHVBScheduler, FewstepHeavyBallScheduler
from .unipc import FewstepUniPCScheduler

__all__ = [
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "FewstepDDIMScheduler",
    "FewstepDPMSolverScheduler",
    "FewstepUniPCScheduler",
    "FewstepHeavyBallScheduler",
    "FewstepGHVBScheduler",
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
    "hb": FewstepHeavyBallScheduler,
    "ghvb": FewstepGHVBScheduler,
}


def names() -> list[str]:
    """Registered sampler names, in registration order."""
    return list(_REGISTRY)


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
