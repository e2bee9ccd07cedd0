#!/usr/bin/env python3
"""BitNet's MLP at the 2B4T shape: one fused kernel against the three separate kernels it replaces.

Per decode batch (tokens), both preceded by the post-attention norm + quantization kernel
(``cuda_ext_rms_norm_quant`` mode 1, residual add), as in the model:

* **separate**: int8 gate/up GEMV -> norm + quantization mode 2 (squared-ReLU gate) -> int8 down GEMV;
* **fused**: ``cuda_ext_bitnet_mlp`` (backends/cuda_ext/bitnet_mlp.py), one kernel;
* **norm in**: ``cuda_ext_bitnet_mlp_norm``, the same kernel taking the residual add and the norm itself
  (no norm kernel before it; ``FusedBitnetMLP.norm_and_mlp``);
* **floor**: the weight bytes (gate, up, down: 2 bits each) over 3.0 TB/s.

Timing: CUDA-graph replay over rotating weight copies (>= 3x L2), median per MLP (gpu_timing.py).
The outputs of the two paths are compared on the first copy (relative error, share of equal values).

    python benchmarks/bench_bitnet_mlp.py --out docs/benchmarks

Writes bitnet_mlp.json, bitnet_mlp.md and bitnet_mlp.png into --out.
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

from bench_output import cuda_available  # noqa: E402
from gpu_timing import n_copies, time_graph  # noqa: E402

from backends.cuda_ext import bitnet_mlp, ops  # noqa: E402
from backends.cuda_ext.kernels import CudaExtInt8Kernel  # noqa: E402
from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.packing import pack_weight  # noqa: E402

CFG = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token")
FLOOR_TBPS = 3.0


def random_ternary(out_f, in_f, gen, device, per_channel):
    values = torch.randint(-1, 2, (out_f, in_f), generator=gen, device=device, dtype=torch.int8)
    scale = torch.rand(out_f if per_channel else 1, generator=gen, device=device) * 0.02 + 0.01
    return pack_weight(values, scale, 1.58, "per_channel" if per_channel else "per_tensor")


class Layer:
    """One copy of an MLP's weights, prepared for both paths."""

    def __init__(self, hidden, inter, gen, device, dtype):
        kernel = CudaExtInt8Kernel()
        self.gate_up = kernel.prepare(random_ternary(2 * inter, hidden, gen, device, True), CFG)
        self.down = kernel.prepare(random_ternary(hidden, inter, gen, device, False), CFG)
        self.post_norm = (torch.rand(hidden, generator=gen, device=device) + 0.5).to(dtype)
        self.sub_norm = (torch.rand(inter, generator=gen, device=device) + 0.5).to(dtype)
        self.fused = bitnet_mlp.prepare_bitnet_mlp(self.gate_up, self.down, self.sub_norm, 1e-5, self.post_norm, 1e-5)
        self.inter = inter

    def separate(self, h, delta):
        _, xq, xs = ops.rms_norm_quant(h, delta, self.post_norm, 1e-5, 1)
        g = self.gate_up
        gu = ops.linear_int8(xq, xs, g.wq, g.scale, None, g.fmt, 0, g.out_features, g.in_features, h.dtype)
        gate, up = gu.split(self.inter, dim=-1)
        _, mq, ms = ops.rms_norm_quant(gate, up, self.sub_norm, 1e-5, 2)
        d = self.down
        return ops.linear_int8(mq, ms, d.wq, d.scale, None, d.fmt, 0, d.out_features, d.in_features, h.dtype)

    def fused_mlp(self, h, delta):
        _, xq, xs = ops.rms_norm_quant(h, delta, self.post_norm, 1e-5, 1)
        return self.fused(xq, xs)

    def norm_in(self, h, delta):
        return self.fused.norm_and_mlp(h, delta)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--intermediate", type=int, default=6912)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    if not cuda_available():
        return 2
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    H, I = args.hidden, args.intermediate
    weight_bytes = (2 * I * H + H * I) // 4
    gen = torch.Generator(device=device).manual_seed(0)
    layers = [Layer(H, I, gen, device, dtype) for _ in range(n_copies(weight_bytes))]
    rows = []
    for batch in args.batches:
        if batch > layers[0].fused.max_tokens:
            print(f"batch {batch}: over the fused kernel's {layers[0].fused.max_tokens} tokens, skipped")
            continue
        h = torch.randn(batch, H, generator=gen, device=device).to(dtype)
        delta = torch.randn(batch, H, generator=gen, device=device).to(dtype)
        want, got = layers[0].separate(h, delta), layers[0].fused_mlp(h, delta)
        norm_in = batch <= layers[0].fused.norm_max_tokens
        got_in = layers[0].norm_in(h, delta) if norm_in else None
        torch.cuda.synchronize()
        err = float((got.double() - want.double()).norm() / want.double().norm())
        same = float((got == want).float().mean())
        sep = time_graph([functools.partial(layer.separate, h, delta) for layer in layers])
        fus = time_graph([functools.partial(layer.fused_mlp, h, delta) for layer in layers])
        row = {"batch": batch, "separate_us": sep["median_us"], "fused_us": fus["median_us"],
               "speedup": sep["median_us"] / fus["median_us"], "floor_us": weight_bytes / (FLOOR_TBPS * 1e6),
               "rel_err": err, "equal_share": same, "timing_mode": [sep["mode"], fus["mode"]],
               "norm_in_us": None, "norm_in_rel_err": None}
        if norm_in:
            nin = time_graph([functools.partial(layer.norm_in, h, delta) for layer in layers])
            row.update(norm_in_us=nin["median_us"], timing_mode=row["timing_mode"] + [nin["mode"]],
                       norm_in_rel_err=float((got_in.double() - want.double()).norm() / want.double().norm()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "hidden": H, "intermediate": I,
            "dtype": args.dtype, "weight_mb": weight_bytes / 1e6, "copies": len(layers),
            "timing": "CUDA-graph replay, rotating weight copies >= 3x L2, median per MLP (norm included)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bitnet_mlp.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# BitNet MLP ({H} x {I}, {args.dtype}): fused kernel vs separate kernels", "",
             f"{meta['device']}, torch {meta['torch']}; {meta['timing']}; weights {meta['weight_mb']:.1f} MB "
             f"(floor at {FLOOR_TBPS} TB/s).", "",
             "| tokens | separate us | fused us | speed-up | norm in us | floor us | rel. error | equal outputs | "
             "norm in rel. error |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nin = "" if r["norm_in_us"] is None else f"{r['norm_in_us']:.2f}"
        nerr = "" if r["norm_in_rel_err"] is None else f"{r['norm_in_rel_err']:.2e}"
        lines.append(f"| {r['batch']} | {r['separate_us']:.2f} | {r['fused_us']:.2f} | {r['speedup']:.2f}x | {nin} | "
                     f"{r['floor_us']:.2f} | {r['rel_err']:.2e} | {100 * r['equal_share']:.1f} % | {nerr} |")
    (out / "bitnet_mlp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = range(len(rows))
        ax.bar([x - 0.27 for x in xs], [r["separate_us"] for r in rows], 0.27, label="separate kernels")
        ax.bar(list(xs), [r["fused_us"] for r in rows], 0.27, label="norm kernel + fused kernel")
        ax.bar([x + 0.27 for x in xs], [r["norm_in_us"] or 0 for r in rows], 0.27, label="fused kernel, norm in")
        ax.plot(list(xs), [r["floor_us"] for r in rows], "k--", label="weight bytes / 3 TB/s")
        ax.set_xticks(list(xs), [str(r["batch"]) for r in rows])
        ax.set_xlabel("tokens")
        ax.set_ylabel("us per MLP (norm included)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bitnet_mlp.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
