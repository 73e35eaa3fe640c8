"""Quantized drop-in replacements of ``nn.Linear`` / ``nn.Conv2d`` (W8A8, static activation scales).

The activation quantizer sits on the layer *input* (Q-Diffusion's placement, the one a real int8 GEMM
needs); nonlinearities (SiLU, softmax) and norms are outside these layers and stay in float.

Execution modes of one layer (same stored parameters, same numerics up to float rounding):

* ``fake``    -- the reference: quantize-dequantize input and weight in float32, then the float op;
* ``int8``    -- real integer GEMM (``torch._int_mm``; convs through im2col), int8 format only;
* ``fp8``     -- real e4m3 GEMM (``torch._scaled_mm``: CUDA SM >= 8.9, or CPU where the build has it), fp8
  format only; convs through im2col, or (``set_conv_kernel("triton")``) the Triton implicit-GEMM kernel
  of ``triton_conv``, which never materialises the patch matrix;
* ``dequant`` -- 8-bit weight *storage*, dequantized to the input dtype (bf16 on GPU) for a float op;
  the input is still fake-quantized so the numerics are the reference's.

Split quantization (Q-Diffusion sec. 4.3, "shortcut splitting"): for a layer whose input is the
concatenation ``[h, skip]`` (diffusers up-block resnets' ``conv_shortcut``), the first ``split`` input
channels and the rest get their own activation quantizer and their own per-output-channel weight
scales; the two partial products are summed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import FP8_UNAVAILABLE, fp8_mm, fp8_supported, im2col, im2col_int8, int8_mm, scaled_mm_fuses_bias
from .quantizers import (
    ActQParams,
    act_qparams_problem,
    fake_quant_act,
    quantize_act,
    quantize_weight,
    weight_scale_problem,
)

__all__ = ["QuantLayer", "MODES", "AUTO_MODE", "SETTABLE_MODES", "CONV_KERNELS", "quant_layers", "set_mode",
           "set_conv_kernel"]

MODES = ("fake", "int8", "fp8", "dequant")
#: resolves per layer to its own 8-bit format when the layer and device can run it, else ``"fake"``; fp8 only on
#: CUDA (the CPU float8 ``_scaled_mm`` is exact but ~4x slower than fake-quant: a numerics check, not a fast path)
AUTO_MODE = "auto"
#: what ``set_mode`` accepts: an execution mode or ``"auto"``
SETTABLE_MODES = (*MODES, AUTO_MODE)
#: how a conv runs in ``fp8`` mode: im2col + ``torch._scaled_mm``, or the Triton implicit-GEMM kernel
CONV_KERNELS = ("im2col", "triton")


class _NoGradient(torch.autograd.Function):
    """The real 8-bit path of ``layer`` on ``x`` when autograd records: the forward runs (inference with grad
    mode on, e.g. a denoiser whose ``conv_in`` still has trainable weights, works), and a backward through it
    is refused -- the int8/fp8 kernels have no gradient, and one from the float layers alone would be silently
    wrong (DPS, PSLD or STSL through the denoiser)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLayer) -> torch.Tensor:
        ctx.layer_name, ctx.mode = layer.name or "(unnamed)", layer.mode
        return layer._forward_real(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> None:
        raise RuntimeError(
            f"QuantLayer {ctx.layer_name!r} ran in {ctx.mode!r} mode, whose {ctx.mode} kernels have no gradient, "
            "and a backward pass reached it (gradient-based guidance such as DPS, PSLD or STSL backpropagating "
            "through the denoiser): the gradient would come from the float layers only, silently wrong. Use "
            "quant.set_mode(model, 'fake') or 'dequant' (straight-through gradients) for gradient-based guidance")


class QuantLayer(nn.Module):
    """W8A8 version of a ``Linear`` or ``Conv2d`` (see the module docstring).

    ``weight_scales``: per-output-channel scales, one tensor per input-channel group (two when
    ``split > 0``); ``act``: one ``ActQParams`` per group; ``name``: the layer's name in its model (what errors
    call it; ``quantize`` and ``load_quantized`` set it).
    """

    def __init__(self, layer: nn.Module, weight_scales: list[torch.Tensor], act: list[ActQParams],
                 fmt: str = "int8", split: int = 0, mode: str = "fake", name: str = ""):
        super().__init__()
        if not isinstance(name, str):
            raise ValueError(f"`name` must be a string (the layer's name in its model), got {name!r}")
        self.name = name
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"`layer` must be nn.Linear or nn.Conv2d, got {type(layer).__name__}")
        in_ch = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        groups = 2 if split else 1
        if split and not 0 < split < in_ch:
            raise ValueError(f"`split` must be in 1..{in_ch - 1} (input channels) or 0, got {split}")
        if len(weight_scales) != groups or len(act) != groups:
            raise ValueError(f"expected {groups} weight-scale tensors and activation quantizers, got "
                             f"{len(weight_scales)} and {len(act)}")
        self.kind = "linear" if isinstance(layer, nn.Linear) else "conv2d"
        self.fmt, self.split, self.in_channels = fmt, int(split), in_ch
        self.out_channels = layer.weight.shape[0]
        self.act = list(act)
        if self.kind == "conv2d":
            self.conv = {"kernel_size": tuple(layer.kernel_size), "stride": tuple(layer.stride),
                         "padding": layer.padding, "dilation": tuple(layer.dilation), "groups": layer.groups,
                         "padding_mode": layer.padding_mode,
                         "explicit_padding": tuple(layer._reversed_padding_repeated_twice)}
        w = layer.weight.detach().float()
        parts = [w] if not split else [w[:, :split], w[:, split:]]
        for g, (part, scale) in enumerate(zip(parts, weight_scales)):
            scale = scale.detach().float().reshape(-1).to(w.device)
            self.register_buffer(f"weight_q{g}", quantize_weight(part, scale, fmt))
            self.register_buffer(f"weight_scale{g}", scale)
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        self._derived: dict[tuple[str, int], torch.Tensor] = {}
        self._fuse_bias = False
        self.conv_kernel = "im2col"
        self.mode = "fake"
        self.set_mode(mode)

    # the attributes of the layer it replaces that code outside reads (diffusers' SDXL pipeline reads
    # ``unet.add_embedding.linear_1.in_features``); a conv's ``in_channels`` / ``out_channels`` are plain attributes;
    # an attribute of the other layer kind raises AttributeError, which nn.Module reports as a missing attribute
    def _linear_attr(self, name: str, value: int) -> int:
        if self.kind != "linear":
            raise AttributeError(name)
        return value

    def _conv_attr(self, name: str) -> Any:
        if self.kind != "conv2d":
            raise AttributeError(name)
        return self.conv[name]

    @property
    def in_features(self) -> int:
        return self._linear_attr("in_features", self.in_channels)

    @property
    def out_features(self) -> int:
        return self._linear_attr("out_features", self.out_channels)

    @property
    def kernel_size(self) -> tuple:
        return self._conv_attr("kernel_size")

    @property
    def stride(self) -> tuple:
        return self._conv_attr("stride")

    @property
    def padding(self) -> Any:
        return self._conv_attr("padding")

    @property
    def dilation(self) -> tuple:
        return self._conv_attr("dilation")

    def _apply(self, fn, recurse: bool = True):
        """Device moves reach the stored tensors, dtype casts do not: ``pipe.to("cuda", torch.float16)`` must not
        turn the e4m3 weights into fp16 codes or round the float32 scales and bias (they define the numerics,
        and the real kernels need their dtypes). The rest of the model is cast as usual."""
        stored = {name: buf for name, buf in self._buffers.items() if buf is not None}
        for name in stored:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in stored.items():
                self._buffers[name] = buf.to(fn(torch.empty(0, device=buf.device)).device)
        self._prepare_execution()  # on the new device
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """``load_state_dict`` writes the stored weights in place: check the scales first (all of this layer's,
        before anything is written; ``act_qparams_problem`` / ``weight_scale_problem``, the checks
        ``load_quantized`` applies to files), then rebuild what is derived from the weights."""
        where = prefix[:-1] or self.name or "(unnamed)"
        for g in range(self.groups):
            key = f"{prefix}weight_scale{g}"
            if key in state_dict:
                problem = weight_scale_problem(state_dict[key], self.out_channels)
                if problem:
                    raise ValueError(f"state_dict {key!r} of QuantLayer {where!r} {problem}")
        if f"{prefix}_extra_state" in state_dict:
            self._acts_from_state(state_dict[f"{prefix}_extra_state"], where)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._prepare_execution()

    def get_extra_state(self) -> torch.Tensor:
        """The static activation quantizers in ``state_dict`` (one ``[scale, zero_point]`` row per input part), so
        that ``load_state_dict`` carries them with the weights."""
        return torch.tensor([[a.scale, float(a.zero_point)] for a in self.act], dtype=torch.float64)

    def _acts_from_state(self, state: Any, where: str) -> list[ActQParams]:
        """The activation quantizers a ``get_extra_state`` tensor holds, checked (``ValueError`` naming the layer)."""
        try:
            rows = torch.as_tensor(state, dtype=torch.float64).reshape(-1, 2).tolist()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"QuantLayer {where!r}: the activation-quantizer state must be [scale, zero_point] "
                             f"rows, got {state!r} ({exc})") from None
        if len(rows) != len(self.act):
            raise ValueError(f"QuantLayer {where!r}: the state holds {len(rows)} activation quantizers, this layer "
                             f"has {len(self.act)}")
        acts = []
        for a, (scale, zero) in zip(self.act, rows):
            zero = int(zero) if float(zero).is_integer() else zero  # (stored as float64; 3.5 is refused)
            problem = act_qparams_problem(scale, zero, self.fmt)
            if problem:
                raise ValueError(f"QuantLayer {where!r}: {problem}")
            acts.append(dataclasses.replace(a, scale=scale, zero_point=zero))
        return acts

    def set_extra_state(self, state: Any) -> None:
        self.act = self._acts_from_state(state, self.name or "(unnamed)")
        self._prepare_execution()  # the zero-point term depends on the zero-points

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def groups(self) -> int:
        return 2 if self.split else 1

    def weight_q(self, g: int) -> torch.Tensor:
        return getattr(self, f"weight_q{g}")

    def weight_scale(self, g: int) -> torch.Tensor:
        return getattr(self, f"weight_scale{g}")

    def dequant_weight(self, g: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = self.weight_scale(g).reshape(-1, *([1] * (self.weight_q(g).dim() - 1)))
        return (self.weight_q(g).float() * s).to(dtype)

    def _input_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.split:
            return [x]
        dim = -1 if self.kind == "linear" else 1
        return [x.narrow(dim, 0, self.split), x.narrow(dim, self.split, self.in_channels - self.split)]

    def _gemm_shaped(self) -> bool:
        """A Linear, or a conv that is one GEMM over its patches: groups 1, numeric zero padding."""
        return self.kind == "linear" or (self.conv["groups"] == 1 and self.conv["padding_mode"] == "zeros"
                                         and not isinstance(self.conv["padding"], str))

    def supported_modes(self) -> list[str]:
        """Modes this layer can run in on the current device of its buffers."""
        modes = ["fake", "dequant"]
        real_ok = self._gemm_shaped()
        if real_ok and self.fmt == "int8":
            modes.append("int8")
        if real_ok and self.fmt == "fp8" and fp8_supported(self.weight_q0.device):
            modes.append("fp8")
        return modes

    def set_mode(self, mode: str) -> QuantLayer:
        """Execution mode: one of ``MODES``, or ``"auto"`` -- this layer's own format (``"int8"``/``"fp8"``) where
        ``supported_modes`` has it on the current device (fp8: on CUDA only), else ``"fake"``."""
        if mode == AUTO_MODE:
            fast = self.fmt != "fp8" or self.weight_q0.device.type == "cuda"
            mode = self.fmt if fast and self.fmt in self.supported_modes() else "fake"
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {list(SETTABLE_MODES)}, got {mode!r}")
        if mode == "int8" and self.fmt != "int8":
            raise ValueError(f"`mode` 'int8' needs int8-format parameters; this layer holds {self.fmt!r} "
                             "(use 'fp8', 'fake' or 'dequant')")
        if mode == "fp8" and self.fmt != "fp8":
            raise ValueError(f"`mode` 'fp8' needs fp8-format parameters; this layer holds {self.fmt!r} "
                             "(use 'int8', 'fake' or 'dequant')")
        if mode == "fp8" and not fp8_supported(self.weight_q0.device):
            raise RuntimeError(FP8_UNAVAILABLE)
        if mode in ("int8", "fp8") and mode not in self.supported_modes():
            raise ValueError(f"`mode` {mode!r} is not available for this {self.kind} ({self.conv}); "
                             "use 'fake' or 'dequant'")
        self.mode = mode
        self._prepare_execution()
        return self

    def set_conv_kernel(self, kernel: str) -> QuantLayer:
        """How this conv runs in ``fp8`` mode: ``"im2col"`` (im2col + ``torch._scaled_mm``, the default) or
        ``"triton"`` (``triton_conv.triton_fp8_conv2d``: fp8 format, groups 1, zero padding, and Triton on a
        CUDA device or under ``TRITON_INTERPRET=1``)."""
        if kernel not in CONV_KERNELS:
            raise ValueError(f"`kernel` must be one of {list(CONV_KERNELS)}, got {kernel!r}")
        if kernel == "triton":
            from .triton_conv import TRITON_UNAVAILABLE, triton_available

            if self.kind != "conv2d" or self.fmt != "fp8":
                raise ValueError(f"`kernel` 'triton' is an fp8 conv kernel; this layer is an {self.fmt} {self.kind}")
            if not self._gemm_shaped():
                raise ValueError(f"`kernel` 'triton' needs groups 1 and numeric zero padding, got {self.conv}")
            if not triton_available(self.weight_q0.device):
                raise RuntimeError(TRITON_UNAVAILABLE)
        self.conv_kernel = kernel
        self._prepare_execution()
        return self

    def extra_repr(self) -> str:
        split = f", split={self.split}" if self.split else ""
        return (f"{self.kind}, in={self.in_channels}, out={self.out_channels}, format={self.fmt}, "
                f"mode={self.mode}{split}")

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d" and x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it: in every mode
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self.mode in ("fake", "dequant"):
            return self._forward_float(x)
        if torch.is_grad_enabled() and x.requires_grad:  # metadata only: no host sync
            return _NoGradient.apply(x, self)  # runs; only a backward through it is refused
        return self._forward_real(x)

    def _float_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, bias)
        c = self.conv
        if c["padding_mode"] != "zeros":  # as nn.Conv2d: pad with the mode first, then convolve unpadded
            x = F.pad(x, c["explicit_padding"], mode=c["padding_mode"])
            return F.conv2d(x, w, bias, c["stride"], 0, c["dilation"], c["groups"])
        return F.conv2d(x, w, bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def _forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize, then the float op: ``fake`` accumulates in float64 and rounds to float32, ``dequant``
        computes in the input's dtype.

        Why float64 for the reference: the products of 8-bit values and float32 scales are exact in float64, so the
        float32 result no longer depends on the order the backend sums them in -- which changes with the batch size
        (a float32 conv differs by ~5e-7 between batch 1 and 3), and the next layer's rounding turns such noise into
        a whole quantization step wherever a value sits on a rounding boundary: an image then changed with the other
        images of its batch (by up to 0.2 in [0, 1]). ``int8`` sums integers exactly and is batch invariant too;
        ``dequant``, a speed path in half precision, is not (as any float model, amplified by the rounding)."""
        if self.mode == "fake":  # (MPS has no float64: float32 there, batch dependent as dequant)
            dtype, work = torch.float32, (torch.float32 if x.device.type == "mps" else torch.float64)
        else:
            dtype = work = x.dtype
        out = None
        for g, part in enumerate(self._input_parts(x)):
            xq = fake_quant_act(part.to(dtype), self.act[g]).to(work)
            bias = self.bias.to(work) if (self.bias is not None and g == 0) else None
            y = self._float_op(xq, self.dequant_weight(g, dtype).to(work), bias)
            out = y if out is None else out + y
        return out.to(dtype).to(x.dtype)

    def _rows(self, part: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """GEMM rows of one input part, and how to fold the (M, N) result back."""
        if self.kind == "linear":
            return part.reshape(-1, part.shape[-1]), ("linear", part.shape[:-1])
        if self.conv["padding_mode"] != "zeros":
            raise ValueError("real 8-bit convs need padding_mode='zeros'")
        rows, (ho, wo) = im2col(part, self.conv)
        return rows, ("conv", part.shape[0], ho, wo)

    def _fold(self, y: torch.Tensor, how: tuple) -> torch.Tensor:
        if how[0] == "linear":
            return y.reshape(*how[1], y.shape[-1])
        _, b, ho, wo = how
        return y.reshape(b, ho, wo, -1).permute(0, 3, 1, 2)

    def _derived_keys(self) -> tuple[str, ...]:
        """The derived weight tensors the current mode and conv kernel read (``_make_derived``)."""
        keys = []
        if self.mode == "int8":
            if self.kind == "conv2d" and tuple(self.conv["dilation"]) == (1, 1):
                keys.append("nk")
            if any(qp.zero_point for qp in self.act):
                keys.append("zero_term")
        elif self.mode == "fp8" and self.kind == "conv2d" and self.conv_kernel == "triton":
            keys.append("nk")
        return tuple(keys)

    def _make_derived(self, key: str, g: int) -> torch.Tensor:
        """``"nk"``: the weight as an ``(N, kh * kw * C)`` matrix in ``(kh, kw, C)`` order, contiguous (what the int8
        im2col rows and the Triton conv read); ``"zero_term"``: ``z * sum_k W_q[n, k]`` in int32."""
        w = self.weight_q(g)
        if key == "nk":
            return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
        return self.act[g].zero_point * w.reshape(w.shape[0], -1).to(torch.int32).sum(1)

    def _prepare_execution(self) -> None:
        """Build what the current mode reads, now, on the weights' device, so that ``forward`` only reads it: the
        derived weight tensors (a forward that filled a cache would mutate module state, which ``torch.compile``
        guards on -- every compiled model would be compiled a second time on its second call), and whether the fp8
        GEMM adds the bias in its epilogue (``kernels.scaled_mm_fuses_bias``; not for split layers, whose halves
        are summed in float32 first)."""
        self._derived = {(key, g): self._make_derived(key, g) for key in self._derived_keys()
                         for g in range(self.groups)}  # fmt: skip
        self._fuse_bias = (self.mode == "fp8" and self.bias is not None and not self.split
                           and scaled_mm_fuses_bias(self.weight_q0.device))  # fmt: skip

    def _derived_tensor(self, key: str, g: int) -> torch.Tensor:
        cached = self._derived.get((key, g))
        if cached is not None and cached.device == self.weight_q(g).device:
            return cached
        return self._make_derived(key, g)  # not stored: forward changes no state (see _prepare_execution)

    def _int8_gemm(self, part: torch.Tensor, g: int) -> tuple[torch.Tensor, tuple]:
        """Exact int32 ``sum_k (x_q - z) W_q`` of one input part, and how to fold it back."""
        qp = self.act[g]
        if self.kind == "conv2d" and tuple(self.conv["dilation"]) == (1, 1):
            rows, (ho, wo) = im2col_int8(quantize_act(part, qp), self.conv, qp.zero_point)
            w = self._derived_tensor("nk", g)
            how = ("conv", part.shape[0], ho, wo)
        else:
            rows, how = self._rows(part)
            rows = quantize_act(rows, qp)
            w = self.weight_q(g).reshape(self.out_channels, -1)
        acc = int8_mm(rows, w)
        if qp.zero_point:
            zero_term = self._derived_tensor("zero_term", g)
            acc.sub_(zero_term)  # exact, in int32, in place
        return acc, how

    def _nan_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 1)`` bool: the GEMM rows whose input (a Linear's row, a conv's patch) holds a NaN -- the outputs
        the fake-quant reference makes NaN (rounding and clamping keep NaN, and the float op spreads it over the
        row). int8 has no NaN code, so ``_forward_real`` puts it back there. On the device: no host sync."""
        if self.kind == "linear":
            return torch.isnan(x).any(-1).reshape(-1, 1)
        c = self.conv
        hit = torch.isnan(x).any(1, keepdim=True).to(torch.float32)  # (B, 1, H, W)
        window = torch.ones((1, 1, *c["kernel_size"]), device=x.device)
        hit = F.conv2d(hit, window, None, c["stride"], c["padding"], c["dilation"])  # NaN count per patch
        return (hit > 0).permute(0, 2, 3, 1).reshape(-1, 1)

    def _forward_real(self, x: torch.Tensor) -> torch.Tensor:
        out, how = None, None
        bias = self.bias
        for g, part in enumerate(self._input_parts(x)):
            if self.mode == "int8":
                acc, how = self._int8_gemm(part, g)
                scale = self.act[g].scale * self.weight_scale(g)
                y = acc.to(torch.float32).mul_(scale)
                if bias is not None:
                    y.add_(bias)
            elif self.kind == "conv2d" and self.conv_kernel == "triton":
                y, how = self._triton_conv(part, g, bias)
            else:
                rows, how = self._rows(part)
                w = self.weight_q(g).reshape(self.out_channels, -1)
                if self._fuse_bias:  # the bias in the GEMM's epilogue: no pass over the output after it
                    y = fp8_mm(rows, self.act[g].scale, w, self.weight_scale(g), bias=bias)
                else:
                    y = fp8_mm(rows, self.act[g].scale, w, self.weight_scale(g)).float()
                    y = y + bias if bias is not None else y
            bias = None  # added once
            out = y if out is None else out + y
        if self.mode == "int8":  # (fp8 has a NaN code: e4m3 keeps it and the GEMM spreads it as the float op does)
            out.masked_fill_(self._nan_rows(x), float("nan"))  # `out` is this call's own float32 result
        return self._fold(out, how).to(x.dtype)

    def _triton_conv(self, part: torch.Tensor, g: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        """fp8 implicit-GEMM conv of one input part as (M, N) rows (a view of its channels-last output)."""
        from .triton_conv import triton_fp8_conv2d

        # (N, K) with K contiguous, passed as its (K, N) transpose: the layout Hopper's fp8 MMA reads directly
        w_kn = self._derived_tensor("nk", g).t()
        c = self.conv
        # the epilogue (scales, bias) runs in float32 and rounds once: straight to the input's dtype, unless the two
        # halves of a split layer are still to be summed (then in float32)
        out_dtype = torch.float32 if self.split else part.dtype
        y = triton_fp8_conv2d(part, self.act[g].scale, w_kn, self.weight_scale(g), bias, c["kernel_size"],
                              c["stride"], tuple(c["padding"]), c["dilation"], out_dtype=out_dtype)
        b, n, ho, wo = y.shape
        return y.permute(0, 2, 3, 1).reshape(-1, n), ("conv", b, ho, wo)

    # ------------------------------------------------------------------------------------- reference
    def reference_weight(self) -> torch.Tensor:
        """The full dequantized weight in float32 (both groups concatenated along input channels)."""
        parts = [self.dequant_weight(g) for g in range(self.groups)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Name -> ``QuantLayer`` of a quantized model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def set_conv_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Set the fp8 conv kernel (``CONV_KERNELS``) of every fp8-format conv of a quantized model that can take it;
    errors name the first layer that cannot when none can."""
    if kernel not in CONV_KERNELS:
        raise ValueError(f"`kernel` must be one of {list(CONV_KERNELS)}, got {kernel!r}")
    convs = {name: m for name, m in quant_layers(model).items() if m.kind == "conv2d" and m.fmt == "fp8"}
    if not convs:
        raise ValueError("`model` holds no fp8-format quantized convs (quantize with QuantConfig(format='fp8'))")
    errors = {}
    for name, layer in convs.items():
        try:
            layer.set_conv_kernel(kernel)
        except ValueError as exc:  # e.g. a grouped conv: it keeps its kernel
            errors[name] = exc
    if len(errors) == len(convs):
        name, exc = next(iter(errors.items()))
        raise ValueError(f"no fp8 conv of `model` can use kernel {kernel!r}; {name}: {exc}")
    return model


def set_mode(model: nn.Module, mode: str | dict[str, str]) -> nn.Module:
    """Switch every quantized layer (``mode`` a string) or the named ones (a dict name -> mode); ``"auto"``
    picks each layer's real 8-bit path where it can run, else the fake-quant reference (``QuantLayer.set_mode``)."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("`model` holds no quantized layers (run fewstep.quant.quantize first)")
    if not isinstance(mode, (str, dict)):
        raise ValueError(f"`mode` must be one of {list(SETTABLE_MODES)} or a dict layer name -> mode, got {mode!r}")
    plan = {name: mode for name in layers} if isinstance(mode, str) else dict(mode)
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise ValueError(f"`mode` names layers that are not quantized: {unknown[:5]}")
    previous = {name: layers[name].mode for name in plan}
    for name, m in plan.items():
        try:
            layers[name].set_mode(m)
        except (ValueError, RuntimeError) as exc:  # RuntimeError: fp8 unavailable on this device
            for done, old in previous.items():  # all or nothing: no model left half switched
                layers[done].set_mode(old)
            raise type(exc)(f"layer {name!r}: {exc}") from None
    return model

