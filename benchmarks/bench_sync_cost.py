#!/usr/bin/env python3
"""What one whole-GPU synchronization costs: a kernel boundary in a CUDA graph (plain or programmatic dependent
launch) against a grid barrier inside one persistent kernel, at 1 block, one block per multiprocessor and two.

It decides between a chain of small kernels and one persistent kernel per layer for batch-1 decoding: a
persistent kernel only pays where its barriers are cheaper than the kernel boundaries they replace.  Builds
``benchmarks/csrc/sync_cost.cu`` with nvcc for the current GPU, runs it, prints the table and writes
``sync_cost.{json,md,png}``.

    python benchmarks/bench_sync_cost.py --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import cuda_available, run_meta, write_outputs  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "csrc" / "sync_cost.cu"
KIND = {("kernel_boundary", 0): "kernel boundary (plain launch)",
        ("kernel_boundary", 1): "kernel boundary (programmatic dependent launch)",
        ("grid_barrier", 0): "grid barrier (persistent kernel)"}


def build_and_run(steps: int) -> list:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not on PATH")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "sync_cost"
        subprocess.run([nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", str(SOURCE),
                        "-o", str(exe)], check=True)
        out = subprocess.run([str(exe), str(steps)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        kind, blocks, pdl, us = line.split()
        rows.append({"kind": KIND[(kind, int(pdl))], "blocks": int(blocks), "us_per_sync": float(us)})
    return rows


def markdown(meta: dict, rows: list) -> str:
    lines = [f"# Cost of one GPU-wide synchronization: {meta['device']}", "",
             f"torch {meta['torch']}, {meta['date']}; {meta['steps']} dependent steps per measurement, median of 12 "
             "(a CUDA graph of kernels, or one persistent kernel); every block reads what another block wrote in "
             "the step before.  256 threads per block.", "",
             "| synchronization | blocks | us per step |", "|---|---:|---:|"]
    lines += [f"| {r['kind']} | {r['blocks']} | {r['us_per_sync']:.3f} |" for r in rows]
    lines += ["", f"Command: `python benchmarks/bench_sync_cost.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    blocks = list(dict.fromkeys(r["blocks"] for r in rows))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        vals = [next(r["us_per_sync"] for r in rows if r["kind"] == kind and r["blocks"] == b) for b in blocks]
        ax.bar([j + i * width for j in range(len(blocks))], vals, width, label=kind)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(blocks))], [f"{b} blocks" for b in blocks])
    ax.set_ylabel("us per synchronization")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    if not cuda_available():
        return 2
    rows = build_and_run(args.steps)
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    meta["steps"] = args.steps
    md = write_outputs(Path(args.out), "sync_cost", meta, rows, markdown, plot)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
