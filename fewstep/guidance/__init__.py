"""Guidance rules on ``(x0, eps)`` pairs (CFG, CFG++, APG), inverse-problem posterior samplers (DPS, PSLD, STSL),
measurement operators, and adapters to ``diffusers.guiders``.

``get(name)`` returns the class registered under a public name: a guidance rule (``cfg``, ``cfg++``, ``apg``;
``get("apg")(guidance_scale=4.0, norm_threshold=3.0)``) or a posterior method (``dps``, ``psld``, ``stsl``;
``get("stsl")(eta=0.02, inner_steps=5)``, run by ``fewstep.pipelines.posterior``). The two kinds differ: a rule
combines conditional and unconditional predictions inside any sampler's step, a posterior method owns the
sampling loop (it backpropagates through the denoiser). ``names(kind)`` lists ``"rule"`` or ``"posterior"`` names
(rules by default); ``make(name_or_rule, guidance_scale, **options)`` builds guidance rules only.
The diffusers adapters live in ``fewstep.guidance.guiders`` (imported lazily: diffusers' guiders log an
"experimental" warning on construction).
"""

from __future__ import annotations

import inspect
from typing import Any

from .base import GuidanceRule, Pair, StepState
from .inversion import ddim_invert
from .posterior import DPS, PSLD, InverseProblem, PosteriorMethod, PosteriorResult
from .rules import APG, CFG, CFGPlusPlus, apg_update, cfgpp_equivalent_scales, rescale_to_std, scheduler_rhos
from .stepping import guided_step, raw_cfg, step_kwargs, step_state, supports_pairs
from .stsl import STSL, fd_hutchinson_trace

__all__ = [
    "APG",
    "CFG",
    "CFGPlusPlus",
    "DPS",
    "InverseProblem",
    "PSLD",
    "PosteriorMethod",
    "PosteriorResult",
    "STSL",
    "GuidanceRule",
    "Pair",
    "StepState",
    "apg_update",
    "cfgpp_equivalent_scales",
    "ddim_invert",
    "fd_hutchinson_trace",
    "get",
    "is_posterior",
    "make_posterior",
    "guided_step",
    "make",
    "rule_options",
    "names",
    "raw_cfg",
    "rescale_to_std",
    "scheduler_rhos",
    "step_kwargs",
    "step_state",
    "supports_pairs",
]

_REGISTRY: dict[str, type[GuidanceRule]] = {"cfg": CFG, "cfg++": CFGPlusPlus, "apg": APG}
_POSTERIOR: dict[str, type[PosteriorMethod]] = {"dps": DPS, "psld": PSLD, "stsl": STSL}
_ALIASES = {"cfgpp": "cfg++"}
KINDS = ("rule", "posterior")


def names(kind: str = "rule") -> list[str]:
    """Registered names of one kind: ``"rule"`` (guidance rules, the default) or ``"posterior"`` (inverse-problem
    posterior samplers)."""
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {list(KINDS)}, got {kind!r}")
    return list(_REGISTRY if kind == "rule" else _POSTERIOR)


def get(name: str) -> type[GuidanceRule] | type[PosteriorMethod]:
    """The class registered under ``name``: a guidance rule (``cfg``, ``cfg++`` -- alias ``cfgpp`` --, ``apg``) or
    a posterior method (``dps``, ``psld``, ``stsl``); tell them apart with ``is_posterior(name)``."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if isinstance(key, str) and key in _REGISTRY:
        return _REGISTRY[key]
    if isinstance(key, str) and key in _POSTERIOR:
        return _POSTERIOR[key]
    raise ValueError(
        f"unknown guidance rule {name!r}; available: {', '.join(_REGISTRY)} (guidance rules), "
        f"{', '.join(_POSTERIOR)} (inverse-problem posterior samplers)"
    )


def is_posterior(name: str) -> bool:
    """Whether ``name`` is a registered posterior method (``dps``, ``psld``, ``stsl``)."""
    return isinstance(name, str) and name in _POSTERIOR


def make_posterior(method: str | PosteriorMethod, **options) -> PosteriorMethod:
    """A posterior method object: ``method`` itself (then no ``options``) or the named one built with ``options``."""
    if isinstance(method, PosteriorMethod):
        if options:
            raise ValueError(f"options {sorted(options)} given together with a posterior method object ({method!r})")
        return method
    if not is_posterior(method):
        raise ValueError(f"unknown posterior method {method!r}; available: {', '.join(_POSTERIOR)}")
    return _POSTERIOR[method](**options)


def make(guidance: str | GuidanceRule, guidance_scale: float | None = None, **options: Any) -> GuidanceRule:
    """A rule object: ``guidance`` itself if it is one (then ``guidance_scale`` must be ``None`` and no
    ``options`` given), else the named rule built with ``guidance_scale`` (its default when ``None``) and its other
    constructor arguments ``options`` (e.g. ``make("apg", 7.5, eta=0.5, momentum=0.0)``, ``make("cfg++", 0.6,
    history="unconditional")``, ``make("cfg", 7.5, guidance_rescale=0.7)``); an option the rule does not take is
    a ``ValueError`` listing those it does."""
    if isinstance(guidance, GuidanceRule):
        given = [f"`{k}`" for k in sorted(options)]
        if guidance_scale is not None:
            given.insert(0, f"`guidance_scale`={guidance_scale!r}")
        if given:
            raise ValueError(
                f"{', '.join(given)} given together with a guidance rule object ({guidance!r}); set "
                f"{'it' if len(given) == 1 else 'them'} on the rule instead"
            )
        return guidance
    if not isinstance(guidance, str):
        raise TypeError(
            f"`guidance` must be a rule name ({', '.join(_REGISTRY)}) or a GuidanceRule, got {type(guidance).__name__}"
        )
    if is_posterior(guidance):
        raise ValueError(
            f"`guidance` {guidance!r} is an inverse-problem posterior sampler, not a guidance rule (cfg, cfg++, apg); "
            "run it with fewstep.pipelines.posterior.posterior_sample (CLI: --task ... --posterior)"
        )
    cls = get(guidance)
    allowed = rule_options(guidance)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"guidance rule {guidance!r} has no option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; its options: {', '.join(allowed) or 'none'} (its scale "
                         "is make's `guidance_scale` argument)")
    if guidance_scale is not None:
        options = {**options, "guidance_scale": guidance_scale}
    return cls(**options)


def rule_options(guidance: str) -> list[str]:
    """The constructor options of the named guidance rule other than ``guidance_scale`` (what ``make`` and
    ``fewstep generate --guidance-option KEY=VALUE`` accept)."""
    params = inspect.signature(get(guidance).__init__).parameters
    return [name for name, p in params.items()
            if name not in ("self", "guidance_scale") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
