"""BitNet's MLP in one kernel (backends/cuda_ext/bitnet_mlp.py) against the separate kernels it replaces
(int8 gate/up GEMV, norm + quantization mode 2, int8 down GEMV) on fresh random inputs; what needs no GPU
(the reasons it is not used) runs everywhere."""
import os

import pytest
import torch

from backends.cuda_ext import bitnet_mlp, layout, ops
from backends.cuda_ext.kernels import CudaExtInt8Kernel, CudaExtWeight
from bitcore.config import BitQuantConfig
from bitcore.packing import pack_weight

CFG = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token")


def fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def random_ternary(out_f, in_f, gen, per_channel):
    values = torch.randint(-1, 2, (out_f, in_f), generator=gen, dtype=torch.int8)
    scale = torch.rand(out_f if per_channel else 1, generator=gen) + 0.05
    return pack_weight(values, scale, 1.58, "per_channel" if per_channel else "per_tensor")


def to_device(packed, device):
    from dataclasses import replace

    return replace(packed, data=packed.data.to(device), scale=packed.scale.to(device))


def prepare(packed, device):
    """What CudaExtInt8Kernel.prepare builds (it refuses CPU weights; the layout itself is plain torch)."""
    if device.type == "cuda":
        return CudaExtInt8Kernel().prepare(to_device(packed, device), CFG)
    return CudaExtWeight(wq=layout.lane_tiles(packed, "int8"), scale=packed.scale, fmt=layout.FORMAT_CODE[1.58],
                         act_mode=ops.ACT_INT8_PER_TOKEN, out_features=packed.out_features,
                         in_features=packed.in_features, act_dtype=None)


def prepared_pair(hidden, intermediate, gen, device):
    """Prepared (gate_up, down) as the model binds them: gate rows then up rows, per-channel scales."""
    gate_up = prepare(random_ternary(2 * intermediate, hidden, gen, True), device)
    down = prepare(random_ternary(hidden, intermediate, gen, False), device)
    return gate_up, down


# ----------------------------------------------------------------------------- no GPU needed
def test_reasons_it_does_not_run():
    gen, _ = fresh_generator()
    gate_up, down = prepared_pair(64, 48, gen, torch.device("cpu"))
    weight = torch.ones(48, dtype=torch.bfloat16)
    assert bitnet_mlp.why_not(gate_up, down, weight) == "weights on cpu, not CUDA"
    assert "not prepared by the cuda_ext kernels" in bitnet_mlp.why_not(object(), down, weight)
    assert "float16 or bfloat16" in bitnet_mlp.why_not(gate_up, down, weight.float())
    odd_gate_up, odd_down = prepared_pair(64, 40, gen, torch.device("cpu"))
    assert "40 is not a multiple of 16" in bitnet_mlp.why_not(odd_gate_up, odd_down, torch.ones(40, dtype=torch.bfloat16))
    assert "do not chain" in bitnet_mlp.why_not(gate_up, odd_down, weight)
    binary = prepare(random_ternary(96, 64, gen, True), torch.device("cpu"))
    binary.fmt = layout.FORMAT_CODE[1]
    assert "ternary" in bitnet_mlp.why_not(binary, down, weight)
    with pytest.raises(ValueError, match="bitnet_mlp: weights on cpu"):
        bitnet_mlp.prepare_bitnet_mlp(gate_up, down, weight, 1e-5)


def cpu_fused(hidden, max_tokens, norm_weight):
    """A FusedBitnetMLP record on the CPU (no kernel runs): enough for the input checks."""
    w = torch.zeros(16, dtype=torch.int32)
    return bitnet_mlp.FusedBitnetMLP(
        gate_wq=w, up_wq=w, down_wq=w, gate_scale=w.float(), up_scale=w.float(), down_scale=w.float(),
        sub_weight=torch.ones(32, dtype=torch.bfloat16), eps=1e-5, hidden=hidden, intermediate=32,
        max_tokens=max_tokens, mid=w, barrier=w, norm_weight=norm_weight, norm_eps=1e-5)


