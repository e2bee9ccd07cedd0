"""The GEMMs on cuBLAS (csrc/cublas_gemm.cu + torch._int_mm / at::mm) against torch_ref, on a CUDA device.

Many tokens with int8 activations: the weight is expanded to int8 in slices, cuBLAS accumulates in
int32 (exact), and our epilogue applies the scales, bias and activation with the reference's float32
roundings, so every result must equal the reference bit for bit.

Many tokens with half / bf16 activations: the weight is expanded to exact half / bf16 code values,
cuBLAS multiplies into float32, the same epilogue follows; within the float paths' tolerance of the
reference and of the mma.sync GEMM.
"""
import pytest
import torch

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.config import BitQuantConfig
from .test_cuda_ext_kernels import VALUES, make_packed, rel_err

pytestmark = pytest.mark.gpu

REF = TorchReferenceKernel()
SHAPES = [(7, 7), (33, 4097), (130, 257), (1000, 520)]  # (out_features, in_features): no tile multiples


@pytest.fixture(scope="module")
def kernels(cuda_ext_ops):
    from backends.cuda_ext import kernels

    return kernels


@pytest.fixture
def cublas(monkeypatch):
    for kind in ("INT8", "FLOAT"):
        monkeypatch.setenv(f"BITLAB_CUDA_{kind}_GEMM", "cublas")
        monkeypatch.delenv(f"BITLAB_CUDA_{kind}_GEMM_SLICE", raising=False)


def int8_config(bits, gran="per_channel", act_gran="per_token"):
    return BitQuantConfig(weight_bits=bits, activation_dtype="int8", weight_granularity=gran,
                          activation_granularity=act_gran)


def float_config(bits, dtype, gran="per_channel"):
    return BitQuantConfig(weight_bits=bits, activation_dtype=str(dtype).split(".")[-1], weight_granularity=gran)


def float_tolerance(dtype):
    return 5e-3 if dtype == torch.bfloat16 else 1.5e-3  # as test_cuda_ext_kernels' float paths


