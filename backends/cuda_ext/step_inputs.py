"""A decode step's input rows in one kernel (``bitlab::cuda_ext_gather_step_inputs``).

Every step starts by looking up, for each token, its embedding row and its rotary cos / sin rows.  As torch
ops that is three kernels (an ``index_select`` and two index kernels, plus a cast where the rotary table is
float32) at the head of the step's CUDA graph, each costing more launch latency than work at batch 1.  The
kernel (``csrc/host_gather.cu``) copies all three sets of rows in one launch; the embedding table may sit on
the GPU or in pinned host memory (:mod:`backends.cuda_ext.host_embedding`).  The values are the tables', bit
for bit: the rotary tables are cast to the embedding's dtype once (:func:`rotary_tables_in`), as
``BitNetForCausalLM.rotary`` casts the rows it looks up.

Example::

    h, cos, sin = gather_step_inputs(embedding, ids, cos_table, sin_table, positions)
    # ids, positions [B, T] int64 on the GPU -> h [B, T, H], cos / sin [B, T, D]
"""
from __future__ import annotations

from typing import Tuple

import torch

from backends.cuda_ext import ops


def _fake(table, ids, cos_table, sin_table, positions):
    return (ids.new_empty((*ids.shape, table.shape[1]), dtype=table.dtype),
            positions.new_empty((*positions.shape, cos_table.shape[1]), dtype=cos_table.dtype),
            positions.new_empty((*positions.shape, sin_table.shape[1]), dtype=sin_table.dtype))


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_gather_step_inputs")(_fake)


def gather_step_inputs(table: torch.Tensor, ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                       positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(table[ids], cos_table[positions], sin_table[positions])`` on ``ids``' device in one kernel.  ``table``:
    on that device or in pinned host memory; the rotary tables: on that device, in ``table``'s dtype.  Bad input
    is named before the launch; an index outside a table stops the kernel with a message (as torch's
    embedding does on CUDA)."""
    if ids.device.type != "cuda" or ids.dtype != torch.long:
        raise ValueError(f"gather_step_inputs: ids must be int64 on a CUDA device, got {ids.dtype} on {ids.device}")
    if positions.shape != ids.shape or positions.dtype != torch.long or positions.device != ids.device:
        raise ValueError(f"gather_step_inputs: positions must be int64 on {ids.device} with ids' shape "
                         f"{tuple(ids.shape)}, got {positions.dtype} on {positions.device} {tuple(positions.shape)}")
    if table.device != ids.device and not (table.device.type == "cpu" and table.is_pinned()):
        raise ValueError(f"gather_step_inputs: table must be on {ids.device} or in pinned host memory, got "
                         f"{table.device}" + (" (not pinned)" if table.device.type == "cpu" else ""))
    for name, t in (("cos_table", cos_table), ("sin_table", sin_table)):
        if t.device != ids.device or t.dtype != table.dtype or t.dim() != 2:
            raise ValueError(f"gather_step_inputs: {name} must be [positions, head_dim] on {ids.device} in "
                             f"table's dtype {table.dtype}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    return ops._op("cuda_ext_gather_step_inputs")(table, ids, cos_table, sin_table, positions)