def test_norm_and_mlp_inputs_are_checked_with_reasons():
    fused = cpu_fused(2560, 6, torch.ones(2560, dtype=torch.bfloat16))
    assert fused.norm_max_tokens == 6  # 4 x 8 x 512 values: 6 rows of 2560
    assert cpu_fused(4096, 6, torch.ones(4096, dtype=torch.bfloat16)).norm_max_tokens == 4
    assert cpu_fused(2564, 6, torch.ones(2564, dtype=torch.bfloat16)).norm_max_tokens == 0
    assert cpu_fused(2560, 6, None).norm_max_tokens == 0
    assert cpu_fused(8200, 6, torch.ones(8200, dtype=torch.bfloat16)).norm_max_tokens == 0  # past norm_quant's order
    fused.norm_fits_tokens = 2  # what the staged rows leave room for, measured by prepare_bitnet_mlp
    assert fused.norm_max_tokens == 2
    with pytest.raises(ValueError, match="at most 2"):
        bitnet_mlp.check_norm_inputs(torch.randn(3, 2560).bfloat16(), torch.randn(3, 2560).bfloat16(), fused)
    fused.norm_fits_tokens = 0
    with pytest.raises(ValueError, match="do not fit the kernel's shared memory"):
        bitnet_mlp.check_norm_inputs(torch.randn(1, 2560).bfloat16(), torch.randn(1, 2560).bfloat16(), fused)
    fused.norm_fits_tokens = bitnet_mlp.MAX_TOKENS
    res = torch.randn(2, 2560).bfloat16()
    with pytest.raises(ValueError, match="without the post-attention norm"):
        bitnet_mlp.check_norm_inputs(res, res, cpu_fused(2560, 6, None))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        bitnet_mlp.check_norm_inputs(res, res, cpu_fused(2564, 6, torch.ones(2564, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match=r"delta must be torch.bfloat16 \[tokens, 2560\]"):
        bitnet_mlp.check_norm_inputs(res, res.float(), fused)
    with pytest.raises(ValueError, match="res must be contiguous"):
        bitnet_mlp.check_norm_inputs(torch.randn(2560, 2).bfloat16().t(), res, fused)
    with pytest.raises(ValueError, match="res has 2 rows, delta 1"):
        bitnet_mlp.check_norm_inputs(res, res[:1], fused)
    with pytest.raises(ValueError, match="at most 6"):
        bitnet_mlp.check_norm_inputs(torch.randn(7, 2560).bfloat16(), torch.randn(7, 2560).bfloat16(), fused)
    bitnet_mlp.check_norm_inputs(res, res, fused)  # fine


# ----------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cuda_ops(cuda_ext_ops):
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip("the fused MLP kernel needs sm_90")
    return cuda_ext_ops


def separate_kernels(ops, xq, xs, gate_up, down, sub_weight, eps, dtype):
    """(m, y): the three kernels the fused one replaces, and m = T(T(relu(g)^2) * u) between them."""
    inter = gate_up.out_features // 2
    gu = ops.linear_int8(xq, xs, gate_up.wq, gate_up.scale, None, gate_up.fmt, 0, gate_up.out_features,
                         gate_up.in_features, dtype)
    gate, up = gu.split(inter, dim=-1)
    m = (torch.relu(gate).square() * up)
    _, mq, ms = ops.rms_norm_quant(gate, up, sub_weight, eps, 2)
    y = ops.linear_int8(mq, ms, down.wq, down.scale, None, down.fmt, 0, down.out_features, down.in_features, dtype)
    return m, y


def random_input(tokens, hidden, gen):
    """int8 rows and scales small enough that relu(g)^2 * u stays finite in float16 (|g| < ~40)."""
    xq = torch.randint(-127, 128, (tokens, hidden), generator=gen, dtype=torch.int8)
    xs = torch.rand(tokens, generator=gen) * 0.0015 + 0.0005
    return xq.cuda(), xs.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden, inter, tokens", [(2560, 6912, 1), (2560, 6912, 3), (2560, 6912, 8), (70, 48, 1),
                                                    (70, 48, 2), (300, 1040, 5), (129, 4096, 7), (1000, 16, 1),
                                                    (8000, 64, 2)])
