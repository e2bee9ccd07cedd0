"""A decode step's input rows in one kernel (``bitlab::cuda_ext_gather_step_inputs``): equal to indexing the
embedding and the rotary tables (embedding on the GPU or in pinned host memory), in eager mode and in a CUDA
graph; bad inputs named (the checks before the launch run without a GPU)."""
import pytest
import torch

from backends.cuda_ext.step_inputs import gather_step_inputs


def _tables(rows, width, head_dim, positions, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, width, generator=gen).to(dtype)
    cos, sin = (torch.randn(positions, head_dim, generator=gen).to(dtype).to(device) for _ in range(2))
    return table, cos, sin


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,width,head_dim", [(1000, 48, 8), (7, 5, 3), (128256 // 64, 2560, 128)])
@pytest.mark.parametrize("where", ["gpu", "pinned host"])
def test_gathered_rows_equal_the_tables(cuda_ext_ops, dtype, rows, width, head_dim, where):
    table, cos_t, sin_t = _tables(rows, width, head_dim, 300, dtype, "cuda", rows + width)
    table = table.cuda() if where == "gpu" else table.pin_memory()
    gen = torch.Generator().manual_seed(rows)
    for shape in ((1, 1), (3, 1), (2, 9)):
        ids, pos = torch.randint(0, rows, shape, generator=gen), torch.randint(0, 300, shape, generator=gen)
        h, cos, sin = gather_step_inputs(table, ids.cuda(), cos_t, sin_t, pos.cuda())
        assert h.is_cuda and h.shape == (*shape, width) and h.dtype == dtype
        assert cos.shape == sin.shape == (*shape, head_dim) and cos.dtype == dtype
        assert torch.equal(h.cpu(), table.cpu()[ids])
        assert torch.equal(cos, cos_t[pos.cuda()]) and torch.equal(sin, sin_t[pos.cuda()])
    expanded = torch.arange(4, device="cuda").expand(2, 4)  # positions as the model builds them for a prompt
    ids = torch.tensor([[0, rows - 1, 1, 0], [rows - 1, 0, 0, 1]], device="cuda") % rows
    h, cos, _ = gather_step_inputs(table, ids, cos_t, sin_t, expanded)
    assert torch.equal(h.cpu(), table.cpu()[ids.cpu()]) and torch.equal(cos, cos_t[expanded])


@pytest.mark.gpu
def test_lookup_replays_in_a_cuda_graph(cuda_ext_ops):
    table, cos_t, sin_t = _tables(300, 2560, 128, 4096, torch.bfloat16, "cuda", 5)
    table = table.pin_memory()
    ids = torch.randint(0, 300, (4, 1), device="cuda")
    pos = torch.randint(0, 4096, (4, 1), device="cuda")
    gather_step_inputs(table, ids, cos_t, sin_t, pos)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, cos, sin = gather_step_inputs(table, ids, cos_t, sin_t, pos)
    for _ in range(3):
        ids.copy_(torch.randint(0, 300, (4, 1)))
        pos.copy_(torch.randint(0, 4096, (4, 1)))
        graph.replay()
        assert torch.equal(h.cpu(), table[ids.cpu()])
        assert torch.equal(cos, cos_t[pos]) and torch.equal(sin, sin_t[pos])


def test_bad_inputs_are_named():
    table, cos_t, sin_t = _tables(4, 8, 2, 6, torch.float32, "cpu", 0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="ids must be int64 on a CUDA device"):
        gather_step_inputs(table, ids, cos_t, sin_t, ids)
    if not torch.cuda.is_available():
        return
    ids = ids.cuda()
    cos_t, sin_t = cos_t.cuda(), sin_t.cuda()
    with pytest.raises(ValueError, match="positions must be int64"):
        gather_step_inputs(table.cuda(), ids, cos_t, sin_t, torch.zeros(1, 2, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="pinned host memory.*not pinned"):
        gather_step_inputs(table, ids, cos_t, sin_t, ids)
    with pytest.raises(ValueError, match="cos_table must be .* in table's dtype"):
        gather_step_inputs(table.cuda(), ids, cos_t.half(), sin_t, ids)
    with pytest.raises(RuntimeError, match="contiguous"):
        gather_step_inputs(table.cuda().t(), ids, cos_t, sin_t, ids)
    torch.library.opcheck(torch.ops.bitlab.cuda_ext_gather_step_inputs.default,
                          (table.cuda(), ids, cos_t, sin_t, ids))
