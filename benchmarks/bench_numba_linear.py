"""numba_cuda ternary linear layers against cuBLAS fp16 (torch.nn.functional.linear) on one GPU.

Method (docs/benchmarks/numba_linear.md reports the numbers):

* ternary weights, per-tensor scale; activations float16 (and int8 per token in the
  batch table, quantized by torch ops inside the timed region);
* every weight set is rotated among enough copies that their total exceeds twice the
  L2 cache, so each call streams its weights from device memory;
* each backend's calls are captured in one CUDA graph (``CALLS_PER_GRAPH`` calls cycling
  through the copies) and the graph is replayed; time per call = event time of a
  replay / calls per replay; the median over ``REPLAYS`` replays is reported, with the
  fastest and slowest replay as the spread;
* before timing, the numba output is compared with the reference backend on the same data.

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
from backends.numba_cuda.plugin import NumbaFloatKernel, NumbaInt8Kernel, cuda_view, numba_stream  # noqa: E402
from backends.torch_ref.kernels import TorchReferenceKernel  # noqa: E402
from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.packing import pack_weight  # noqa: E402

SHAPES = [(8192, 8192), (28672, 8192)]  # out x in, batch 1
BATCH_SHAPE, BATCHES = (8192, 8192), [1, 4, 16, 64]
CALLS_PER_GRAPH = 20
REPLAYS = 30
FP16 = BitQuantConfig(weight_bits=1.58, activation_dtype="float16")
INT8 = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token")


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-2 * l2 // nbytes) + 1)


def graph_times_us(calls) -> list:
    """Capture ``calls`` (zero-argument callables) in one CUDA graph; per-call time of each replay (us)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, load modules) outside the capture
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


def summary(times: list) -> dict:
    return {"median_us": statistics.median(times), "min_us": min(times), "max_us": max(times)}


def eager_us(f, n: int = 200) -> float:
    """Wall time per call without a graph (host launch overhead included)."""
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n


def rotate(items: list, fn) -> list:
    return [lambda item=items[i % len(items)]: fn(item) for i in range(CALLS_PER_GRAPH)]


def cublas_times(out_f: int, in_f: int, x: torch.Tensor) -> list:
    n = copies_for(out_f * in_f * 2)
    dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) for _ in range(n)]
    times = graph_times_us(rotate(dense, lambda w: torch.nn.functional.linear(x, w)))
    del dense
    torch.cuda.empty_cache()
    return times


def prepared_copies(kernel, cfg, out_f: int, in_f: int, gen: torch.Generator) -> list:
    """Packed random ternary weights, prepared for ``kernel``, enough copies to defeat L2."""
    def one():
        values = torch.randint(-1, 2, (out_f, in_f), generator=gen, dtype=torch.int8).cuda()
        return kernel.prepare(pack_weight(values, torch.rand(1, generator=gen).cuda() + 0.5, 1.58, "per_tensor"), cfg)

    copies = [one()]
    copies += [one() for _ in range(copies_for(copies[0].words.numel() * 8) - 1)]
    return copies


def relative_error(kernel, prepared, cfg, x) -> float:
    ref = TorchReferenceKernel()
    packed = pack_weight(prepared_values(prepared), prepared.scale, 1.58, "per_tensor")
    want = ref.forward(x, ref.prepare(packed, cfg)).float()
    got = kernel.forward(x, prepared).float()
    return float((got - want).norm() / want.norm())


def prepared_values(prepared) -> torch.Tensor:
    """Ternary values back from the sign-code words (bit 0: nonzero, bit 1: negative)."""
    from backends.numba_cuda.layout import LANES

    words = prepared.words
    shifts = torch.arange(32, device=words.device, dtype=torch.int64) * 2
    codes = (words.unsqueeze(-1) >> shifts) & 3
    codes = codes.view(words.shape[0], -1, LANES, 32).transpose(2, 3).reshape(words.shape[0], -1)
    return ((codes & 1) - (codes & 2))[:, : prepared.in_features].to(torch.int8)


def variant_times(prepared: list, x: torch.Tensor, rows: int, warps: int) -> tuple:
    """(times, rel. error) of the batch-1 fp16 kernel launched directly with ``rows`` x ``warps`` per block."""
    out_f, in_f = prepared[0].out_features, prepared[0].in_features
    out = torch.empty(1, out_f, dtype=torch.float16, device="cuda")
    knl = K.sign_code_kernel(2, "float", "float", "float", rows, 1, warps)
    grid, block = K.sign_code_grid(out_f, 1, rows, 1, warps)

    def launch(p):
        words, scale, unused, unused_flat = p.arrays(cuda_view)
        K.launch(knl, grid, block, numba_stream(torch.cuda.current_stream().cuda_stream), cuda_view(out),
                 cuda_view(x.view(-1)), in_f, words, scale, 0, unused, unused_flat, 0, 0, out_f, in_f, 1)
        return out

    kernel = NumbaFloatKernel()
    want = kernel.forward(x, prepared[0]).float()
    got = launch(prepared[0]).float()
    torch.cuda.synchronize()
    err = float((got - want).norm() / want.norm().clamp(min=1e-30))
    return graph_times_us(rotate(prepared, launch)), err


