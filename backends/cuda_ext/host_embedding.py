"""An embedding table kept in pinned host memory, looked up by the GPU (``bitlab::cuda_ext_gather_host_rows``).

A decode step reads a few rows of the table (one per token), so the table need not take GPU memory: the
kernel (``csrc/host_gather.cu``) reads those rows over the bus through the table's mapped address.  The
lookup is one kernel on the current stream, so a CUDA graph captures it; values are the table's, bit for
bit (a copy, no arithmetic).

Example::

    emb = HostEmbedding(model.embed_tokens.weight)   # pinned copy on the host
    h = emb(input_ids)                               # input_ids on the GPU -> rows on the GPU
"""
from __future__ import annotations

import torch

from backends.cuda_ext import ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fake(table, ids):
    return ids.new_empty((*ids.shape, table.shape[1]), dtype=table.dtype)


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_gather_host_rows")(_fake)


def status(device) -> str:
    """Empty string when the lookup can run for ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the model is on {device}: its embedding already lives in host memory"
    avail = ops.availability()
    return "" if avail else f"cuda_ext is unavailable: {avail.reason}"


def gather_host_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` on ``ids``' device, for ``table`` in pinned host memory; names bad input first."""
    if table.device.type != "cpu" or not table.is_pinned():
        raise ValueError(f"gather_host_rows: table must be in pinned host memory, got {table.device}"
                         + (" (not pinned)" if table.device.type == "cpu" else ""))
    if table.dim() != 2 or not table.is_contiguous() or table.dtype not in DTYPES:
        raise ValueError(f"gather_host_rows: table must be a contiguous [rows, H] tensor in one of {DTYPES}; got "
                         f"{tuple(table.shape)} {table.dtype}")
    if ids.device.type != "cuda" or ids.dtype != torch.long:
        raise ValueError(f"gather_host_rows: ids must be int64 on a CUDA device, got {ids.dtype} on {ids.device}")
    return ops._op("cuda_ext_gather_host_rows")(table, ids)


class HostEmbedding:
    """Lookup of ``weight``'s rows from a pinned host copy; ``__call__(ids)`` returns them on ``ids``' device."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"HostEmbedding: weight must be [rows, H], got {tuple(weight.shape)}")
        self.table = weight.detach().to("cpu").contiguous().pin_memory()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return gather_host_rows(self.table, ids)

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()
