"""The device buffers a decode step reads and writes, and the step's bookkeeping after its tokens are picked.

A decode step (:class:`bitmodels.bitnet.generate.Generator`) reads the current tokens, the cache slot, and the
rotary positions and attention mask from a :class:`DecodeState`, and after the sampler advances them all:
:func:`advance_torch` in torch ops, or ``backends.cuda_ext.decode_advance.advance`` (the same in one kernel)
where :func:`use_advance_kernel` finds cuda_ext.  A CUDA graph of the step is bound to these buffers.

Example::

    st = DecodeState(cache, prompt_len=12, max_new=32, stop_ids=[2], pad_id=0, device="cuda")
    advance, why = use_advance_kernel("cuda")
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence, Tuple

import torch

from bitmodels.bitnet.ops import cuda_ext_or_torch

if TYPE_CHECKING:
    from bitmodels.bitnet.generate import KVCache

WARMUP_STEPS = 2  # eager steps before a graph capture: compile, cuBLAS handles, allocator pools


class DecodeState:
    """Device buffers a decode step reads and writes; a captured graph is bound to them."""

    def __init__(self, cache: "KVCache", prompt_len: int, max_new: int, stop_ids: Sequence[int], pad_id: int,
                 device) -> None:
        batch, _, seq, _ = cache.shape
        self.cache = cache
        self.prompt_len = prompt_len
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # cache slot the next token is written to
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # left padding of each row
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, max_new + WARMUP_STEPS + 1, dtype=torch.long, device=device)
        self.key_index = torch.arange(seq, device=device)
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        self.pad_id = torch.tensor(pad_id, dtype=torch.long, device=device)
        # the next step's rotary positions and attention mask, written when the slot advances
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)

    def refresh_inputs(self) -> None:
        """The next step's positions and mask from ``pos`` and ``pad`` (after a prefill)."""
        self.positions.copy_((self.pos - self.pad).unsqueeze(1))
        self.mask.copy_((self.key_index[None, :] >= self.pad[:, None]) & (self.key_index[None, :] <= self.pos))

    @property
    def mutable(self) -> tuple:
        """What a decode step writes (saved around a graph capture's warm-up steps; ``out`` is rewritten)."""
        return self.tokens, self.pos, self.done, self.positions, self.mask


def advance_torch(ids, done, pad_id, stop_ids, out, pos, prompt_len: int, tokens, pad, positions, mask) -> None:
    """A decode step's bookkeeping after its tokens ``ids [B]`` are picked, in place, in torch ops:
    ``t = where(done, pad_id, ids)`` goes to ``out[:, pos - prompt_len + 1]`` and ``tokens``; ``done |= t in
    stop_ids``; ``pos += 1``; then the next step's ``positions = pos - pad`` and ``mask = pad <= slot <= pos``.
    (``backends.cuda_ext.decode_advance.advance`` is the same in one kernel.)"""
    batch = ids.shape[0]
    nxt = torch.where(done, pad_id, ids)
    out.index_copy_(1, (pos - prompt_len + 1).view(1), nxt.view(batch, 1))
    done.logical_or_((nxt[:, None] == stop_ids[None, :]).any(dim=-1))
    tokens.copy_(nxt)
    pos.add_(1)
    # written in place, no per-step allocation: the same kernels the step ran before the one-kernel form
    torch.sub(pos, pad, out=positions.view(-1))
    slots = _slots(mask.shape[-1], mask.device)
    torch.logical_and(slots[None, :] >= pad[:, None], slots[None, :] <= pos, out=mask.view(pad.shape[0], -1))


_SLOT_INDEX = {}


def _slots(n: int, device) -> torch.Tensor:
    """``arange(n)`` on ``device``, made once (a decode step reads it every step; a graph keeps its address)."""
    key = (n, torch.device(device))
    if key not in _SLOT_INDEX:
        _SLOT_INDEX[key] = torch.arange(n, device=device)
    return _SLOT_INDEX[key]


def use_advance_kernel(device) -> Tuple[Callable, str]:
    """The decode step's bookkeeping for ``device``: cuda_ext's one kernel where it runs (``BITLAB_DECODE_ADVANCE
    =torch`` keeps the torch ops, for A/B timing), else :func:`advance_torch`; and what runs it, with the reason."""

    def load():
        from backends.cuda_ext.decode_advance import advance

        return advance

    return cuda_ext_or_torch(device, "BITLAB_DECODE_ADVANCE", advance_torch, "torch", load,
                             "cuda_ext.decode_advance, one kernel")
