#!/usr/bin/env python3
"""What code that is not in the instruction caches costs, and how much code BitLab's decode kernels run.

A batch-1 decode step is a chain of short kernels that run most of their code once per launch.  Where a
layer's distinct code is larger than what a multiprocessor's instruction caches hold, every kernel of every
layer fetches its code from L2 again, and the step-parts method (each part run twice, the second time with its
code cached) cannot see that.  Two measurements:

* the probe (``benchmarks/csrc/code_fetch.cu``, built with nvcc for the current GPU): CUDA graphs of 240
  launches cycling through N distinct kernels of straight-line code (8 or 32 KB each, executed once per
  launch): cycles per launch from each block's start to the end of its code, against footprint N x KB; N = 1
  keeps the code cached.  The footprint where the cycles jump is the cache's size; the jump over KB is the
  cost of a fetched kilobyte;
* the code size of each kernel in ``backends/cuda_ext/csrc`` for sm_90a (``nvcc -cubin`` and the ``.text``
  sections listed by ``readelf``; no GPU needed: ``--sizes-only``).

    python benchmarks/bench_code_fetch.py --out docs/benchmarks
    python benchmarks/bench_code_fetch.py --sizes-only

Writes code_fetch.json, .md and .png into --out (with --sizes-only: prints the sizes).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import cuda_available, run_meta, write_outputs  # noqa: E402
from kernel_timeline import build_probe  # noqa: E402

CSRC = Path(__file__).resolve().parents[1] / "backends" / "cuda_ext" / "csrc"
# The sources of the kernels one batch-1 decode layer runs (norm_quant: the norms; linear_int8: the q/k/v and o
# GEMVs; linear_norm: the norms folded into them, opt-in).
DECODE_SOURCES = ("norm_quant.cu", "linear_int8.cu", "linear_norm.cu", "decode_attention.cu", "bitnet_mlp.cu")


def parse_probe(text: str) -> dict:
    """The probe's output as {clock_khz, sms, runs: [{threads, kb, kernels, footprint_kb, us_per_launch,
    cycles_median, cycles_p90}]}."""
    out = {"runs": []}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "clock_khz":
            out["clock_khz"] = int(parts[1])
        elif parts[0] == "sm":
            out["sms"] = int(parts[1])
        elif parts[0] == "run":
            threads, kb, n = (int(v) for v in parts[1:4])
            out["runs"].append({"threads": threads, "kb": kb, "kernels": n, "footprint_kb": kb * n,
                                "us_per_launch": float(parts[4]), "cycles_median": int(parts[5]),
                                "cycles_p90": int(parts[6])})
    if not out["runs"]:
        raise RuntimeError("the code-fetch probe printed no run:\n" + text)
    return out


def with_fetch_cost(runs: list) -> list:
    """Each run with `extra_cycles_per_kb`: its median cycles over those of the same (threads, kb) with one
    kernel (code cached), per kilobyte of the kernel."""
    hot = {(r["threads"], r["kb"]): r["cycles_median"] for r in runs if r["kernels"] == 1}
    out = []
    for r in runs:
        base = hot.get((r["threads"], r["kb"]))
        extra = None if base is None else (r["cycles_median"] - base) / r["kb"]
        out.append(dict(r, extra_cycles_per_kb=extra))
    return out


def text_sections(cubin: Path) -> dict:
    """{kernel symbol: bytes of its .text section} of a cubin (``readelf -SW``)."""
    listing = subprocess.run(["readelf", "-SW", str(cubin)], check=True, capture_output=True, text=True).stdout
    return parse_text_sections(listing)


def parse_text_sections(listing: str) -> dict:
    sizes = {}
    for line in listing.splitlines():
        fields = line.replace("[ ", "[").split()
        for i, f in enumerate(fields):
            if f.startswith(".text.") and i + 4 < len(fields):
                sizes[f[len(".text."):]] = int(fields[i + 4], 16)  # name, type, address, offset, size
                break
    return sizes


def demangle(names: list) -> dict:
    if shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def kernel_code_sizes(sources=DECODE_SOURCES, arch: str = "90a") -> list:
    """[{source, kernel, bytes}] of every kernel the sources compile to for sm_<arch>, largest first."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or shutil.which("readelf") is None:
        raise RuntimeError("needs nvcc and readelf on PATH")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cubin = Path(tmp) / (Path(src).stem + ".cubin")
            subprocess.run([nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin",
                            "-I", str(CSRC), str(CSRC / src), "-o", str(cubin)], check=True)
            sizes = text_sections(cubin)
            names = demangle(sorted(sizes))
            rows += [{"source": src, "kernel": names[k], "bytes": v} for k, v in sizes.items()]
    return sorted(rows, key=lambda r: -r["bytes"])


