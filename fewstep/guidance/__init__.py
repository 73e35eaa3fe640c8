"""Guidance rules on ``(x0, eps)`` pairs (CFG, CFG++, APG) and adapters to ``diffusers.guiders``.

``get(name)`` returns a rule class (``get("apg")(guidance_scale=4.0, norm_threshold=3.0)``), ``names()``
lists them; ``make(name_or_rule, guidance_scale)`` builds one from a name or passes a rule through.
The diffusers adapters live in ``fewstep.guidance.guiders`` (imported lazily: diffusers' guiders log an
"experimental" warning on construction).
"""

from __future__ import annotations

from .base import GuidanceRule, Pair, StepState
from .inversion import ddim_invert
from .rules import APG, CFG, CFGPlusPlus, apg_update, cfgpp_equivalent_scales, rescale_to_std, scheduler_rhos
from .stepping import guided_step, raw_cfg, step_state, supports_pairs

__all__ = [
    "APG",
    "CFG",
    "CFGPlusPlus",
    "GuidanceRule",
    "Pair",
    "StepState",
    "apg_update",
    "cfgpp_equivalent_scales",
    "ddim_invert",
    "get",
    "guided_step",
    "make",
    "names",
    "raw_cfg",
    "rescale_to_std",
    "scheduler_rhos",
    "step_state",
    "supports_pairs",
]

_REGISTRY: dict[str, type[GuidanceRule]] = {"cfg": CFG, "cfg++": CFGPlusPlus, "apg": APG}
_ALIASES = {"cfgpp": "cfg++"}


def names() -> list[str]:
    """Registered guidance rule names."""
    return list(_REGISTRY)


def get(name: str) -> type[GuidanceRule]:
    """The rule class registered under ``name`` (``cfg``, ``cfg++`` -- alias ``cfgpp`` --, ``apg``)."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(key, str) or key not in _REGISTRY:
        raise ValueError(f"unknown guidance rule {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def make(guidance: str | GuidanceRule, guidance_scale: float | None = None) -> GuidanceRule:
    """A rule object: ``guidance`` itself if it is one (then ``guidance_scale`` must be ``None``), else the
    named rule built with ``guidance_scale`` (its default when ``None``)."""
    if isinstance(guidance, GuidanceRule):
        if guidance_scale is not None:
            raise ValueError(
                f"`guidance_scale`={guidance_scale!r} given together with a guidance rule object "
                f"({guidance!r}); set the scale on the rule instead"
            )
        return guidance
    if not isinstance(guidance, str):
        raise TypeError(
            f"`guidance` must be a rule name ({', '.join(_REGISTRY)}) or a GuidanceRule, got {type(guidance).__name__}"
        )
    cls = get(guidance)
    return cls() if guidance_scale is None else cls(guidance_scale=guidance_scale)
