"""fp8 (e4m3) implicit-GEMM convolution in Triton: the 8-bit conv PyTorch lacks.

A conv is the GEMM ``Y (M, N) = A (M, K) @ B (K, N)`` with ``M = batch * H_out * W_out`` output pixels,
``N`` output channels and ``K = kh * kw * C`` patch elements. ``fp8_mm`` after ``im2col`` materialises
``A`` -- ``kh * kw`` times the input, in memory -- before the 8-bit GEMM. The implicit GEMM never builds
it: each program computes one ``BLOCK_M x BLOCK_N`` tile of ``Y`` and, for every ``BLOCK_K`` slice of
``K``, gathers its ``A`` tile straight from the channels-last e4m3 input (row ``m`` -> pixel
``(b, oh, ow)``, column ``k`` -> tap ``(r, s)`` and channel ``c``; taps that fall in the zero padding load
the e4m3 code of 0.0), multiplies in fp8 with float32 accumulation (``tl.dot``; Hopper's fp8 tensor cores),
and applies the static scales ``s_x * s_w[n]`` and the bias once in the epilogue:

    y[m, n] = s_x * s_w[n] * sum_k e4m3(x / s_x)[m, k] * W_fp8[k, n] + b[n]

which is exactly the fake-quant reference's sum (the products of e4m3 values are exact in float32).

On Hopper both operands should be K-contiguous: fp8 tensor-core MMA reads them K-major, so the weight is best
given as the transpose of an ``(N, K)``-contiguous matrix (then both tiles are copied global -> shared
asynchronously and software-pipelined; an N-contiguous weight is loaded through registers every K step). When
the channels are a multiple of ``BLOCK_K`` each K slice lies in one tap (``C_ALIGNED``). On the GPU the tile shape
is autotuned per ``(M, N, K)``.

Status: the kernel is checked against the fake-quant reference in Triton's interpreter
(``TRITON_INTERPRET=1``, CPU) and compiled for sm_90 in the tests; its GPU speed is measured by
``scripts/bench_quant_cuda.py``. It is opt-in per layer (``QuantLayer.set_conv_kernel("triton")``) or chosen by
the per-layer policy where it is timed faster.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .kernels import conv_output_size

__all__ = ["triton_available", "triton_fp8_conv2d", "TRITON_UNAVAILABLE"]

TRITON_UNAVAILABLE = (
    "the Triton fp8 conv needs the `triton` package and a CUDA GPU with compute capability >= 8.9 (or "
    "TRITON_INTERPRET=1 for Triton's CPU interpreter); use conv kernel 'im2col' (im2col + torch._scaled_mm) or "
    "mode 'dequant'"
)

#: Triton's CPU interpreter, chosen as Triton itself chooses it: from the environment, before triton is imported
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton fp8 conv can run on ``device``: ``triton`` importable, and a CUDA device with fp8
    tensor cores (compute capability >= 8.9: Ada, Hopper), or the CPU when this process started with
    ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    if not _HAS_TRITON:
        return False
    dev = torch.device(device)
    if _INTERPRET:
        return dev.type == "cpu"
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


if _HAS_TRITON:
    import triton
    import triton.language as tl

    def _fp8_conv_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, x_scale,
                         M, N, K, C, H, W, HO, WO, KW, SH, SW, PH, PW, DH, DW, stride_wk, stride_wn,
                         HAS_BIAS: tl.constexpr, C_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One BLOCK_M x BLOCK_N tile of ``Y = A @ B`` with ``A`` gathered from the NHWC e4m3 input.

        ``C_ALIGNED`` (``C % BLOCK_K == 0``, every UNet conv but ``conv_in``): each ``BLOCK_K`` slice of ``K`` lies
        in one tap ``(r, s)``, so the tap is a scalar per slice and the slice is ``BLOCK_K`` consecutive channels
        of one input pixel per row: contiguous, vectorisable loads and one bounds mask per row. Otherwise every
        element's tap and channel are computed."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ow = rm % WO
        oh = (rm // WO) % HO
        bb = rm // (WO * HO)
        ih0 = oh * SH - PH
        iw0 = ow * SW - PW
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if C_ALIGNED:
                tap = k0 // C
                ih = ih0 + (tap // KW) * DH
                iw = iw0 + (tap % KW) * DW
                in_row = (rm < M) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                cc = tl.max_contiguous(tl.multiple_of(k0 - tap * C + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
                a = tl.load(x_ptr + (((bb * H + ih) * W + iw) * C)[:, None] + cc[None, :], mask=in_row[:, None],
                            other=0.0)
                b = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=rn[None, :] < N,
                            other=0.0)
            else:
                c = rk % C
                tap_s = (rk // C) % KW
                tap_r = rk // (C * KW)
                ih = ih0[:, None] + tap_r[None, :] * DH
                iw = iw0[:, None] + tap_s[None, :] * DW
                in_a = (rm[:, None] < M) & (rk[None, :] < K) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_ptr + ((bb[:, None] * H + ih) * W + iw) * C + c[None, :], mask=in_a, other=0.0)
                b = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                            mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            # promote to the float32 accumulator after every K tile: Hopper's fp8 MMA otherwise accumulates the
            # whole K loop at reduced precision (3.5e-3 relative error at K = 2880, measured on an H200)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        y = acc * (ws[None, :] * x_scale)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
        out = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=out)

    _KERNEL = triton.jit(_fp8_conv_kernel)
    #: on the GPU the tile shape is chosen by timing these per (M, N, K) on the first call (BLOCK_K stays 64: the
    #: channel alignment above is decided with it, and fp8 ``tl.dot`` needs BLOCK_K >= 32)
    _TUNED = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
                                          (128, 256, 8, 3))
        ],
        key=["M", "N", "K", "C_ALIGNED"],
    )(_KERNEL)

#: compile options of every launch: FP fusion (the epilogue's multiply-add as one FMA) stated explicitly, as the
#: kernel has been measured with it; Triton 3.9 warns when it is left to its default, which 3.10 turns off
_COMPILE_OPTIONS = {"enable_fp_fusion": True}
#: BLOCK_K of the kernel: on the GPU (``_TUNED``'s configs) and in the interpreter (small tiles: each program is
#: emulated on the CPU)
_GPU_BLOCK_K = 64
_INTERPRET_BLOCKS = (32, 32, 32)


def triton_fp8_conv2d(x: torch.Tensor, x_scale: float, w_kn: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, kernel_size: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int], dilation: tuple[int, int],
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W8A8 e4m3 ``conv2d`` of an NCHW input ``x`` with the static per-tensor scale ``x_scale``.

    ``w_kn``: the float8_e4m3fn weight as a ``(kh * kw * C, N)`` matrix, row ``k`` = tap ``(r, s)``,
    channel ``c`` with ``k = (r * kw + s) * C + c`` -- e.g. ``weight.permute(2, 3, 1, 0).reshape(-1, N)``, any
    strides. Fastest as the transpose of an ``(N, K)``-contiguous matrix (``weight.permute(0, 2, 3, 1)
    .reshape(N, -1).contiguous().t()``, what ``QuantLayer`` passes): Hopper's fp8 tensor-core MMA takes B with K
    contiguous, so that layout is copied straight into shared memory, pipelined, while an N-contiguous one goes
    through registers to be transposed;
    ``w_scale`` (N,) float32; ``bias`` (N,) or None. Returns NCHW (channels-last memory) in ``out_dtype``
    (default: ``x``'s dtype). Groups 1, zero padding.
    """
    b, c, h, w = x.shape
    kh, kw = kernel_size
    if not torch.compiler.is_compiling():  # checked eagerly; nothing here for the tracer
        if not triton_available(x.device):
            raise RuntimeError(TRITON_UNAVAILABLE)
        if w_kn.dtype != torch.float8_e4m3fn or w_kn.dim() != 2:
            raise TypeError(f"`w_kn` must be a 2-D float8_e4m3fn matrix, got {w_kn.dtype} with shape "
                            f"{tuple(w_kn.shape)}")
        if w_kn.shape[0] != kh * kw * c:
            raise ValueError(f"`w_kn` has {w_kn.shape[0]} rows; a {kh}x{kw} conv over {c} channels needs "
                             f"{kh * kw * c}")
    n = w_kn.shape[1]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = conv_output_size(h, w, kernel_size, stride, padding, dilation)
    x_q = (x.float().permute(0, 2, 3, 1) / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).contiguous()
    m = b * ho * wo
    y = torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype)
    bias_arg = bias.float().contiguous() if bias is not None else w_scale
    args = (x_q, w_kn, w_scale.float().contiguous(), bias_arg, y, float(x_scale),
            m, n, kh * kw * c, c, h, w, ho, wo, kw, sh, sw, ph, pw, dh, dw, w_kn.stride(0), w_kn.stride(1))
    if _INTERPRET:
        block_m, block_n, block_k = _INTERPRET_BLOCKS
        grid = (-(-m // block_m), -(-n // block_n))
        _KERNEL[grid](*args, HAS_BIAS=bias is not None, C_ALIGNED=c % block_k == 0, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_K=block_k, **_COMPILE_OPTIONS)  # fmt: skip
    else:
        def grid(meta):
            return (-(-m // meta["BLOCK_M"]), -(-n // meta["BLOCK_N"]))

        _TUNED[grid](*args, HAS_BIAS=bias is not None, C_ALIGNED=c % _GPU_BLOCK_K == 0, **_COMPILE_OPTIONS)
    return y.view(b, ho, wo, n).permute(0, 3, 1, 2)
