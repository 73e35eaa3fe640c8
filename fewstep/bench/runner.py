"""The FID/MSE-versus-NFE grid runner behind ``fewstep bench``: samplers x NFE x guidance x model.

Every cell ``(model, sampler, steps, guidance rule, scale)`` becomes one row of metrics:

* ``analytic`` -- the exact Gaussian-mixture reference (``fewstep.bench.analytic_bench``): RMSE to the exact
  PF-ODE endpoint and the Frechet distance to the data distribution;
* ``digits-eps`` / ``digits-flow`` -- the embedded models, scored by the digits objectives of
  ``fewstep.search.objectives``: Frechet distance to the held-out test digits in the shipped classifier's
  features, class accuracy, and the MSE to a many-step reference solve from the same noise and classes;
* a diffusers pipeline directory (with prompts) -- the MSE to a many-step reference solve in latent space and,
  with image features (``inception`` or any :class:`~fewstep.bench.fid.FeatureExtractor`), the Frechet distance
  of the decoded images to a folder of reference images or to the decoded reference solves.

Each sample's initial noise comes from its own seed (``seed + index``), so numbers do not depend on the batch
size. Results are stored per cell in ``results.json`` (rewritten atomically after every cell); a re-run with
the same configuration skips the finished cells, a results file of another configuration is an error.
The reference feature statistics of the test digits (and the reference solves) are cached as safetensors.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import guidance as guidance_rules
from .. import samplers as sampler_registry
from .._checks import MISSING, check_bool, check_int, differing_keys, repeated_values
from .._dist import check_same_on_all_processes, distributed_state, is_main_process, main_process_value, split_samples
from .._io import atomic_write, first_missing_dir
from ..pipelines.defaults import default_sampler_options
from ._cache import cache_name as _cache_name
from ._cache import cached_tensor as _cached_tensor
from ._cache import load_statistics as _load_statistics
from ._cache import save_cached as _save_cached
from .fid import FeatureExtractor, cached_statistics, folder_statistics, image_set_digest, list_reference_images

__all__ = [
    "MODELS",
    "METRICS",
    "BenchConfig",
    "Cell",
    "parse_guidance",
    "run_grid",
    "reference_statistics",
    "format_markdown",
    "plot_results",
    "RESULTS_FILES",
    "is_main_process",
]

#: the models a grid can hold
MODELS = ("analytic", "digits-eps", "digits-flow")
#: metric columns of a row (``None`` where a metric does not apply to the model)
METRICS = ("fd", "accuracy", "mse", "rmse")
#: the files a run writes into its output directory
RESULTS_FILES = {"json": "results.json", "csv": "results.csv", "markdown": "results.md"}
#: the advisory lock a run holds on its output folder (``fcntl.flock``): a hidden file, no result, removed at the end
LOCK_FILE = ".fewstep-bench.lock"
#: feature extractor of the digits metrics (part of the reference-statistics cache key)
FEATURE_EXTRACTOR = "digits-classifier"
#: feature extractors for the Frechet distance: the shipped classifier, or pytorch-fid's Inception-V3 (user weights)
FEATURE_EXTRACTORS = ("digits-classifier", "inception")


def parse_guidance(text: str) -> tuple[str, float]:
    """``"cfg:3"`` -> ``("cfg", 3.0)``; ``"apg"`` -> ``("apg", 7.5)`` (the rule's default scale).

    The rule and its scale are validated by ``fewstep.guidance.make``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"`guidance` must be RULE or RULE:SCALE like cfg:3, got {text!r}")
    name, sep, scale_text = text.strip().partition(":")
    scale: float | None = None
    if sep:
        try:
            scale = float(scale_text)
        except ValueError:
            raise ValueError(f"`guidance` {text!r}: scale {scale_text!r} is not a number (RULE:SCALE like cfg:3)") \
                from None
    name = {"cfgpp": "cfg++"}.get(name, name)
    rule = guidance_rules.make(name, scale)
    return name, float(rule.guidance_scale) if scale is None else scale


@dataclass(frozen=True)
class Cell:
    """One grid point; ``guidance`` is ``None`` for the analytic model."""

    model: str
    sampler: str
    steps: int
    guidance: str | None = None
    guidance_scale: float | None = None

    @property
    def key(self) -> str:
        """Stable identifier of the cell in the results file: ``MODEL|SAMPLER|STEPS|RULE:SCALE`` with the scale
        written exactly (``repr`` of the float: ``cfg:3.0``, ``cfg:3.0000004``), ``-`` for no guidance. Results
        files of earlier versions keyed the scale rounded to 6 digits (``cfg:3``); their rows are re-keyed from the
        row's own fields when read (:func:`_load_results`)."""
        guide = "-" if self.guidance is None else f"{self.guidance}:{float(self.guidance_scale)!r}"
        return f"{self.model}|{self.sampler}|{self.steps}|{guide}"


