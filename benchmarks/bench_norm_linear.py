#!/usr/bin/env python3
"""The norm before a W1.58A8 projection inside the projection's GEMV, against the norm kernel then the GEMV.

BitNet 2B's two folded shapes at 1-3 tokens (bf16):

* **qkv** (3840 x 2560), mode 1: residual add + ``input_layernorm`` + int8 quantization, then q/k/v;
* **o** (2560 x 2560), mode 0: ``attn_sub_norm`` + int8 quantization, then o.

Columns per shape and token count:

* **separate**: ``cuda_ext_rms_norm_quant`` then ``cuda_ext_linear_int8`` (the default decode path);
* **fused**: ``cuda_ext_linear_int8_norm`` (backends/cuda_ext/norm_linear.py), one kernel;
* **GEMV only**: ``cuda_ext_linear_int8`` on rows quantized beforehand (no norm at all: the fused kernel's floor);
* **cuBLAS fp16**: ``torch.nn.functional.linear`` with a dense fp16 weight of the same shape (the peer).

Timing: CUDA-graph replay over rotating weight copies (>= 3x L2), median per call (gpu_timing.py).  The fused
output is compared with the separate one on the first copy (``torch.equal``: the kernel promises the same bits).

    python benchmarks/bench_norm_linear.py --out docs/benchmarks

Writes norm_linear.json, norm_linear.md and norm_linear.png into --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import cuda_available, run_meta, write_outputs  # noqa: E402
from gpu_timing import n_copies, time_graph  # noqa: E402

from backends.cuda_ext import norm_linear, ops  # noqa: E402
from backends.cuda_ext.kernels import CudaExtInt8Kernel  # noqa: E402
from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.packing import pack_weight  # noqa: E402

CFG = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token",
                     weight_granularity="per_channel")
SHAPES = {"qkv": (3840, 2560, 1), "o": (2560, 2560, 0)}  # name: (out_features, in_features, mode)


class Copy:
    """One rotating copy of a projection's weight: prepared ternary lane tiles, the norm, a dense fp16 peer."""

    def __init__(self, n, k, mode, gen, device, dtype):
        values = torch.randint(-1, 2, (n, k), generator=gen, device=device, dtype=torch.int8)
        scale = torch.rand(n, generator=gen, device=device) * 0.02 + 0.01
        self.prepared = CudaExtInt8Kernel().prepare(pack_weight(values, scale, 1.58, "per_channel"), CFG)
        self.norm_weight = (torch.rand(k, generator=gen, device=device) + 0.5).to(dtype)
        self.fused = norm_linear.NormLinear.prepare(self.prepared, self.norm_weight, 1e-5, out_dtype=dtype)
        self.dense = torch.randn(n, k, generator=gen, device=device).half()
        self.mode, self.dtype = mode, dtype

    def separate(self, a, b):
        _, xq, xs = ops.rms_norm_quant(a, b, self.norm_weight, 1e-5, self.mode)
        return self.gemv(xq, xs)

    def gemv(self, xq, xs):
        p = self.prepared
        return ops.linear_int8(xq, xs, p.wq, p.scale, None, p.fmt, 0, p.out_features, p.in_features, self.dtype)

    def one_kernel(self, a, b):
        return self.fused(a, b)[1]

    def cublas(self, x16):
        return torch.nn.functional.linear(x16, self.dense)


def markdown(meta: dict, rows: list) -> str:
    lines = [
        "# Norm + int8 GEMV in one kernel (BitNet 2B's q/k/v and o projections)", "",
        f"{meta['device']}, torch {meta['torch']}, {meta['dtype']}, {meta['date']}; {meta['timing']}.", "",
        "| projection | tokens | separate us | fused us | speed-up | GEMV only us | cuBLAS fp16 us | same bits |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['separate_us']:.2f} | {r['fused_us']:.2f} | "
                     f"{r['separate_us'] / r['fused_us']:.2f}x | {r['gemv_us']:.2f} | {r['cublas_us']:.2f} | "
                     f"{r['equal']} |")
    lines += ["", f"Command: `python benchmarks/bench_norm_linear.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']} x{r['tokens']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (key, name) in enumerate([("separate_us", "norm kernel + GEMV"), ("fused_us", "one kernel"),
                                     ("gemv_us", "GEMV only"), ("cublas_us", "cuBLAS fp16")]):
        ax.bar([x + (i - 1.5) * 0.2 for x in xs], [r[key] for r in rows], 0.2, label=name)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("us per call")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    if not cuda_available():
        return 2
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape, (n, k, mode) in SHAPES.items():
        copies = [Copy(n, k, mode, gen, device, dtype) for _ in range(n_copies(n * k // 4))]
        for tokens in args.tokens:
            if tokens > copies[0].fused.max_tokens:
                print(f"{shape} x{tokens}: over the kernel's {copies[0].fused.max_tokens} tokens, skipped")
                continue
            a = torch.randn(tokens, k, generator=gen, device=device).to(dtype)
            b = torch.randn(tokens, k, generator=gen, device=device).to(dtype) if mode else None
            _, xq, xs = ops.rms_norm_quant(a, b, copies[0].norm_weight, 1e-5, mode)
            x16 = a.half()
            equal = bool(torch.equal(copies[0].one_kernel(a, b), copies[0].separate(a, b)))
            times = {key: time_graph([functools.partial(fn(c), *inputs) for c in copies])
                     for key, fn, inputs in [("separate", lambda c: c.separate, (a, b)),
                                             ("fused", lambda c: c.one_kernel, (a, b)),
                                             ("gemv", lambda c: c.gemv, (xq, xs)),
                                             ("cublas", lambda c: c.cublas, (x16,))]}
            row = {"shape": shape, "n": n, "k": k, "mode": mode, "tokens": tokens, "equal": equal,
                   "copies": len(copies), "modes": [t["mode"] for t in times.values()]}
            row.update({f"{key}_us": t["median_us"] for key, t in times.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
        del copies
    meta = run_meta(" ".join(argv if argv is not None else sys.argv[1:]))
    meta["dtype"] = args.dtype
    print(write_outputs(Path(args.out), "norm_linear", meta, rows, markdown, plot))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
