"""Threads of a decode step on a CPU: torch's small ops on one thread, the weight-bound kernels on all cores.

On a CPU the step's projections run in the cpp_cpu kernels, which have their own thread pool, and its small
torch ops (norms, rotary, the attention over the cache) run on torch's OpenMP threads.  After every parallel
torch op those threads keep spinning for a while, and the kernels' pool then waits for a core.  Measured on the
2-core development machine (BitNet 2B shape, batch 1, 4-bit head on int8 activations,
``benchmarks/bench_bitnet_cpu.py``): 86.9 ms per token with both on two threads, 69.8 ms with torch's ops on one
thread and the kernels on two (with the bf16 head, whose matmul needs torch's threads anyway: 98.4 -> 94.4).  So :class:`DecodeThreads`
runs the decode loop that way; the dense lm_head (a torch matmul that needs every core) runs on torch's full
count (:class:`HeadOnAllThreadsOps`).  ``BITLAB_CPU_DECODE_THREADS=torch`` leaves torch's setting alone (A/B).

Inside the loop the kernels' helper threads also spin between calls for ``DECODE_SPIN_US`` instead of sleeping
after ~40 us (:func:`backends.cpp_cpu.threads.pool_spin`): a step's torch ops on one thread leave them a core, and
a sleeping helper woke too late to share a projection (90.2 -> 78.2 ms per token with the bf16 head,
``bench_bitnet_cpu.py``'s ``bitlab_short_spin`` row against ``bitlab``).  Around a dense head, whose matmul needs
that core for torch's threads, the spin is 0.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Tuple

import torch

SWITCH = "BITLAB_CPU_DECODE_THREADS"


def split_status(model, device: torch.device) -> Tuple[bool, str]:
    """Whether a decode loop on ``device`` splits the threads, and what runs (with the reason)."""
    if device.type != "cpu":
        return False, f"torch's own setting ({device.type} device)"
    if os.environ.get(SWITCH, "") == "torch":
        return False, f"torch's own setting ({SWITCH}=torch)"
    kernels = {getattr(getattr(b, "kernel", None), "name", "") for layer in model.model.layers
               for b in layer.bound.values()}
    if not any(name.startswith("cpp_cpu.") for name in kernels):
        return False, "torch's own setting (no projection runs on cpp_cpu)"
    return True, ("torch ops on 1 thread, cpp_cpu kernels and the dense lm_head on torch's count "
                  "(OpenMP threads spinning after torch's ops would take the kernels' cores)")


class DecodeThreads:
    """Context for a decode loop: pins the cpp_cpu kernels to torch's thread count and sets torch's to one,
    restoring both on exit.  ``threads`` holds the count inside the block (None outside or when not split)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.threads: Optional[int] = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        n = torch.get_num_threads()
        if not self.enabled or n < 2:
            yield
            return
        from backends.cpp_cpu.threads import DECODE_SPIN_US, pinned_threads, pool_spin

        with pinned_threads(n), pool_spin(DECODE_SPIN_US):
            self.threads = n
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(n)
                self.threads = None


class HeadOnAllThreadsOps:
    """An ops set whose ``head`` runs on all of torch's threads while :class:`DecodeThreads` holds torch at one;
    the other operations are the base set's."""

    def __init__(self, base, decode_threads: DecodeThreads) -> None:
        self.base = base
        self.decode_threads = decode_threads
        self.norm_input, self.add_rms_norm = base.norm_input, base.add_rms_norm
        self.relu2_gate_norm, self.attention = base.relu2_gate_norm, base.attention

    def head(self, linear, x):
        n = self.decode_threads.threads
        if n is None:
            return self.base.head(linear, x)
        from backends.cpp_cpu.threads import pool_spin

        torch.set_num_threads(n)
        try:
            if not isinstance(linear, torch.nn.Module):  # a quantized head: a cpp_cpu kernel call like the rest
                return self.base.head(linear, x)
            with pool_spin(0):  # the dense head's matmul: the kernels' helpers leave the core to torch's threads
                return self.base.head(linear, x)
        finally:
            torch.set_num_threads(1)
