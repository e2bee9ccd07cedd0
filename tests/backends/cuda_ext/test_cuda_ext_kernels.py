"""cuda_ext kernels against the torch_ref reference on a CUDA device (skipped where there is none).

Integer paths (int8 / binary activations) must agree bit for bit: the kernels accumulate
exactly and apply the epilogue with the reference's float32 roundings in its order.
Float paths (half / bf16 activations, fp32 accumulation) must stay within 1e-3 relative
(norm-wise). Every case draws fresh random inputs.
"""
import pytest
import torch

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.config import BitQuantConfig
from bitcore.packing import pack_weight

pytestmark = pytest.mark.gpu

VALUES = {1: (-1, 1), 1.58: (-1, 0, 1), 2: (-3, -1, 1, 3), 4: tuple(range(-8, 8)), 8: tuple(range(-128, 128))}
SHAPES = [(1, 1), (7, 7), (33, 4097), (130, 257)]  # (out_features, in_features): no tile multiples
BATCHES = [1, 3, 8, 11, 16, 17, 70]
REF = TorchReferenceKernel()


@pytest.fixture(scope="module")
def kernels(cuda_ext_ops):
    from backends.cuda_ext import kernels

    return kernels


@pytest.fixture(params=["bulk", "cluster", "oneshot"])
def gemv(request, monkeypatch):
    """Every GEMV kernel (M <= 16 tokens): bulk-copy ring and cluster split-K (sm_90+), register-only.

    Past 16 tokens: with "cluster" the default route (wide cluster GEMV, then cuBLAS past 64 tokens on
    sm_90), with "bulk" and "oneshot" the mma.sync GEMM at every token count (so it stays covered there)."""
    monkeypatch.setenv("BITLAB_CUDA_GEMV", request.param)
    if request.param != "cluster":
        monkeypatch.setenv("BITLAB_CUDA_INT8_GEMM", "mma")
        monkeypatch.setenv("BITLAB_CUDA_FLOAT_GEMM", "mma")
    return request.param


def make_packed(bits, gran, n, k, probe=False):
    choices = torch.tensor(VALUES[bits], dtype=torch.int8)
    values = choices[torch.randint(len(choices), (n, k))]
    if probe:
        scale = torch.ones(1 if gran == "per_tensor" else n)
    else:
        scale = torch.rand(1 if gran == "per_tensor" else n) + 0.25
    packed = pack_weight(values, scale, bits, gran)
    packed.data, packed.scale = packed.data.cuda(), packed.scale.cuda()
    return packed


def run_both(kernel, cfg, packed, x, bias=None, activation="none"):
    y = kernel.forward(x, kernel.prepare(packed, cfg), bias, activation)
    ref = REF.forward(x, REF.prepare(packed, cfg), bias, activation)
    return y, ref


def check_against_reference(kernel, cfg, bits, act, shapes, tokens, dtype):
    """Every (out, in) shape and token count against torch_ref with bias and ReLU: exact for int8
    activations, within the float tolerance otherwise."""
    for n, k in shapes:
        packed = make_packed(bits, "per_channel", n, k)
        prep, rprep = kernel.prepare(packed, cfg), REF.prepare(packed, cfg)
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            bias = torch.randn(n, device="cuda")
            y, r = kernel.forward(x, prep, bias, "relu"), REF.forward(x, rprep, bias, "relu")
            if act == "int8":
                assert torch.equal(y, r), (n, k, m)
            else:
                assert rel_err(y, r) < (5e-3 if act == "bfloat16" else 1.5e-3), (n, k, m, rel_err(y, r))


def per_channel_setup(kernels, bits, act):
    """Config (per-channel weights, per-token activations), kernel and input dtype for one activation kind."""
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act, weight_granularity="per_channel",
                         activation_granularity="per_token")
    kernel = kernels.CudaExtInt8Kernel() if act == "int8" else kernels.CudaExtFloatKernel()
    return cfg, kernel, torch.bfloat16 if act == "bfloat16" else torch.float16


