"""The L2 prefetch op (csrc/prefetch_l2.cu): leaves every byte as it was, runs inside a CUDA graph on a side
branch, takes views and odd sizes, and names bad input."""
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def l2(cuda_ext_ops):
    from backends.cuda_ext import l2_prefetch

    return l2_prefetch


def test_prefetch_changes_nothing_and_takes_odd_ranges(l2):
    big = torch.randn(5_000_001, device="cuda")  # not a multiple of the 64 KB piece
    odd = torch.randint(0, 255, (1, 33), dtype=torch.uint8, device="cuda")[:, 1:]  # unaligned view, 32 bytes
    many = [torch.randn(17, device="cuda") for _ in range(40)]  # more than 16 ranges: several launches
    before = [t.clone() for t in (big, odd, *many)]
    l2.prefetch_l2([big, odd, *many, torch.empty(0, device="cuda")])
    l2.prefetch_l2([big, odd], in_chain=True)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, (big, odd, *many)))


def test_prefetcher_in_a_cuda_graph(l2):
    w = torch.randn(4096, 1024, device="cuda")
    x = torch.randn(8, 1024, device="cuda")
    pre = l2.L2Prefetcher(x.device)
    pre.prefetch([w])  # the side stream and cuBLAS exist before capture, as after a model's warm-up steps
    pre.join()
    x @ w.T
    torch.cuda.synchronize()
    ranges = l2.distinct_storages([w, w[:10]])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pre.prefetch(ranges)
        y = x @ w.T
        pre.join()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, x @ w.T)


def test_prefetch_names_cpu_tensors(l2):
    with pytest.raises(ValueError, match="CUDA tensors"):
        l2.prefetch_l2([torch.zeros(4)])


def test_distinct_storages_counts_views_once(l2):
    w = torch.randn(64, 64, device="cuda")
    out = l2.distinct_storages([w, w[3:], w.T, torch.randn(3, device="cuda"), torch.zeros(2)])
    assert [t.numel() for t in out] == [64 * 64 * 4, 3 * 4]