@dataclass
class BenchConfig:
    """What a grid run measures. The fields except the grid axes (``models``, ``samplers``, ``steps``,
    ``guidance``) and ``batch_size`` define the configuration a results file belongs to."""

    #: built-in names or pipeline directories (stored as their resolved absolute paths: one folder, one model)
    models: list[str] = field(default_factory=lambda: ["digits-eps"])
    samplers: list[str] | None = None
    steps: list[int] = field(default_factory=lambda: [5, 10, 20])
    guidance: list[tuple[str, float]] = field(default_factory=lambda: [("cfg", 3.0)])
    classes: list[int] = field(default_factory=lambda: list(range(10)))
    num_per_class: int = 20
    seed: int = 0
    batch_size: int = 250
    reference_sampler: str = "dpm-solver++"
    reference_steps: int = 200
    #: features of the Frechet distance: ``digits-classifier``, ``inception`` (needs ``inception_weights``) or a
    #: :class:`~fewstep.bench.fid.FeatureExtractor` (any callable with an id); pipeline directories get an FD only
    #: with image features (not the digits classifier)
    feature_extractor: str | FeatureExtractor = FEATURE_EXTRACTOR
    #: pytorch-fid's weights file (else ``$FEWSTEP_INCEPTION_WEIGHTS`` or torch hub's cache)
    inception_weights: str | None = None
    #: prompts for diffusers pipeline directories among ``models`` (cycled; ``num_per_class`` samples each)
    prompts: list[str] | None = None
    #: image side for pipeline directories (default: the pipeline's own)
    image_size: int | None = None
    #: pipeline directories: folder of reference images for the Frechet distance (default: the reference solves)
    reference_images: str | None = None
    # analytic model
    schedule: str = "vp"
    num_samples: int = 2000
    dim: int = 2

    def __post_init__(self) -> None:
        self.models = _check_models(self.models)
        if any(is_pipeline_dir(m) for m in self.models):
            self.prompts = [str(p) for p in (self.prompts or []) if str(p).strip()]
            if not self.prompts:
                raise ValueError("`prompts` must hold at least one prompt for a pipeline directory in `models`")
        if self.image_size is not None:
            self.image_size = _check_ints("image_size", [self.image_size], 8)[0]
        self.samplers = _check_names("samplers", self.samplers or _default_samplers(self.models),
                                     sampler_registry.names())
        self.steps = _check_ints("steps", self.steps, 1)
        for name, low in (("num_per_class", 1), ("batch_size", 1), ("reference_steps", 2), ("num_samples", 2),
                          ("dim", 1)):
            # stored as Python ints: numpy integers broke torch's generators and the JSON results file
            setattr(self, name, _check_ints(name, [getattr(self, name)], low)[0])
        self.seed = check_int("seed", self.seed, 0, 2**63 - 1)
        from .analytic_bench import SCHEDULE_CONFIGS

        if self.schedule not in SCHEDULE_CONFIGS:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULE_CONFIGS)}, got {self.schedule!r}")
        self.classes = _check_ints("classes", self.classes, 0)
        if any(c > 9 for c in self.classes) or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"`classes` must be distinct digits 0..9, got {self.classes}")
        if self.reference_sampler not in sampler_registry.names("diffusion", standalone=True):
            raise ValueError(f"`reference_sampler` {self.reference_sampler!r} is not a standalone diffusion sampler; "
                             f"available: {', '.join(sampler_registry.names('diffusion', standalone=True))}")
        guidance = []
        for item in self.guidance:
            name, scale = parse_guidance(item) if isinstance(item, str) else item
            guidance_rules.make(name, scale)
            guidance.append((name, float(scale)))
        if not guidance and any(m != "analytic" for m in self.models):
            raise ValueError("`guidance` must not be empty for the digits models (use cfg:1 for no guidance)")
        self.guidance = guidance
        _check_distinct_scales(guidance)
        for name, values in (("models", self.models), ("samplers", self.samplers), ("steps", self.steps),
                             ("guidance", self.guidance)):
            repeated = repeated_values(values)
            if repeated:  # a repeated entry ran (and reported) its cells several times
                raise ValueError(f"`{name}` repeats {repeated}; give each value once")
        fe = self.feature_extractor
        if not isinstance(fe, FeatureExtractor) and fe not in FEATURE_EXTRACTORS:
            raise ValueError(f"`feature_extractor` must be one of {list(FEATURE_EXTRACTORS)} or a FeatureExtractor, "
                             f"got {self.feature_extractor!r}")
        if self.inception_weights is not None and self.feature_extractor != "inception":
            raise ValueError("`inception_weights` is only used with feature_extractor='inception'")
        if self.num_per_class * len(self.classes) < 2:
            raise ValueError("need at least 2 digits samples: raise `num_per_class` or add `classes`")
        self._check_pipeline_fd()

    @property
    def pipeline_fd(self) -> bool:
        """Whether pipeline directories get a Frechet distance (image features, not the digits classifier)."""
        return any(is_pipeline_dir(m) for m in self.models) and self.feature_extractor != FEATURE_EXTRACTOR

    def _check_pipeline_fd(self) -> None:
        if self.reference_images is not None:
            if not any(is_pipeline_dir(m) for m in self.models):
                raise ValueError(f"`reference_images` {self.reference_images!r} is for diffusers pipeline directories "
                                 "among `models`; the digits models use their held-out test digits")
            if not self.pipeline_fd:
                raise ValueError(f"`reference_images` {self.reference_images!r} needs image features: "
                                 "feature_extractor='inception' (with its weights) or a FeatureExtractor; the "
                                 "digits classifier only reads digits")
            self.reference_images = str(self.reference_images)
            list_reference_images(self.reference_images)  # a missing or empty folder fails before anything runs
        if self.pipeline_fd and len(self.prompts) * self.num_per_class < 2:
            raise ValueError(f"the Frechet distance needs at least 2 samples per cell: {len(self.prompts)} prompt(s) x "
                             f"`num_per_class` {self.num_per_class}; raise `num_per_class`")

    @property
    def extractor_id(self) -> str:
        """Name of the Frechet-distance features in results and cache keys (weights file resolved later)."""
        fe = self.feature_extractor
        return fe.id if isinstance(fe, FeatureExtractor) else fe

    def fingerprint(self) -> dict[str, Any]:
        """The settings a stored cell depends on (not the grid axes, not the batch size), only those of the kinds of
        model that run (:data:`_SETTING_KINDS`: e.g. ``classes`` only with a digits model, ``analytic`` only with
        the analytic one; ``seed`` always), plus per model: ``pipelines`` (``{directory: _folder_fingerprint}`` of
        the pipeline directories among ``models``: weights re-saved in place are another configuration) and
        ``embedded`` (``{model: _embedded_digest}`` of the digits models: retrained or upgraded weights are another
        configuration), both compared per model by :func:`_load_results`."""
        kinds = {_model_kind(m) for m in self.models}
        out: dict[str, Any] = {"seed": self.seed}
        if "digits" in kinds:
            out["classes"] = self.classes
            # the shipped classifier scores every digits row (accuracy, and the FD with its features)
            out["classifier"] = _embedded_digest(FEATURE_EXTRACTOR)
        if kinds & {"digits", "pipeline"}:
            out.update({"num_per_class": self.num_per_class,
                        "reference": f"{self.reference_sampler}:{self.reference_steps}",
                        "feature_extractor": self.extractor_id})
        if "analytic" in kinds:
            out["analytic"] = {"schedule": self.schedule, "num_samples": self.num_samples, "dim": self.dim}
        if "pipeline" in kinds:
            out["prompts"] = hashlib.sha256("\n".join(self.prompts or []).encode()).hexdigest()[:16]
            out["image_size"] = self.image_size
            if self.reference_images is not None:
                out["reference_images"] = image_set_digest(list_reference_images(self.reference_images))
            # weights re-saved into the same folder are another configuration (``_folder_fingerprint``)
            out["pipelines"] = {m: _folder_fingerprint(m) for m in self.models if is_pipeline_dir(m)}
        if "digits" in kinds:
            out["embedded"] = {m: _embedded_digest(m) for m in self.models if _model_kind(m) == "digits"}
        return out

    def cells(self) -> list[Cell]:
        """The grid in a fixed order: model, guidance, sampler, steps."""
        out = []
        for model in self.models:
            guides = [(None, None)] if model == "analytic" else self.guidance
            for rule, scale in guides:
                for name in self.samplers:
                    for n in self.steps:
                        out.append(Cell(model, name, n, rule, scale))
        return out


def _check_distinct_scales(guidance: Sequence[tuple[str, float]]) -> None:
    """``ValueError`` when two scales of one rule differ but print alike with 6 significant digits (``:g``, the
    results tables and plots): ``cfg:3`` and ``cfg:3.0000004`` are one setting to a reader and almost surely a
    typo or a float round-trip."""
    seen: dict[tuple[str, str], float] = {}
    for rule, scale in guidance:
        label = (rule, format(scale, "g"))
        if label in seen and seen[label] != scale:
            raise ValueError(f"`guidance` holds near-duplicate scales of {rule!r}: {seen[label]!r} and {scale!r} "
                             f"(both print as {rule} {label[1]}); give scales that differ in their first 6 "
                             "significant digits")
        seen[label] = scale