def force_hopper_gemv(monkeypatch, name, needs, **knobs):
    """Force one sm_90 GEMV (BITLAB_CUDA_GEMV=name) and its knobs; skip on older devices."""
    if torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip(f"the {name} GEMV needs sm_90 ({needs})")
    monkeypatch.setenv("BITLAB_CUDA_GEMV", name)
    for knob, value in knobs.items():
        monkeypatch.setenv(knob, value)


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("act", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_float_activations_match_reference(kernels, gemv, bits, act, gran):
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act, weight_granularity=gran)
    kernel = kernels.CudaExtFloatKernel()
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[act]
    for n, k in SHAPES:
        packed = make_packed(bits, gran, n, k)
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda").to(dtype)
            bias = torch.randn(n, device="cuda")
            y, ref = run_both(kernel, cfg, packed, x, bias, "relu")
            assert y.dtype == x.dtype and y.shape == (m, n)
            assert torch.isfinite(y).all()
            err = rel_err(y, ref)
            # the output is rounded to x.dtype; compare against the reference rounded the same way
            assert err < 1e-3 + (4e-3 if dtype == torch.bfloat16 else 5e-4), (n, k, m, err)
            y32 = kernel.forward(x.float(), kernel.prepare(packed, cfg))
            ref32 = REF.forward(x.float(), REF.prepare(packed, cfg))
            assert y32.dtype == torch.float32
            assert rel_err(y32, ref32) < 1e-3, (n, k, m, rel_err(y32, ref32))


@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_int8_activations_bit_exact(kernels, gemv, bits, gran, act_gran):
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype="int8", weight_granularity=gran,
                         activation_granularity=act_gran)
    kernel = kernels.CudaExtInt8Kernel()
    for n, k in SHAPES:
        for probe in (True, False):
            packed = make_packed(bits, gran, n, k, probe=probe)
            for m in BATCHES:
                if probe:  # exactness probe: unit scales, each row's max |x| is exactly 127
                    x = torch.randint(-127, 128, (m, k), device="cuda").float()
                    x[:, 0] = 127.0
                    x = x.half()
                else:
                    x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 3
                bias = None if probe else torch.randn(n, device="cuda")
                y, ref = run_both(kernel, cfg, packed, x, bias, "none" if probe else "relu2")
                assert torch.equal(y, ref), (n, k, m, probe, (y.float() - ref.float()).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_quantizer_vector_path(kernels, dtype):
    # Per-token rows of half / bf16 with K % 8 == 0 and aligned rows take the vector quantizer (one
    # read, registers); 16392 columns are past its register budget, a row stride of 8204 elements
    # breaks the alignment: both take the scalar one.  Every case equals the reference bit for bit.
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", weight_granularity="per_channel",
                         activation_granularity="per_token")
    kernel = kernels.CudaExtInt8Kernel()
    for k in (8, 520, 4096, 16384, 16392):
        packed = make_packed(1.58, "per_channel", 40, k)
        prepared, rprep = kernel.prepare(packed, cfg), REF.prepare(packed, cfg)
        for m in (1, 5, 16):
            x = torch.randn(m, k, device="cuda", dtype=dtype) * 4
            x[0, k // 2] = 50.0  # one outlier sets the row's scale
            assert torch.equal(kernel.forward(x, prepared), REF.forward(x, rprep)), (k, m)
    packed = make_packed(1.58, "per_channel", 40, 8192)
    wide = torch.randn(3, 8204, device="cuda", dtype=dtype)[:, :8192]  # rows 8204 elements apart
    assert torch.equal(kernel.forward(wide, kernel.prepare(packed, cfg)), REF.forward(wide, REF.prepare(packed, cfg)))


@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("path", ["auto", "popcount", "mma"])
def test_w1a1_popcount(kernels, monkeypatch, gran, act_gran, path):
    # Both W1A1 kernels (XOR + popcount on the CUDA cores, AND + popcount mma on the tensor cores) and the
    # default split between them (the mma kernel from 33 tokens on sm_80+).
    if path != "auto":
        monkeypatch.setenv("BITLAB_CUDA_XNOR", path)
    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary", weight_granularity=gran,
                         activation_granularity=act_gran)
    kernel = kernels.CudaExtXnorKernel()
    for n, k in SHAPES:
        for m in BATCHES:
            packed = make_packed(1, gran, n, k, probe=True)
            signs = torch.randint(0, 2, (m, k), device="cuda").float() * 2 - 1  # |x| = 1: scale exactly 1
            y, ref = run_both(kernel, cfg, packed, signs)
            # integer counts are exact; the scale mean|x| = 1 may differ from torch's mean by one ulp
            assert ((y - ref).abs() <= 1e-6 * ref.abs() + 1e-6).all(), (n, k, m)
            packed = make_packed(1, gran, n, k)
            x = torch.randn(m, k, device="cuda")
            bias = torch.randn(n, device="cuda")
            y, ref = run_both(kernel, cfg, packed, x, bias, "relu")
            # The scale mean|x| is summed in another order than torch's (an ulp apart), and count * scale + bias
            # can cancel to almost nothing, so the error is bounded against the terms' size, not the result's
            # (the relative bound used before can fail on such an output: cuda_ext notes v12).  One count off
            # moves an output by 2 mean|x| w_scale, i.e. 2 / K of the bound's first term: far above 1e-5 of it.
            bound = k * x.abs().mean() * packed.scale.max() + bias.abs().max()
            assert (y - ref).abs().max() <= 1e-5 * bound, (n, k, m, (y - ref).abs().max().item(), bound.item())


