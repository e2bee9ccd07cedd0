"""How many threads the cpp_cpu kernels run on.

By default they follow ``torch.get_num_threads()`` at every call.  :func:`pinned_threads` fixes the count for a
block of code, whatever torch's own setting is meanwhile: a CPU decode loop runs torch's small ops on one thread
and the kernels on all cores (see :mod:`bitmodels.bitnet.cpu_threads` for why).

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
