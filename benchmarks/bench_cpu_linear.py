#!/usr/bin/env python3
"""Time the cpp_cpu backend against float32 ``F.linear`` and the torch_ref backend; write JSON + a table.

Shapes are ``out x in`` weight matrices (4096x4096, 11008x4096) at batch 1, 8 and 64; configs
are W1.58A8, W1.58 with float32 activations, W1A1 (XNOR), W1 with float32 activations, W4A8
and W8A8 (per_tensor weights, per_token activations).  The whole measurement runs twice
(``--passes``); each number is the median of one pass, and the table shows the median of the
passes and their spread (max / min - 1), because the machine is shared.  Everything is timed
with 2 threads (all cores here) and with 1: on a machine other jobs keep busy, a 2-thread
OpenMP GEMM (F.linear) can stall a scheduler tick at its barrier, which flatters any
competitor; the 1-thread rows are the comparison that load skews least, and for them the
thread's CPU time is recorded too (time the work actually ran, whatever else the machine did).

    python benchmarks/bench_cpu_linear.py                 # writes docs/benchmarks/cpu_linear.{json,md}
    python benchmarks/bench_cpu_linear.py --quick         # one small shape, nothing written
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.cpp_cpu.kernels import (  # noqa: E402
    CppFloatActivationKernel,
    CppInt8ActivationKernel,
    CppXnorKernel,
    load_ops,
)
from backends.torch_ref.kernels import TorchReferenceKernel  # noqa: E402
from bitcore.config import BitQuantConfig  # noqa: E402
from bitcore.packing import pack_weight  # noqa: E402
from bitcore.quantize import quantize_weight  # noqa: E402

CONFIGS = {
    "W1.58A8": (dict(weight_bits=1.58, activation_dtype="int8"), CppInt8ActivationKernel),
    "W1.58A32": (dict(weight_bits=1.58, activation_dtype="float32"), CppFloatActivationKernel),
    "W1A1": (dict(weight_bits=1, activation_dtype="binary"), CppXnorKernel),
    "W1A32": (dict(weight_bits=1, activation_dtype="float32"), CppFloatActivationKernel),
    "W4A8": (dict(weight_bits=4, activation_dtype="int8"), CppInt8ActivationKernel),
    "W8A8": (dict(weight_bits=8, activation_dtype="int8"), CppInt8ActivationKernel),
}
SHAPES = [(4096, 4096), (11008, 4096)]
BATCHES = [1, 8, 64]
# Targets of issue 3 (ratio = F.linear float32 time / cpp_cpu time).
TARGETS = [
    ("W1.58A8", (4096, 4096), 1, 5.0),
    ("W1A1", (4096, 4096), 1, 10.0),
    ("W1.58A8", (4096, 4096), 64, 1.0),
    ("W1A1", (4096, 4096), 64, 1.0),
]


def median_ms(fn, min_reps: int = 7, min_seconds: float = 0.3, max_reps: int = 200) -> tuple:
    """(median wall ms, median CPU ms of this thread) over repeated calls."""
    fn()  # warm-up (first call may allocate scratch buffers / wake threads)
    wall, cpu = [], []
    start = time.perf_counter()
    while len(wall) < min_reps or (time.perf_counter() - start < min_seconds and len(wall) < max_reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def measure_pass(shapes, batches, configs, with_reference: bool, seed: int) -> dict:
    """{(shape, batch, name): {"fp32": ms, "cpp": ms, "ref": ms, ...}} for one pass.

    With one thread the CPU times ("fp32_cpu", "cpp_cpu") are kept as well.
    """
    single = torch.get_num_threads() == 1
    gen = torch.Generator().manual_seed(seed)
    cpp_ref = TorchReferenceKernel()
    out = {}
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        prepared = {}
        for name in configs:
            fields, kernel_cls = CONFIGS[name]
            cfg = BitQuantConfig(weight_granularity="per_tensor", activation_granularity="per_token", **fields)
            values, scale = quantize_weight(w, cfg)
            packed = pack_weight(values, scale, cfg.weight_bits, cfg.weight_granularity)
            kernel = kernel_cls()
            prepared[name] = (kernel, kernel.prepare(packed, cfg), cpp_ref.prepare(packed, cfg) if with_reference else None)
            del values
        for m in batches:
            x = torch.randn(m, k, generator=gen)
            with torch.no_grad():
                fp32, fp32_cpu = median_ms(lambda: F.linear(x, w))
                for name, (kernel, prep, ref_prep) in prepared.items():
                    cpp, cpp_cpu = median_ms(lambda: kernel.forward(x, prep))
                    row = {"fp32": fp32, "cpp": cpp}
                    if single:
                        row.update(fp32_cpu=fp32_cpu, cpp_cpu=cpp_cpu)
                    if ref_prep is not None:
                        row["ref"] = median_ms(lambda: cpp_ref.forward(x, ref_prep), min_reps=3, min_seconds=0.1)[0]
                    out[(f"{n}x{k}", m, name)] = row
                    print(f"  {n}x{k} batch {m:>2} {name:<9} fp32 {fp32:8.3f} ms  cpp {row['cpp']:8.3f} ms"
                          + (f"  ref {row['ref']:9.3f} ms" if "ref" in row else ""), flush=True)
        del w, prepared
    return out


def summarize(passes: list, threads: int) -> list:
    rows = []
    for key in passes[0]:
        shape, batch, name = key
        entry = {"threads": threads, "shape": shape, "batch": batch, "config": name}
        for col in ("fp32", "cpp", "ref", "fp32_cpu", "cpp_cpu"):
            vals = [p[key][col] for p in passes if col in p[key]]
            if vals:
                entry[f"{col}_ms"] = statistics.median(vals)
                entry[f"{col}_ms_passes"] = vals
                entry[f"{col}_spread"] = max(vals) / min(vals) - 1.0
        entry["speedup_vs_fp32"] = entry["fp32_ms"] / entry["cpp_ms"]
        entry["speedup_vs_fp32_passes"] = [p[key]["fp32"] / p[key]["cpp"] for p in passes]
        if "ref_ms" in entry:
            entry["speedup_vs_ref"] = entry["ref_ms"] / entry["cpp_ms"]
        if "cpp_cpu_ms" in entry:
            entry["cpu_time_speedup_vs_fp32"] = entry["fp32_cpu_ms"] / entry["cpp_cpu_ms"]
        rows.append(entry)
    return rows


def target_results(rows: list) -> list:
    results = []
    for name, (n, k), batch, need in TARGETS:
        for r in rows:
            if (r["config"], r["shape"], r["batch"]) != (name, f"{n}x{k}", batch):
                continue
            results.append({
                "target": f"{name} {n}x{k} batch {batch}: >= {need:g}x float32 F.linear",
                "threads": r["threads"],
                "measured": r["speedup_vs_fp32"],
                "worst_pass": min(r["speedup_vs_fp32_passes"]),
                "met": min(r["speedup_vs_fp32_passes"]) >= need,
            })
    return results


def markdown(meta: dict, rows: list, targets: list) -> str:
    lines = [
        "# CPU linear: cpp_cpu vs float32 F.linear vs torch_ref",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpu']} ({meta['cpu_features']}), {os.cpu_count()} cores, torch {meta['torch']}  ",
        f"Date: {meta['date']}; 1-minute load average [threads, before, after] each pass: {meta['load_average']}  ",
        f"Each time is the median over one pass; the table gives the median of {meta['passes']} passes and the "
        "spread between passes (max/min - 1) of the cpp_cpu time and of the float32 time.  Weights are "
        "`out x in`; activations per_token, weights per_tensor.",
        "",
        "| threads | shape | batch | config | F.linear fp32 ms | cpp_cpu ms | torch_ref ms | vs fp32 | vs torch_ref "
        "| spread cpp / fp32 | vs fp32 by CPU time |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ref = f"{r['ref_ms']:.3f}" if "ref_ms" in r else "-"
        vs_ref = f"{r['speedup_vs_ref']:.1f}x" if "speedup_vs_ref" in r else "-"
        lines.append(
            f"| {r['threads']} | {r['shape']} | {r['batch']} | {r['config']} | {r['fp32_ms']:.3f} | {r['cpp_ms']:.3f} | {ref} | "
            f"{r['speedup_vs_fp32']:.1f}x | {vs_ref} | {r['cpp_spread'] * 100:.0f}% / {r['fp32_spread'] * 100:.0f}% | "
            + (f"{r['cpu_time_speedup_vs_fp32']:.1f}x |" if "cpu_time_speedup_vs_fp32" in r else "- |")
        )
    lines += ["", "## Targets (issue 3)", "", "| target | threads | measured (median of passes) | worst pass | met |",
              "|---|---:|---:|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['threads']} | {t['measured']:.1f}x | {t['worst_pass']:.1f}x | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", default="2,1", help="comma-separated thread counts (default 2,1)")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) torch_ref timings")
    parser.add_argument("--quick", action="store_true", help="1024x1024 only, batch 1 and 8; writes nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)

    load_ops()
    shapes, batches = ([(1024, 1024)], [1, 8]) if args.quick else (SHAPES, BATCHES)
    rows, loads = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        passes = []
        for i in range(args.passes):
            before = os.getloadavg()[0]
            print(f"{threads} thread(s), pass {i + 1}/{args.passes} (load average {before:.1f})", flush=True)
            passes.append(measure_pass(shapes, batches, list(CONFIGS), not args.no_reference, seed=1234 + i))
            loads.append([threads, round(before, 2), round(os.getloadavg()[0], 2)])
        rows += summarize(passes, threads)
    targets = target_results(rows)
    meta = {
        "command": "python benchmarks/bench_cpu_linear.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_features": torch.ops.bitlab.cpu_features(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "passes": args.passes,
        "load_average": loads,
    }
    try:
        model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        meta["cpu"] = model[0].split(":", 1)[1].strip() if model else meta["cpu"]
    except OSError:
        pass
    text = markdown(meta, rows, targets)
    print("\n" + text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_linear.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1))
        (args.out / "cpu_linear.md").write_text(text)
        print(f"wrote {args.out / 'cpu_linear.json'} and {args.out / 'cpu_linear.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