@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
def test_w1a1_tensor_core_kernel_equals_popcount_kernel(kernels, monkeypatch, act_gran):
    # The same integer dot product and epilogue: the two kernels' outputs are identical, at K on and off
    # the 512-bit step (128-bit tails of 1 to 3 words per lane), rows and tokens past the 128 x 128 tiles.
    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary", weight_granularity="per_channel",
                         activation_granularity=act_gran)
    kernel = kernels.CudaExtXnorKernel()
    for n, k in ((300, 4097), (129, 1024), (64, 640), (1000, 8192)):
        packed = make_packed(1, "per_channel", n, k)
        prep = kernel.prepare(packed, cfg)
        bias = torch.randn(n, device="cuda")
        for m in (1, 17, 130, 300):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            out = {}
            for path in ("popcount", "mma"):
                monkeypatch.setenv("BITLAB_CUDA_XNOR", path)
                out[path] = kernel.forward(x, prep, bias, "relu")
            assert torch.equal(out["mma"], out["popcount"]), (n, k, m)


@pytest.mark.parametrize("act", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_large_shapes_every_path(kernels, gemv, bits, act):
    # Shapes where the GEMV runs many blocks (20011 rows) or long K (9000), at token counts of
    # both GEMV tile widths (1..8, 9..16); every weight format and activation type.
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act, weight_granularity="per_channel",
                         activation_granularity="per_token")
    kernel = kernels.CudaExtInt8Kernel() if act == "int8" else kernels.CudaExtFloatKernel()
    check_against_reference(kernel, cfg, bits, act, ((20011, 300), (3000, 9000)), (1, 3, 8, 11, 16), torch.float16)


@pytest.mark.parametrize("act", ["float16", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58])
def test_gemv_many_tiles(kernels, gemv, bits, act):
    # Many more 16-row tiles than multiprocessors; K sizes where some warps of a block idle.
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act, weight_granularity="per_channel",
                         activation_granularity="per_token")
    kernel = kernels.CudaExtFloatKernel() if act == "float16" else kernels.CudaExtInt8Kernel()
    for n, k in [(20011, 300), (17000, 1100)]:
        packed = make_packed(bits, "per_channel", n, k)
        prepared = kernel.prepare(packed, cfg)
        for m in (1, 5, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            bias = torch.randn(n, device="cuda")
            y = kernel.forward(x, prepared, bias, "relu")
            ref = REF.forward(x, REF.prepare(packed, cfg), bias, "relu")
            if act == "int8":
                assert torch.equal(y, ref), (n, k, m)
            else:
                assert rel_err(y, ref) < 1.5e-3, (n, k, m, rel_err(y, ref))


@pytest.mark.parametrize("mt", ["1", "2"])
@pytest.mark.parametrize("act", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58, 4, 8])
def test_bulk_gemv_ring_wraps(kernels, monkeypatch, bits, act, mt):
    # The smallest ring (2 slots) over long K: every slot is refilled many times, so the
    # full/empty barrier phases wrap; one and two m-tiles per block; both GEMV tile widths.
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "bulk")
    monkeypatch.setenv("BITLAB_CUDA_BULK_INFLIGHT", "1")
    monkeypatch.setenv("BITLAB_CUDA_BULK_MT", mt)
    cfg, kernel, dtype = per_channel_setup(kernels, bits, act)
    check_against_reference(kernel, cfg, bits, act, ((300, 9000), (129, 2000), (40, 130)), (1, 2, 9, 16), dtype)


