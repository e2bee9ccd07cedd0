"""Bring tensors into the GPU's L2 cache ahead of use, on a side stream (``bitlab::cuda_ext_prefetch_l2``).

At one token a decode step is a chain of short kernels, each waiting for its input and then for its
weights, with DRAM mostly idle in between; a layer's weights (17 MB at BitNet 2B's shape) fit in the L2 (50 MB
on H100 / H200).  :class:`L2Prefetcher` launches the prefetch kernel for a later layer's tensors on a side
stream forked from the current one, so it runs as a parallel branch (also inside a captured CUDA graph) and
never sits in the chain; :meth:`L2Prefetcher.join` makes the current stream wait for the side stream before
the step ends (graph capture requires the branch to rejoin).

Example::

    pre = L2Prefetcher(device)
    pre.prefetch([w_next_layer, k_cache_next, v_cache_next])   # returns at once
    ...                                                         # the current layer's kernels
    pre.join()
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from backends.cuda_ext import ops


def prefetch_l2(tensors: Iterable[torch.Tensor], in_chain: bool = False) -> None:
    """``torch.ops.bitlab.cuda_ext_prefetch_l2`` on the current stream: request the tensors' bytes into L2.
    ``in_chain``: a programmatic dependent of the kernel before it that completes after it (sm_90)."""
    tensors = [t for t in tensors if t.numel()]
    bad = [t.device for t in tensors if not t.is_cuda]
    if bad:
        raise ValueError(f"prefetch_l2 needs CUDA tensors; got tensors on {bad[0]}")
    if tensors:
        ops._op("cuda_ext_prefetch_l2")(tensors, in_chain)


def distinct_storages(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """One tensor per storage (the whole storage as a flat uint8 view), so views of one weight count once."""
    out, seen = [], set()
    for t in tensors:
        if not t.is_cuda or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        out.append(torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage))
    return out


class L2Prefetcher:
    """Prefetches on one side stream of ``device`` (:meth:`prefetch` forks from the current stream, :meth:`join`
    rejoins it), or with ``in_chain`` on the current stream as a link of its kernel chain."""

    def __init__(self, device, in_chain: bool = False) -> None:
        self.device = torch.device(device)
        self.in_chain = in_chain
        self.side: Optional[torch.cuda.Stream] = None
        self.forked = False

    def prefetch(self, tensors: List[torch.Tensor]) -> None:
        if not tensors:
            return
        if self.in_chain:
            prefetch_l2(tensors, in_chain=True)
            return
        if self.side is None:
            self.side = torch.cuda.Stream(self.device)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            prefetch_l2(tensors)
        self.forked = True

    def join(self) -> None:
        if self.forked:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.forked = False
