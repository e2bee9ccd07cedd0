"""How many threads the cpp_cpu kernels run on, and how long their idle threads wait awake.

By default they follow ``torch.get_num_threads()`` at every call.  :func:`pinned_threads` fixes the count for a
block of code, whatever torch's own setting is meanwhile: a CPU decode loop runs torch's small ops on one thread
and the kernels on all cores (see :mod:`bitmodels.bitnet.cpu_threads` for why).

Between calls the kernels' helper threads spin for a while, then sleep; waking a sleeping one takes longer than a
small projection, so the caller ends up doing the call alone.  :func:`pool_spin` sets that spin for a block: long
where torch's own ops run on one thread meanwhile (a decode loop), short elsewhere (the default, ~40 us), because a
spinning helper takes the core that torch's OpenMP threads need for a parallel op.

Example::

    with pinned_threads(4):
        torch.set_num_threads(1)   # torch's ops now run on one thread, the cpp_cpu kernels on four
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from backends.cpp_cpu.kernels import load_ops

_lock = threading.Lock()
_pinned = 0  # what the extension was last told (0: follow torch)

# The spin a decode loop sets (pool_spin): longer than the gaps between a step's projections (torch ops on one
# thread, 0.1-1 ms) and between steps.  BitNet 2B on the 2-core development machine, decode ms per token with the
# default ~40 us spin against this one: 90.2 -> 78.2 (bf16 head; benchmarks/bench_bitnet_cpu.py, same run).
DECODE_SPIN_US = 2000


def kernel_threads() -> int:
    """The thread count the next cpp_cpu kernel call will use."""
    load_ops()
    return int(torch.ops.bitlab.cpu_threads())


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[int]:
    """Run the cpp_cpu kernels on ``n`` threads inside the block (restored on exit, exceptions included)."""
    global _pinned
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"pinned_threads: n must be a positive int, got {n!r}")
    load_ops()
    with _lock:
        before, _pinned = _pinned, n
        torch.ops.bitlab.cpu_set_threads(n)
    try:
        yield n
    finally:
        with _lock:
            _pinned = before
            torch.ops.bitlab.cpu_set_threads(before)


def pool_spin_us() -> int:
    """How long, in microseconds, the kernels' idle helper threads now spin before sleeping."""
    load_ops()
    return int(torch.ops.bitlab.cpu_pool_spin())


@contextlib.contextmanager
def pool_spin(us: int) -> Iterator[int]:
    """Let the kernels' idle helper threads spin ``us`` microseconds for the next call before sleeping, inside
    the block (0: sleep at once; restored on exit, exceptions included).  A helper already spinning re-reads the
    setting, so lowering it frees the core at once."""
    if isinstance(us, bool) or not isinstance(us, int) or us < 0:
        raise ValueError(f"pool_spin: us must be a non-negative int, got {us!r}")
    load_ops()
    before = int(torch.ops.bitlab.cpu_set_pool_spin(us))
    try:
        yield us
    finally:
        torch.ops.bitlab.cpu_set_pool_spin(before)
