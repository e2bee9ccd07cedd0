"""The index of each row's maximum on the GPU in one kernel (``bitlab::cuda_ext_argmax_rows``).

Greedy decoding takes ``argmax`` over the vocabulary every step (128256 logits a row for BitNet 2B).  The
kernel (``csrc/argmax.cu``) reads a row with 16-byte loads: on sm_90, for rows of at least 8192 values and
batches whose clusters are all resident at once (``B * 8 <= 4 * multiprocessors``), a cluster of 8 blocks per
row, each taking one slice and block 0 reducing the slices; else one block of 1024 threads per row
(``BITLAB_CUDA_ARGMAX=block`` / ``cluster`` forces one, read per launch).  Its answer is
``torch.argmax(x, dim=-1)``'s: NaN counts as the largest value and among equal maxima the first index wins.

Example::

    ids = argmax_rows(logits)   # logits [B, V] on the GPU -> int64 [B]
"""
from __future__ import annotations

import torch

from backends.cuda_ext import ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fake(x):
    return x.new_empty((x.shape[0],), dtype=torch.long)


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_argmax_rows")(_fake)


def check_argmax_input(x: torch.Tensor) -> None:
    """ValueError naming what :func:`argmax_rows` cannot take (the op checks again)."""
    if not x.is_cuda:
        raise ValueError(f"argmax_rows: x must be on a CUDA device, got {x.device}")
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"argmax_rows: x must be [B, V] with V >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"argmax_rows: x dtype {x.dtype} is not served; expected one of {DTYPES}")


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)`` for ``x [B, V]`` on the GPU, int64 ``[B]`` (rows copied first if strided)."""
    check_argmax_input(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return ops._op("cuda_ext_argmax_rows")(x)
