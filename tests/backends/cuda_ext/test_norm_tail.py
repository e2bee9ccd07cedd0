"""bitlab::cuda_ext_linear_int8_norm_tail: an int8 projection, the residual add and RMSNorm + int8 quantization of
its output in one kernel (backends/cuda_ext/norm_tail.py) against cuda_ext_linear_int8 then
cuda_ext_rms_norm_quant (mode 1): the same bits.  GPU tests skip where there is no CUDA device."""
from types import SimpleNamespace

import pytest
import torch

from backends.cuda_ext import norm_tail, ops
from tests.backends.cuda_ext.int8_weights import fresh_generator, prepared_weight


# ----------------------------------------------------------------------------- no GPU needed
def test_rows_it_takes():
    assert norm_tail.max_rows(2560) == 4  # BitNet 2B's hidden size: the staged rows fit 48 KB up to 4 tokens
    assert norm_tail.max_rows(1024) == 8
    assert norm_tail.max_rows(4096) == 2
    assert norm_tail.max_rows(8192) == 0  # one row's stage is over 48 KB
    assert norm_tail.max_rows(8200) == 0 and norm_tail.max_rows(100) == 0 and norm_tail.max_rows(0) == 0
    assert norm_tail.stage_bytes(4, 2560) <= norm_tail.MAX_STAGE_BYTES < norm_tail.stage_bytes(5, 2560)


def test_reasons_it_does_not_run():
    weight = torch.ones(64, dtype=torch.bfloat16)
    int8 = SimpleNamespace(act_mode=ops.ACT_INT8_PER_TOKEN, out_features=64, wq=torch.zeros(4, dtype=torch.int32))
    assert norm_tail.why_not(int8, weight) == "the prepared weight is not on a CUDA device"
    floats = SimpleNamespace(act_mode=ops.ACT_FLOAT, out_features=64, wq=int8.wq)
    assert "int8 per-token" in norm_tail.why_not(floats, weight)
    assert "float16 / bfloat16" in norm_tail.why_not(int8, weight.float())
    assert "expected (64,)" in norm_tail.why_not(int8, torch.ones(32, dtype=torch.bfloat16))
    odd = SimpleNamespace(act_mode=ops.ACT_INT8_PER_TOKEN, out_features=60, wq=int8.wq)
    assert "60 is not a multiple of 8" in norm_tail.why_not(odd, torch.ones(60, dtype=torch.bfloat16))
    wide = SimpleNamespace(act_mode=ops.ACT_INT8_PER_TOKEN, out_features=8192, wq=int8.wq)
    assert "staged norm is over 49152 bytes" in norm_tail.why_not(wide, torch.ones(8192, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not on a CUDA device"):
        norm_tail.NormTailLinear.prepare(int8, weight, 1e-5)


def test_inputs_are_checked_with_reasons():
    prepared = SimpleNamespace(out_features=2560, in_features=2560)
    tail = norm_tail.NormTailLinear(prepared, torch.ones(2560, dtype=torch.bfloat16), 1e-5, torch.zeros(1))
    q = torch.zeros(1, 2560, dtype=torch.int8)
    res = torch.zeros(1, 2560, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"res must be contiguous, 16-byte aligned \[\.\.\., 2560\] torch.bfloat16 "
                                         r"on CUDA; got torch.bfloat16 \(1, 2560\) on cpu"):
        norm_tail.check_inputs(q, torch.ones(1), res, tail)
    assert not tail.serves(q, res)  # CPU rows
    assert tail.max_tokens == 4


# ----------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cuda_ops(cuda_ext_ops):
    return cuda_ext_ops


def separate_kernels(cuda_ops, prepared, xq, xs, res, norm_weight, eps):
    """(h, q, scale) from the projection's kernel, then the norm kernel (mode 1)."""
    n, k = prepared.out_features, prepared.in_features
    y = cuda_ops.linear_int8(xq, xs, prepared.wq, prepared.scale, None, prepared.fmt, 0, n, k, res.dtype)
    return cuda_ops.rms_norm_quant(res, y, norm_weight, eps, 1)


def random_case(tokens, k, n, dtype, gen, bits=1.58):
    prepared = prepared_weight(n, k, gen, bits)
    norm_weight = (torch.rand(n, generator=gen) + 0.5).to(dtype).cuda()
    xq = torch.randint(-127, 128, (tokens, k), generator=gen, dtype=torch.int8).cuda()
    xs = (torch.rand(tokens, 1, generator=gen) * 0.02 + 0.002).cuda()
    res = (torch.randn(tokens, n, generator=gen) * 3).to(dtype).cuda()
    return prepared, norm_weight, xq, xs, res


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, n, tokens", [(2560, 2560, 1), (2560, 2560, 2), (2560, 2560, 4), (6912, 2560, 1),
                                          (300, 136, 3), (1000, 8, 1), (24, 1024, 8), (4096, 4096, 2)])
