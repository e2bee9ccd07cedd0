"""Thread-safety repair for numba's CUDA simulator, applied only when the simulator is on.

The simulator runs every thread of a block as a Python thread and creates a block's
shared array when the first thread reaches the allocating line, keyed by that line, with
an unlocked look-up-then-insert.  A thread switch between the two steps hands two threads
different arrays, and a reduction through shared memory then reads uninitialised memory
(seen as rare wrong results in CI; forced with ``sys.setswitchinterval(1e-6)``).  This
module replaces that method with one that does the same keyed allocation under a lock.
"""
from __future__ import annotations

import sys
import threading
import traceback

import numpy as np


def serialize_shared_allocation() -> None:
    """Make ``cuda.shared.array`` in the simulator allocate under a lock (idempotent)."""
    from numba.core import types
    from numba.np import numpy_support
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    if getattr(FakeCUDAShared.array, "_bitlab_locked", False):
        return
    unlocked = FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one preallocated buffer, nothing to race on
            return unlocked(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[0][0:2])  # (file, line)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    array._bitlab_locked = True
    FakeCUDAShared.array = array
