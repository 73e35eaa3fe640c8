"""The Triton fp8 implicit-GEMM conv (fewstep.quant.triton_conv): checked against the fake-quant reference in
Triton's CPU interpreter (a subprocess: TRITON_INTERPRET must be set before triton is imported), and the
errors of the opt-in switch and of the policy's kernel candidates."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fewstep import quant
from fewstep.quant.quantizers import act_qparams_from_range, weight_qparams
from fewstep.quant.triton_conv import triton_available, triton_fp8_conv2d

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]


def _fp8_conv(conv: nn.Conv2d) -> quant.QuantLayer:
    return quant.QuantLayer(conv, [weight_qparams(conv.weight, fmt="fp8")], [act_qparams_from_range(-1, 1, "fp8")],
                            fmt="fp8")


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_triton_conv_interp.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    if "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr:
        # seen on a GPU image (triton 3.6, numpy 2.5): that interpreter converts 1-element arrays with int(),
        # which numpy 2.5 refuses; triton 3.9's squeezes first. The kernel itself compiled and passed there.
        pytest.skip("this triton's CPU interpreter cannot run with this numpy (int() of a 1-element array); "
                    "upgrade triton (3.9 works)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (pip install -e '.[test]')")
def test_kernel_equals_the_fp8_conv_of_the_same_operands(interpreted):
    assert interpreted["available_cpu"]
    # stride, dilation, zero padding, 1x1, N and K not multiples of the block, K blocks spanning taps
    assert set(interpreted["kernel"]) == {"3x3 pad1 bias", "3x3 stride2", "1x1 wide", "3x3 dilation2", "K spans taps",
                                          "aligned 3x3 pad1", "aligned stride2 dilation", "aligned 1x1",
                                          "K-contiguous weight", "K-contiguous weight, general"}
    for case, err in interpreted["kernel"].items():
        assert err < 2e-6, case


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (pip install -e '.[test]')")
def test_quant_layer_on_triton_matches_fake_quant_reference(interpreted):
    for case, (real_vs_fake, fake_vs_float) in interpreted["layer"].items():
        assert real_vs_fake < 2e-6, case
        assert fake_vs_float > 1e-3, case  # the reference is quantized: the check is not vacuous
    assert interpreted["model"] < 1e-5 and interpreted["kernels"] == ["triton"]
    real_vs_fake, fake_vs_float = interpreted["layer_bf16"]
    assert real_vs_fake < 1e-2 and fake_vs_float > 1e-3  # within bf16 rounding of the reference


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (pip install -e '.[test]')")
def test_policy_times_and_sets_the_triton_kernel(interpreted):
    for name, (timed, chosen) in interpreted["policy"].items():
        assert timed == ["dequant", "fp8", "fp8+triton"] and chosen == "fp8+triton", name
        assert interpreted["policy_set"][name] == ["fp8", "triton"]


def _case_functions():
    spec = importlib.util.spec_from_file_location("_triton_conv_interp", ROOT / "tests" / "_triton_conv_interp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not triton_available("cuda"), reason="needs triton and a CUDA GPU with compute capability >= 8.9")
def test_compiled_kernel_on_cuda_matches_reference():
    """The kernel compiled for the GPU (Hopper-sized tiles, fp8 tensor cores) on the interpreter's cases plus
    SD-sized ones whose M, N and K are not multiples of the GPU tiles. fp8 products are exact; the tolerance
    allows for the tensor cores' reduced-precision fp32 accumulation."""
    cases = _case_functions()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the reference conv in true float32
    try:
        torch.manual_seed(0)
        kernel = {
            "3x3 pad1 bias": cases.kernel_case(2, 6, 9, 9, 10, 3, 1, 1, 1, True, device="cuda"),
            "3x3 stride2": cases.kernel_case(1, 5, 7, 8, 3, 3, 2, 1, 1, False, device="cuda"),
            "1x1 wide": cases.kernel_case(2, 40, 5, 5, 70, 1, 1, 0, 1, True, device="cuda"),
            "3x3 dilation2": cases.kernel_case(1, 4, 9, 9, 8, 3, 1, 2, 2, False, device="cuda"),
            "SD-sized, ragged tiles": cases.kernel_case(2, 40, 48, 48, 160, 3, 1, 1, 1, True, device="cuda"),
            "C320 @ 32^2": cases.kernel_case(2, 320, 32, 32, 320, 3, 1, 1, 1, True, device="cuda"),
            "downsample C320": cases.kernel_case(2, 320, 32, 32, 320, 3, 2, 1, 1, True, device="cuda"),
            "C96 (not a multiple of 64)": cases.kernel_case(2, 96, 16, 16, 200, 3, 1, 1, 1, True, device="cuda"),
            "C1280 @ 16^2, N 1280": cases.kernel_case(2, 1280, 16, 16, 1280, 3, 1, 1, 1, False, device="cuda"),
            "C640, K-contiguous": cases.kernel_case(2, 640, 16, 16, 640, 3, 1, 1, 1, True, device="cuda",
                                                    k_contiguous=True),
        }
        layer = cases.layer_case(nn.Conv2d(64, 96, 3, padding=1), torch.randn(4, 64, 40, 40), 0, device="cuda")
        split = cases.layer_case(nn.Conv2d(96, 64, 1), torch.randn(4, 96, 40, 40), 40, device="cuda")
        bf16 = cases.layer_case(nn.Conv2d(64, 96, 3, padding=1), torch.randn(4, 64, 40, 40), 0, device="cuda",
                                dtype=torch.bfloat16)  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for name, err in kernel.items():
        assert err < 1e-3, (name, err)
    for name, (real_vs_fake, fake_vs_float) in {"3x3": layer, "split 1x1": split}.items():
        assert real_vs_fake < 1e-3 and fake_vs_float > 1e-3, (name, real_vs_fake, fake_vs_float)
    assert bf16[0] < 1e-2, bf16  # both round the same float32 result to bf16 (one bf16 ulp apart at most)