@pytest.mark.parametrize("mt", ["1", "2", "4"])
@pytest.mark.parametrize("act", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58, 4, 8])
def test_cluster_gemv_slices_and_row_blocks(kernels, monkeypatch, bits, act, mt):
    # The cluster GEMV at cluster sizes 1, 3 and 8: a last slice shorter than the others (9000 columns =
    # 71 chunks), empty slices (1100 columns = 9 chunks over 8 blocks), row blocks past the last weight
    # tile (300 and 40 rows), one to four m-tiles per warp, both tile widths.
    force_hopper_gemv(monkeypatch, "cluster", "thread-block clusters", BITLAB_CUDA_CLUSTER_MT=mt)
    cfg, kernel, dtype = per_channel_setup(kernels, bits, act)
    for slices in ("1", "3", "8"):
        monkeypatch.setenv("BITLAB_CUDA_CLUSTER_KS", slices)
        check_against_reference(kernel, cfg, bits, act, ((300, 9000), (40, 1100)), (1, 5, 9, 16), dtype)


@pytest.mark.parametrize("act", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_wide_cluster_gemv_17_to_64_tokens(kernels, monkeypatch, bits, act):
    # 17-64 tokens on sm_90 run the cluster GEMV with 4 or 8 n-tiles (the GEMM elsewhere): every format
    # and activation type, token counts on and off the 8-token tiles, K and N off every tile size,
    # K long enough for several slices, and the route naming it.
    if torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("the cluster GEMV needs sm_90 (thread-block clusters)")
    monkeypatch.delenv("BITLAB_CUDA_GEMV", raising=False)
    cfg, kernel, dtype = per_channel_setup(kernels, bits, act)
    shapes = ((33, 4097), (130, 257), (3000, 2560), (1000, 9000))
    check_against_reference(kernel, cfg, bits, act, shapes, (17, 24, 32, 33, 47, 64), dtype)
    prepared = kernel.prepare(make_packed(bits, "per_channel", 3000, 2560), cfg)
    assert kernel.route(17, prepared).endswith("gemv_cluster") and kernel.route(64, prepared).endswith("gemv_cluster")


@pytest.mark.parametrize("split", ["1", "2"])
@pytest.mark.parametrize("slices", ["1", "3", "8"])
@pytest.mark.parametrize("mt", ["1", "2"])
def test_wide_cluster_gemv_plans(kernels, monkeypatch, mt, slices, split):
    # The wide variant with 1 or 2 m-tiles per warp, 1, 3 or 8 K-slices (a slice count that does not fit
    # falls back to the cost model's) and one or two warps per group of m-tiles (the second taking the
    # upper token tiles; int8 activations past 32 tokens only), ternary and int4 weights, fp16 and int8
    # activations; against the GEMM (BITLAB_CUDA_GEMV=oneshot past 16 tokens) and the reference.
    monkeypatch.setenv("BITLAB_CUDA_CLUSTER_TSPLIT", split)
    if torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("the cluster GEMV needs sm_90 (thread-block clusters)")
    for bits in (1.58, 4):
        for act in ("float16", "int8"):
            cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act, weight_granularity="per_channel",
                                 activation_granularity="per_token")
            kernel = kernels.CudaExtInt8Kernel() if act == "int8" else kernels.CudaExtFloatKernel()
            packed = make_packed(bits, "per_channel", 700, 1500)
            prepared, rprep = kernel.prepare(packed, cfg), REF.prepare(packed, cfg)
            for m in (20, 33, 64):
                x = torch.randn(m, 1500, device="cuda", dtype=torch.float16)
                monkeypatch.setenv("BITLAB_CUDA_GEMV", "oneshot")
                gemm = kernel.forward(x, prepared)
                monkeypatch.setenv("BITLAB_CUDA_GEMV", "cluster")
                monkeypatch.setenv("BITLAB_CUDA_CLUSTER_MT", mt)
                monkeypatch.setenv("BITLAB_CUDA_CLUSTER_KS", slices)
                y = kernel.forward(x, prepared)
                for knob in ("BITLAB_CUDA_GEMV", "BITLAB_CUDA_CLUSTER_MT", "BITLAB_CUDA_CLUSTER_KS"):
                    monkeypatch.delenv(knob)
                ref = REF.forward(x, rprep)
                if act == "int8":
                    assert torch.equal(y, ref) and torch.equal(gemm, ref), (bits, m)
                else:
                    assert rel_err(y, ref) < 1.5e-3 and rel_err(y, gemm) < 1.5e-3, (bits, m, rel_err(y, ref))