def _check_stored_scales(guidance: Sequence[tuple[str, float]], rows: Any, path: Path) -> None:
    """``ValueError`` when a scale of this run prints like (``:g``) but differs from the scale of a stored row of
    the same rule: across a resume the pair would be two rows that read alike, as :func:`_check_distinct_scales`
    refuses within one run."""
    stored: dict[tuple[str, str], float] = {}
    for row in rows:
        rule, scale = row.get("guidance"), row.get("guidance_scale")
        if isinstance(rule, str) and isinstance(scale, (int, float)) and not isinstance(scale, bool):
            stored.setdefault((rule, format(scale, "g")), float(scale))
    for rule, scale in guidance:
        label = (rule, format(scale, "g"))
        if label in stored and stored[label] != scale:
            raise ValueError(f"`guidance` {rule}:{scale!r} is a near-duplicate of the stored scale {stored[label]!r} "
                             f"of {rule!r} in results file {str(path)!r} (both print as {rule} {label[1]}); give "
                             f"{rule}:{stored[label]!r} to resume that setting, or a scale that differs in its first 6 "
                             "significant digits")


def _default_samplers(models: Sequence[str]) -> list[str]:
    """Every standalone diffusion sampler, plus those whose artifacts ship for every model (``dpm-solver-v3``'s
    EMS for ``digits-eps``)."""
    names = sampler_registry.names("diffusion", standalone=True)
    if all(default_sampler_options(m, "dpm-solver-v3") for m in models):
        names.insert(names.index("unipc") + 1, "dpm-solver-v3")
    return names