def test_conv_kernel_bad_input():
    conv = _fp8_conv(nn.Conv2d(4, 8, 3, padding=1))
    with pytest.raises(ValueError, match=r"`kernel` must be one of \['im2col', 'triton'\], got 'cudnn'"):
        conv.set_conv_kernel("cudnn")
    lin = nn.Linear(8, 8)
    fp8_linear = quant.QuantLayer(lin, [weight_qparams(lin.weight, fmt="fp8")], [act_qparams_from_range(-1, 1, "fp8")],
                                  fmt="fp8")
    with pytest.raises(ValueError, match=r"`kernel` 'triton' is an fp8 conv kernel; this layer is an fp8 linear"):
        fp8_linear.set_conv_kernel("triton")
    int8_conv = quant.QuantLayer(nn.Conv2d(4, 8, 3), [torch.full((8,), 0.01)], [act_qparams_from_range(-1, 1)])
    with pytest.raises(ValueError, match=r"this layer is an int8 conv2d"):
        int8_conv.set_conv_kernel("triton")
    grouped = quant.QuantLayer(nn.Conv2d(4, 4, 3, groups=2), [torch.full((4,), 0.01)],
                               [act_qparams_from_range(-1, 1, "fp8")], fmt="fp8")
    with pytest.raises(ValueError, match=r"`kernel` 'triton' needs groups 1 and numeric zero padding"):
        grouped.set_conv_kernel("triton")
    if not triton_available("cpu"):  # in this process: no interpreter, and the layer is on the CPU
        with pytest.raises(RuntimeError, match=r"needs the `triton` package and a CUDA GPU .* kernel 'im2col'"):
            conv.set_conv_kernel("triton")
        with pytest.raises(RuntimeError, match=r"needs the `triton` package"):
            triton_fp8_conv2d(torch.randn(1, 4, 5, 5), 0.01, torch.zeros(36, 8).to(torch.float8_e4m3fn),
                              torch.ones(8), None, (3, 3), (1, 1), (1, 1), (1, 1))
    assert conv.conv_kernel == "im2col"  # failed switches change nothing


