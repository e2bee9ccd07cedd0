"""GPU timing that any backend's benchmark can reuse: CUDA-graph replay over rotating copies, median.

Why this shape of measurement:

* **CUDA graphs**: a decode-size layer runs for a few microseconds, about as long as a
  launch; capturing ``calls_per_graph`` calls in one graph and timing its replays
  measures the kernels, not Python or launch gaps.
* **rotating copies**: each call in the graph reads a different copy of the weights,
  and the copies together exceed the L2 cache several times, so every call streams
  its weights from device memory as it would in a model.
* **median** over replays, with the 10th / 90th percentiles beside it.

Example::

    copies = n_copies(weight_bytes)
    calls = [functools.partial(layer_fn, w) for w in weight_copies]
    stats = time_graph(calls)          # {"median_us": ..., "p10_us": ..., "mode": "graph"}
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Dict, Sequence

import torch


def l2_bytes(device: int = 0) -> int:
    """L2 cache size of the device (50 MB on an H100 SXM)."""
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


def n_copies(bytes_per_copy: int, factor: float = 3.0, min_copies: int = 2, max_copies: int = 64) -> int:
    """How many copies of a ``bytes_per_copy`` input make the rotation ``factor`` times the L2 size."""
    need = math.ceil(factor * l2_bytes() / max(1, bytes_per_copy))
    return max(min_copies, min(max_copies, need))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def _summary(per_call_us, mode: str) -> Dict[str, Any]:
    s = sorted(per_call_us)
    return {
        "median_us": statistics.median(s),
        "p10_us": _percentile(s, 0.1),
        "p90_us": _percentile(s, 0.9),
        "samples": len(s),
        "mode": mode,
    }


def time_graph(calls: Sequence[Callable[[], Any]], calls_per_graph: int = 32, replays: int = 25,
               warmup: int = 3, allow_eager: bool = True) -> Dict[str, Any]:
    """Median microseconds per call: ``calls`` (one per rotating copy) captured round-robin in a graph.

    Falls back to eager launches timed with events (``mode: "eager"``) when capture fails and
    ``allow_eager`` is set; the caller reports the mode.
    """
    if not calls:
        raise ValueError("time_graph needs at least one call")
    per_graph = max(calls_per_graph, len(calls))
    per_graph = math.ceil(per_graph / len(calls)) * len(calls)
    for fn in calls:  # first use: compilation, autotuning, allocator warm-up
        fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(per_graph):
                calls[i % len(calls)]()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(per_graph):
                calls[i % len(calls)]()
        run, mode = graph.replay, "graph"
    except Exception:
        if not allow_eager:
            raise
        torch.cuda.synchronize()

        def run():
            for i in range(per_graph):
                calls[i % len(calls)]()

        mode = "eager"
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / per_graph)
    return _summary(times, mode)


def copy_bandwidth(nbytes: int = 1 << 30, replays: int = 20) -> Dict[str, Any]:
    """Device-to-device copy rate, counting bytes read plus bytes written (the roofline for streaming)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    stats = time_graph([lambda: dst.copy_(src)], calls_per_graph=4, replays=replays)
    stats["bytes_per_s"] = 2 * nbytes / (stats["median_us"] * 1e-6)
    stats["nbytes"] = nbytes
    del src, dst
    torch.cuda.empty_cache()
    return stats


def read_bandwidth(nbytes: int = 1 << 30, replays: int = 20) -> Dict[str, Any]:
    """Read-only streaming rate: a float32 sum over ``nbytes`` (the floor for weight-streaming GEMVs).

    A copy (``copy_bandwidth``) also writes, and on an H100 reads alone stream ~20 % faster than
    the copy's read + write rate; a GEMV at batch 1 only reads.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    stats = time_graph([lambda: src.sum()], calls_per_graph=4, replays=replays)
    stats["bytes_per_s"] = nbytes / (stats["median_us"] * 1e-6)
    stats["nbytes"] = nbytes
    del src
    torch.cuda.empty_cache()
    return stats
