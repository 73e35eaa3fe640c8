"""Real 8-bit GEMMs: int8 x int8 -> int32 via ``torch._int_mm`` (CPU and CUDA) and fp8 e4m3 via
``torch._scaled_mm`` (CUDA with compute capability >= 8.9, and CPU where the PyTorch build has the
float8 kernel -- probed once, see ``fp8_supported``).

Static-scale W8A8 linear (per-tensor activation ``(s_x, z)``, per-channel weight ``s_w[n]``)::

    y[m, n] = s_x * s_w[n] * (sum_k x_q[m, k] W_q[n, k]  -  z * sum_k W_q[n, k]) + b[n]

The integer product is exact; the zero-point term is a per-channel row sum computed once. The weight
is stored N x K (contiguous) and passed transposed, i.e. column-major, which is the layout cuBLASLt
accepts for every M > 16 (a row-major K x N weight is rejected for many M and is several times
slower). On CUDA, shapes outside ``_int_mm``'s limits (M > 16, K and N multiples of 8) are zero-padded,
which leaves the integer result unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["int8_mm", "fp8_mm", "fp8_supported", "scaled_mm_fuses_bias", "FP8_UNAVAILABLE", "conv_output_size",
           "im2col", "im2col_int8"]

FP8_UNAVAILABLE = (
    "the fp8 path (torch._scaled_mm) needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper), or a "
    "PyTorch build with a CPU float8 _scaled_mm; use mode='fake' (the fake-quant reference, any device) or "
    "mode='dequant' (8-bit storage, float compute)"
)


def _pad_to(t: torch.Tensor, dim: int, multiple: int, minimum: int = 0) -> torch.Tensor:
    size = t.shape[dim]
    target = max(-(-size // multiple) * multiple, minimum)
    if target == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, target - size]
    return F.pad(t, pad)


def int8_mm(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``x_q (M, K) int8 @ w_q (N, K) int8 ^T -> (M, N) int32``, exact; ``w_q`` is passed as ``w_q.t()``."""
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise TypeError(f"int8_mm needs int8 operands, got {x_q.dtype} and {w_q.dtype}")
    if x_q.device.type != "cuda":
        return torch._int_mm(x_q, w_q.t())
    m, n = x_q.shape[0], w_q.shape[0]
    a = _pad_to(_pad_to(x_q, 1, 8), 0, 8, minimum=32)
    b = _pad_to(_pad_to(w_q, 1, 8), 0, 8)
    return torch._int_mm(a.contiguous(), b.contiguous().t())[:m, :n]


@functools.lru_cache(maxsize=1)
def _cpu_scaled_mm_works() -> bool:
    """Whether this PyTorch build's CPU ``_scaled_mm`` multiplies e4m3 operands with row-wise scales correctly
    (a 16 x 16 probe against the float product; run once per process)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(16, 16, generator=gen).to(torch.float8_e4m3fn)
    sa, sb = torch.full((16, 1), 0.5), torch.full((1, 16), 2.0)
    try:
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(torch.allclose(out, a.float() @ b.float().t(), atol=1e-4))


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True when ``torch._scaled_mm`` with e4m3 operands can run on ``device``: CUDA with SM >= 8.9, or the
    CPU when this PyTorch build has the kernel (``device=None`` asks about the default CUDA device)."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type == "cpu":
        return _cpu_scaled_mm_works()
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


@functools.cache
def _scaled_mm_bias_probe(device: str) -> bool:
    """Whether ``torch._scaled_mm`` on ``device`` adds a bf16 bias in its epilogue with row-wise scales and bf16
    output, correctly (a 32 x 32 probe against the unfused result; once per device and process)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, generator=gen).to(device).to(torch.float8_e4m3fn)
    b = torch.randn(32, 32, generator=gen).to(device).to(torch.float8_e4m3fn)
    bias = torch.randn(32, generator=gen).to(device, torch.bfloat16)
    sa, sb = torch.full((32, 1), 0.5, device=device), torch.full((1, 32), 2.0, device=device)
    try:
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    ref = a.float() @ b.float().t() + bias.float()
    return bool(torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())))


def scaled_mm_fuses_bias(device: torch.device | str) -> bool:
    """True where ``fp8_mm(..., bias=...)`` adds the bias inside the fp8 GEMM's epilogue (CUDA with a row-wise
    ``_scaled_mm`` that takes a bf16 bias; probed once). Elsewhere the bias is added afterwards, in float32."""
    dev = torch.device(device)
    if dev.type != "cuda" or not fp8_supported(dev):
        return False
    return _scaled_mm_bias_probe(str(dev))


