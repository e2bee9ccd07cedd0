"""Rows of a pinned host table gathered by GPU indices (``bitlab::cuda_ext_gather_host_rows``): equal to
indexing the table, in eager mode and in a CUDA graph; bad inputs named (those checks run without a GPU)."""
import pytest
import torch

from backends.cuda_ext import host_embedding


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,width", [(1000, 48), (7, 5), (128256 // 64, 2560), (3, 1)])
def test_gathered_rows_equal_the_table(cuda_ext_ops, dtype, rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    emb = host_embedding.HostEmbedding(torch.randn(rows, width, generator=gen).to(dtype))
    for shape in ((1,), (3, 1), (2, 9)):
        ids = torch.randint(0, rows, shape, generator=gen)
        got = emb(ids.cuda())
        assert got.is_cuda and got.shape == (*shape, width) and got.dtype == dtype
        assert torch.equal(got.cpu(), emb.table[ids])
    assert torch.equal(emb(torch.tensor([0, rows - 1], device="cuda")).cpu(), emb.table[[0, rows - 1]])


@pytest.mark.gpu
def test_lookup_replays_in_a_cuda_graph(cuda_ext_ops):
    emb = host_embedding.HostEmbedding(torch.randn(300, 2560).to(torch.bfloat16))
    ids = torch.randint(0, 300, (4,), device="cuda")
    emb(ids)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = emb(ids)
    for _ in range(3):
        ids.copy_(torch.randint(0, 300, (4,)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), emb.table[ids.cpu()])


def test_bad_inputs_are_named():
    table = torch.randn(4, 8)
    with pytest.raises(ValueError, match="pinned host memory.*not pinned"):
        host_embedding.gather_host_rows(table, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \[rows, H\]"):
        host_embedding.HostEmbedding(torch.randn(8))
    if torch.cuda.is_available():
        pinned = table.pin_memory()
        with pytest.raises(ValueError, match="ids must be int64 on a CUDA device"):
            host_embedding.gather_host_rows(pinned, torch.zeros(1, dtype=torch.int32, device="cuda"))
        with pytest.raises(ValueError, match="contiguous"):
            host_embedding.gather_host_rows(pinned.t(), torch.zeros(1, dtype=torch.long, device="cuda"))
    assert "already lives in host memory" in host_embedding.status("cpu")