def test_same_bits_as_the_projection_then_the_norm_kernel(cuda_ops, k, n, tokens, dtype):
    """Grids from 1 block (8 outputs) to 256 (4096): the last block sees every block's outputs."""
    gen, seed = fresh_generator()
    prepared, norm_weight, xq, xs, res = random_case(tokens, k, n, dtype, gen)
    tail = norm_tail.NormTailLinear.prepare(prepared, norm_weight, 1e-6)
    h, (q, scale) = tail((xq, xs), res)
    h_want, q_want, scale_want = separate_kernels(cuda_ops, prepared, xq, xs, res, norm_weight, 1e-6)
    torch.cuda.synchronize()
    assert h.shape == res.shape and q.shape == (tokens, n) and scale.shape == (tokens, 1)
    assert torch.equal(h, h_want), f"seed {seed}: {(h != h_want).sum().item()} of {h.numel()} differ"
    assert torch.equal(q, q_want), f"seed {seed}: {(q != q_want).sum().item()} of {q.numel()} differ"
    assert torch.equal(scale.view(-1), scale_want.view(-1)), f"seed {seed}"
    assert q.abs().max() == 127 and int(tail.counter.item()) == 0, f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_other_weight_formats(cuda_ops, bits):
    gen, seed = fresh_generator()
    prepared, norm_weight, xq, xs, res = random_case(2, 1536, 640, torch.bfloat16, gen, bits)
    tail = norm_tail.NormTailLinear.prepare(prepared, norm_weight, 1e-5)
    h, (q, scale) = tail((xq, xs), res)
    h_want, q_want, scale_want = separate_kernels(cuda_ops, prepared, xq, xs, res, norm_weight, 1e-5)
    assert torch.equal(h, h_want) and torch.equal(q, q_want), f"seed {seed}"
    assert torch.equal(scale.view(-1), scale_want.view(-1)), f"seed {seed}"


@pytest.mark.gpu
def test_repeated_launches_and_cuda_graph_replay(cuda_ops):
    """The last block resets the counter: launch after launch, and replay after replay of a captured one, the
    outputs follow new inputs."""
    gen, seed = fresh_generator()
    prepared, norm_weight, xq, xs, res = random_case(1, 2560, 2560, torch.bfloat16, gen)
    xq, xs, res = xq.view(1, 1, 2560), xs.view(1, 1, 1), res.view(1, 1, 2560)
    tail = norm_tail.NormTailLinear.prepare(prepared, norm_weight, 1e-5)
    for _ in range(3):
        xq.copy_(torch.randint(-127, 128, xq.shape, generator=gen, dtype=torch.int8))
        h, (q, _) = tail((xq, xs), res)
        _, q_want, _ = separate_kernels(cuda_ops, prepared, xq.view(1, -1), xs.view(1, 1), res.view(1, -1),
                                        norm_weight, 1e-5)
        assert torch.equal(q.view(1, -1), q_want), f"seed {seed}"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tail((xq, xs), res)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_out, (q_out, s_out) = tail((xq, xs), res)
    for _ in range(3):
        xq.copy_(torch.randint(-127, 128, xq.shape, generator=gen, dtype=torch.int8))
        res.copy_(torch.randn(res.shape, generator=gen).bfloat16())
        graph.replay()
        h_want, q_want, s_want = separate_kernels(cuda_ops, prepared, xq.view(1, -1), xs.view(1, 1),
                                                  res.view(1, -1), norm_weight, 1e-5)
        torch.cuda.synchronize()
        assert h_out.shape == (1, 1, 2560) and q_out.shape == (1, 1, 2560) and s_out.shape == (1, 1, 1)
        assert torch.equal(h_out.view(1, -1), h_want) and torch.equal(q_out.view(1, -1), q_want), f"seed {seed}"
    assert int(tail.counter.item()) == 0


@pytest.mark.gpu
def test_bad_inputs_are_named(cuda_ops):
    gen, _ = fresh_generator()
    prepared, norm_weight, xq, xs, res = random_case(1, 256, 2560, torch.bfloat16, gen)
    tail = norm_tail.NormTailLinear.prepare(prepared, norm_weight, 1e-5)
    with pytest.raises(ValueError, match="5 rows of 2560 outputs: the kernel takes 1 to 4"):
        tail((xq.repeat(5, 1), xs.repeat(5, 1)), res.repeat(5, 1))
    with pytest.raises(ValueError, match=r"res must be contiguous.*torch.float16"):
        tail((xq, xs), res.half())
    with pytest.raises(ValueError, match=r"x.q must be int8 \[\.\.\., 256\] with 1 rows"):
        tail((xq[:, :128], xs), res)
    with pytest.raises(ValueError, match="x.scale must be float32 with 1 or 1 values"):
        tail((xq, xs.double()), res)
    assert int(tail.counter.item()) == 0  # nothing ran