def test_matches_the_separate_kernels(cuda_ops, hidden, inter, tokens, dtype):
    gen, seed = fresh_generator()
    gate_up, down = prepared_pair(hidden, inter, gen, torch.device("cuda"))
    sub_weight = (torch.rand(inter, generator=gen) + 0.5).to(dtype).cuda()
    fused = bitnet_mlp.prepare_bitnet_mlp(gate_up, down, sub_weight, 1e-5)
    assert fused.max_tokens >= min(tokens, 4), fused.max_tokens  # shared memory bounds it (6 at the 2B shape)
    tokens = min(tokens, fused.max_tokens)
    xq, xs = random_input(tokens, hidden, gen)
    y = fused(xq, xs)
    m, want = separate_kernels(cuda_ops, xq, xs, gate_up, down, sub_weight, 1e-5, dtype)
    torch.cuda.synchronize()
    assert y.shape == (tokens, hidden) and y.dtype == dtype
    # phase A is exact: the same integers, scales and roundings as the GEMV + the norm kernel's gate
    assert torch.equal(fused.mid[: tokens * inter].view(tokens, inter), m), f"seed {seed}"
    # the sub-norm's sum is added in another order: the quantized m may move by one step, rarely
    err = float((y.double() - want.double()).norm() / want.double().norm())
    assert err < 2e-3, f"relative error {err:.3g} (seed {seed})"
    same = (y == want).float().mean().item()
    assert same > 0.97, f"only {same:.3f} of outputs equal the separate kernels' (seed {seed})"


@pytest.mark.gpu
@pytest.mark.parametrize("knob, value", [("BITLAB_MLP_DOWN", "single"), ("BITLAB_MLP_GATE_UP", "single"),
                                         ("BITLAB_MLP_BARRIER", "fence")])
@pytest.mark.parametrize("hidden, inter, tokens", [(2560, 6912, 1), (2560, 6912, 2), (8000, 64, 2), (256, 4096, 3)])
def test_tiles_in_pairs_equal_one_at_a_time(cuda_ops, monkeypatch, knob, value, hidden, inter, tokens):
    """Blocks with an even number of down tiles (of gate/up pair tiles) multiply them two at a time;
    BITLAB_MLP_DOWN=single (BITLAB_MLP_GATE_UP=single) takes them one at a time: the same integer sums, so
    the same m and outputs.  On 132 multiprocessors: 2560 x 6912 has one or two down tiles and three or
    four pair tiles per block, 8000 x 64 three or four down tiles, 256 x 4096 one or two pair tiles.  The
    grid barrier with fences (BITLAB_MLP_BARRIER=fence) instead of release / acquire gives the same too."""
    gen, seed = fresh_generator()
    gate_up, down = prepared_pair(hidden, inter, gen, torch.device("cuda"))
    sub_weight = (torch.rand(inter, generator=gen) + 0.5).bfloat16().cuda()
    fused = bitnet_mlp.prepare_bitnet_mlp(gate_up, down, sub_weight, 1e-5)
    xq, xs = random_input(tokens, hidden, gen)
    pairs = fused(xq, xs).clone()
    mid = fused.mid[: tokens * inter].clone()
    monkeypatch.setenv(knob, value)
    apart = fused(xq, xs)
    torch.cuda.synchronize()
    assert torch.equal(fused.mid[: tokens * inter], mid), f"seed {seed}"
    assert torch.equal(pairs, apart), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden, inter, tokens", [(2560, 6912, 1), (2560, 6912, 2), (70, 48, 1), (300, 1040, 2),
                                                    (129, 8064, 2), (1000, 16, 1), (2560, 6912, 3)])
def test_subnorm_in_registers_equals_the_passes(cuda_ops, monkeypatch, hidden, inter, tokens, dtype):
    """For one or two tokens and I <= ~8176 the sub-norm and m's quantization run on m held in registers;
    BITLAB_MLP_SUBNORM=passes runs them through shared memory.  Same piece order, same sums: the same outputs
    (at 3 tokens both runs take the passes).  8064 columns: a thread's second piece holds the padding's last
    zero pieces; 16 and 48: most threads own no piece."""
    gen, seed = fresh_generator()
    gate_up, down = prepared_pair(hidden, inter, gen, torch.device("cuda"))
    sub_weight = (torch.rand(inter, generator=gen) + 0.5).to(dtype).cuda()
    fused = bitnet_mlp.prepare_bitnet_mlp(gate_up, down, sub_weight, 1e-5)
    xq, xs = random_input(tokens, hidden, gen)
    registers = fused(xq, xs).clone()
    monkeypatch.setenv("BITLAB_MLP_SUBNORM", "passes")
    passes = fused(xq, xs)
    torch.cuda.synchronize()
    assert torch.isfinite(passes.float()).all() and passes.abs().sum() > 0, f"seed {seed}"
    assert torch.equal(registers, passes), f"seed {seed}: {(registers != passes).sum().item()} outputs differ"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden, inter, tokens", [(2560, 6912, 1), (2560, 6912, 2), (2560, 6912, 6), (72, 48, 1),
                                                    (1000, 16, 3), (8000, 64, 2)])