@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_bit_exact_against_reference(kernels, cublas, bits, gran, act_gran):
    cfg = int8_config(bits, gran, act_gran)
    kernel = kernels.CudaExtInt8Kernel()
    for n, k in SHAPES:
        packed = make_packed(bits, gran, n, k)
        prepared, rprep = kernel.prepare(packed, cfg), REF.prepare(packed, cfg)
        for m in (17, 70, 301):
            assert kernel.route(m, prepared).endswith("gemm_cublas")
            x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 3
            bias = torch.randn(n, device="cuda")
            for b, act in ((None, "none"), (bias, "relu2"), (bias, "relu")):
                y, ref = kernel.forward(x, prepared, b, act), REF.forward(x, rprep, b, act)
                assert torch.equal(y, ref), (n, k, m, act, (y.float() - ref.float()).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_output_dtypes(kernels, cublas, dtype):
    cfg = int8_config(1.58)
    kernel = kernels.CudaExtInt8Kernel()
    for n, k in ((130, 257), (1000, 520)):  # element stores, then 16-byte stores (out_features % 8 == 0)
        packed = make_packed(1.58, "per_channel", n, k)
        x = torch.randn(40, k, device="cuda", dtype=dtype)
        y = kernel.forward(x, kernel.prepare(packed, cfg), None, "relu")
        assert y.dtype == dtype
        assert torch.equal(y, REF.forward(x, REF.prepare(packed, cfg), None, "relu")), (n, k)


@pytest.mark.parametrize("slice_rows", ["128", "384", "1000", "100000"])
def test_slices_give_the_same_result(kernels, cublas, monkeypatch, slice_rows):
    # 1000 rows pad to 1024: 128-row slices run 8 full ones, 384-row slices leave a 256-row remainder;
    # 1000 rounds down to 896; more rows than the weight has means one slice.
    cfg = int8_config(1.58)
    kernel = kernels.CudaExtInt8Kernel()
    packed = make_packed(1.58, "per_channel", 1000, 520)
    prepared = kernel.prepare(packed, cfg)
    x = torch.randn(64, 520, device="cuda", dtype=torch.float16)
    bias = torch.randn(1000, device="cuda")
    monkeypatch.setenv("BITLAB_CUDA_INT8_GEMM_SLICE", slice_rows)
    sliced = kernel.forward(x, prepared, bias, "relu2")
    monkeypatch.setenv("BITLAB_CUDA_INT8_GEMM", "mma")
    assert torch.equal(sliced, kernel.forward(x, prepared, bias, "relu2"))


@pytest.mark.parametrize("act", ["int8", "float16"])
def test_default_rule_takes_cublas_past_the_wide_gemv(kernels, monkeypatch, act):
    monkeypatch.delenv("BITLAB_CUDA_INT8_GEMM", raising=False)
    monkeypatch.delenv("BITLAB_CUDA_FLOAT_GEMM", raising=False)
    int8 = act == "int8"
    cfg = int8_config(1.58) if int8 else float_config(1.58, torch.float16)
    kernel = kernels.CudaExtInt8Kernel() if int8 else kernels.CudaExtFloatKernel()
    packed = make_packed(1.58, "per_channel", 300, 1024)
    prepared = kernel.prepare(packed, cfg)
    hopper = torch.cuda.get_device_capability(0)[0] >= 9
    first = kernels.CUBLAS_MIN_TOKENS
    assert kernel.route(first, prepared).endswith("gemm_cublas" if hopper else "gemm")
    assert not kernel.route(first - 1, prepared).endswith("gemm_cublas")
    x = torch.randn(first, 1024, device="cuda", dtype=torch.float16)
    y, ref = kernel.forward(x, prepared), REF.forward(x, REF.prepare(packed, cfg))
    assert torch.equal(y, ref) if int8 else rel_err(y, ref) < 1.5e-3


@pytest.mark.parametrize("act, k, tokens", [("int8", 32896, 20), ("float16", 12416, 64), ("float16", 20096, 40)])
def test_rows_too_long_for_the_wide_gemv_take_cublas_from_17_tokens(kernels, monkeypatch, act, k, tokens):
    # 257 chunks (int8), or 13 chunks per slice x 64 rows and 20 x 40 rows of 2 B (float) do not fit the wide GEMV's staging
    monkeypatch.delenv("BITLAB_CUDA_INT8_GEMM", raising=False)
    monkeypatch.delenv("BITLAB_CUDA_FLOAT_GEMM", raising=False)
    monkeypatch.delenv("BITLAB_CUDA_GEMV", raising=False)
    int8 = act == "int8"
    cfg = int8_config(1.58) if int8 else float_config(1.58, torch.float16)
    kernel = kernels.CudaExtInt8Kernel() if int8 else kernels.CudaExtFloatKernel()
    packed = make_packed(1.58, "per_channel", 136, k)
    prepared = kernel.prepare(packed, cfg)
    hopper = torch.cuda.get_device_capability(0)[0] >= 9
    assert kernel.route(tokens, prepared).endswith("gemm_cublas" if hopper else "gemm")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.float16) / (1 if int8 else k ** 0.5)
    y, ref = kernel.forward(x, prepared), REF.forward(x, REF.prepare(packed, cfg))
    assert torch.equal(y, ref) if int8 else rel_err(y, ref) < 1.5e-3
    monkeypatch.setenv("BITLAB_CUDA_INT8_GEMM" if int8 else "BITLAB_CUDA_FLOAT_GEMM", "mma")
    mma = kernel.forward(x, prepared)
    assert torch.equal(mma, y) if int8 else rel_err(mma, ref) < 1.5e-3


