"""A decode step's bookkeeping after its tokens are picked, in one kernel (``bitlab::cuda_ext_decode_advance``).

After the sampler, a decode step writes each row's token to the output and to the next input (the pad id for a
row that has stopped), marks rows that produced a stop token, advances the cache slot, and derives the next
step's rotary positions and attention mask from it.  As torch ops that is about a dozen small kernels in the
step's CUDA graph; ``csrc/decode_advance.cu`` does it in one block.  The same bookkeeping in torch ops is
:func:`bitmodels.bitnet.decode_state.advance_torch` (the CPU path, and what the GPU tests compare with).

Example::

    advance(ids, done, pad_id, stop_ids, out, pos, prompt_len, tokens, pad, positions, mask)
"""
from __future__ import annotations

import torch

from backends.cuda_ext import ops


def _fake(ids, done, pad_id, stop_ids, out, pos, prompt_len, tokens, pad, positions, mask):
    return None


def register_fake() -> None:
    torch.library.register_fake("bitlab::cuda_ext_decode_advance")(_fake)


def check_inputs(ids, done, pad_id, stop_ids, out, pos, tokens, pad, positions, mask) -> None:
    """ValueError naming the first tensor that the kernel cannot take.

    The op checks the same in C++, but on the GPU machine's torch 2.11 build a failing shape check there crashed
    the process instead of raising (dtype checks raised), so the wrapper checks first, as the other cuda_ext
    wrappers do."""
    if not ids.is_cuda:
        raise ValueError(f"ids (and every other tensor) must be on a CUDA device, got {ids.device}")
    rows = ids.numel()
    if not 1 <= rows <= 2**30:
        raise ValueError(f"ids must hold 1 to 2^30 rows, got shape {tuple(ids.shape)}")
    wanted = [("ids", ids), ("pad_id", pad_id), ("stop_ids", stop_ids), ("out", out), ("pos", pos),
              ("tokens", tokens), ("pad", pad), ("positions", positions)]
    for name, t in wanted + [("done", done), ("mask", mask)]:
        dtype, dtype_name = (torch.bool, "bool") if name in ("done", "mask") else (torch.int64, "int64")
        if t.dtype != dtype or t.device != ids.device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype_name} tensor on {ids.device}, got {t.dtype} on "
                             f"{t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")
    if pad_id.numel() != 1 or pos.numel() != 1:
        raise ValueError(f"pad_id and pos must hold one value each, got {pad_id.numel()} and {pos.numel()}")
    per_row = {"done": done, "tokens": tokens, "pad": pad, "positions": positions}
    if any(t.numel() != rows for t in per_row.values()):
        got = ", ".join(f"{name} {t.numel()}" for name, t in per_row.items())
        raise ValueError(f"done, tokens, pad and positions must hold one value per row ({rows}), got {got}")
    if (out.dim() != 2 or out.shape[0] != rows or mask.dim() < 2 or mask.shape[0] != rows or mask.shape[-1] < 1
            or mask.numel() != rows * mask.shape[-1]):
        raise ValueError(f"out must be [{rows}, columns] and mask [{rows}, slots], got {tuple(out.shape)} and "
                         f"{tuple(mask.shape)}")


def advance(ids, done, pad_id, stop_ids, out, pos, prompt_len: int, tokens, pad, positions, mask) -> None:
    """``bitmodels.bitnet.decode_state.advance_torch`` in one kernel on the GPU; int64 tensors except ``done`` and
    ``mask`` (bool), all contiguous on one CUDA device (:func:`check_inputs` names what is not)."""
    check_inputs(ids, done, pad_id, stop_ids, out, pos, tokens, pad, positions, mask)
    ops._op("cuda_ext_decode_advance")(ids, done, pad_id, stop_ids, out, pos, int(prompt_len), tokens, pad,
                                       positions, mask)
