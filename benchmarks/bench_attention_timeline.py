#!/usr/bin/env python3
"""Where the one-token attention kernel's time goes: stage clocks of every block, BitNet 2B heads.

Builds ``benchmarks/csrc/attention_timeline.cu`` (which compiles ``backends/cuda_ext/csrc/decode_attention.cu``
with its ``BITLAB_ATTN_TIMELINE`` stamps) with nvcc for the current GPU and replays a CUDA graph of LAYERS
(projection, attention) pairs: the projection reads its own 2.4 MB of weight bytes and then writes the q/k/v row,
letting the attention start early as BitNet's GEMVs do.  In one more replay thread 0 of every block of the last
layer's attention records ``clock64()`` at each stage.  The table gives, per stage, the median over blocks of
the microseconds since the block started and since the stage before, with the attention launched as a
programmatic dependent of the projection (its first cache loads before the wait, as in BitNet's decode) and
plainly.

    python benchmarks/bench_attention_timeline.py --out docs/benchmarks

Writes attention_timeline.json, .md and .png into --out.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import run_meta, write_outputs  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "csrc" / "attention_timeline.cu"
STAGES = ("first chunk's cache loads issued", "dependent-launch wait returned", "rotary, new key and value (sync)",
          "scores (sync)", "softmax (sync)", "values (sync)", "per-warp sums stored (sync)",
          "cluster barrier: partial sums visible", "this block's slice merged and written", "final cluster barrier")
MODES = {"dependent": 1, "plain": 0}


def build(tmp: Path) -> Path:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not on PATH")
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        raise RuntimeError(f"GPU compute capability {major}.{minor}: the attention kernel needs 9.0")
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    exe = tmp / "attention_timeline"
    subprocess.run([nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", str(SOURCE),
                    "-o", str(exe)], check=True)
    return exe


def parse(text: str) -> dict:
    """The program's output as {span_us, clock_khz, blocks: [(start_ns, end_ns, [cycles at stages 1..])]}."""
    out = {"blocks": []}
    for line in text.splitlines():
        parts = line.split()
        if parts[0] in ("span_us", "clock_khz"):
            out[parts[0]] = float(parts[1])
        elif parts[0] == "block":
            out["blocks"].append((int(parts[2]), int(parts[3]), [int(c) for c in parts[4:]]))
    if not out["blocks"]:
        raise RuntimeError("the timeline program recorded no block:\n" + text)
    return out


def summarize(run: dict) -> dict:
    """Median over blocks of microseconds since the block's start at each stage (unset stages left out)."""
    us_per_cycle = 1e3 / run["clock_khz"]
    stages = []
    for s, name in enumerate(STAGES):
        cycles = [b[2][s] for b in run["blocks"] if b[2][s] >= 0]
        stages.append({"stage": name, "blocks": len(cycles),
                       "us_from_start": statistics.median(cycles) * us_per_cycle if cycles else None})
    prev = 0.0
    for st in stages:
        if st["us_from_start"] is not None:
            st["us_from_previous"] = st["us_from_start"] - prev
            prev = st["us_from_start"]
    starts = [b[0] for b in run["blocks"]]
    ends = [b[1] for b in run["blocks"] if b[1]]
    return {"span_us_per_layer_pair": run["span_us"], "blocks": len(run["blocks"]),
            "starts_spread_us": (max(starts) - min(starts)) / 1e3,
            "kernel_us_first_start_to_last_end": (max(ends) - min(starts)) / 1e3 if ends else None,
            "block_us_median": statistics.median(b[1] - b[0] for b in run["blocks"] if b[1]) / 1e3 if ends else None,
            "stages": stages}


def markdown(meta: dict, rows: list) -> str:
    by_mode = {r["mode"]: r for r in rows}
    lines = [f"# One-token attention, stage by stage: {meta['device']}", "",
             f"torch {meta['torch']}, {meta['date']}.  Batch {meta['batch']}, BitNet 2B heads (20 query, 5 KV, "
             f"head_dim 128), {meta['seq']} cache positions attending {meta['position'] + 1}, {meta['layers']} "
             "(projection, attention) pairs in a CUDA graph; stage clocks of thread 0 of every block of the last "
             "layer's attention (`clock64()`, SM clock from the device attribute), median over blocks.  "
             "`dependent`: launched as a programmatic dependent of the projection (first cache loads before the "
             "wait); `plain`: launched after it.", "",
             "| stage | " + " | ".join(f"{m} us from start | {m} us step" for m in by_mode) + " |",
             "|---|" + "---:|---:|" * len(by_mode)]
    for s, name in enumerate(STAGES):
        cells = []
        for r in by_mode.values():
            st = r["stages"][s]
            if st["us_from_start"] is None:
                cells += ["", ""]
            else:
                cells += [f"{st['us_from_start']:.2f}", f"{st['us_from_previous']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for m, r in by_mode.items():
        lines.append(f"* `{m}`: {r['blocks']} blocks; graph replay {r['span_us_per_layer_pair']:.2f} us per "
                     f"(projection, attention) pair; block starts spread over {r['starts_spread_us']:.2f} us; "
                     f"median block {r['block_us_median']:.2f} us; first start to last end "
                     f"{r['kernel_us_first_start_to_last_end']:.2f} us (`%globaltimer`).")
    lines += ["", f"Command: `python benchmarks/bench_attention_timeline.py {meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for y, r in enumerate(rows):
        left = 0.0
        for s, st in enumerate(r["stages"]):
            if st["us_from_start"] is None:
                continue
            ax.barh(y, st["us_from_previous"], left=left, color=plt.cm.tab10(s % 10),
                    label=st["stage"] if y == 0 else None)
            left = st["us_from_start"]
    ax.set_yticks(range(len(rows)), [r["mode"] for r in rows])
    ax.set_xlabel("us since the block started (median block)")
    ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=640)
    ap.add_argument("--position", type=int, default=600)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if not 0 <= args.position < args.seq:
        raise SystemExit(f"--position {args.position} must lie in [0, --seq {args.seq})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        for mode, pdl in MODES.items():
            cmd = [str(exe), str(args.batch), str(args.seq), str(args.position), str(args.layers), str(pdl),
                   str(args.reps)]
            run = parse(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows.append({"mode": mode, **summarize(run)})
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    meta.update(batch=args.batch, seq=args.seq, position=args.position, layers=args.layers)
    print(write_outputs(Path(args.out), "attention_timeline", meta, rows, markdown, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