def test_norm_and_mlp_match_the_norm_kernel_then_the_mlp(cuda_ops, hidden, inter, tokens, dtype):
    """The kernel with the residual add and post-attention norm against norm_quant's mode 1 and then the
    kernel on its int8 rows: the same bits (the in-kernel norm adds its sums in norm_quant's order)."""
    gen, seed = fresh_generator()
    gate_up, down = prepared_pair(hidden, inter, gen, torch.device("cuda"))
    sub_weight = (torch.rand(inter, generator=gen) + 0.5).to(dtype).cuda()
    # x's scale ~0.001 as in random_input: relu(g)^2 * u stays finite in float16
    norm_weight = ((torch.rand(hidden, generator=gen) + 0.5) * 0.02).to(dtype).cuda()
    fused = bitnet_mlp.prepare_bitnet_mlp(gate_up, down, sub_weight, 1e-5, norm_weight, 1e-6)
    tokens = min(tokens, fused.norm_max_tokens)
    res = (torch.randn(tokens, hidden, generator=gen) * 2).to(dtype).cuda()
    delta = torch.randn(tokens, hidden, generator=gen).to(dtype).cuda()
    h, y = fused.norm_and_mlp(res, delta)
    h_want, xq, xs = cuda_ops.rms_norm_quant(res, delta, norm_weight, 1e-6, 1)
    want = fused(xq, xs.reshape(-1))
    torch.cuda.synchronize()
    assert h.shape == (tokens, hidden) and y.shape == (tokens, hidden) and y.dtype == dtype
    assert torch.equal(h, h_want) and torch.equal(h, (res + delta)), f"seed {seed}"
    assert torch.equal(y, want), f"seed {seed}: {(y != want).sum().item()} of {y.numel()} differ"
    with pytest.raises(ValueError, match="at most"):
        fused.norm_and_mlp(*(torch.randn(fused.norm_max_tokens + 1, hidden).to(dtype).cuda() for _ in range(2)))


@pytest.mark.gpu
def test_repeated_launches_and_cuda_graph_replay(cuda_ops):
    """The grid barrier's counter only grows: many launches, eager and replayed, stay correct."""
    gen, seed = fresh_generator()
    gate_up, down = prepared_pair(2560, 6912, gen, torch.device("cuda"))
    sub_weight = (torch.rand(6912, generator=gen) + 0.5).bfloat16().cuda()
    fused = bitnet_mlp.prepare_bitnet_mlp(gate_up, down, sub_weight, 1e-5)
    xq, xs = random_input(1, 2560, gen)
    first = fused(xq, xs)
    for _ in range(50):
        again = fused(xq, xs)
    torch.cuda.synchronize()
    assert torch.equal(first, again), f"seed {seed}"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused(xq, xs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused(xq, xs)
    for _ in range(3):
        new_q, new_s = random_input(1, 2560, gen)
        xq.copy_(new_q)
        xs.copy_(new_s)
        graph.replay()
        eager = fused(xq, xs)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"seed {seed}"
    assert int(fused.barrier.item()) % min(torch.cuda.get_device_properties(0).multi_processor_count, 432) == 0


@pytest.mark.gpu
def test_bad_inputs_are_named(cuda_ops):
    gen, _ = fresh_generator()
    gate_up, down = prepared_pair(70, 48, gen, torch.device("cuda"))
    fused = bitnet_mlp.prepare_bitnet_mlp(gate_up, down, torch.ones(48, dtype=torch.bfloat16, device="cuda"), 1e-5)
    xq, xs = random_input(2, 70, gen)
    with pytest.raises(ValueError, match=r"int8 \[tokens, 70\]"):
        fused(xq.float(), xs)
    with pytest.raises(ValueError, match="at most"):
        fused(*random_input(fused.max_tokens + 1, 70, gen))
    with pytest.raises(ValueError, match="one value per token"):
        fused(xq, xs[:1])
    with pytest.raises(ValueError, match="inputs on cpu"):
        fused(xq.cpu(), xs.cpu())
