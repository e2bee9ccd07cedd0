"""The one-kernel argmax (bitlab::cuda_ext_argmax_rows) against torch.argmax, on a CUDA device (skipped where
there is none): torch's index exactly, ties, -inf rows, NaN, strided and unaligned rows included, in both of
the kernel's layouts (a block per row; a cluster of blocks per row on sm_90)."""
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def argmax_rows(cuda_ext_ops):
    from backends.cuda_ext.argmax import argmax_rows

    return argmax_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4097, 32001, 128256])
def test_matches_torch_argmax(argmax_rows, dtype, vocab):
    gen = torch.Generator(device="cuda").manual_seed(vocab)
    for rows in (1, 3, 64):
        spread = torch.randn(rows, vocab, device="cuda", generator=gen).to(dtype)
        ties = torch.randint(-3, 3, (rows, vocab), device="cuda", generator=gen).to(dtype)  # maxima repeat
        for x in (spread, ties):
            got = argmax_rows(x)
            assert got.dtype == torch.long and got.shape == (rows,)
            assert torch.equal(got, torch.argmax(x, dim=-1)), (dtype, vocab, rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [5003, 5000, 128256])  # the scalar path, then the vector path
def test_special_values_give_torchs_index(argmax_rows, dtype, V):
    x = torch.randn(6, V, device="cuda").to(dtype)
    x[0] = float("-inf")  # all -inf: index 0
    x[1] = float("-inf")
    x[1, V - 1] = -1e30 if dtype == torch.float32 else -1e20  # the only finite value is the last one
    x[2, 17] = float("nan")  # NaN wins over any number
    x[3, 4000] = float("nan")
    x[3, 11] = float("nan")  # the first NaN wins
    x[4, 123] = float("inf")
    x[4, 4999] = float("inf")  # the first +inf
    x[5] = 2.5  # a constant row: index 0
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))


def test_strided_and_unaligned_rows(argmax_rows):
    base = torch.randn(4, 3 * 4099, device="cuda", dtype=torch.bfloat16)
    strided = base[:, 5:4104]  # row stride 12297 elements, the rows start off any 16-byte boundary
    assert torch.equal(argmax_rows(strided), torch.argmax(strided, dim=-1))
    logits = torch.randn(3, 1, 128256, device="cuda", dtype=torch.bfloat16)[:, -1]  # a decode step's last position
    assert torch.equal(argmax_rows(logits), torch.argmax(logits, dim=-1))
    columns = base.t()[:7]  # columns not contiguous: copied first
    assert torch.equal(argmax_rows(columns), torch.argmax(columns, dim=-1))
    tail = torch.randn(4, 4104, device="cuda", dtype=torch.bfloat16)[:, :4099]  # vector rows, a tail of three
    assert torch.equal(argmax_rows(tail), torch.argmax(tail, dim=-1))
    tail[2, 4098] = 100.0  # the maximum in the tail
    assert torch.equal(argmax_rows(tail), torch.argmax(tail, dim=-1))
    one = torch.randn(1, 5, device="cuda").t()  # V = 1 with a column stride of 5
    assert torch.equal(argmax_rows(one), torch.zeros(5, dtype=torch.long, device="cuda"))


def _slice_starts(V: int, itemsize: int, vector: bool) -> list:
    """Where the cluster layout's slices start (csrc/argmax.cu: whole 16-byte loads per slice)."""
    per_load = 16 // itemsize if vector else 1
    units = V // per_load
    per = -(-units // 8)
    return [min(r * per, units) * per_load for r in range(1, 8)]


@pytest.mark.parametrize("layout", ["block", "cluster"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_layouts_give_torchs_index(argmax_rows, monkeypatch, layout, dtype):
    if layout == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    monkeypatch.setenv("BITLAB_CUDA_ARGMAX", layout)
    gen = torch.Generator(device="cuda").manual_seed(11)
    itemsize = torch.empty((), dtype=dtype).element_size()
    for V, width in ((1, 1), (7, 7), (100, 104), (4099, 4104), (16033, 16040), (128256, 128256), (128259, 128264)):
        x = torch.randn(5, width, device="cuda", generator=gen).to(dtype)[:, :V]
        vector = (width * itemsize) % 16 == 0
        starts = [s for s in _slice_starts(V, itemsize, vector) if 0 < s < V]
        if starts:
            s = starts[len(starts) // 2]
            x[1, s - 1] = x[1, s] = 50.0  # equal maxima on both sides of a slice boundary: the first wins
            x[2, starts[-1]] = float("nan")  # a NaN in a later slice and one in an earlier: the first wins
            x[2, starts[0] - 1] = float("nan")
        x[3] = float("-inf")  # all -inf: index 0
        x[4, V - 1] = 1e4  # the maximum is the last value (the last slice's tail past the whole loads)
        got = argmax_rows(x)
        assert torch.equal(got, torch.argmax(x, dim=-1)), (layout, dtype, V, got.tolist())
        for rows in (1, 40):  # one row; more rows than the cluster layout takes unforced
            y = torch.randn(rows, V, device="cuda", generator=gen).to(dtype)
            assert torch.equal(argmax_rows(y), torch.argmax(y, dim=-1)), (layout, dtype, V, rows)


def test_bad_input_is_named(argmax_rows):
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        argmax_rows(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[B, V\] with V >= 1"):
        argmax_rows(torch.randn(2, 3, 5, device="cuda"))
    with pytest.raises(ValueError, match=r"\[B, V\] with V >= 1"):
        argmax_rows(torch.randn(2, 0, device="cuda"))
    with pytest.raises(ValueError, match="torch.int32 is not served"):
        argmax_rows(torch.ones(2, 5, device="cuda", dtype=torch.int32))
    x = torch.randn(2, 300, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.bitlab.cuda_ext_argmax_rows.default, (x,))


def test_replays_in_a_cuda_graph(argmax_rows):
    x = torch.randn(2, 128256, device="cuda", dtype=torch.bfloat16)
    argmax_rows(x)  # load and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = argmax_rows(x)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, torch.argmax(x, dim=-1))


def test_greedy_decoding_uses_it(cuda_ext_ops):
    from bitmodels.bitnet.sampling import SamplingConfig, sample, use_argmax_kernel

    argmax, why = use_argmax_kernel("cuda")
    assert why.startswith("cuda_ext.argmax_rows")
    logits = torch.randn(4, 128256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(sample(logits, SamplingConfig(), argmax), torch.argmax(logits, dim=-1))
