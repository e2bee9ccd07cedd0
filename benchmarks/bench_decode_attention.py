#!/usr/bin/env python3
"""One-token attention of BitNet 2B (20 query heads, 5 KV heads, head_dim 128) per layer, on the GPU.

For each batch: cuda_ext's one-token attention kernel (rotary + cache write + grouped-query attention,
then ``attn_sub_norm`` + int8 quantization, as :class:`bitmodels.bitnet.ops.FusedDecodeAttentionOps`
runs it) with its launch rule, with chunks of head_dim keys forced (``BITLAB_ATTN_KEYS=full``) and with the
cluster capped at 8 / 4 / 3 / 2 / 1 blocks (``BITLAB_ATTN_MAX_CLUSTER``; both read at every launch), against the torch path of the same step
(:func:`bitmodels.bitnet.ops.attention`: rotary, ``index_copy`` cache writes, grouped matmuls, softmax,
norm), eager and, with ``--compile``, through ``torch.compile`` as the generation engine runs it.
Timing: CUDA-graph replay over 30 layers' caches (rotating; together larger than L2), median per layer
(gpu_timing.py).  Every variant's output is compared with the torch path's.

    python benchmarks/bench_decode_attention.py --out docs/benchmarks
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

from gpu_timing import time_graph  # noqa: E402

import bitmodels.bitnet.ops as bitnet_ops  # noqa: E402
from bitmodels.bitnet.ops import FusedDecodeAttentionOps, Ops, compiled_ops, rotary_table, use_fused_norm_quant  # noqa: E402,E501

# The fused kernel's variants: environment of each (read at every launch).  `fused` = the launch rule;
# `fused_full` = chunks of head_dim keys forced (the rule before chunks of head_dim / 2 keys); `fused_cN` =
# the cluster capped at N blocks.
VARIANTS = {"fused": {}, "fused_full": {"BITLAB_ATTN_KEYS": "full"},
            "fused_spread": {"BITLAB_ATTN_MERGE": "spread"}, "fused_merge0": {"BITLAB_ATTN_MERGE": "block0"},
            **{f"fused_c{n}": {"BITLAB_ATTN_MAX_CLUSTER": str(n)} for n in (8, 4, 3, 2, 1)}}
KNOBS = ("BITLAB_ATTN_KEYS", "BITLAB_ATTN_MAX_CLUSTER", "BITLAB_ATTN_MERGE")


def make_layers(batch, layers, heads, kv_heads, dim, seq, dtype, gen):
    """Per layer: (k_cache, v_cache) [B, KVH, S, D] of random values."""
    shape = (batch, kv_heads, seq, dim)
    return [(torch.randn(shape, generator=gen, device="cuda").to(dtype),
             torch.randn(shape, generator=gen, device="cuda").to(dtype)) for _ in range(layers)]


def measure(batch, args, dtype) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(batch)
    H, KVH, D = args.heads, args.kv_heads, args.head_dim
    caches = make_layers(batch, args.layers, H, KVH, D, args.seq, dtype, gen)
    q = torch.randn(batch, 1, H, D, generator=gen, device="cuda").to(dtype)
    k = torch.randn(batch, 1, KVH, D, generator=gen, device="cuda").to(dtype)
    v = torch.randn(batch, 1, KVH, D, generator=gen, device="cuda").to(dtype)
    cos_t, sin_t = rotary_table(D, 500000.0, args.seq)
    pos = args.position
    cos = cos_t[pos].to("cuda", dtype).expand(batch, 1, 1, D).contiguous()
    sin = sin_t[pos].to("cuda", dtype).expand(batch, 1, 1, D).contiguous()
    slots = torch.tensor([pos], device="cuda")
    mask = torch.zeros(batch, 1, 1, args.seq, dtype=torch.bool, device="cuda")
    mask[..., : pos + 1] = True
    weight = (torch.rand(H * D, generator=gen, device="cuda") + 0.5).to(dtype)
    eps = 1e-5

    def step(fn, layer):
        kc, vc = caches[layer]
        return fn(q, k, v, cos, sin, kc, vc, slots, mask, weight, eps, True)

    paths = {"torch": Ops.attention}
    if args.compile and batch in args.compile_batches:
        paths["torch_compiled"] = compiled_ops().attention
    fused = FusedDecodeAttentionOps(Ops()).attention
    row = {"batch": batch}
    ref = step(Ops.attention, 0)
    for name, fn in list(paths.items()) + [(c, fused) for c in VARIANTS]:
        for knob in KNOBS:
            os.environ.pop(knob, None)
        os.environ.update(VARIANTS.get(name, {}))
        out = step(fn, 0)
        deq = lambda a: a.q.float() * a.scale  # noqa: E731  (scale [..., 1])
        err = float((deq(out) - deq(ref)).norm() / deq(ref).norm())
        row[name] = time_graph([functools.partial(step, fn, i) for i in range(args.layers)])["median_us"]
        row[name + "_rel_err"] = err
    for knob in KNOBS:
        os.environ.pop(knob, None)
    print(json.dumps({key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}), flush=True)
    del caches
    torch.cuda.empty_cache()
    return row


def markdown(meta, rows, names) -> str:
    lines = [
        f"# One-token attention per layer (BitNet 2B heads): {meta['device']}",
        "",
        f"CUDA-graph replay over {meta['layers']} layers' caches of {meta['seq']} positions (attending "
        f"{meta['position'] + 1}), median us per layer, {meta['dtype']}, attn_sub_norm + int8 quantization included "
        f"(run by {meta['norm']}); "
        f"torch {meta['torch']}, {meta['date']}.  `fused` = cuda_ext kernel with its launch rule (chunks of head_dim / 2 keys where one wave holds a "
        "block for each, else head_dim keys; clusters of up to 16 / 8 blocks), "
        "`fused_full` = chunks of head_dim keys forced (BITLAB_ATTN_KEYS=full), "
        "`fused_spread` = each block of the cluster reads its slice of the partial sums from every block after the "
        "barrier (BITLAB_ATTN_MERGE=spread; `fused` pushes them before it), "
        "`fused_merge0` = block 0 reads all of them (BITLAB_ATTN_MERGE=block0), "
        "`fused_cN` = cluster capped at N blocks (before the kernel's rounding to a power of two where the "
        "cluster does not cover every key chunk: 3 runs as 2 there); fastest in bold.",
        "",
        "| batch | torch compiled | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        best = min(r[n] for n in names)
        cells = [f"**{r[n]:.2f}**" if r[n] == best else f"{r[n]:.2f}" for n in names]
        compiled = f"{r['torch_compiled']:.2f}" if "torch_compiled" in r else ""
        lines.append(f"| {r['batch']} | {compiled} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `python benchmarks/bench_decode_attention.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows, names, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r[n] for r in rows], width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("us per layer (lower is faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--kv-heads", type=int, default=5)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=640, help="cache positions (512-token prompt + 128 steps)")
    ap.add_argument("--position", type=int, default=600, help="the new token's cache slot")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="also time the torch path through torch.compile")
    ap.add_argument("--compile-batches", type=int, nargs="*", default=[16, 32, 64],
                    help="batches at which --compile times the compiled torch path (one compile each)")
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    bitnet_ops.FUSED_ATTENTION_MAX_BATCH = max(args.batches)  # the kernel at every batch here
    norm = use_fused_norm_quant("cuda")  # attn_sub_norm + quantization on cuda_ext's kernel, as in the model
    rows = [measure(b, args, dtype) for b in args.batches]
    names = ["torch"] + list(VARIANTS)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers, "norm": norm,
            "seq": args.seq, "position": args.position, "dtype": args.dtype,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "args": " ".join(a if a != args.out else "docs/benchmarks" for a in (sys.argv[1:] if argv is None else argv))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "decode_attention.md").write_text(markdown(meta, rows, names))
    plot(rows, names, out / "decode_attention.png")
    print(markdown(meta, rows, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