def test_pre_quantized_input_equals_forward(kernels, cublas):
    from bitcore.quantize import quantize_activation_int8

    cfg = int8_config(1.58)
    kernel = kernels.CudaExtInt8Kernel()
    packed = make_packed(1.58, "per_channel", 130, 257)
    prepared = kernel.prepare(packed, cfg)
    bias = torch.randn(130, device="cuda")
    x = torch.randn(90, 257, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_activation_int8(x, "per_token")
    y = kernel.forward_quantized(xq, xs, prepared, bias, "relu", torch.bfloat16)
    assert torch.equal(y, kernel.forward(x, prepared, bias, "relu"))


def replay_equals_eager(kernel, prepared, dtype):
    """A forward of 300 tokens captured in a CUDA graph, replayed on fresh input, equals the eager call."""
    static_x = torch.randn(300, prepared.in_features, device="cuda", dtype=dtype)
    kernel.forward(static_x, prepared)  # warm up (cuBLAS handle and workspace) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = kernel.forward(static_x, prepared)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, kernel.forward(fresh, prepared))
    return fresh


def test_cuda_graph_capture(kernels, cublas):
    kernel = kernels.CudaExtInt8Kernel()
    replay_equals_eager(kernel, kernel.prepare(make_packed(1.58, "per_channel", 300, 520), int8_config(1.58)),
                        torch.float16)


def test_torch_compile_traces_the_op(kernels, cublas):
    cfg = int8_config(1.58)
    kernel = kernels.CudaExtInt8Kernel()
    prepared = kernel.prepare(make_packed(1.58, "per_tensor", 64, 256), cfg)
    x = torch.randn(40, 256, device="cuda", dtype=torch.float16)
    compiled = torch.compile(lambda t: kernel.forward(t, prepared) * 2, fullgraph=True)
    assert torch.equal(compiled(x), kernel.forward(x, prepared) * 2)


# ---------------------------------------------------------------- float activations

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_float_activations_against_reference_and_mma(kernels, cublas, monkeypatch, bits, gran, dtype):
    cfg = float_config(bits, dtype, gran)
    kernel = kernels.CudaExtFloatKernel()
    for n, k in SHAPES:
        packed = make_packed(bits, gran, n, k)
        prepared, rprep = kernel.prepare(packed, cfg), REF.prepare(packed, cfg)
        top = max(abs(v) for v in VALUES[bits])
        for m in (17, 70, 301):
            assert kernel.route(m, prepared).endswith("gemm_cublas")
            # Outputs of order one: squared ReLU of larger ones would overflow float16 in both results.
            x = (torch.randn(m, k, device="cuda") / (top * k ** 0.5)).to(dtype)
            bias = torch.randn(n, device="cuda")
            for b, act in ((None, "none"), (bias, "relu2"), (bias, "relu")):
                y, ref = kernel.forward(x, prepared, b, act), REF.forward(x, rprep, b, act)
                monkeypatch.setenv("BITLAB_CUDA_FLOAT_GEMM", "mma")
                mma = kernel.forward(x, prepared, b, act)
                monkeypatch.setenv("BITLAB_CUDA_FLOAT_GEMM", "cublas")
                assert y.dtype == dtype and y.shape == (m, n)
                tol = float_tolerance(dtype)
                assert rel_err(y, ref) < tol and rel_err(y, mma) < tol, (n, k, m, act, rel_err(y, ref), rel_err(y, mma))


def test_float_weight_expansion_is_exact(kernels, cublas):
    # Scale 1, no bias, float32 output: with integer-valued activations every product and partial sum is an
    # integer below 2^24, so the cuBLAS result must equal the reference exactly.  A wrong column order in
    # the expansion shows here at once.
    for bits in (1, 1.58, 2, 4, 8):
        for dtype in (torch.float16, torch.bfloat16):
            cfg = float_config(bits, dtype, "per_tensor")
            kernel = kernels.CudaExtFloatKernel()
            packed = make_packed(bits, "per_tensor", 130, 257, probe=True)
            x = torch.randint(-8, 9, (70, 257), device="cuda").to(dtype)
            y = kernel.forward(x.float(), kernel.prepare(packed, cfg))
            ref = REF.forward(x.float(), REF.prepare(packed, cfg))
            assert torch.equal(y, ref), (bits, dtype, (y - ref).abs().max().item())


@pytest.mark.parametrize("slice_rows", ["128", "384", "100000"])
def test_float_slices_give_the_same_result(kernels, cublas, monkeypatch, slice_rows):
    cfg = float_config(1.58, torch.float16)
    kernel = kernels.CudaExtFloatKernel()
    prepared = kernel.prepare(make_packed(1.58, "per_channel", 1000, 520), cfg)
    x = torch.randn(80, 520, device="cuda", dtype=torch.float16)
    bias = torch.randn(1000, device="cuda")
    whole = kernel.forward(x, prepared, bias, "relu2")
    monkeypatch.setenv("BITLAB_CUDA_FLOAT_GEMM_SLICE", slice_rows)
    assert torch.equal(kernel.forward(x, prepared, bias, "relu2"), whole)


def test_float_cuda_graph_capture_and_compile(kernels, cublas):
    kernel = kernels.CudaExtFloatKernel()
    prepared = kernel.prepare(make_packed(1.58, "per_channel", 300, 520), float_config(1.58, torch.bfloat16))
    fresh = replay_equals_eager(kernel, prepared, torch.bfloat16)
    compiled = torch.compile(lambda t: kernel.forward(t, prepared) * 2, fullgraph=True)
    assert torch.equal(compiled(fresh), kernel.forward(fresh, prepared) * 2)
