"""PTQ4DM-style 8-bit post-training quantization of diffusion UNets (Shang et al. 2023; Li et al. 2023).

* ``build_calibration_set(pipe, method="ndtc" | "uniform")`` -- the denoiser's real inputs along
  full-precision trajectories (PTQ4DM NDTC or Q-Diffusion's uniform steps), both CFG branches;
* ``quantize(unet, calibration, QuantConfig(...))`` -- per-channel weight / per-tensor static activation
  scales from an L_p (p = 2.4) range search; Linear/Conv2d swapped for ``QuantLayer``;
* ``set_mode(model, "fake" | "int8" | "fp8" | "dequant" | "auto" | {layer: mode})`` and ``choose_modes`` (the
  per-layer policy);
  ``set_conv_kernel(model, "triton")`` runs fp8 convs on the Triton implicit-GEMM kernel (``triton_conv``);
* ``save_quantized`` / ``load_quantized`` -- safetensors + JSON artifacts, checked against the model.

Depends only on torch and safetensors (calibration drives a pipeline object given to it).
"""

from .artifacts import load_quantized, model_fingerprint, read_metadata, save_quantized
from .calibration import (
    CALIBRATION_METHODS,
    CalibrationSet,
    build_calibration_set,
    calibration_from_records,
    ndtc_indices,
    record_denoiser_inputs,
    uniform_indices,
)
from .kernels import fp8_supported
from .modules import (
    AUTO_MODE,
    CONV_KERNELS,
    MODES,
    SETTABLE_MODES,
    QuantLayer,
    quant_layers,
    set_conv_kernel,
    set_mode,
)
from .policy import LayerTiming, choose_modes, compile_fresh, layer_macs, layer_signature, time_layer
from .quantize import (
    BOUNDARY_LAYERS,
    QuantConfig,
    find_skip_splits,
    quantizable_layers,
    quantize,
    refuse_peft_adapters,
)
from .quantizers import FORMATS, METRICS, ActQParams, Histogram, search_act_range, weight_qparams

__all__ = [
    "BOUNDARY_LAYERS",
    "CALIBRATION_METHODS", "CalibrationSet", "build_calibration_set", "ndtc_indices", "uniform_indices",
    "record_denoiser_inputs", "calibration_from_records", "QuantConfig", "quantize", "quantizable_layers",
    "refuse_peft_adapters",
    "find_skip_splits",
    "QuantLayer", "MODES", "AUTO_MODE", "SETTABLE_MODES", "CONV_KERNELS", "quant_layers", "set_mode",
    "set_conv_kernel", "LayerTiming",
    "choose_modes", "time_layer", "compile_fresh", "layer_signature", "layer_macs",
    "save_quantized", "load_quantized", "read_metadata", "model_fingerprint", "fp8_supported",
    "FORMATS", "METRICS", "ActQParams", "Histogram", "search_act_range", "weight_qparams",
]