def batch1_rows(variants: list, gen: torch.Generator) -> list:
    kernel = NumbaFloatKernel()
    rows = []
    for out_f, in_f in SHAPES:
        x = torch.randn(1, in_f, generator=gen).half().cuda()
        cublas = summary(cublas_times(out_f, in_f, x))
        prepared = prepared_copies(kernel, FP16, out_f, in_f, gen)
        err = relative_error(kernel, prepared[0], FP16, x)
        numba = summary(graph_times_us(rotate(prepared, lambda p: kernel.forward(x, p))))
        tried = {}
        for r, w in variants:
            t, verr = variant_times(prepared, x, r, w)
            tried[f"{r}x{w}"] = {**summary(t), "rel_err_vs_plugin": verr}
        rows.append({
            "shape": f"{out_f}x{in_f}",
            "cublas_fp16": cublas,
            "numba_fp16": numba,
            "speedup": cublas["median_us"] / numba["median_us"],
            "numba_weight_GBps": prepared[0].words.numel() * 8 / numba["median_us"] / 1e3,
            "numba_eager_us": eager_us(lambda: kernel.forward(x, prepared[0])),
            "rel_err_vs_torch_ref": err,
            "launch": K.launch_shape(out_f, 1),
            "variants_rows_x_warps": tried,
        })
        del prepared
        torch.cuda.empty_cache()
    return rows


def batch_rows(gen: torch.Generator) -> list:
    out_f, in_f = BATCH_SHAPE
    fp16, int8 = NumbaFloatKernel(), NumbaInt8Kernel()
    prepared16 = prepared_copies(fp16, FP16, out_f, in_f, gen)
    prepared8 = prepared_copies(int8, INT8, out_f, in_f, gen)
    rows = []
    for tokens in BATCHES:
        x = torch.randn(tokens, in_f, generator=gen).half().cuda()
        cublas = summary(cublas_times(out_f, in_f, x))
        t16 = summary(graph_times_us(rotate(prepared16, lambda p: fp16.forward(x, p))))
        t8 = summary(graph_times_us(rotate(prepared8, lambda p: int8.forward(x, p))))
        rows.append({
            "tokens": tokens,
            "cublas_fp16": cublas,
            "numba_fp16": t16,
            "numba_int8_per_token": t8,
            "rel_err_fp16": relative_error(fp16, prepared16[0], FP16, x),
            "rel_err_int8": relative_error(int8, prepared8[0], INT8, x),
        })
    return rows


def markdown(meta: dict, batch1: list, batches: list) -> str:
    lines = [
        "# numba_cuda linear layers against cuBLAS fp16",
        "",
        "`python benchmarks/bench_numba_linear.py --out docs/benchmarks/numba_linear`",
        "",
        f"device: {meta['device']}; torch {meta['torch']}; numba {meta['numba']} (numba-cuda {meta['numba_cuda']})",
        f"method: {meta['method']}",
        "",
        "Batch 1, ternary weights, float16 activations (median us per call; [fastest, slowest] replay):",
        "",
        "| out x in | cuBLAS fp16 | numba_cuda | speedup | weight GB/s | eager numba_cuda | rel. err vs torch_ref |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in batch1:
        c, n = r["cublas_fp16"], r["numba_fp16"]
        lines.append(
            f"| {r['shape']} | {c['median_us']:.1f} [{c['min_us']:.1f}, {c['max_us']:.1f}] | "
            f"{n['median_us']:.1f} [{n['min_us']:.1f}, {n['max_us']:.1f}] | {r['speedup']:.2f}x | "
            f"{r['numba_weight_GBps']:.0f} | {r['numba_eager_us']:.0f} | {r['rel_err_vs_torch_ref']:.1e} |"
        )
    lines += ["", "Launch variants (rows x warps per block; median us), batch 1:", ""]
    for r in batch1:
        tried = ", ".join(f"{k}: {v['median_us']:.1f}" for k, v in r["variants_rows_x_warps"].items())
        lines.append(f"- {r['shape']} (plugin uses {r['launch'][0]}x{r['launch'][2]}): {tried}")
    lines += [
        "",
        f"Tokens 1..64 at {BATCH_SHAPE[0]}x{BATCH_SHAPE[1]} (median us per call):",
        "",
        "| tokens | cuBLAS fp16 | numba_cuda fp16 | numba_cuda int8 per token | fp16 / cuBLAS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in batches:
        c, n, q = r["cublas_fp16"]["median_us"], r["numba_fp16"]["median_us"], r["numba_int8_per_token"]["median_us"]
        lines.append(f"| {r['tokens']} | {c:.1f} | {n:.1f} | {q:.1f} | {c / n:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="4x4,8x4,4x2,8x2",
                        help="batch-1 launch variants to time, ROWSxWARPS per block, comma separated")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    from importlib import metadata

    import numba

    gen = torch.Generator().manual_seed(0)
    variants = [tuple(int(v) for v in item.split("x")) for item in args.variants.split(",") if item]
    batch1 = batch1_rows(variants, gen)
    batches = batch_rows(gen)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numba_cuda": metadata.version("numba-cuda") if _installed("numba-cuda") else "not installed",
        "method": f"one CUDA graph of {CALLS_PER_GRAPH} calls, median of {REPLAYS} replays, "
                  f"weights rotated over copies totalling > 2x L2",
    }
    table = markdown(meta, batch1, batches)
    print(table)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "batch1": batch1, "tokens": batches}, indent=2))
        Path(args.out + ".md").write_text(table)
    return 0


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
