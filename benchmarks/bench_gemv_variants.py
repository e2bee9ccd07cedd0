#!/usr/bin/env python3
"""The cuda_ext GEMVs against each other and cuBLAS fp16, one process: which kernel where.

For each shape (out x in), config and batch, cuBLAS fp16 (``F.linear``) and the cuda_ext kernel
under each chosen variant of ``VARIANTS`` (default ``DEFAULT_VARIANTS``): the one-shot GEMV, the
bulk-copy GEMV (sm_90) with its default plan or with 1 / 2 16-row tiles per block and 8 / 32 KB of
weights in flight, and the cluster GEMV (sm_90) with its default plan, 1 / 2 / 4 m-tiles per warp or 2 / 4
/ 6 / 8 K-slices per cluster.  The variants are environment knobs the launcher reads at every launch
(``KNOBS``), so each CUDA graph captures one variant.
Timing: CUDA-graph replay over rotating prepared copies larger than L2, median (gpu_timing.py).
Every variant's output is compared with the first variant's on the same input (relative error
reported when above 2e-3).

    python benchmarks/bench_gemv_variants.py --out docs/benchmarks
    python benchmarks/bench_gemv_variants.py --configs W1.58A16 --batches 1 16 --variants oneshot cluster

Writes NAME.json, NAME.md and NAME.png into --out (--name, default gpu_gemv_sweep).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import cuda_available  # noqa: E402
from bench_gpu_linear import CONFIGS, random_packed  # noqa: E402
from gpu_timing import n_copies, time_graph  # noqa: E402

from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.kernels import KernelRegistry  # noqa: E402

# A quantized lm_head on int8 activations (bitmodels.bitnet's --lm-head-a8) runs W4A8 / W8A8.
CONFIGS = {**CONFIGS, **{f"W{b}A8": {**CONFIGS["W1.58A8"], "weight_bits": b} for b in (4, 8)}}

# The shapes, then the BitNet 2B projections (2560 hidden, 6912 intermediate).
SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (13824, 2560), (28672, 8192),
          (2560, 2560), (3840, 2560), (2560, 6912)]
KNOBS = ("BITLAB_CUDA_GEMV", "BITLAB_CUDA_ONESHOT_MT", "BITLAB_CUDA_PREFETCH_MT", "BITLAB_CUDA_BULK_MT", "BITLAB_CUDA_BULK_INFLIGHT", "BITLAB_CUDA_CLUSTER_MT",
         "BITLAB_CUDA_CLUSTER_KS", "BITLAB_CUDA_CLUSTER_TSPLIT")
VARIANTS = {
    "oneshot": {"BITLAB_CUDA_GEMV": "oneshot"},
    "gemm": {"BITLAB_CUDA_GEMV": "oneshot"},  # past 16 tokens "oneshot" leaves the wide cluster GEMV: the GEMM runs
    "oneshot_mt1": {"BITLAB_CUDA_GEMV": "oneshot", "BITLAB_CUDA_ONESHOT_MT": "1"},
    "oneshot_mt2": {"BITLAB_CUDA_GEMV": "oneshot", "BITLAB_CUDA_ONESHOT_MT": "2"},
    "oneshot_mt4": {"BITLAB_CUDA_GEMV": "oneshot", "BITLAB_CUDA_ONESHOT_MT": "4"},
    "bulk": {"BITLAB_CUDA_GEMV": "bulk"},
    "bulk_mt1": {"BITLAB_CUDA_GEMV": "bulk", "BITLAB_CUDA_BULK_MT": "1"},
    "bulk_mt2": {"BITLAB_CUDA_GEMV": "bulk", "BITLAB_CUDA_BULK_MT": "2"},
    "bulk_8k": {"BITLAB_CUDA_GEMV": "bulk", "BITLAB_CUDA_BULK_INFLIGHT": "8192"},
    "bulk_32k": {"BITLAB_CUDA_GEMV": "bulk", "BITLAB_CUDA_BULK_INFLIGHT": "32768"},
    "cluster": {"BITLAB_CUDA_GEMV": "cluster"},
    "prefetch": {"BITLAB_CUDA_GEMV": "prefetch"},
    "prefetch_mt1": {"BITLAB_CUDA_GEMV": "prefetch", "BITLAB_CUDA_PREFETCH_MT": "1"},
    "prefetch_mt2": {"BITLAB_CUDA_GEMV": "prefetch", "BITLAB_CUDA_PREFETCH_MT": "2"},
    "prefetch_mt4": {"BITLAB_CUDA_GEMV": "prefetch", "BITLAB_CUDA_PREFETCH_MT": "4"},
    "cluster_mt1": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_MT": "1"},
    "cluster_mt2": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_MT": "2"},
    "cluster_mt4": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_MT": "4"},
    "cluster_ks2": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_KS": "2"},
    "cluster_ks4": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_KS": "4"},
    "cluster_ks6": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_KS": "6"},
    "cluster_ks8": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_KS": "8"},
    # 33-64 tokens, int8 activations: one warp (ts1) or two warps splitting the tokens (ts2) per group of
    # m-tiles (elsewhere the knob changes nothing)
    "cluster_ts1": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_TSPLIT": "1"},
    "cluster_ts2": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_TSPLIT": "2"},
    "cluster_ts2_mt1": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_TSPLIT": "2", "BITLAB_CUDA_CLUSTER_MT": "1"},
    "cluster_ts2_mt2": {"BITLAB_CUDA_GEMV": "cluster", "BITLAB_CUDA_CLUSTER_TSPLIT": "2", "BITLAB_CUDA_CLUSTER_MT": "2"},
}
DEFAULT_VARIANTS = ["oneshot", "bulk", "cluster", "cluster_mt2", "cluster_mt4", "cluster_ks4", "cluster_ks8"]


def set_variant(env: dict) -> None:
    for knob in KNOBS:
        os.environ.pop(knob, None)
    os.environ.update(env)


def measure(n: int, k: int, name: str, batches, with_cublas: bool, variants) -> list:
    cfg = BitQuantConfig(**CONFIGS[name])
    kernel = KernelRegistry.get_kernel_for_config(cfg, torch.device("cuda"), backend="cuda_ext")
    packed = random_packed(cfg.weight_bits, n, k)
    first = kernel.prepare(packed, cfg)
    copies = [first] + [first.clone() for _ in range(n_copies(first.wq.numel() * first.wq.element_size()) - 1)]
    rows = []
    for batch in batches:
        x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
        row = {"shape": f"{n}x{k}", "config": name, "batch": batch}
        if with_cublas:
            dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(n_copies(n * k * 2))]
            row["cublas"] = time_graph([functools.partial(torch.nn.functional.linear, x, w) for w in dense])["median_us"]
            del dense
        reference = None
        for variant in variants:
            set_variant(VARIANTS[variant])
            y = kernel.forward(x, first).float()
            if reference is None:
                reference = y
            err = float((y - reference).norm() / reference.norm().clamp_min(1e-30))
            row[variant] = time_graph([functools.partial(kernel.forward, x, p) for p in copies])["median_us"]
            if err > 2e-3:
                row[variant + "_rel_err"] = err
        set_variant({})
        print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        rows.append(row)
    del copies, first
    torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list, names) -> str:
    lines = [
        f"# cuda_ext GEMV variants: {meta['device']}",
        "",
        f"{meta['timing']}; torch {meta['torch']}, {meta['date']}.  Microseconds per call; the fastest cuda_ext "
        "variant of each row in bold.  Variants: " + ", ".join(f"`{v}` = {VARIANTS[v]}" for v in names) + ".",
        "",
        "| out x in | config | batch | cuBLAS fp16 | " + " | ".join(names) + " |",
        "|---|---|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        best = min(r[v] for v in names)
        cells = [f"**{r[v]:.2f}**" if r[v] == best else f"{r[v]:.2f}" for v in names]
        cublas = f"{r['cublas']:.2f}" if "cublas" in r else ""
        lines.append(f"| {r['shape']} | {r['config']} | {r['batch']} | {cublas} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `python benchmarks/bench_gemv_variants.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{r['shape']}\n{r['config']} b{r['batch']}" for r in rows]
    width = 0.8 / len(names)
    for i, variant in enumerate(names):
        ratio = [r[names[0]] / r[variant] for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], ratio, width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel(f"speed vs {names[0]} (higher is faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--name", default="gpu_gemv_sweep", help="file stem of the JSON, table and plot")
    ap.add_argument("--configs", nargs="*", default=["W1.58A16", "W1.58A8", "W1A16"], choices=sorted(CONFIGS))
    ap.add_argument("--shapes", nargs="*", default=None, help="OUTxIN shapes instead of the default list")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8, 16])
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS),
                    help="the first one is the reference of the error check and the plot")
    args = ap.parse_args(argv)
    if not cuda_available():
        return 2
    if any(c == "W1A1" for c in args.configs):
        ap.error("W1A1 runs the popcount kernel, not a GEMV variant")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    rows = []
    for n, k in shapes:
        for i, name in enumerate(args.configs):
            rows += measure(n, k, name, args.batches, with_cublas=i == 0, variants=args.variants)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": args.variants,
            "args": " ".join(sys.argv[1:] if argv is None else argv),
            "timing": "CUDA-graph replay, rotating weight copies >= 3x L2, median per call",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows, args.variants)
    (out / f"{args.name}.md").write_text(md)
    try:
        plot(rows, out / f"{args.name}.png", args.variants)
    except Exception as exc:  # report, keep the table
        print(f"plot failed: {exc}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
