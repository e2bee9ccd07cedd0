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


def advance(ids, done, pad_id, stop_ids, out, pos, prompt_len: int, tokens, pad, positions, mask) -> None:
    """``bitmodels.bitnet.decode_state.advance_torch`` in one kernel on the GPU; int64 tensors except ``done`` and
    ``mask`` (bool), all contiguous on one CUDA device (the op names what is not)."""
    ops._op("cuda_ext_decode_advance")(ids, done, pad_id, stop_ids, out, pos, int(prompt_len), tokens, pad,
                                       positions, mask)