def _check_names(arg: str, values: Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    values = list(values or [])
    if not values:
        raise ValueError(f"`{arg}` must not be empty; available: {', '.join(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"`{arg}` has unknown value(s) {bad}; available: {', '.join(allowed)}")
    return values


def is_pipeline_dir(model: str) -> bool:
    """A diffusers pipeline directory (``model_index.json``) rather than one of the built-in :data:`MODELS`."""
    return model not in MODELS and (Path(model) / "model_index.json").is_file()


def _normalise_model(model: str) -> str:
    """A built-in model's name as it is; a pipeline directory as its resolved absolute path, so that one folder
    spelled two ways (``sd/pipe``, ``./sd/pipe``, ``/abs/sd/pipe``, through a symlink) is one model: one set of
    cells, one key in the results file."""
    return model if model in MODELS else str(Path(model).resolve())


def _model_kind(model: str) -> str:
    """``analytic``, ``digits`` (an embedded digits model) or ``pipeline`` (a pipeline directory)."""
    return "analytic" if model == "analytic" else "digits" if model in MODELS else "pipeline"


#: the kinds of model each setting of the results configuration concerns: ``fingerprint`` stores a setting only
#: when one of its kinds runs, and ``_load_results`` compares it only when one of its kinds has stored rows and
#: one of its kinds runs now (a setting two kinds share has one value for the rows of both)
_SETTING_KINDS = {
    "seed": ("analytic", "digits", "pipeline"),
    "classes": ("digits",), "classifier": ("digits",),
    "num_per_class": ("digits", "pipeline"), "reference": ("digits", "pipeline"),
    "feature_extractor": ("digits", "pipeline"),
    "analytic": ("analytic",),
    "prompts": ("pipeline",), "image_size": ("pipeline",), "reference_images": ("pipeline",),
}  # fmt: skip
#: settings a results file written before fewstep recorded them lacks: adopted from this run, not refused
_ADOPTED_SETTINGS = ("classifier",)
#: per-model digests of the configuration: ``{model: digest}``
_PER_MODEL = ("pipelines", "embedded")


def _check_models(values: Sequence[str] | None) -> list[str]:
    values = list(values or [])
    bad = [v for v in values if v not in MODELS and not is_pipeline_dir(v)]
    if not values or bad:
        raise ValueError(f"`models` has unknown value(s) {bad or values}; available: {', '.join(MODELS)} or a "
                         "diffusers pipeline directory (with model_index.json)")
    return [_normalise_model(v) for v in values]


def _check_ints(arg: str, values: Sequence[int], minimum: int) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in values):
        raise ValueError(f"`{arg}` must hold integers >= {minimum}, got {values!r}")
    return [int(v) for v in values]


def _check_cell(cell: Cell, model_config: dict[str, Any]) -> None:
    """Build the cell's scheduler once: an NFE below a sampler's minimum or a sampler that does not fit the
    model is reported before anything runs."""
    try:
        sched = sampler_registry.from_config(cell.sampler, model_config,
                                             **default_sampler_options(cell.model, cell.sampler, with_schedule=True))
        # dynamic-shift models (Flux) get their mu from the image size at run time; any value checks the grid
        sched.set_timesteps(cell.steps, mu=1.0 if model_config.get("use_dynamic_shifting") else None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cell {cell.key}: sampler {cell.sampler!r} cannot run {cell.steps} steps on "
                         f"{cell.model}: {exc}") from None


# ---------------------------------------------------------------------------------------------- caching
def reference_statistics(model: str, classes: Sequence[int], cache_dir: str | Path | None = None,
                         classifier=None, inception=None, inception_id: str | None = None,
                         extractor: FeatureExtractor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance ``mu = mean_i f(x_i)``, ``C = sum_i (f(x_i) - mu)(f(x_i) - mu)^T / (N - 1)`` of the
    feature extractor's features ``f`` of the held-out test digits ``x_i`` of ``classes``.

    Computed once and cached as safetensors in ``cache_dir`` (keyed by model, classes, feature extractor and
    image size); later calls load the file. The features are those of the shipped digits classifier (keyed by a
    digest of its files, :func:`_embedded_digest`), or else of
    exactly one of: ``classifier`` (another digits classifier module: keyed by a digest of its weights, see
    :func:`_module_digest`); ``extractor`` (a :class:`~fewstep.bench.fid.FeatureExtractor`, keyed by its id);
    ``inception`` (a loaded :class:`~fewstep.bench.inception.InceptionV3Features`, the same as
    ``extractor=FeatureExtractor(inception, f"inception:{inception_id}")``: with a ``cache_dir``, ``inception_id``
    must name its weights, e.g. the digest of its file)."""
    from ..datasets import load_digits_images, to_unit_range
    from ..pipelines import load_default
    from ..pipelines.defaults import default_model_path
    from .digits_eval import classifier_features
    from .metrics import feature_statistics

    if model not in MODELS[1:]:
        raise ValueError(f"`model` must be one of {list(MODELS[1:])}, got {model!r}")
    classes = _check_ints("classes", classes, 0)
    if not classes or any(c > 9 for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"`classes` must be distinct digits 0..9 (at least one), got {classes}")
    given = [name for name, value in (("classifier", classifier), ("inception", inception), ("extractor", extractor))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of `classifier`, `inception` and `extractor` (the features of the "
                         f"statistics), got {' and '.join(f'`{g}`' for g in given)}")
    if extractor is not None and not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"`extractor` must be a FeatureExtractor, got {type(extractor).__name__}")
    if inception_id is not None and (not isinstance(inception_id, str) or not inception_id.strip()):
        raise ValueError(f"`inception_id` must be a non-empty string naming the Inception weights, got "
                         f"{inception_id!r}")
    if inception_id is not None and inception is None:
        raise ValueError(f"`inception_id` {inception_id!r} names the weights of `inception`, which is not given")
    if inception is not None and inception_id is None and cache_dir is not None:
        raise ValueError("`inception_id` must name the weights of `inception` (e.g. the digest of its weights "
                         "file) when caching in `cache_dir`, got None: statistics of other weights would share the "
                         "cache file")
    if classifier is not None and not isinstance(classifier, torch.nn.Module):
        raise TypeError(f"`classifier` must be a digits classifier (torch.nn.Module), got "
                        f"{type(classifier).__name__}")
    unet_config = json.loads((default_model_path(model) / "unet" / "config.json").read_text())
    size = int(unet_config["sample_size"])
    if inception is not None:
        extractor = FeatureExtractor(inception, f"inception:{inception_id}")
    if extractor is not None:
        features_id = extractor.id
    elif classifier is not None:  # its weights, not its name: a fine-tuned or scaled copy gets its own file
        features_id = f"{FEATURE_EXTRACTOR}:{_module_digest(classifier)}"
    else:  # the shipped classifier: keyed by a digest of its files, so a retrained one is not served stale statistics
        features_id = f"{FEATURE_EXTRACTOR}:files:{_embedded_digest(FEATURE_EXTRACTOR)}"
    key = {"kind": "reference-statistics", "model": model, "classes": sorted(int(c) for c in classes),
           "feature_extractor": features_id, "split": "test", "sample_size": size}
    path = Path(cache_dir) / _cache_name("refstats", key) if cache_dir is not None else None
    cached = _load_statistics(path, key)
    if cached is not None:
        return cached
    images, labels = load_digits_images(size, "test")
    keep = torch.from_numpy(np.isin(labels.numpy(), list(classes)))
    if extractor is not None:
        feats = extractor(to_unit_range(images[keep]))
    else:
        classifier = classifier if classifier is not None else load_default(FEATURE_EXTRACTOR)
        feats, _ = classifier_features(classifier, to_unit_range(images[keep]))
    mean, cov = feature_statistics(feats.double())
    if path is not None and is_main_process():
        _save_cached(path, {"mean": torch.from_numpy(mean), "cov": torch.from_numpy(cov)}, key)
    return mean, cov


def _module_digest(module: torch.nn.Module) -> str:
    """Digest of a module's weights: every ``state_dict`` entry's name, dtype, shape and bytes (parameters and
    buffers), in name order."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- results file
def _load_results(path: Path, fingerprint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stored rows of ``path`` (none when it does not exist), keyed by :attr:`Cell.key` rebuilt from each row's
    own fields (files of earlier versions keyed the guidance scale rounded to 6 digits, and a pipeline directory as
    it was spelled: it is resolved against the working directory, :func:`_normalise_model`).

    The stored configuration must agree with ``fingerprint`` where it concerns stored rows (:func:`_config_differences`:
    a setting only where a kind of model it concerns has stored rows and runs now; a pipeline directory or embedded
    model of this run with stored rows must have its stored digest). The stored settings and digests this run does
    not set are merged into ``fingerprint`` (in place), so the file keeps describing all its rows. Anything else is
    ``ValueError`` naming the differing settings with the stored value and this run's."""
    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # also binary bytes in the file
        raise ValueError(f"results file {str(path)!r} is not valid JSON ({exc}); delete it or choose another --out") \
            from None
    cells = payload.get("cells") if isinstance(payload, dict) else None
    if not isinstance(cells, dict) or not all(_is_result_row(row) for row in cells.values()):
        raise ValueError(f"results file {str(path)!r} is not a fewstep bench results file (a JSON object whose "
                         "'cells' hold result rows); delete it or choose another --out")  # fmt: skip
    for row in cells.values():
        row["model"] = _normalise_model(row["model"])
    stored = payload.get("config")
    if not isinstance(stored, dict) or not all(isinstance(stored.get(k, {}), dict) for k in _PER_MODEL):
        raise ValueError(f"results file {str(path)!r} is from another configuration: its configuration is "
                         f"{json.dumps(stored)}; use another output directory")
    stored = {**stored, "pipelines": {_normalise_model(k): v for k, v in stored.get("pipelines", {}).items()}}
    stored_models = {row["model"] for row in cells.values()}
    settings, changed, embedded = _config_differences(stored, fingerprint, stored_models)
    if changed:
        raise ValueError(
            f"results file {str(path)!r} holds rows of pipeline director{'ies' if len(changed) > 1 else 'y'} "
            f"{changed} whose files differ from when they were stored (weights re-saved, or a results file written "
            "before fewstep recorded pipeline folders); use another output directory"
        )
    if embedded:
        raise ValueError(
            f"results file {str(path)!r} holds rows of embedded model{'s' if len(embedded) > 1 else ''} {embedded} "
            "whose files differ from when they were stored (retrained, e.g. by scripts/train_digits.py, or changed "
            "by a fewstep upgrade); use another output directory"
        )
    if settings:
        raise ValueError(f"results file {str(path)!r} is from another configuration: {'; '.join(settings)}; use "
                         "another output directory or the same settings")
    stored_kinds = {_model_kind(m) for m in stored_models}
    for key, value in stored.items():
        if key in _PER_MODEL:
            if value or fingerprint.get(key):
                fingerprint[key] = {**value, **fingerprint.get(key, {})}
        elif key not in fingerprint and set(_SETTING_KINDS.get(key, stored_kinds)) & stored_kinds:
            fingerprint[key] = value  # a setting of stored rows this run does not use
    rows: dict[str, dict[str, Any]] = {}
    for key, row in cells.items():
        new_key = _row_key(row) or key
        rows[new_key if new_key not in rows else key] = row
    return rows


def _config_differences(stored: dict[str, Any], fingerprint: dict[str, Any], stored_models: set[str]
                        ) -> tuple[list[str], list[str], list[str]]:
    """How a stored configuration differs from this run's, as ``(settings, directories, embedded)``:

    * ``settings``: ``"KEY: stored X, this run Y"`` for each setting that differs where it matters: a kind of model
      it concerns (:data:`_SETTING_KINDS`; an unknown key concerns all) has rows among ``stored_models`` and one
      runs now. A setting the stored file lacks that fewstep records only since (:data:`_ADOPTED_SETTINGS`) is
      adopted, not refused;
    * ``directories``: the pipeline directories of this run with stored rows whose folder fingerprint differs from
      the stored one or was never stored (rows of unknown weights);
    * ``embedded``: the embedded models of this run with stored rows whose stored digest differs (a results file
      written before fewstep recorded them has none: adopted, the shipped models being the likely ones)."""
    stored_kinds = {_model_kind(m) for m in stored_models}
    # this run's kinds: ``fingerprint`` holds ``analytic``, ``embedded`` and ``pipelines`` exactly when they run
    run_kinds = {kind for key, kind in (("analytic", "analytic"), ("embedded", "digits"), ("pipelines", "pipeline"))
                 if key in fingerprint}
    settings = []
    for key in differing_keys(stored, fingerprint):
        kinds = set(_SETTING_KINDS.get(key, ("analytic", "digits", "pipeline")))
        if key in _PER_MODEL or not (kinds & stored_kinds and kinds & run_kinds):
            continue
        if key not in stored and key in _ADOPTED_SETTINGS:
            continue
        old, new = stored.get(key, MISSING), fingerprint.get(key, MISSING)
        settings.append(f"{_SETTING_NAMES.get(key, key)}: stored {_show(old)}, this run {_show(new)}")
    old_dirs = stored.get("pipelines", {})
    directories = sorted(model for model, files in fingerprint.get("pipelines", {}).items()
                         if model in stored_models and old_dirs.get(model) != files)
    old_embedded = stored.get("embedded", {})
    embedded = sorted(model for model, digest in fingerprint.get("embedded", {}).items()
                      if model in stored_models and old_embedded.get(model, digest) != digest)
    return settings, directories, embedded


#: how a differing setting is named in the error
_SETTING_NAMES = {"classifier": "classifier (digest of the shipped digits-classifier's files)",
                  "prompts": "prompts (digest)", "reference_images": "reference_images (digest of the images)"}


def _show(value: Any) -> str:
    return "(not set)" if value is MISSING else json.dumps(value)


def _row_key(row: dict[str, Any]) -> str | None:
    """:attr:`Cell.key` of a stored row, ``None`` when its guidance fields are not a rule and a number."""
    guidance, scale = row.get("guidance"), row.get("guidance_scale")
    if isinstance(row["steps"], bool) or not isinstance(row["steps"], int):
        return None
    if guidance is not None and (not isinstance(guidance, str) or isinstance(scale, bool)
                                 or not isinstance(scale, (int, float))):
        return None
    return Cell(row["model"], row["sampler"], row["steps"], guidance, None if guidance is None else scale).key


#: the fields every stored result row has (metrics: a number, or None where it does not apply)
_ROW_TEXT = ("model", "sampler")
_ROW_NUMBERS = ("steps", "nfe", "fd", "accuracy", "mse", "rmse", "seconds_per_image")


def _is_result_row(row: Any) -> bool:
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in _ROW_TEXT):
        return False
    return all(k in row and (row[k] is None or (isinstance(row[k], (int, float)) and not isinstance(row[k], bool)))
               for k in _ROW_NUMBERS)


def _write_results(out_dir: Path, fingerprint: dict[str, Any], cells: dict[str, dict[str, Any]],
                   order: list[str]) -> None:
    rows = [cells[k] for k in order if k in cells] + [v for k, v in cells.items() if k not in order]
    payload = {"version": __version__, "config": fingerprint, "cells": cells}
    atomic_write(out_dir / RESULTS_FILES["json"], lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
    columns = ["model", "sampler", "steps", "nfe", "guidance", "guidance_scale", *METRICS, "seconds_per_image",
               "num_samples"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    atomic_write(out_dir / RESULTS_FILES["csv"], lambda p: p.write_text(buf.getvalue()))
    atomic_write(out_dir / RESULTS_FILES["markdown"], lambda p: p.write_text(format_markdown(rows) + "\n"))


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of result rows (``-`` where a metric does not apply; a pipeline row whose samples diverged
    says how many next to its MSE)."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| model | guidance | sampler | steps | NFE | FD | accuracy | MSE to ref | RMSE to exact | s / image |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        guide = "-" if r.get("guidance") is None else f"{r['guidance']} {r['guidance_scale']:g}"
        lines.append(f"| {r['model']} | {guide} | {r['sampler']} | {r['steps']} | {r['nfe']} | {fmt(r['fd'], '.4g')} "
                     f"| {fmt(r['accuracy'], '.3f')} | {fmt(r['mse'], '.3e')}{_diverged_note(r)} "
                     f"| {fmt(r['rmse'], '.3e')} "
                     f"| {fmt(r['seconds_per_image'], '.2e')} |")
    return "\n".join(lines)


def _diverged_note(row: dict[str, Any]) -> str:
    count = row.get("diverged")
    return f" ({count}/{row.get('num_samples')} diverged)" if isinstance(count, int) and count > 0 else ""


# ---------------------------------------------------------------------------------------------- the cells
class _DigitsWorld:
    """One embedded digits model: the shared objective (pipeline, classifier, seeds, reference statistics) and
    the many-step reference solves, one per guidance setting (cached as safetensors)."""

    def __init__(self, model: str, config: BenchConfig, cache_dir: Path | None, progress: bool,
                 extractor: FeatureExtractor | None = None):
        from ..search.objectives import DigitsObjective

        self.config, self.cache_dir, self.progress = config, cache_dir, progress
        self.extractor, self.extractor_stats = extractor, None
        if extractor is not None:  # image features (Inception or the user's) replace the classifier's for the FD
            self.extractor_stats = reference_statistics(model, config.classes, cache_dir, extractor=extractor)
        stats = reference_statistics(model, config.classes, cache_dir)
        self.objective = DigitsObjective(config.classes, config.num_per_class, seed=config.seed, model=model,
                                         batch_size=config.batch_size, reference_stats=stats)
        self.references: dict[tuple[str, float], torch.Tensor] = {}

    def _use(self, rule: str, scale: float) -> None:
        self.objective.guidance, self.objective.guidance_scale = rule, float(scale)

    def generate(self, scheduler, steps: int) -> tuple[torch.Tensor, float]:
        """All samples and the wall time of generating them (split across processes: ``_dist.split_samples``)."""
        return split_samples(
            len(self.objective.labels),
            lambda idx: self.objective.images(scheduler, steps, progress=self.progress and is_main_process(),
                                              indices=idx),
        )

    def reference(self, rule: str, scale: float) -> torch.Tensor:
        if (rule, scale) in self.references:
            return self.references[(rule, scale)]
        c = self.config
        # the model's files, not only its name: a retrained or upgraded model gets its own reference solve
        key = {"kind": "reference-solve", "model": self.objective.model,
               "weights": _embedded_digest(self.objective.model), "guidance": rule, "guidance_scale": scale,
               "classes": c.classes, "num_per_class": c.num_per_class, "seed": c.seed,
               "reference": f"{c.reference_sampler}:{c.reference_steps}"}

        def solve() -> torch.Tensor:
            self._use(rule, scale)
            sched = sampler_registry.from_config(c.reference_sampler, self.objective.model_config,
                                                 **default_sampler_options(self.objective.model, c.reference_sampler))
            return self.generate(sched, c.reference_steps)[0].double()

        images = _cached_tensor(self.cache_dir, "refsolve", key, "images", solve, write=is_main_process(),
                                rows=len(c.classes) * c.num_per_class)
        self.references[(rule, scale)] = images
        return images

    def run(self, cell: Cell) -> dict[str, Any]:
        reference = self.reference(cell.guidance, cell.guidance_scale)
        self._use(cell.guidance, cell.guidance_scale)
        sched = sampler_registry.from_config(cell.sampler, self.objective.model_config,
                                             **default_sampler_options(cell.model, cell.sampler, with_schedule=True))
        images, seconds = self.generate(sched, cell.steps)
        fd, accuracy = self.objective.score(images)
        if self.extractor is not None:
            from .metrics import feature_statistics, frechet_distance

            fd = frechet_distance(*feature_statistics(self.extractor(images)), *self.extractor_stats)
        mse = (images.double() - reference).pow(2).mean().item()
        n = len(images)
        return {"nfe": len(sched.timesteps), "fd": fd, "accuracy": accuracy, "mse": mse, "rmse": None,
                "seconds_per_image": seconds / n, "num_samples": n}


_DIGESTS: dict[tuple, str] = {}


def _embedded_digest(model: str) -> str:
    """A content digest of an embedded model's files (every file under ``default_model_path(model)``: relative
    path and bytes): results rows, reference solves and the classifier's reference statistics carry it, so a model
    retrained in place (``scripts/train_digits.py``) or changed by an upgrade is recomputed, never reused. The
    models are a few MB; the digest is computed once per process for the same file names, sizes and times."""
    from ..pipelines.defaults import default_model_path

    root = default_model_path(model)
    return _files_digest({str(f.relative_to(root)): f for f in root.rglob("*") if f.is_file()})


def _files_digest(files: dict[str, Path]) -> str:
    """sha256 (16 hex digits) of ``files``' names (the keys) and bytes, in name order; memoised per process on the
    files' paths, sizes and modification times."""
    named = sorted(files.items())
    memo = tuple((name, str(f), f.stat().st_size, f.stat().st_mtime_ns) for name, f in named)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        for name, f in named:
            data = f.read_bytes()
            h.update(f"{name}:{len(data)};".encode())
            h.update(data)
        _DIGESTS[memo] = h.hexdigest()[:16]
    return _DIGESTS[memo]


def _shipped_artifacts_digest(cell: Cell) -> str | None:
    """Content digest of the shipped artifacts a cell's sampler reads on a built-in model
    (:func:`~fewstep.pipelines.defaults.default_sampler_options`): the DPM-Solver-v3 EMS (``dpm-solver-v3``, and
    ``s3``, whose schedules may take EMS steps) and the searched schedule for the cell's NFE (``s3``); ``None``
    when it reads none. A stored row carries it (``artifacts``), so a row made with artifacts that a fewstep
    upgrade or a new search has replaced is recomputed on the next run instead of being reported as current."""
    from ..samplers.dpm_solver_v3 import SHIPPED_EMS
    from ..samplers.s3 import shipped_schedule_path

    if cell.model not in MODELS:
        return None
    options = default_sampler_options(cell.model, cell.sampler, with_schedule=True)
    files = {"ems": SHIPPED_EMS[options["ems_file"]]} if "ems_file" in options else {}
    if "s3_schedule" in options:
        files["s3"] = shipped_schedule_path(options["s3_schedule"], cell.steps)
    return _files_digest(files) if files else None


def _folder_fingerprint(folder: str | Path) -> str:
    """A digest of a pipeline folder's files (relative path, size, modification time): cache entries of reference
    solves and the results' configuration carry it, so weights replaced under the same path are recomputed, not
    reused (a re-saved identical checkpoint only costs a recomputation). Only ``model_index.json`` and the
    component folders it names count (when it names them), so results or caches written into the pipeline
    folder do not change it."""
    root = Path(folder).resolve()
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    parts = ([root / "model_index.json"] + [root / k for k in index if not k.startswith("_") and (root / k).is_dir()]
             if isinstance(index, dict) else [root])
    files = {f for part in parts for f in ([part] if part.is_file() else part.rglob("*")) if f.is_file()}
    entries = sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


class _PipelineWorld:
    """A diffusers text-to-image pipeline directory (SD 1.x/2.x, SDXL, SD3, Flux) run through ``FewstepPipeline``:
    prompts from the config, one seeded generator per sample (``seed + k``, so results do not depend on the
    batch size), MSE to a many-step reference solve in latent space (the metric DPM-Solver-v3 and DC-Solver
    report for Stable Diffusion) and wall time per image. With an ``extractor``, also the Frechet distance of the
    decoded images to ``config.reference_images`` (a folder) or else to the decoded reference solves.
    Reference solves and reference statistics are cached as safetensors in ``cache_dir``. As on the digits models,
    a sampler that diverges is scored (NaN replaced by 0, Inf by the largest float), not an error that would stop
    the grid at that cell on every rerun; the row counts its ``diverged`` samples (shown next to the MSE). A
    reference solve that diverges is a ``FloatingPointError`` naming the guidance setting to lower: every MSE
    against it would be meaningless."""

    def __init__(self, model: str, config: BenchConfig, progress: bool, cache_dir: Path | None = None,
                 extractor: FeatureExtractor | None = None):
        from diffusers import DiffusionPipeline

        from ..pipelines import FewstepPipeline

        self.model, self.config, self.progress, self.cache_dir = model, config, progress, cache_dir
        self.files_id = _folder_fingerprint(model)  # a changed checkpoint in the same folder misses the cache
        self.pipe = DiffusionPipeline.from_pretrained(model)
        if not FewstepPipeline.supports(self.pipe):
            raise ValueError(f"`models` entry {model!r}: {type(self.pipe).__name__} is not a pipeline FewstepPipeline "
                             "hosts (SD 1.x/2.x, SDXL, SD3, Flux)")
        self.pipe.set_progress_bar_config(disable=True)
        self.model_config = dict(self.pipe.scheduler.config)
        n = len(config.prompts) * config.num_per_class
        self.prompts = [config.prompts[k % len(config.prompts)] for k in range(n)]
        self.seeds = [config.seed + k for k in range(n)]
        self.size = config.image_size
        self.references: dict[tuple[str, float], torch.Tensor] = {}
        self.extractor, self.folder_stats = extractor, None
        if extractor is not None:
            self.decoder = FewstepPipeline.from_pipe(self.pipe)  # decodes latents; its scheduler and rule are unused
            side = self.size if self.size is not None else self.decoder.default_image_size()
            self.image_hw = (side, side)
            if config.reference_images is not None:
                self.folder_stats = folder_statistics(config.reference_images, extractor, self.image_hw, cache_dir)
        self.solve_stats: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}

    def generate(self, sampler: str, steps: int, rule: str, scale: float) -> tuple[torch.Tensor, float, int]:
        """Latents of all samples (Flux: packed), the wall time of generating them, and how many samples diverged
        (held NaN/Inf: replaced as on the digits models, NaN by 0 and Inf by the largest float)."""
        from ..pipelines import FewstepPipeline

        scheduler = sampler_registry.from_config(sampler, self.model_config)
        flux = FewstepPipeline.family_of(self.pipe) == "flux"
        # Flux: `cfg` is its distilled guidance embedding (one call per step, as `fewstep generate` does); other
        # rules run true guidance against the empty prompt
        embedded = flux and rule == "cfg"
        fp = FewstepPipeline.from_pipe(self.pipe, scheduler=scheduler, guidance=None if embedded else rule,
                                       guidance_scale=scale)
        extra = {"height": self.size, "width": self.size} if self.size is not None else {}
        bs = self.config.batch_size

        def make(indices: list[int]) -> torch.Tensor:
            outs = []
            for i in tqdm(range(0, len(indices), bs), desc=f"{sampler} {steps} steps",
                          disable=not (self.progress and is_main_process()), leave=False):
                chunk = indices[i:i + bs]
                gens = [torch.Generator().manual_seed(self.seeds[k]) for k in chunk]
                batch = [self.prompts[k] for k in chunk]
                if flux and not embedded:
                    extra["negative_prompt"] = [""] * len(batch)
                # a diverging sampler is scored (below), not an error that stops the grid at it on every rerun
                out = fp(prompt=batch, generator=gens, num_inference_steps=steps, output_type="latent",
                         check_finite=False, **extra)
                outs.append(out.images.float().cpu())
            return torch.cat(outs)

        latents, seconds = split_samples(len(self.prompts), make)
        diverged = int((~torch.isfinite(latents.reshape(len(latents), -1))).any(dim=1).sum())
        return torch.nan_to_num(latents, nan=0.0), seconds, diverged

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features of the decoded latents (decoded ``batch_size`` at a time). Under ``accelerate
        launch`` every process decodes and featurises its share of the (gathered) latents; the features are
        gathered, so no process repeats another's VAE decodes and Inception passes."""
        h, w = self.image_hw

        def make(indices: list[int]) -> torch.Tensor:
            share = latents[torch.tensor(indices)]
            # diverged latents decode to NaN: replaced by 0 like the digits path's images
            return torch.cat([self.extractor(torch.nan_to_num(
                self.decoder.decode_latents(chunk.to(torch.float32), h, w), nan=0.0, posinf=1.0, neginf=0.0)).cpu()
                for chunk in share.split(self.config.batch_size)])

        return split_samples(len(latents), make)[0]

    def reference(self, rule: str, scale: float) -> torch.Tensor:
        """The many-step reference latents of a guidance setting (cached as safetensors)."""
        if (rule, scale) in self.references:
            return self.references[(rule, scale)]
        c = self.config
        key = {"kind": "reference-solve", "model": str(Path(self.model).resolve()), "files": self.files_id,
               "guidance": rule,
               "guidance_scale": scale, "prompts": hashlib.sha256("\n".join(c.prompts).encode()).hexdigest()[:16],
               "num_per_class": c.num_per_class, "seed": c.seed, "image_size": c.image_size,
               "reference": f"{c.reference_sampler}:{c.reference_steps}"}
        def solve() -> torch.Tensor:
            solved, _, diverged = self.generate(c.reference_sampler, c.reference_steps, rule, scale)
            if diverged:  # every MSE of this setting would compare against replaced values (0 to 0: a "perfect" 0)
                raise FloatingPointError(
                    f"the reference solve of {self.model} ({c.reference_sampler}, {c.reference_steps} steps) at "
                    f"guidance {rule} {scale:g} diverged: {diverged} of {len(solved)} samples hold NaN/Inf; lower the "
                    f"guidance scale (--guidance {rule}:{scale:g}) or leave that setting out")
            return solved.double()

        latents = _cached_tensor(self.cache_dir, "refsolve", key, "latents", solve, write=is_main_process(),
                                 rows=len(c.prompts) * c.num_per_class)
        self.references[(rule, scale)] = latents
        return latents

    def reference_stats(self, rule: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Reference statistics of the FD: the folder's, else those of the decoded reference solve (cached, keyed by
        the extractor, a hash of the reference latents, the pipeline folder's fingerprint -- the VAE that decodes
        them: another VAE with the same latents must not reuse them -- and the image size)."""
        if self.folder_stats is not None:
            return self.folder_stats
        if (rule, scale) not in self.solve_stats:
            latents = self.reference(rule, scale)
            digest = hashlib.sha256(latents.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]
            key = {"kind": "reference-statistics", "extractor": self.extractor.id,
                   "images": f"reference-solve:{digest}", "files": self.files_id, "count": len(latents),
                   "size": list(self.image_hw)}
            self.solve_stats[(rule, scale)] = cached_statistics(key, self.cache_dir, lambda: self.features(latents))
        return self.solve_stats[(rule, scale)]

    def run(self, cell: Cell) -> dict[str, Any]:
        from .metrics import feature_statistics, frechet_distance

        reference = self.reference(cell.guidance, cell.guidance_scale)
        latents, seconds, diverged = self.generate(cell.sampler, cell.steps, cell.guidance, cell.guidance_scale)
        mse = (latents.double() - reference).pow(2).mean().item()
        fd = None
        if self.extractor is not None:
            stats = self.reference_stats(cell.guidance, cell.guidance_scale)
            fd = frechet_distance(*feature_statistics(self.features(latents)), *stats)
        n = len(latents)
        return {"nfe": cell.steps, "fd": fd, "accuracy": None, "mse": mse, "rmse": None,
                "seconds_per_image": seconds / n, "num_samples": n, "diverged": diverged}


def _run_analytic(cell: Cell, config: BenchConfig) -> dict[str, Any]:
    from .analytic_bench import run_analytic_bench

    rows, _ = run_analytic_bench(samplers=[cell.sampler], steps=[cell.steps], schedule=config.schedule,
                                 num_samples=config.num_samples, dim=config.dim, seed=config.seed, progress=False)
    r = rows[0]
    return {"nfe": r.nfe, "fd": r.fd, "accuracy": None, "mse": None, "rmse": r.rmse,
            "seconds_per_image": r.seconds / config.num_samples, "num_samples": config.num_samples}


def _model_config(model: str, config: BenchConfig) -> dict[str, Any]:
    if model == "analytic":
        from .analytic_bench import SCHEDULE_CONFIGS

        if config.schedule not in SCHEDULE_CONFIGS:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULE_CONFIGS)}, got {config.schedule!r}")
        return SCHEDULE_CONFIGS[config.schedule]
    if is_pipeline_dir(model):
        return json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
    from ..pipelines.defaults import default_model_path

    return json.loads((default_model_path(model) / "scheduler" / "scheduler_config.json").read_text())


def _resolve_extractor(config: BenchConfig) -> FeatureExtractor | None:
    """The image features of the Frechet distance (``None``: the digits classifier, or no FD for pipelines);
    ``inception`` loads the user's weights file (a clear error saying how to supply it when missing)."""
    fe = config.feature_extractor
    if isinstance(fe, FeatureExtractor):
        return fe
    if fe != "inception" or all(m == "analytic" for m in config.models):
        return None
    from .fid import inception_extractor

    return inception_extractor(config.inception_weights, batch_size=min(config.batch_size, 50))


def run_grid(config: BenchConfig, out_dir: str | Path, cache_dir: str | Path | None = None,
             progress: bool = True, refuse_near_duplicates: bool = False) -> list[dict[str, Any]]:
    """Run every cell of ``config`` not yet stored in ``out_dir/results.json`` and write JSON, CSV and Markdown
    results there (after every cell). Returns all rows of this grid, in grid order.

    Under a distributed launch (``torchrun --nproc_per_node N``, or ``accelerate launch`` with a multi-process
    config) the samples of every cell are split across the processes (each computing on the CPU) and gathered;
    only the main process writes files.

    One run at a time per ``out_dir``: the main process holds an exclusive advisory lock on it for the run
    (``fcntl.flock`` on :data:`LOCK_FILE`, removed at the end; no locking without ``fcntl``), and a run started
    while another holds it is a ``ValueError`` on every process before anything is read or written. The results
    files and the cache folder are checked before any cell runs; a run that fails before writing a file removes the
    folders it made.

    ``cache_dir``: where reference statistics and reference solves are cached (default ``out_dir/cache``).
    ``refuse_near_duplicates`` (``fewstep bench`` sets it): a guidance scale that prints like (6 significant
    digits) but differs from a stored row's scale of the same rule is a ``ValueError``, as two such scales within
    one config are; by default the two are kept apart as two rows (cells are keyed by the exact scale)."""
    check_bool("refuse_near_duplicates", refuse_near_duplicates)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir` {str(out)!r} is a file; give a directory")
    main = is_main_process()
    progress = progress and main
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    # every check before the output directory is made: a grid that cannot run leaves no (empty) folder behind
    _check_output_paths(out, cache if any(m != "analytic" for m in config.models) else None, cache_dir is None)
    cells = config.cells()
    configs = {m: _model_config(m, config) for m in config.models}
    for cell in cells:
        _check_cell(cell, configs[cell.model])
    fingerprint = config.fingerprint()
    extractor = _resolve_extractor(config)  # missing Inception weights fail before anything runs
    if extractor is not None:
        fingerprint["feature_extractor"] = extractor.id
    # the output folder is locked for the whole run before its results are read: two runs into one folder would
    # each rewrite results.json with their own rows (the later one's file losing the other's)
    created = first_missing_dir(out) if main else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        try:
            refusal = None
            if main:
                try:
                    lock = _lock_output(out)
                except _OutputBusy as exc:
                    refusal = str(exc)
            refusal = main_process_value(refusal)  # every process of a distributed launch stops, none waits
            if refusal is not None:
                raise ValueError(refusal)
            return _run_locked(config, out, cache, cells, fingerprint, extractor, progress, refuse_near_duplicates)
        finally:
            _unlock_output(out, lock)
    except BaseException:
        # a run that failed or was refused before writing a file leaves no folder it made (the lock file is gone)
        if created is not None and created.is_dir() and not any(f.is_file() for f in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _run_locked(config: BenchConfig, out: Path, cache: Path, cells: list[Cell], fingerprint: dict[str, Any],
                extractor: FeatureExtractor | None, progress: bool, refuse_near_duplicates: bool
                ) -> list[dict[str, Any]]:
    """:func:`run_grid` once its output folder exists and is locked: read the stored rows, run the missing cells
    and write the results after each."""
    main = is_main_process()
    stored = _load_results(out / RESULTS_FILES["json"], fingerprint)
    if refuse_near_duplicates:
        _check_stored_scales(config.guidance, stored.values(), out / RESULTS_FILES["json"])
    artifacts = {c.key: _shipped_artifacts_digest(c) for c in cells}
    stale = [key for key, digest in artifacts.items() if key in stored and stored[key].get("artifacts") != digest]
    if stale and progress:
        tqdm.write(f"recomputing {len(stale)} stored row(s) made with other shipped sampler artifacts (EMS or "
                   f"searched schedules): {', '.join(stale)}")
    for key in stale:
        del stored[key]
    # processes of a distributed launch given other settings or grids would gather mixed samples, or hang
    check_same_on_all_processes({**fingerprint, "cells to run": sorted(c.key for c in cells if c.key not in stored)},
                                "bench settings")
    order = [c.key for c in cells]
    todo = [c for c in cells if c.key not in stored]
    worlds: dict[str, _DigitsWorld | _PipelineWorld] = {}
    for cell in tqdm(todo, desc="bench cells", disable=not progress):
        if cell.model == "analytic":
            metrics = _run_analytic(cell, config)
        else:
            if cell.model not in worlds:
                worlds[cell.model] = (_PipelineWorld(cell.model, config, progress, cache, extractor)
                                      if is_pipeline_dir(cell.model)
                                      else _DigitsWorld(cell.model, config, cache, progress, extractor))
            metrics = worlds[cell.model].run(cell)
        stored[cell.key] = {**asdict(cell), **metrics}
        if artifacts[cell.key] is not None:
            stored[cell.key]["artifacts"] = artifacts[cell.key]
        if main:
            _write_results(out, fingerprint, stored, order)
    if not todo and main:
        _write_results(out, fingerprint, stored, order)
    state = distributed_state()
    if state is not None:
        state.wait_for_everyone()  # the results file is complete before any process returns
    return [stored[k] for k in order]


def _check_output_paths(out: Path, cache: Path | None, default_cache: bool) -> None:
    """The files a run writes into ``out`` (results.json/.csv/.md) and its cache folder (``None``: the run caches
    nothing) must be creatable: checked before any cell runs, not found out after the work is done (``ValueError``
    naming ``out_dir``/``cache_dir``)."""
    for name in RESULTS_FILES.values():
        path = out / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise ValueError(f"`out_dir` {str(out)!r}: {str(path)!r} exists and is not a regular file (a directory, "
                             "device or broken link); remove it or choose another output directory")
    if cache is not None and (cache.exists() or cache.is_symlink()) and not cache.is_dir():
        where = f"`out_dir` {str(out)!r}: its cache folder" if default_cache else "`cache_dir`"
        raise ValueError(f"{where} {str(cache)!r} exists and is not a directory; remove it or give another "
                         "`cache_dir`")



class _OutputBusy(ValueError):
    """Another run holds the lock of an output folder."""


def _lock_output(folder: Path) -> int | None:
    """Take the exclusive advisory lock of ``folder`` (``fcntl.flock`` on :data:`LOCK_FILE` in it, not waiting) and
    return its file descriptor; ``_OutputBusy`` when another run holds it. ``None`` where there is no ``flock``
    (Windows) or the file system refuses it: runs into one folder are then not kept apart."""
    try:
        import fcntl
    except ImportError:
        return None
    path = folder / LOCK_FILE
    while True:
        folder.mkdir(parents=True, exist_ok=True)  # (again, if a run that failed removed the folder it had made)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _OutputBusy(f"another fewstep bench is writing results to {str(folder)!r}; wait for it or use "
                              "another --out") from None
        except OSError:  # no locks on this file system (ENOLCK, EOPNOTSUPP): run unlocked
            os.close(fd)
            return None
        # the run that held it removes the file before unlocking (_unlock_output): a lock taken on a removed file
        # would keep no one out, so lock the file the path names now
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock_output(folder: Path, fd: int | None) -> None:
    """Release the lock taken by :func:`_lock_output` and remove its file (a finished run leaves only results)."""
    if fd is None:
        return
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- plots
def plot_results(rows: list[dict[str, Any]], path: str | Path, metric: str = "fd") -> Path:
    """``metric`` versus NFE, one line per sampler, log-x (log-y for positive errors), one panel per
    (model, guidance); saved as PNG.

    Needs matplotlib (``pip install fewstep[plot]``): ``ImportError`` saying so otherwise."""
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {list(METRICS)}, got {metric!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'fewstep[plot]' (or pip install matplotlib)") \
            from None
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get(metric) is None:
            continue
        guide = "" if r.get("guidance") is None else f", {r['guidance']} {r['guidance_scale']:g}"
        groups.setdefault(f"{r['model']}{guide}", []).append(r)
    if not groups:
        raise ValueError(f"no row has the metric {metric!r} to plot")
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (title, group) in zip(axes[0], groups.items()):
        for name in dict.fromkeys(r["sampler"] for r in group):
            pts = sorted((r["nfe"], r[metric]) for r in group if r["sampler"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        nfes = sorted({r["nfe"] for r in group})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if metric != "accuracy" and all(r[metric] > 0 for r in group):
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.tight_layout()
    target = Path(path)
    atomic_write(target, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return target
