#!/usr/bin/env python3
"""W1A1 (binary weights x binary activations) on the GPU: the XOR + popcount kernel (CUDA cores) against the
AND + popcount ``mma`` kernel (tensor cores) and cuBLAS fp16, across token counts: where the mma pays.

Timing: CUDA-graph replay over rotating weight copies larger than L2, median (gpu_timing.py); activation
binarization included (both kernels run it).  The two kernels' outputs are checked equal on every case.

    python benchmarks/bench_w1a1.py --out docs/benchmarks
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
from bench_output import cuda_available, run_meta, write_outputs  # noqa: E402
from gpu_timing import n_copies, time_graph  # noqa: E402

from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.kernels import KernelRegistry  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (28672, 8192)]
TOKENS = [1, 16, 17, 64, 256, 2048]
PATHS = ("popcount", "mma")


def measure(n: int, k: int, tokens) -> list:
    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary", weight_granularity="per_channel",
                         activation_granularity="per_token")
    kernel = KernelRegistry.get_kernel_for_config(cfg, torch.device("cuda"), backend="cuda_ext")
    first = kernel.prepare(random_packed(1, n, k), cfg)
    copies = [first] + [first.clone() for _ in range(n_copies(first.wq.numel() * first.wq.element_size()) - 1)]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(n_copies(n * k * 2))]
    rows = []
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        row = {"shape": f"{n}x{k}", "tokens": m,
               "cublas": time_graph([functools.partial(torch.nn.functional.linear, x, w) for w in dense])["median_us"]}
        outs = {}
        for path in PATHS:
            os.environ["BITLAB_CUDA_XNOR"] = path
            outs[path] = kernel.forward(x, first)
            row[path] = time_graph([functools.partial(kernel.forward, x, p) for p in copies])["median_us"]
        os.environ.pop("BITLAB_CUDA_XNOR", None)
        row["equal"] = bool(torch.equal(outs["popcount"], outs["mma"]))
        row["default"] = kernel.route(m).rsplit(".", 1)[-1]
        print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        rows.append(row)
    del copies, dense
    torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list) -> str:
    lines = [f"# W1A1 kernels: {meta['device']}", "",
             f"{meta['timing']}; torch {meta['torch']}, {meta['date']}.  Microseconds per call (activation "
             "binarization included); `x cuBLAS` = cuBLAS fp16 time / the faster kernel's.", "",
             "| out x in | tokens | cuBLAS fp16 | popcount | mma | x cuBLAS | default | outputs equal |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        best = min(r["popcount"], r["mma"])
        cells = [f"**{r[p]:.2f}**" if r[p] == best else f"{r[p]:.2f}" for p in PATHS]
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['cublas']:.2f} | {cells[0]} | {cells[1]} | "
                     f"{r['cublas'] / best:.2f} | {r['default']} | {r['equal']} |")
    lines += ["", f"Command: `python benchmarks/bench_w1a1.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.axhline(1.0, color="black", linewidth=0.8)
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        for p, style in zip(PATHS, ("--", "-")):
            speedup = [r["cublas"] / r[p] for r in sel]
            ax.plot([r["tokens"] for r in sel], speedup, style, marker="o", label=f"{shape} {p}")
    ax.set(xscale="log", xlabel="tokens", ylabel="x cuBLAS fp16 (higher is faster)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--shapes", nargs="*", default=None, help="OUTxIN shapes instead of the default list")
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    args = ap.parse_args(argv)
    if not cuda_available():
        return 2
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    rows = [r for n, k in shapes for r in measure(n, k, args.tokens)]
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    md = write_outputs(Path(args.out), "w1a1", meta, rows, markdown, plot)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
