"""Run by tests/test_quant_triton.py in a subprocess with TRITON_INTERPRET=1 (Triton's CPU interpreter must be
chosen before triton is imported). Prints one JSON object of measured errors; the test asserts on it. The case
functions also serve the compiled-kernel test on a CUDA GPU (``device="cuda"``, in the test's own process)."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from fewstep import quant
from fewstep.quant.quantizers import act_qparams_from_range, fp8_fake_quant, weight_qparams
from fewstep.quant.triton_conv import triton_available, triton_fp8_conv2d


def kernel_case(b, c, h, w, n, k, stride, padding, dilation, bias, device="cpu", k_contiguous=False):
    """Relative max error of the kernel against an fp32 conv of the same e4m3 operands (the weight matrix passed
    N-contiguous, or K-contiguous as QuantLayer passes it)."""
    x = torch.randn(b, c, h, w).to(device)
    weight = torch.randn(n, c, k, k).to(device) * 0.2
    s_x = float(x.abs().max()) / 448
    s_w = weight.abs().amax(dim=(1, 2, 3)) / 448
    w8 = (weight / s_w.reshape(-1, 1, 1, 1)).to(torch.float8_e4m3fn)
    bvec = torch.randn(n).to(device) if bias else None
    ref = F.conv2d(fp8_fake_quant(x, s_x), w8.float() * s_w.reshape(-1, 1, 1, 1), bvec, stride, padding, dilation)
    w_kn = w8.permute(2, 3, 1, 0).reshape(-1, n)
    if k_contiguous:
        w_kn = w_kn.t().contiguous().t()
    y = triton_fp8_conv2d(x, s_x, w_kn, s_w, bvec, (k, k), (stride, stride), (padding, padding),
                          (dilation, dilation))
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return float((y - ref).abs().max() / ref.abs().max())


def layer_case(conv, x, split, device="cpu", dtype=torch.float32):
    """Relative max error of a QuantLayer on the Triton kernel against its fake-quant reference, and the
    error of the fake-quant reference against the float conv (so the check is not vacuous); ``dtype``: of the
    input and so of the output (bf16: the kernel's epilogue writes it directly)."""
    conv, x = conv.to(device), x.to(device, dtype)
    w = conv.weight.detach()
    parts = [w] if not split else [w[:, :split], w[:, split:]]
    q = quant.QuantLayer(conv, [weight_qparams(p, fmt="fp8") for p in parts],
                         [act_qparams_from_range(-3.0, 3.0, "fp8")] * len(parts), fmt="fp8", split=split).to(device)
    with torch.no_grad():
        fake = q(x)
        q.set_mode("fp8").set_conv_kernel("triton")
        real = q(x)
        fp = conv(x.float())
    assert real.dtype == fake.dtype == dtype
    real, fake = real.float(), fake.float()
    scale = float(fake.abs().max())
    return float((real - fake).abs().max()) / scale, float((fake - fp).abs().max()) / scale


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 4, 3, stride=2, padding=1)

    def forward(self, sample, timestep):
        return self.b(F.silu(self.a(sample)))


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    out = {"available_cpu": triton_available("cpu")}
    out["kernel"] = {
        "3x3 pad1 bias": kernel_case(2, 6, 9, 9, 10, 3, 1, 1, 1, True),
        "3x3 stride2": kernel_case(1, 5, 7, 8, 3, 3, 2, 1, 1, False),
        "1x1 wide": kernel_case(2, 40, 5, 5, 70, 1, 1, 0, 1, True),
        "3x3 dilation2": kernel_case(1, 4, 9, 9, 8, 3, 1, 2, 2, False),
        "K spans taps": kernel_case(1, 20, 6, 6, 33, 3, 1, 1, 1, True),
        # channels a multiple of BLOCK_K: the kernel's one-tap-per-K-slice path (every UNet conv but conv_in)
        "aligned 3x3 pad1": kernel_case(2, 64, 7, 6, 40, 3, 1, 1, 1, True),
        "aligned stride2 dilation": kernel_case(1, 32, 9, 9, 24, 3, 2, 2, 2, False),
        "aligned 1x1": kernel_case(1, 96, 4, 5, 16, 1, 1, 0, 1, True),
        "K-contiguous weight": kernel_case(2, 64, 6, 6, 24, 3, 1, 1, 1, True, k_contiguous=True),
        "K-contiguous weight, general": kernel_case(1, 20, 6, 6, 33, 3, 1, 1, 1, False, k_contiguous=True),
    }
    out["layer"] = {
        "3x3": layer_case(nn.Conv2d(6, 10, 3, padding=1), torch.randn(2, 6, 8, 8), 0),
        "split 1x1": layer_case(nn.Conv2d(12, 8, 1), torch.randn(2, 12, 5, 5), 5),
    }
    # bf16 in and out: the kernel's float32 epilogue rounds straight to bf16, as the reference's result is rounded
    out["layer_bf16"] = layer_case(nn.Conv2d(64, 96, 3, padding=1), torch.randn(2, 64, 6, 6), 0, dtype=torch.bfloat16)
    # model level: set_conv_kernel and the policy's "fp8+triton" candidate
    model = TwoConvs().eval()
    cal = quant.CalibrationSet(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    q = quant.quantize(model, cal, quant.QuantConfig(format="fp8", act_grid=10, weight_grid=5, exclude=[]))
    batch = next(cal.batches(6))
    with torch.no_grad():
        fake = q(**batch)
        quant.set_mode(q, "fp8")
        quant.set_conv_kernel(q, "triton")
        real = q(**batch)
    out["model"] = float((real - fake).norm() / fake.norm())
    out["kernels"] = sorted({layer.conv_kernel for layer in quant.quant_layers(q).values()})

    def timer(layer, x, mode):  # the Triton kernel "fastest": the policy must pick it and set it
        return 1.0 if (mode == "fp8" and layer.conv_kernel == "triton") else 2.0

    quant.set_conv_kernel(q, "im2col")
    report = quant.choose_modes(q, batch, candidates=("fp8", "dequant"), timer=timer,
                                fp8_conv_kernels=("im2col", "triton"))
    out["policy"] = {r.name: [sorted(r.seconds), r.chosen] for r in report}
    out["policy_set"] = {n: [m.mode, m.conv_kernel] for n, m in quant.quant_layers(q).items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
