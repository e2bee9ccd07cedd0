"""The norm + int8 GEMV kernel (backends/cuda_ext/norm_linear.py) against the two kernels it replaces
(cuda_ext_rms_norm_quant, then cuda_ext_linear_int8): the same bits, on fresh random inputs of odd and
BitNet shapes; the input checks and the reasons it is not used run without a GPU."""
from types import SimpleNamespace

import pytest
import torch

from backends.cuda_ext import norm_linear, ops
from tests.backends.cuda_ext.int8_weights import fresh_generator, prepared_weight


# ----------------------------------------------------------------------------- no GPU needed
def test_rows_it_takes():
    assert norm_linear.max_rows(2560) == 3
    assert norm_linear.max_rows(1024) == 8
    assert norm_linear.max_rows(8192) == 1
    assert norm_linear.max_rows(8200) == 0 and norm_linear.max_rows(100) == 0 and norm_linear.max_rows(0) == 0


def test_reasons_it_does_not_run():
    weight = torch.ones(64, dtype=torch.bfloat16)
    int8 = SimpleNamespace(act_mode=ops.ACT_INT8_PER_TOKEN, in_features=64, wq=torch.zeros(4, dtype=torch.int32))
    assert norm_linear.why_not(int8, weight) == "the prepared weight is not on a CUDA device"
    floats = SimpleNamespace(act_mode=ops.ACT_FLOAT, in_features=64, wq=int8.wq)
    assert "int8 per-token" in norm_linear.why_not(floats, weight)
    assert "float16 / bfloat16" in norm_linear.why_not(int8, weight.float())
    assert "expected (64,)" in norm_linear.why_not(int8, torch.ones(32, dtype=torch.bfloat16))
    odd = SimpleNamespace(act_mode=ops.ACT_INT8_PER_TOKEN, in_features=60, wq=int8.wq)
    assert "60 is not a multiple of 8" in norm_linear.why_not(odd, torch.ones(60, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not on a CUDA device"):
        norm_linear.NormLinear.prepare(int8, weight, 1e-5)


def test_inputs_are_checked_with_reasons():
    weight = torch.ones(2560, dtype=torch.bfloat16)
    rows = torch.zeros(1, 2560, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="on CUDA"):
        norm_linear.check_inputs(rows, None, weight)
    fused = norm_linear.NormLinear(SimpleNamespace(in_features=2560), weight, 1e-5, None, torch.bfloat16)
    assert not fused.serves(rows)  # CPU rows
    assert fused.max_tokens == 3


# ----------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cuda_ops(cuda_ext_ops):
    return cuda_ext_ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("k, n, tokens", [(2560, 3840, 1), (2560, 2560, 1), (2560, 3840, 2), (2560, 2560, 3),
                                          (1000, 200, 8), (8192, 48, 1), (24, 16, 5), (4096, 1000, 2),
                                          (2048, 2560, 4)])
def test_same_bits_as_the_norm_kernel_then_the_gemv(cuda_ops, k, n, tokens, mode, dtype):
    gen, seed = fresh_generator()
    prepared = prepared_weight(n, k, gen)
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(dtype).cuda()
    fused = norm_linear.NormLinear.prepare(prepared, norm_weight, 1e-6, out_dtype=dtype)
    a = (torch.randn(tokens, k, generator=gen) * 2).to(dtype).cuda()
    b = torch.randn(tokens, k, generator=gen).to(dtype).cuda() if mode else None
    h, y = fused(a, b)
    h_want, xq, xs = cuda_ops.rms_norm_quant(a, b, norm_weight, 1e-6, mode)
    want = cuda_ops.linear_int8(xq, xs, prepared.wq, prepared.scale, None, prepared.fmt, 0, n, k, dtype)
    torch.cuda.synchronize()
    assert y.shape == (tokens, n) and y.dtype == dtype
    assert torch.equal(y, want), f"seed {seed}: {(y != want).sum().item()} of {y.numel()} differ"
    if mode:
        assert torch.equal(h, h_want) and torch.equal(h, a + b), f"seed {seed}"
    else:
        assert h is None


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_other_weight_formats(cuda_ops, bits):
    gen, seed = fresh_generator()
    k, n = 1536, 640
    prepared = prepared_weight(n, k, gen, bits)
    norm_weight = (torch.rand(k, generator=gen) + 0.5).bfloat16().cuda()
    fused = norm_linear.NormLinear.prepare(prepared, norm_weight, 1e-5, out_dtype=torch.bfloat16)
    a, b = (torch.randn(2, k, generator=gen).bfloat16().cuda() for _ in range(2))
    h, y = fused(a, b)
    _, xq, xs = cuda_ops.rms_norm_quant(a, b, norm_weight, 1e-5, 1)
    want = cuda_ops.linear_int8(xq, xs, prepared.wq, prepared.scale, None, prepared.fmt, 0, n, k, torch.bfloat16)
    assert torch.equal(y, want), f"seed {seed}"


@pytest.mark.gpu
def test_bias_out_dtype_and_graph_replay(cuda_ops):
    gen, seed = fresh_generator()
    k, n = 2560, 3840
    prepared = prepared_weight(n, k, gen)
    bias = torch.randn(n, generator=gen).cuda()
    norm_weight = (torch.rand(k, generator=gen) + 0.5).bfloat16().cuda()
    fused = norm_linear.NormLinear.prepare(prepared, norm_weight, 1e-5, bias=bias, out_dtype=torch.float32)
    a, b = (torch.randn(1, 1, k, generator=gen).bfloat16().cuda() for _ in range(2))

    def want_of(a, b):
        _, xq, xs = cuda_ops.rms_norm_quant(a.view(1, k), b.view(1, k), norm_weight, 1e-5, 1)
        return cuda_ops.linear_int8(xq, xs, prepared.wq, prepared.scale, bias, prepared.fmt, 0, n, k, torch.float32)

    h, y = fused(a, b)
    assert h.shape == a.shape and y.shape == (1, 1, n) and y.dtype == torch.float32
    assert torch.equal(y.view(1, n), want_of(a, b)), f"seed {seed}"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused(a, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_out, y_out = fused(a, b)
    for _ in range(3):
        a.copy_(torch.randn(1, 1, k, generator=gen).bfloat16())
        b.copy_(torch.randn(1, 1, k, generator=gen).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_out.view(1, n), want_of(a, b)) and torch.equal(h_out, a + b), f"seed {seed}"


@pytest.mark.gpu
def test_bad_inputs_raise_and_name_the_problem(cuda_ops):
    gen, _ = fresh_generator()
    prepared = prepared_weight(256, 2560, gen)
    fused = norm_linear.NormLinear.prepare(prepared, torch.ones(2560, dtype=torch.bfloat16).cuda(), 1e-5)
    with pytest.raises(ValueError, match="1 to 3"):
        fused(torch.randn(4, 2560).bfloat16().cuda())
    with pytest.raises(ValueError, match=r"16-byte aligned \[\.\.\., 2560\] torch.bfloat16"):
        fused(torch.randn(1, 2560).half().cuda())
    with pytest.raises(ValueError, match="b must be shaped like a"):
        fused(torch.randn(1, 2560).bfloat16().cuda(), torch.randn(2, 2560).bfloat16().cuda())
    odd = torch.randn(2 * 2560 + 1).bfloat16().cuda()[1:2561].view(1, 2560)  # contiguous, 2 bytes off alignment
    assert not fused.serves(odd)
    with pytest.raises(ValueError, match="not contiguous or aligned"):
        fused(odd)
    with pytest.raises(RuntimeError, match="not served"):
        torch.ops.bitlab.cuda_ext_linear_int8_norm(torch.randn(4, 2560).bfloat16().cuda(), None, fused.norm_weight,
                                                   1e-5, 0, prepared.wq, prepared.scale, None, prepared.fmt, 0, 256,
                                                   torch.bfloat16)
