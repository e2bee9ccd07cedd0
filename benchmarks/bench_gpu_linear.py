#!/usr/bin/env python3
"""Low-bit linear layers on the GPU vs cuBLAS fp16, every CUDA backend in the registry, one run.

For each shape (out x in) and batch: ``torch.nn.functional.linear`` in fp16 (cuBLAS),
then each config on every registered backend that serves it on CUDA (forced by name;
a backend that is unavailable or fails is recorded and skipped).  Timing: CUDA-graph
replay over rotating weight copies larger than L2, median (benchmarks/gpu_timing.py).
A device-to-device copy measured in the same run gives the bandwidth roofline.

    python benchmarks/bench_gpu_linear.py --out docs/benchmarks           # full run
    python benchmarks/bench_gpu_linear.py --quick                         # two shapes

Writes gpu_linear.json, gpu_linear.md and gpu_linear.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import copy_bandwidth, l2_bytes, n_copies, read_bandwidth, time_graph  # noqa: E402

from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.kernels import KernelRegistry  # noqa: E402
from bitcore.packing import pack_weight, storage_bits  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (13824, 2560), (28672, 8192)]
BATCHES = [1, 8, 16]
LARGE = [((8192, 8192), 2048, "W1.58A8"), ((8192, 8192), 2048, "W1.58A16")]
_PC = dict(weight_granularity="per_channel")  # one scale per output row, as LLM checkpoints ship
CONFIGS = {
    "W1.58A16": dict(weight_bits=1.58, activation_dtype="float16", **_PC),
    "W1.58A8": dict(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token", **_PC),
    "W1A16": dict(weight_bits=1, activation_dtype="float16", **_PC),
    "W2A16": dict(weight_bits=2, activation_dtype="float16", **_PC),
    "W4A16": dict(weight_bits=4, activation_dtype="float16", **_PC),
    "W8A16": dict(weight_bits=8, activation_dtype="float16", **_PC),
    "W1A1": dict(weight_bits=1, activation_dtype="binary", activation_granularity="per_token", **_PC),
}
# Backends other than cuda_ext are timed on these configs (bounds the run's length).
PEER_CONFIGS = ("W1.58A16", "W1.58A8", "W1A16")
SKIP_BACKENDS = {"torch_ref"}  # the reference: unpacks to int8 and runs an fp32 matmul; not a contender
VALUES = {1: (-1, 1), 1.58: (-1, 0, 1), 2: (-3, -1, 1, 3), 4: tuple(range(-7, 8)), 8: tuple(range(-127, 128))}


def random_packed(bits, n, k):
    choices = torch.tensor(VALUES[bits], dtype=torch.int8, device="cuda")
    values = choices[torch.randint(len(choices), (n, k), device="cuda")]
    scale = torch.rand(n, device="cuda") + 0.5
    return pack_weight(values, scale, bits, "per_channel")


def cuda_backends():
    names = []
    for status in KernelRegistry.backends():
        if status.name in SKIP_BACKENDS:
            continue
        if any("cuda" in k.devices for k in status.kernels):
            names.append((status.name, status.availability))
    return names


def time_cublas(n, k, batch):
    w_bytes = n * k * 2
    copies = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(n_copies(w_bytes))]
    x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
    stats = time_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in copies])
    del copies
    torch.cuda.empty_cache()
    return stats


def time_cublas_int8(n, k, batch):
    """cuBLAS int8 x int8 -> int32 (``torch._int_mm``), the GEMM alone: no activation quantization, no
    epilogue; the ceiling of any W*A8 layer that runs on it."""
    copies = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(n_copies(n * k))]
    x = torch.randint(-127, 128, (batch, k), device="cuda", dtype=torch.int8)
    stats = time_graph([lambda w=w: torch._int_mm(x, w.t()) for w in copies])
    del copies
    torch.cuda.empty_cache()
    return stats


def time_backend(backend, cfg, n, k, batch):
    kernel = KernelRegistry.get_kernel_for_config(cfg, "cuda", backend=backend, in_features=k, out_features=n)
    packed = random_packed(cfg.weight_bits, n, k)
    first = kernel.prepare(packed, cfg)
    w_bytes = packed.nbytes()
    count = n_copies(w_bytes)
    if hasattr(first, "clone"):
        prepared = [first] + [first.clone() for _ in range(count - 1)]
    else:
        prepared = [first] + [kernel.prepare(random_packed(cfg.weight_bits, n, k), cfg) for _ in range(count - 1)]
    x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
    stats = time_graph([lambda p=p: kernel.forward(x, p) for p in prepared])
    stats["kernel"] = kernel.name
    try:  # cuda_ext names the GEMV it picks for this weight
        stats["route"] = kernel.route(batch, first)
    except TypeError:
        stats["route"] = kernel.route(batch)
    stats["weight_bytes"] = w_bytes
    del prepared, first, packed
    torch.cuda.empty_cache()
    return stats


def moved_bytes(weight_bytes, n, k, batch):
    return weight_bytes + batch * k * 2 + batch * n * 2


def run(args):
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    try:
        read = read_bandwidth()["bytes_per_s"]
    except Exception as exc:  # the copy rate still gives a roofline
        print(f"read bandwidth failed: {exc}", flush=True)
        read = None
    meta = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": l2_bytes(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_bandwidth_bytes_per_s": copy["bytes_per_s"],
        "read_bandwidth_bytes_per_s": read,
        "timing": "CUDA-graph replay, rotating weight copies >= 3x L2, median per call",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(f"# {props.name}: D2D copy {copy['bytes_per_s'] / 1e12:.2f} TB/s (read + write), read "
          f"{(read or 0) / 1e12:.2f} TB/s", flush=True)
    backends = [b for b in cuda_backends() if args.backends is None or b[0] in args.backends]
    print("# CUDA backends:", ", ".join(f"{n} ({'ok' if a else a.reason})" for n, a in backends), flush=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [parse_shape(t) for t in args.shapes]
    batches = args.batches or BATCHES
    configs = [c for c in CONFIGS if args.configs is None or c in args.configs]
    cases = [(s, b, c) for s in shapes for b in batches for c in configs] + [
        (s, b, c) for s, b, c in LARGE if not args.quick and not args.no_large and c in configs
    ]
    args.read_bw = read
    rows, cublas = [], {}
    # cuda_ext (with cuBLAS) first over every case, then the peers: a cut-short run keeps the core table.
    passes = [[b for b in backends if b[0] == "cuda_ext"], [b for b in backends if b[0] != "cuda_ext"]]
    for pass_backends in passes:
        for (n, k), batch, cname in cases:
            run_case(n, k, batch, cname, pass_backends, rows, cublas, copy, args)
            if args.out and len(rows) % 8 == 0:
                save(meta, rows, Path(args.out), with_plot=False)
    return meta, rows


def parse_shape(text):
    """'8192x8192' -> (8192, 8192) (out_features, in_features)."""
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: got {text!r}; expected OUTxIN, e.g. 8192x8192") from None
    return n, k


def run_case(n, k, batch, cname, backends, rows, cublas, copy, args):
    if (n, k, batch) not in cublas:
        try:
            cublas[(n, k, batch)] = time_cublas(n, k, batch)
            st = cublas[(n, k, batch)]
            wb = n * k * 2
            rows.append(dict(N=n, K=k, batch=batch, config="fp16", backend="cuBLAS", median_us=st["median_us"],
                             p10_us=st["p10_us"], p90_us=st["p90_us"], mode=st["mode"], speedup=1.0,
                             bytes=moved_bytes(wb, n, k, batch),
                             gbps=moved_bytes(wb, n, k, batch) / st["median_us"] / 1e3,
                             frac_copy=moved_bytes(wb, n, k, batch) / (st["median_us"] * 1e-6) / copy["bytes_per_s"],
                             frac_read=(moved_bytes(wb, n, k, batch) / (st["median_us"] * 1e-6) / args.read_bw)
                             if args.read_bw else None))
            print(f"{n}x{k} b{batch:<5} {'fp16':<9} {'cuBLAS':<11} {st['median_us']:9.2f} us", flush=True)
        except Exception as exc:
            print(f"{n}x{k} b{batch} cuBLAS failed: {exc}", flush=True)
            cublas[(n, k, batch)] = None
    base = cublas[(n, k, batch)]
    cfg = BitQuantConfig(**CONFIGS[cname])
    if batch > max(BATCHES) and any(b == "cuda_ext" for b, _ in backends):
        time_large_peers(n, k, batch, cname, cfg, base, rows)
    for backend, avail in backends:
        if backend != "cuda_ext" and (cname not in PEER_CONFIGS or batch > max(BATCHES)):
            continue
        row = dict(N=n, K=k, batch=batch, config=cname, backend=backend)
        if not avail:
            row.update(error=f"unavailable: {avail.reason}")
            rows.append(row)
            continue
        try:
            st = time_backend(backend, cfg, n, k, batch)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            row.update(error=msg[:300])
            rows.append(row)
            print(f"{n}x{k} b{batch:<5} {cname:<9} {backend:<11} error: {msg[:160]}", flush=True)
            if args.verbose:
                traceback.print_exc()
            torch.cuda.empty_cache()
            continue
        moved = moved_bytes(st["weight_bytes"], n, k, batch)
        row.update(
            median_us=st["median_us"], p10_us=st["p10_us"], p90_us=st["p90_us"], mode=st["mode"],
            kernel=st["kernel"], route=st["route"], bytes=moved, gbps=moved / st["median_us"] / 1e3,
            frac_copy=moved / (st["median_us"] * 1e-6) / copy["bytes_per_s"],
            frac_read=(moved / (st["median_us"] * 1e-6) / args.read_bw) if args.read_bw else None,
            speedup=(base["median_us"] / st["median_us"]) if base else None,
        )
        rows.append(row)
        sp = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        print(f"{n}x{k} b{batch:<5} {cname:<9} {backend:<11} {st['median_us']:9.2f} us  {sp:>7} cuBLAS  "
              f"{row['gbps']:7.0f} GB/s  {100 * row['frac_copy']:5.1f}% copy  [{st['mode']}]", flush=True)


def time_large_peers(n, k, batch, cname, cfg, base, rows):
    """Many tokens: cuda_ext held to its mma.sync GEMM (``BITLAB_CUDA_INT8_GEMM`` / ``BITLAB_CUDA_FLOAT_GEMM``
    ``=mma``) beside its default route, and for int8 activations cuBLAS int8 alone."""
    int8 = cname.endswith("A8")
    peers = [("W8A8 int32 out", "cuBLAS int8", lambda: time_cublas_int8(n, k, batch))] if int8 else []
    env = "BITLAB_CUDA_INT8_GEMM" if int8 else "BITLAB_CUDA_FLOAT_GEMM"
    peers.append((cname, "cuda_ext mma GEMM", lambda: time_forced_mma(cfg, n, k, batch, env)))
    for config, backend, fn in peers:
        try:
            st = fn()
        except Exception as exc:
            rows.append(dict(N=n, K=k, batch=batch, config=config, backend=backend, error=str(exc)[:300]))
            print(f"{n}x{k} b{batch:<5} {config:<9} {backend} error: {exc}", flush=True)
            continue
        sp = base["median_us"] / st["median_us"] if base else None
        rows.append(dict(N=n, K=k, batch=batch, config=config, backend=backend, median_us=st["median_us"],
                         p10_us=st["p10_us"], p90_us=st["p90_us"], mode=st["mode"], speedup=sp,
                         route=st.get("route", "torch._int_mm"), bytes=None, gbps=None, frac_copy=None,
                         frac_read=None))
        print(f"{n}x{k} b{batch:<5} {config:<9} {backend:<11} {st['median_us']:9.2f} us  "
              f"{(sp or 0):.2f}x cuBLAS fp16", flush=True)


def time_forced_mma(cfg, n, k, batch, env):
    previous = os.environ.get(env)
    os.environ[env] = "mma"
    try:
        return time_backend("cuda_ext", cfg, n, k, batch)
    finally:
        if previous is None:
            del os.environ[env]
        else:
            os.environ[env] = previous


def save(meta, rows, out, with_plot=True):
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_linear.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(meta, rows)
    (out / "gpu_linear.md").write_text(md)
    if with_plot:
        try:
            plot(meta, rows, out / "gpu_linear.png")
        except Exception as exc:
            print(f"plot failed: {exc}")
    return md


def markdown(meta, rows):
    lines = [
        f"# GPU linear layers: {meta['device']}",
        "",
        f"{meta['timing']}; torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date']}.",
        f"Device-to-device copy (read + write): {meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; "
        f"read-only stream: {(meta.get('read_bandwidth_bytes_per_s') or 0) / 1e12:.2f} TB/s. "
        "`x cuBLAS` is cuBLAS fp16 time / this time (higher is faster); GB/s counts packed weights + "
        "fp16 activations in + fp16 outputs out; `% copy` is that rate over the copy rate, `% read` over the "
        "read-only rate.",
        "",
        "| out x in | batch | config | backend | median us | x cuBLAS | GB/s | % copy | % read | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shape = f"{r['N']}x{r['K']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['batch']} | {r['config']} | {r['backend']} | - | - | - | - | - | {r['error'][:90]} |")
            continue
        sp = f"{r['speedup']:.2f}" if r.get("speedup") else "-"
        note = r.get("route", "") + ("" if r.get("mode", "graph") == "graph" else " (eager timing)")
        fr = f"{100 * r['frac_read']:.1f}" if r.get("frac_read") else "-"
        gb = f"{r['gbps']:.0f}" if r.get("gbps") else "-"
        fc = f"{100 * r['frac_copy']:.1f}" if r.get("frac_copy") else "-"
        lines.append(
            f"| {shape} | {r['batch']} | {r['config']} | {r['backend']} | {r['median_us']:.2f} | {sp} | "
            f"{gb} | {fc} | {fr} | {note} |"
        )
    return "\n".join(lines) + "\n"


def plot(meta, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, batch in zip(axes, (1, 16)):
        ok = [r for r in rows if r["batch"] == batch and "error" not in r and r["backend"] != "cuBLAS" and r.get("speedup")]
        shapes = sorted({(r["N"], r["K"]) for r in ok})
        series = sorted({(r["config"], r["backend"]) for r in ok})
        width = 0.8 / max(1, len(series))
        for i, (cfg, be) in enumerate(series):
            ys = []
            for s in shapes:
                m = [r["speedup"] for r in ok if (r["N"], r["K"]) == s and r["config"] == cfg and r["backend"] == be]
                ys.append(m[0] if m else 0)
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=f"{cfg} {be}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"{n}x{k}" for n, k in shapes], rotation=20)
        ax.set_ylabel("speed-up over cuBLAS fp16")
        ax.set_title(f"batch {batch}, {meta['device']}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks"))
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--backends", nargs="*", default=None, help="subset of the CUDA backends")
    parser.add_argument("--shapes", nargs="*", default=None, help="OUTxIN shapes instead of the default list")
    parser.add_argument("--batches", nargs="*", type=int, default=None, help=f"batches instead of {BATCHES}")
    parser.add_argument("--no-large", action="store_true", help="leave out the batch-2048 GEMM case")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    meta, rows = run(args)
    print(save(meta, rows, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
