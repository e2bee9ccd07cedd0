#!/usr/bin/env python3
"""W1.58A8 at 1-8 tokens: the bit-plane GEMV (ternary weights as bit masks, AND + popcount ``mma``, no
weight decoding) against the int8 lane-tile GEMV that serves these calls otherwise, and cuBLAS fp16.

Both kernels are timed on pre-quantized int8 rows (``forward_quantized``, as a model whose norms quantize
calls them) and from float input (``forward``: quantization + GEMV).  Timing: CUDA-graph replay over
rotating weight copies larger than L2, median (gpu_timing.py).  Outputs of the two kernels are checked
equal on every case.

    python benchmarks/bench_bitplane.py --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu_linear import random_packed  # noqa: E402
from bench_output import run_meta, write_outputs  # noqa: E402
from gpu_timing import n_copies, time_graph  # noqa: E402

from backends.cuda_ext.kernels import CudaExtInt8Kernel, CudaExtWeight  # noqa: E402
from bitcore.config import BitQuantConfig  # noqa: E402

# BitNet 2B's projections (qkv, o, gate/up, down), then the target shapes.
SHAPES = [(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912), (4096, 4096), (8192, 8192), (14336, 4096),
          (28672, 8192)]
TOKENS = [1, 2, 4, 8]
COLUMNS = ("int8_q", "bitplane_q", "int8", "bitplane")


def without_planes(p: CudaExtWeight) -> CudaExtWeight:
    return CudaExtWeight(p.wq, p.scale, p.fmt, p.act_mode, p.out_features, p.in_features, p.act_dtype)


def measure(n: int, k: int, tokens) -> list:
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", weight_granularity="per_channel",
                         activation_granularity="per_token")
    kernel = CudaExtInt8Kernel()
    os.environ["BITLAB_CUDA_BITPLANE"] = "1"
    first = kernel.prepare(random_packed(1.58, n, k), cfg)
    os.environ.pop("BITLAB_CUDA_BITPLANE")
    copies = [first] + [first.clone() for _ in range(n_copies(first.planes.numel() * 4) - 1)]
    plain = [without_planes(p) for p in copies]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(n_copies(n * k * 2))]
    rows = []
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xq = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        xs = torch.rand(m, 1, device="cuda") + 0.01
        row = {"shape": f"{n}x{k}", "tokens": m,
               "cublas": time_graph([functools.partial(torch.nn.functional.linear, x, w) for w in dense])["median_us"]}
        fq = functools.partial(kernel.forward_quantized, xq, xs, out_dtype=torch.float16)
        row["int8_q"] = time_graph([functools.partial(fq, p) for p in plain])["median_us"]
        row["bitplane_q"] = time_graph([functools.partial(fq, p) for p in copies])["median_us"]
        row["int8"] = time_graph([functools.partial(kernel.forward, x, p) for p in plain])["median_us"]
        row["bitplane"] = time_graph([functools.partial(kernel.forward, x, p) for p in copies])["median_us"]
        row["equal"] = bool(torch.equal(fq(first), fq(plain[0])) and
                            torch.equal(kernel.forward(x, first), kernel.forward(x, plain[0])))
        row["int8_route"] = kernel.route(m, plain[0]).rsplit(".", 1)[-1]
        print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        rows.append(row)
    del copies, plain, dense
    torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list) -> str:
    lines = [f"# Bit-plane GEMV (W1.58A8, 1-8 tokens): {meta['device']}", "",
             f"{meta['timing']}; torch {meta['torch']}, {meta['date']}.  Microseconds per call.  `_q`: pre-quantized "
             "int8 input (`forward_quantized`); without: float16 input (quantization + GEMV).  `speedup` = int8 "
             "lane-tile GEMV / bit-plane GEMV on pre-quantized input.", "",
             "| out x in | tokens | cuBLAS fp16 | int8 GEMV _q | bit-plane _q | speedup | int8 GEMV | bit-plane | "
             "int8 route | equal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['cublas']:.2f} | {r['int8_q']:.2f} | {r['bitplane_q']:.2f} | "
                     f"{r['int8_q'] / r['bitplane_q']:.2f} | {r['int8']:.2f} | {r['bitplane']:.2f} | "
                     f"{r['int8_route']} | {r['equal']} |")
    lines += ["", f"Command: `python benchmarks/bench_bitplane.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.axhline(1.0, color="black", linewidth=0.8)
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        ax.plot([r["tokens"] for r in sel], [r["int8_q"] / r["bitplane_q"] for r in sel], marker="o", label=shape)
    ax.set(xlabel="tokens", ylabel="int8 GEMV time / bit-plane GEMV time")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--shapes", nargs="*", default=None, help="OUTxIN shapes instead of the default list")
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    rows = [r for n, k in shapes for r in measure(n, k, args.tokens)]
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    md = write_outputs(Path(args.out), "bitplane_gemv", meta, rows, markdown, plot)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
