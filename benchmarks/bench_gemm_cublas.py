#!/usr/bin/env python3
"""Many tokens: cuda_ext's mma.sync GEMM vs its cuBLAS routes, int8 and float activations, one run.

For each shape (out x in) and token count: cuBLAS fp16 (``torch.nn.functional.linear``), cuBLAS int8
alone (``torch._int_mm``, int32 out: no quantization, no epilogue), W1.58A8 through cuda_ext with
``BITLAB_CUDA_INT8_GEMM=mma`` (the mma.sync GEMM / wide GEMV) and ``=cublas`` at each slice height
(``BITLAB_CUDA_INT8_GEMM_SLICE``; 0 = the whole weight at once), and W1.58A16 (fp16 activations) with
``BITLAB_CUDA_FLOAT_GEMM=mma`` and ``=cublas``.  The W1.58A8 rows include the per-token activation
quantization.  This is the measurement behind the token threshold (kCublasMinTokens,
csrc/bindings.cpp) and the default slice.

    python benchmarks/bench_gemm_cublas.py --out docs/benchmarks

Writes gemm_cublas.json, gemm_cublas.md and gemm_cublas.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu_linear import random_packed, time_cublas, time_cublas_int8  # noqa: E402
from gpu_timing import n_copies, time_graph  # noqa: E402

from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.kernels import KernelRegistry  # noqa: E402

SHAPES = [(8192, 8192), (3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)]  # 8192^2, then BitNet 2B
TOKENS = [65, 128, 512, 2048]
SLICES = [0]
CONFIGS = {
    "W1.58A8": (BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token",
                               weight_granularity="per_channel"), "BITLAB_CUDA_INT8_GEMM"),
    "W1.58A16": (BitQuantConfig(weight_bits=1.58, activation_dtype="float16", weight_granularity="per_channel"),
                 "BITLAB_CUDA_FLOAT_GEMM"),
}


def time_cuda_ext(n, k, tokens, config, mode, slice_rows=0):
    cfg, env = CONFIGS[config]
    os.environ[env] = mode
    os.environ[env + "_SLICE"] = str(slice_rows)
    kernel = KernelRegistry.get_kernel_for_config(cfg, "cuda", backend="cuda_ext", in_features=k, out_features=n)
    first = kernel.prepare(random_packed(1.58, n, k), cfg)
    prepared = [first] + [first.clone() for _ in range(n_copies(first.wq.numel() * 4) - 1)]
    x = torch.randn(tokens, k, device="cuda", dtype=torch.float16)
    stats = time_graph([lambda p=p: kernel.forward(x, p) for p in prepared])
    stats["route"] = kernel.route(tokens, first)
    del prepared, first
    torch.cuda.empty_cache()
    return stats


def run(shapes, tokens_list, slices, configs):
    rows = []
    for n, k in shapes:
        for tokens in tokens_list:
            fp16 = time_cublas(n, k, tokens)["median_us"]
            cases = [("cuBLAS int8 (GEMM alone)", lambda: time_cublas_int8(n, k, tokens))]
            for config in configs:
                cases.append((f"{config} mma", lambda c=config: time_cuda_ext(n, k, tokens, c, "mma")))
                for s in slices:
                    if tokens > 16:
                        cases.append((f"{config} cuBLAS" + (f" slice {s}" if s else ""),
                                      lambda c=config, s=s: time_cuda_ext(n, k, tokens, c, "cublas", s)))
            row = dict(N=n, K=k, tokens=tokens, cublas_fp16_us=fp16, variants={})
            for name, fn in cases:
                try:
                    row["variants"][name] = fn()["median_us"]
                except Exception as exc:  # recorded, the sweep goes on
                    row["variants"][name] = None
                    print(f"{n}x{k} {tokens} {name}: {type(exc).__name__}: {exc}", flush=True)
            rows.append(row)
            print(f"{n}x{k} {tokens:5d} fp16 {fp16:8.2f} | " + " | ".join(
                f"{name} {v:8.2f}" if v else f"{name} -" for name, v in row["variants"].items()), flush=True)
    return rows


def markdown(meta, rows):
    names = list(dict.fromkeys(name for r in rows for name in r["variants"]))
    lines = [f"# Many tokens: the mma.sync GEMM and the cuBLAS routes: {meta['device']}", "",
             f"{meta['timing']}; torch {meta['torch']}, {meta['date']}. Microseconds (x cuBLAS fp16); W1.58A8 rows "
             "include the per-token activation quantization, `cuBLAS int8` is the GEMM alone.", "",
             "| out x in | tokens | cuBLAS fp16 | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for r in rows:
        cells = []
        for name in names:
            v = r["variants"].get(name)
            cells.append(f"{v:.1f} ({r['cublas_fp16_us'] / v:.2f}x)" if v else "-")
        lines.append(f"| {r['N']}x{r['K']} | {r['tokens']} | {r['cublas_fp16_us']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Command: `python benchmarks/bench_gemm_cublas.py --out docs/benchmarks`"]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if (r["N"], r["K"]) == shape]
        for name in dict.fromkeys(n for r in sub for n in r["variants"]):
            pts = [(r["tokens"], r["cublas_fp16_us"] / r["variants"][name]) for r in sub if r["variants"].get(name)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape[0]}x{shape[1]}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("x cuBLAS fp16")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks"))
    parser.add_argument("--shapes", nargs="*", default=None, help="OUTxIN shapes")
    parser.add_argument("--tokens", nargs="*", type=int, default=None, help=f"token counts instead of {TOKENS}")
    parser.add_argument("--slices", nargs="*", type=int, default=None, help=f"slice heights instead of {SLICES}")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    torch.manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                timing="CUDA-graph replay, rotating weight copies >= 3x L2, median per call",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    rows = run(shapes, args.tokens or TOKENS, SLICES if args.slices is None else args.slices, args.configs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_cublas.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows)
    (out / "gemm_cublas.md").write_text(md)
    try:
        plot(rows, out / "gemm_cublas.png")
    except Exception as exc:
        print(f"plot failed: {exc}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