def short_kernel(name: str, width: int = 110) -> str:
    name = name.replace("(anonymous namespace)::", "").replace("__nv_bfloat16", "bf16")
    return name if len(name) <= width else name[:width - 3] + "..."


def size_lines(sizes: list, top: int = 24) -> list:
    lines = ["| source | kernel | KB |", "|---|---|---:|"]
    lines += [f"| {r['source']} | `{short_kernel(r['kernel'])}` | {r['bytes'] / 1024:.1f} |" for r in sizes[:top]]
    return lines


def markdown(meta: dict, rows: list) -> str:
    khz = meta["clock_khz"]
    lines = [f"# Instruction fetch: cached against fetched code, {meta['device']}", "",
             f"torch {meta['torch']}, {meta['date']}; SM clock {khz / 1e6:.2f} GHz, {meta['sms']} blocks per launch "
             "(one per multiprocessor).  CUDA graphs of 240 launches cycling through N distinct kernels of KB "
             "kilobytes of straight-line FFMAs each; cycles from each block's start to the end of its code (thread "
             "0's clock64, median and 90th percentile over blocks and launches), graph time per launch.  "
             "`extra cycles per KB`: over the same kernel size with N = 1 (its code stays cached).", "",
             "| threads | KB per kernel | kernels | footprint KB | us per launch | cycles median | cycles p90 | "
             "extra cycles per KB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = "" if r["extra_cycles_per_kb"] is None else f"{r['extra_cycles_per_kb']:.0f}"
        lines.append(f"| {r['threads']} | {r['kb']} | {r['kernels']} | {r['footprint_kb']} | {r['us_per_launch']:.2f} | "
                     f"{r['cycles_median']} | {r['cycles_p90']} | {extra} |")
    if meta.get("kernel_sizes"):
        lines += ["", "Code size of the decode kernels' sources for sm_90a (`nvcc -cubin`, `.text` sections):", ""]
        lines += size_lines(meta["kernel_sizes"])
    lines += ["", f"Command: `python benchmarks/bench_code_fetch.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key in dict.fromkeys((r["threads"], r["kb"]) for r in rows):
        pts = sorted((r["footprint_kb"], r["cycles_median"] / r["kb"]) for r in rows
                     if (r["threads"], r["kb"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} threads, {key[1]} KB kernels")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("code footprint of the launches cycled through (KB)")
    ax.set_ylabel("cycles per KB of code run")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--sizes-only", action="store_true",
                    help="print the code size of the decode kernels (nvcc + readelf; no GPU)")
    ap.add_argument("--no-sizes", action="store_true", help="skip the code sizes (the probe only)")
    args = ap.parse_args(argv)
    if args.sizes_only:
        print("\n".join(size_lines(kernel_code_sizes(), top=60)))
        return 0
    if not cuda_available("--sizes-only runs without one"):
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_probe("code_fetch", Path(tmp))
        probe = parse_probe(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    rows = with_fetch_cost(probe["runs"])
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    meta.update(clock_khz=probe["clock_khz"], sms=probe["sms"])
    meta["kernel_sizes"] = [] if args.no_sizes else kernel_code_sizes()
    md = write_outputs(Path(args.out), "code_fetch", meta, rows, markdown, plot)
    print(md)
    cached = [r["cycles_median"] / r["kb"] for r in rows if r["kernels"] == 1]
    print(f"cached code: {statistics.median(cached):.0f} cycles per KB (median over the N = 1 runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
