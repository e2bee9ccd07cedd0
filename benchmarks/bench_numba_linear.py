"""Batch-1 GEMV of the numba_cuda backend against cuBLAS fp16 (torch.nn.functional.linear).

Method (docs/benchmarks/numba_linear.md says what was measured):

* ternary weights, float16 activations, 1 token; shapes out x in = 8192x8192 and 28672x8192;
* every weight set is rotated among enough copies that their total exceeds twice the
  L2 cache, so each call streams its weights from device memory;
* each backend's calls are captured in one CUDA graph (``CALLS_PER_GRAPH`` calls cycling
  through the copies) and the graph is replayed; time per call = event time of a
  replay / calls per replay; the median over ``REPLAYS`` replays is reported;
* the numba output is checked against the reference backend on the same data first.

Usage::

    python benchmarks/bench_numba_linear.py [--variants 4x4,8x4] [--out docs/benchmarks/numba_linear]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.numba_cuda import kernels as K  # noqa: E402
from backends.numba_cuda.plugin import NumbaFloatKernel, cuda_view  # noqa: E402
from backends.torch_ref.kernels import TorchReferenceKernel  # noqa: E402
from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.packing import pack_weight  # noqa: E402

SHAPES = [(8192, 8192), (28672, 8192)]
CALLS_PER_GRAPH = 20
REPLAYS = 30


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-2 * l2 // nbytes) + 1)


def graph_time_us(calls) -> list:
    """Capture ``calls`` (a list of zero-argument callables) into one CUDA graph; per-call times of each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles, loads modules) outside the capture
        for f in calls[:3]:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    return times


def eager_time_us(f, n: int = 200) -> float:
    """Wall time per call without graphs (host launch overhead included), synchronizing at the end."""
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n


def bench_shape(out_f: int, in_f: int, variant_options: list, gen: torch.Generator) -> dict:
    dev = torch.device("cuda")
    cfg = BitQuantConfig(weight_bits=1.58, weight_granularity="per_tensor", activation_dtype="float16")
    kernel = NumbaFloatKernel()
    x = torch.randn(1, in_f, generator=gen).to(torch.float16).to(dev)

    # cuBLAS fp16: dense weights, rotated
    dense_bytes = out_f * in_f * 2
    n_dense = copies_for(dense_bytes)
    dense = [torch.randn(out_f, in_f, device=dev, dtype=torch.float16) for _ in range(n_dense)]
    cublas_calls = [lambda w=dense[i % n_dense]: torch.nn.functional.linear(x, w) for i in range(CALLS_PER_GRAPH)]
    cublas = graph_time_us(cublas_calls)
    del dense, cublas_calls
    torch.cuda.empty_cache()

    # numba: packed ternary weights, rotated
    values = torch.randint(-1, 2, (out_f, in_f), generator=gen, dtype=torch.int8)
    packed = pack_weight(values.to(dev), torch.rand(1, generator=gen).to(dev) + 0.5, 1.58, "per_tensor")
    prepared0 = kernel.prepare(packed, cfg)
    ref = TorchReferenceKernel()
    want = ref.forward(x, ref.prepare(packed, cfg)).float()
    got = kernel.forward(x, prepared0).float()
    rel_err = float((got - want).norm() / want.norm())
    packed_bytes = prepared0.words.numel() * 8
    n_packed = copies_for(packed_bytes)
    prepared = [prepared0] + [
        kernel.prepare(pack_weight(torch.randint(-1, 2, (out_f, in_f), device=dev, dtype=torch.int8),
                                   packed.scale, 1.58, "per_tensor"), cfg)
        for _ in range(n_packed - 1)
    ]
    numba_calls = [lambda p=prepared[i % n_packed]: kernel.forward(x, p) for i in range(CALLS_PER_GRAPH)]
    numba_graph = graph_time_us(numba_calls)
    numba_eager = eager_time_us(numba_calls[0])

    # launch variants: rows and warps per block (the plugin uses K.launch_shape)
    from numba import cuda

    variants = {}
    out = torch.empty(1, out_f, dtype=torch.float16, device=dev)
    for rows, warps in variant_options:
        knl = K.sign_code_kernel(2, "float", "float", "float", rows, 1, warps)
        grid, block = K.sign_code_grid(out_f, 1, rows, 1, warps)

        def launch_variant(p, knl=knl, grid=grid, block=block):
            stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
            K.launch(knl, grid, block, stream, cuda_view(out), cuda_view(x), cuda_view(p.words),
                     cuda_view(p.scale), 0, cuda_view(p.unused), cuda_view(p.unused.view(-1)), 0, 0,
                     out_f, in_f, 1)

        launch_variant(prepared0)
        torch.cuda.synchronize()
        variant_err = float((out.float() - want).norm() / want.norm())
        t = graph_time_us([lambda p=prepared[i % n_packed]: launch_variant(p) for i in range(CALLS_PER_GRAPH)])
        variants[f"rows={rows},warps={warps}"] = {"median_us": statistics.median(t), "rel_err": variant_err}

    med_cublas, med_numba = statistics.median(cublas), statistics.median(numba_graph)
    return {
        "shape": f"{out_f}x{in_f}",
        "cublas_fp16_us": med_cublas,
        "numba_graph_us": med_numba,
        "numba_eager_us": numba_eager,
        "speedup_vs_cublas": med_cublas / med_numba,
        "numba_GBps": packed_bytes / med_numba / 1e3,
        "cublas_GBps": dense_bytes / med_cublas / 1e3,
        "rel_err_vs_torch_ref": rel_err,
        "copies": {"cublas": n_dense, "numba": n_packed},
        "launch_variants": variants,
        "spread_us": {"cublas": [min(cublas), max(cublas)], "numba": [min(numba_graph), max(numba_graph)]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="4x4,8x4,4x8,8x8,2x4",
                        help="launch variants to time as ROWSxWARPS per block, comma separated")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    import numba

    gen = torch.Generator().manual_seed(0)
    variant_options = [tuple(int(v) for v in item.split("x")) for item in args.variants.split(",") if item]
    results = [bench_shape(o, i, variant_options, gen) for o, i in SHAPES]
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "method": f"CUDA graph of {CALLS_PER_GRAPH} calls, median of {REPLAYS} replays, weights rotated over > 2x L2",
        "launch_used_rows_tokens_warps": K.launch_shape(1, 1),
    }
    lines = [
        f"device: {meta['device']}; torch {meta['torch']}; numba {meta['numba']}; {meta['method']}",
        "",
        "| out x in | cuBLAS fp16 (us) | numba ternary (us) | speedup | numba GB/s | eager numba (us) | rel err |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['cublas_fp16_us']:.1f} | {r['numba_graph_us']:.1f} | "
            f"{r['speedup_vs_cublas']:.2f}x | {r['numba_GBps']:.0f} | {r['numba_eager_us']:.1f} | "
            f"{r['rel_err_vs_torch_ref']:.1e} |"
        )
    lines += ["", "launch variants, rows x warps per block (graph replay, us): " + "; ".join(
        f"{r['shape']}: " + ", ".join(f"{k} {v['median_us']:.1f}" for k, v in r["launch_variants"].items())
        for r in results)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        Path(args.out + ".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