@pytest.mark.parametrize("mt", ["1", "2", "4"])
@pytest.mark.parametrize("act", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_oneshot_gemv_tiles_per_block(kernels, monkeypatch, bits, act, mt):
    # The one-shot GEMV with 1, 2 or 4 m-tiles per block (the rule picks 4 for large grids with short K),
    # over a last block past the weight rows (40 and 300 rows) and K with a partial chunk.
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "oneshot")
    monkeypatch.setenv("BITLAB_CUDA_ONESHOT_MT", mt)
    cfg, kernel, dtype = per_channel_setup(kernels, bits, act)
    check_against_reference(kernel, cfg, bits, act, ((300, 2600), (40, 700)), (1, 3, 8), dtype)


@pytest.mark.parametrize("mt", ["1", "2", "4"])
@pytest.mark.parametrize("act", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_prefetch_gemv_pieces_and_tiles_per_block(kernels, monkeypatch, bits, act, mt):
    # The prefetch-all GEMV with 1, 2 or 4 m-tiles per block: an odd number of pieces (9000 columns = 71
    # chunks = 9 pieces of 8), a partial last piece, fewer chunks than warps (7 and 700 columns), a last
    # block past the weight rows (40 and 300 rows), 1 to 8 tokens.
    force_hopper_gemv(monkeypatch, "prefetch", "bulk copies", BITLAB_CUDA_PREFETCH_MT=mt)
    cfg, kernel, dtype = per_channel_setup(kernels, bits, act)
    shapes = ((300, 9000), (40, 700), (7, 7)) if bits != 8 else ((300, 2600), (40, 700), (7, 7))
    check_against_reference(kernel, cfg, bits, act, shapes, (1, 3, 8), dtype)


@pytest.mark.parametrize("act", ["float16", "int8", "binary"])
def test_batch_zero_and_non_contiguous_input(kernels, act):
    bits = 1 if act == "binary" else 1.58
    cfg = BitQuantConfig(weight_bits=bits, activation_dtype=act, activation_granularity="per_token")
    kernel = kernels.KERNELS[("float16", "int8", "binary").index(act)]()
    packed = make_packed(bits, "per_tensor", 37, 300)
    prepared = kernel.prepare(packed, cfg)
    empty = kernel.forward(torch.randn(0, 300, device="cuda", dtype=torch.float16), prepared)
    assert empty.shape == (0, 37)
    big = torch.randn(600, 9, device="cuda", dtype=torch.float16)
    x = big.t()[:, :300]  # [9, 300], strides (1, 9): not contiguous
    assert not x.is_contiguous()
    y = kernel.forward(x, prepared)
    ref = REF.forward(x, REF.prepare(packed, cfg))
    assert rel_err(y, ref) < 1e-3
    x_offset = torch.randn(9, 301, device="cuda", dtype=torch.float16)[:, 1:]  # misaligned rows
    assert rel_err(kernel.forward(x_offset, prepared), REF.forward(x_offset, REF.prepare(packed, cfg))) < 1e-3


def test_bad_inputs_are_named_before_the_op(kernels):
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token")
    kernel = kernels.CudaExtInt8Kernel()
    prepared = kernel.prepare(make_packed(1.58, "per_tensor", 37, 300), cfg)
    x = torch.randn(2, 300, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="input is on cpu"):
        kernel.forward(x.cpu(), prepared)
    with pytest.raises(ValueError, match="x dtype torch.float64"):
        kernel.forward(x.double(), prepared)
    with pytest.raises(ValueError, match="expected in_features=300"):
        kernel.forward(x[:, :299], prepared)
    with pytest.raises(ValueError, match="bias must have out_features=37"):
        kernel.forward(x, prepared, torch.zeros(36, device="cuda"))
    with pytest.raises(ValueError, match="activation: got 'gelu'"):
        kernel.forward(x, prepared, None, "gelu")


@pytest.mark.parametrize("act", ["float16", "int8"])
def test_cuda_graph_capture(kernels, gemv, act):
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype=act, activation_granularity="per_token")
    kernel = kernels.CudaExtFloatKernel() if act == "float16" else kernels.CudaExtInt8Kernel()
    packed = make_packed(1.58, "per_channel", 300, 520)
    prepared = kernel.prepare(packed, cfg)
    for m in (1, 8, 40):
        static_x = torch.randn(m, 520, device="cuda", dtype=torch.float16)
        kernel.forward(static_x, prepared)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = kernel.forward(static_x, prepared)
        fresh = torch.randn(m, 520, device="cuda", dtype=torch.float16)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        expected = kernel.forward(fresh, prepared)
        assert torch.equal(static_y, expected)


