"""Pipelines: ``FewstepPipeline`` (the one loop for SD/SDXL/SD3/Flux and the digits models), the
class-conditional and mean-reverting pipelines of the embedded default models, and their loader.

Importing this package makes fewstep's pipeline classes resolvable by name in the ``diffusers`` namespace,
which is where ``DiffusionPipeline.from_pretrained(path)`` looks up a ``model_index.json``'s
``_class_name``; so after ``import fewstep.pipelines`` the generic diffusers loader works on the embedded
models' directories too (no ``custom_pipeline``/``trust_remote_code`` needed).
"""

from .class_conditional import ClassConditionalPipeline
from .defaults import DEFAULT_MODELS, default_model_path, load_default
from .fewstep_pipeline import FewstepPipeline
from .mean_reverting import MeanRevertingPipeline, box_inpainting


def _register_with_diffusers() -> None:
    import diffusers

    for cls in (ClassConditionalPipeline, MeanRevertingPipeline):
        if getattr(diffusers, cls.__name__, cls) is not cls:
            raise RuntimeError(f"diffusers already defines a different {cls.__name__}; refusing to shadow it")
        setattr(diffusers, cls.__name__, cls)


_register_with_diffusers()

__all__ = [
    "ClassConditionalPipeline",
    "DEFAULT_MODELS",
    "FewstepPipeline",
    "MeanRevertingPipeline",
    "box_inpainting",
    "default_model_path",
    "load_default",
]