def fp8_mm(x: torch.Tensor, x_scale: float, w_fp8: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(s_x * e4m3(x / s_x)) @ (s_w * W_fp8)^T (+ bias)`` with ``torch._scaled_mm`` (row-wise scales).

    ``x`` (M, K) float, ``w_fp8`` (N, K) float8_e4m3fn, ``w_scale`` (N,) float32, ``bias`` (N,) or None. K and N
    are zero-padded to multiples of 16 (cuBLASLt's layout rule). The product of e4m3 values is exact in float32;
    CUDA's row-wise kernel writes bf16 (the one rounding against the fake-quant reference) and, where
    ``scaled_mm_fuses_bias``, adds the bias (as bf16) in its epilogue before that rounding; the CPU kernel writes
    float32 and the bias is added to it.
    """
    if not torch.compiler.is_compiling() and not fp8_supported(x.device):  # the probe is not traceable
        raise RuntimeError(FP8_UNAVAILABLE)
    m, n = x.shape[0], w_fp8.shape[0]
    a = (x.float() / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    a = _pad_to(_pad_to(a.view(torch.uint8), 1, 16), 0, 16).view(torch.float8_e4m3fn)
    b = _pad_to(_pad_to(w_fp8.view(torch.uint8), 1, 16), 0, 16).view(torch.float8_e4m3fn)
    scale_a = torch.full((a.shape[0], 1), float(x_scale), device=x.device, dtype=torch.float32)
    scale_b = _pad_to(w_scale.float().reshape(1, -1), 1, 16).to(x.device)
    out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
    # eagerly the probe decides; a compiled caller (QuantLayer) passes a bias here only where the probe passed
    fused = bias is not None and out_dtype == torch.bfloat16 and (
        torch.compiler.is_compiling() or scaled_mm_fuses_bias(x.device))
    out = torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                           bias=_pad_to(bias.to(torch.bfloat16), 0, 16) if fused else None, out_dtype=out_dtype)
    out = out[:m, :n]
    return out + bias.to(out.dtype) if bias is not None and not fused else out


def conv_output_size(h: int, w: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """``(H_out, W_out)`` of a conv with numeric padding: ``(H + 2p - d (k - 1) - 1) // s + 1`` per axis."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def im2col(x: torch.Tensor, conv: dict) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patches of an NCHW input as GEMM rows ``(B * H_out * W_out, C * kh * kw)`` (channel-major, the
    order of ``weight.reshape(N, -1)``), and the output spatial size. 1x1 stride-1 convs skip unfold."""
    kh, kw = conv["kernel_size"]
    b, c, h, w = x.shape
    if (kh, kw) == (1, 1) and conv["stride"] == (1, 1) and conv["padding"] == (0, 0):
        return x.permute(0, 2, 3, 1).reshape(-1, c), (h, w)
    cols = F.unfold(x, (kh, kw), dilation=conv["dilation"], padding=conv["padding"], stride=conv["stride"])
    size = conv_output_size(h, w, (kh, kw), conv["stride"], conv["padding"], conv["dilation"])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), size


def im2col_int8(x_q: torch.Tensor, conv: dict, pad_value: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch rows of an already quantized int8 NCHW input, in ``(kh, kw, C)`` order -- pair them with
    ``weight.permute(0, 2, 3, 1).reshape(N, -1)``. Padded with ``pad_value`` (the zero-point, the code of
    0.0) and built from ``kh * kw`` shifted channels-last slices, so the input is quantized once per
    element (not once per patch element) and the patch matrix is int8. Dilation 1 only."""
    if tuple(conv["dilation"]) != (1, 1):
        raise ValueError(f"im2col_int8 supports dilation (1, 1), got {conv['dilation']}")
    kh, kw = conv["kernel_size"]
    sh, sw = conv["stride"]
    ph, pw = conv["padding"]
    b, c, h, w = x_q.shape
    if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (ph, pw) == (0, 0):
        return x_q.permute(0, 2, 3, 1).reshape(-1, c), (h, w)
    padded = F.pad(x_q, (pw, pw, ph, ph), value=pad_value) if (ph or pw) else x_q
    padded = padded.permute(0, 2, 3, 1).contiguous()  # (B, Hp, Wp, C)
    ho, wo = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    rows_end, cols_end = sh * (ho - 1) + 1, sw * (wo - 1) + 1
    slices = [padded[:, i:i + rows_end:sh, j:j + cols_end:sw, :] for i in range(kh) for j in range(kw)]
    return torch.cat(slices, dim=-1).reshape(b * ho * wo, kh * kw * c), (ho, wo)