def test_torch_compile_traces_the_op(kernels):
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float16")
    kernel = kernels.CudaExtFloatKernel()
    packed = make_packed(1.58, "per_tensor", 64, 256)
    prepared = kernel.prepare(packed, cfg)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    compiled = torch.compile(lambda t: kernel.forward(t, prepared) * 2, fullgraph=True)
    assert torch.equal(compiled(x), kernel.forward(x, prepared) * 2)


@pytest.mark.parametrize("act_mode", [0, 2, 3])
def test_opcheck(kernels, act_mode):
    from backends.cuda_ext import layout, ops

    bits = 1 if act_mode == 3 else 1.58
    packed = make_packed(bits, "per_channel", 40, 200)
    if act_mode == 3:
        wq = layout.xnor_bits(packed)
    else:
        wq = layout.lane_tiles(packed, "float" if act_mode == 0 else "int8")
    x = torch.randn(5, 200, device="cuda", dtype=torch.float16)
    args = (x, wq, packed.scale, torch.randn(40, device="cuda"), layout.FORMAT_CODE[bits], act_mode, 1, 40, 200,
            torch.float16)
    torch.library.opcheck(torch.ops.bitlab.cuda_ext_linear.default, args)


@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_pre_quantized_input_equals_forward(kernels, gemv, bits, act_gran):
    # forward_quantized with the reference quantizer's output computes what forward computes
    # (which quantizes inside), bit for bit, on the GEMV and GEMM paths; bad inputs are named.
    from bitcore.quantize import quantize_activation_int8

    cfg = BitQuantConfig(weight_bits=bits, activation_dtype="int8", weight_granularity="per_channel",
                         activation_granularity=act_gran)
    kernel = kernels.CudaExtInt8Kernel()
    packed = make_packed(bits, "per_channel", 130, 257)
    prepared = kernel.prepare(packed, cfg)
    assert kernel.accepts_quantized(prepared)
    bias = torch.randn(130, device="cuda")
    for m in (1, 5, 16, 40):
        x = torch.randn(m, 257, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_activation_int8(x, act_gran)
        y = kernel.forward_quantized(xq, xs, prepared, bias, "relu", torch.bfloat16)
        assert torch.equal(y, kernel.forward(x, prepared, bias, "relu")), m
    with pytest.raises(ValueError, match="xq must be int8"):
        kernel.forward_quantized(x, xs, prepared)
    with pytest.raises(ValueError, match="x_scale must be float32"):
        kernel.forward_quantized(xq, torch.ones(3, device="cuda"), prepared)
    from backends.cuda_ext import ops

    torch.library.opcheck(torch.ops.bitlab.cuda_ext_linear_int8.default,
                          (xq, xs.reshape(-1), prepared.wq, prepared.scale, bias, prepared.fmt, 1, 130, 257,
                           torch.float16))
    assert ops.EPILOGUE_CODE["relu"] == 1


def test_route_names_the_gemv_it_runs(kernels, monkeypatch):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    big = make_packed(1.58, "per_channel", 6 * sms * 16, 4096)  # 6 tiles per multiprocessor, K = 4096
    short_k = make_packed(1.58, "per_channel", 6 * sms * 16, 2560)
    fk, ik = kernels.CudaExtFloatKernel(), kernels.CudaExtInt8Kernel()
    fcfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float16", weight_granularity="per_channel")
    icfg = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", weight_granularity="per_channel")
    hopper = torch.cuda.get_device_capability(0)[0] >= 9
    fbig = fk.prepare(big, fcfg)
    assert fk.route(1, fbig).endswith("gemv_prefetch" if hopper else "gemv_oneshot")
    assert fk.route(16, fbig).endswith("gemv_cluster" if hopper else "gemv_oneshot")
    assert fk.route(2, fbig).endswith("gemv_prefetch" if hopper else "gemv_oneshot")
    assert ik.route(9, ik.prepare(big, icfg)).endswith("gemv_cluster" if hopper else "gemv_oneshot")
    assert ik.route(8, ik.prepare(big, icfg)).endswith("gemv_oneshot")
    long_rows_int8 = ik.prepare(make_packed(1.58, "per_channel", 1024, 8192), icfg)
    assert ik.route(16, long_rows_int8).endswith("gemv_oneshot")  # int8: K alone does not take it
    small = fk.prepare(make_packed(1.58, "per_channel", 1024, 4096), fcfg)
    assert fk.route(16, small).endswith("gemv_oneshot")  # few tiles and K < 6144
    assert fk.route(8, small).endswith("gemv_oneshot")
    long_rows = fk.prepare(make_packed(1.58, "per_channel", 1024, 6144), fcfg)
    assert fk.route(16, long_rows).endswith("gemv_cluster" if hopper else "gemv_oneshot")
    assert fk.route(8, long_rows).endswith("gemv_oneshot")
    assert fk.route(1, fk.prepare(short_k, fcfg)).endswith("gemv_prefetch" if hopper else "gemv_oneshot")
    assert ik.route(1, ik.prepare(big, icfg)).endswith("gemv_oneshot")
    assert fk.route(17, fbig).endswith("gemv_cluster" if hopper else "gemm")
    assert fk.route(65, fbig).endswith("gemm_cublas" if hopper else "gemm")
    long_packed = make_packed(1.58, "per_channel", 64, 40000)  # past the cluster GEMV's K
    long_k = fk.prepare(long_packed, fcfg)
    assert fk.route(16, long_k).endswith("gemv_oneshot")
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "cluster")
    assert fk.route(16, long_k).endswith("gemv_oneshot")
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "oneshot")
    assert fk.route(1, fbig).endswith("gemv_oneshot")
    # the route agrees with the kernel: every GEMV computes the same result for this weight
    for tokens in (1, 16):
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.float16)
        monkeypatch.setenv("BITLAB_CUDA_GEMV", "oneshot")
        oneshot = fk.forward(x, fbig)
        monkeypatch.delenv("BITLAB_CUDA_GEMV")
        assert rel_err(fk.forward(x, fbig), oneshot) < 1e-3
    monkeypatch.setenv("BITLAB_CUDA_GEMV", "cluster")  # forced, but K is too long: the one-shot kernel runs
    long_x = torch.randn(16, 40000, device="cuda", dtype=torch.float16)
    assert rel_err(fk.forward(long_x, long_k), REF.forward(long_x, REF.prepare(long_packed, fcfg))) < 1.5e-3


def test_registry_prefers_cuda_ext_on_cuda(kernels):
    from bitcore.kernels import KernelRegistry

    for act in ("float16", "bfloat16", "int8"):
        cfg = BitQuantConfig(weight_bits=1.58, activation_dtype=act, weight_granularity="per_channel")
        assert KernelRegistry.get_kernel_for_config(cfg, "cuda").backend == "cuda_ext"
    grouped = BitQuantConfig(weight_bits=1.58, activation_dtype="float16", weight_granularity="per_group")
    assert KernelRegistry.get_kernel_for_config(grouped, "cuda").backend != "cuda_ext"