def test_model_level_switch_and_policy_bad_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    q = nn.Sequential(quant.QuantLayer(model[0], [torch.full((4,), 0.01)], [act_qparams_from_range(-1, 1)]))
    with pytest.raises(ValueError, match=r"holds no fp8-format quantized convs"):
        quant.set_conv_kernel(q, "triton")
    with pytest.raises(ValueError, match=r"`kernel` must be one of \['im2col', 'triton'\], got 'x'"):
        quant.set_conv_kernel(q, "x")
    grouped = nn.Sequential(quant.QuantLayer(nn.Conv2d(4, 4, 3, groups=2), [torch.full((4,), 0.01)],
                                             [act_qparams_from_range(-1, 1, "fp8")], fmt="fp8"))
    with pytest.raises(ValueError, match=r"no fp8 conv of `model` can use kernel 'triton'; 0: `kernel` 'triton' needs"):
        quant.set_conv_kernel(grouped, "triton")
    inputs = {"input": torch.randn(1, 3, 6, 6)}
    with pytest.raises(ValueError, match=r"`fp8_conv_kernels` must be a non-empty subset of \['im2col', 'triton'\], "
                                         r"got \['winograd'\]"):
        quant.choose_modes(q, inputs, fp8_conv_kernels=("winograd",))


def test_policy_skips_a_triton_kernel_that_cannot_run(monkeypatch):
    """Where the Triton kernel cannot run (here: forced unavailable), the policy times only im2col."""
    monkeypatch.setattr("fewstep.quant.triton_conv.triton_available", lambda device="cuda": False)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = nn.Sequential(_fp8_conv(conv))
    candidates = ("fp8", "dequant") if "fp8" in q[0].supported_modes() else ("fake", "dequant")
    report = quant.choose_modes(q, {"input": torch.randn(1, 3, 6, 6)}, candidates=candidates,
                                timer=lambda layer, x, mode: 1.0 if mode != "dequant" else 2.0,
                                fp8_conv_kernels=("im2col", "triton"))
    assert sorted(report[0].seconds) == sorted(candidates) and q[0].conv_kernel == "im2col"
    assert report[0].chosen == candidates[0] and q[0].mode == candidates[0]


def _compile_for_hopper(const: dict, divisible: tuple[str, ...]):
    """The conv kernel compiled ahead of time for sm_90 (no GPU needed: Triton ships ptxas); its TTGIR."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # another Triton's compiler API
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    from fewstep.quant import triton_conv

    fn = triton_conv._KERNEL
    names = fn.arg_names
    ptrs = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16",
            "x_scale": "fp32"}
    signature = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in names}
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                           attrs={(names.index(k),): [["tt.divisibility", 16]] for k in divisible})
    except (TypeError, KeyError, AttributeError) as exc:  # the ahead-of-time API of another Triton version
        pytest.skip(f"this triton's ASTSource takes other arguments: {exc}")
    # with the options every launch passes (triton_conv._COMPILE_OPTIONS): Triton 3.9 warns when FP fusion is left
    # to its default (which Triton 3.10 changes); the launches state it, so compiling must not warn
    options = {"num_warps": 8, "num_stages": 3, **triton_conv._COMPILE_OPTIONS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert not [w for w in caught if "FP_FUSION" in str(w.message)], [str(w.message) for w in caught]
    return kernel.asm["ttgir"]


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (pip install -e '.[test]')")
@pytest.mark.parametrize("aligned", [True, False], ids=["channels-aligned", "general"])
def test_hopper_build_streams_both_operands_into_shared_memory(aligned):
    """Compiled for Hopper, the kernel's K loop copies both GEMM operands global -> shared asynchronously (the
    software pipeline) when the weight matrix is K-contiguous, as QuantLayer passes it; an N-contiguous weight is
    loaded through registers instead (fp8 MMA reads B K-major), which is why QuantLayer transposes it once."""
    base = {"HAS_BIAS": True, "C_ALIGNED": aligned, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
    pointers = ("x_ptr", "w_ptr", "ws_ptr", "b_ptr", "y_ptr", "C", "N", "K")

    def loads(ttgir: str) -> tuple[int, int]:
        lines = [line for line in ttgir.splitlines() if " = " in line]
        copies = sum("ttg.async_copy_global_to_local" in line for line in lines)
        fp8_loads = sum("tt.load" in line and "f8E4M3FN" in line for line in lines)
        return copies, fp8_loads

    k_major = _compile_for_hopper({**base, "stride_wk": 1}, (*pointers, "stride_wn"))
    n_major = _compile_for_hopper({**base, "stride_wn": 1}, (*pointers, "stride_wk"))
    (k_copies, k_loads), (n_copies, n_loads) = loads(k_major), loads(n_major)
    assert "warp_group_dot" in k_major or "wgmma" in k_major  # Hopper's fp8 tensor-core MMA
    assert k_loads == 0 and k_copies > n_copies  # both operands pipelined
    assert n_loads > 0  # the N-contiguous weight goes through registers
