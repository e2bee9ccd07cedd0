#!/usr/bin/env python3
"""Where the one-token attention kernel's time goes: stage clocks of every block, BitNet 2B heads.

Builds ``benchmarks/csrc/attention_timeline.cu`` (which compiles ``backends/cuda_ext/csrc/decode_attention.cu``
with its ``BITLAB_TIMELINE`` stamps) with nvcc for the current GPU and replays a CUDA graph of LAYERS
(projection, attention) pairs: the projection reads its own 2.4 MB of weight bytes and then writes the q/k/v row,
letting the attention start early as BitNet's GEMVs do.  In one more replay thread 0 of every block of the last
layer's attention records ``clock64()`` at each stage.  The table gives, per stage, the median over blocks of
the microseconds since the block started and since the stage before, with the attention launched as a
programmatic dependent of the projection (its first cache loads before the wait, as in BitNet's decode) and
plainly.  ``--evict-code KB`` adds a dependent run with KB kilobytes of other code before each projection
(``benchmarks/csrc/code_flush.cuh``): the attention then starts with none of its code in the instruction caches,
as in a model step whose layer runs more code than they hold; its replay time includes that code's kernels.

    python benchmarks/bench_attention_timeline.py --out docs/benchmarks [--evict-code 256]

Writes attention_timeline.json, .md and .png into --out.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import cuda_available, run_meta, write_outputs  # noqa: E402
from kernel_timeline import (block_summary, build_probe, plot_stages, run_line, run_probe, stage_rows,  # noqa: E402
                             stage_summary)

STAGES = ("first chunk's cache loads issued", "dependent-launch wait returned", "rotary, new key and value (sync)",
          "scores (sync)", "softmax (sync)", "values (sync)", "per-warp sums stored (sync)",
          "cluster barrier: partial sums visible", "weights of the cluster's blocks (sync)",
          "this block's slice merged and written",
          "the end (pull merges: a second cluster barrier)")
MODES = {"dependent": 1, "plain": 0}


def markdown(meta: dict, rows: list) -> str:
    by_mode = {r["mode"]: r for r in rows}
    lines = [f"# One-token attention, stage by stage: {meta['device']}", "",
             f"torch {meta['torch']}, {meta['date']}.  Batch {meta['batch']}, BitNet 2B heads (20 query, 5 KV, "
             f"head_dim 128), {meta['seq']} cache positions attending {meta['position'] + 1}, {meta['layers']} "
             "(projection, attention) pairs in a CUDA graph; stage clocks of thread 0 of every block of the last "
             "layer's attention (`clock64()`, SM clock from the device attribute), median over blocks.  "
             "`dependent`: launched as a programmatic dependent of the projection (first cache loads before the "
             "wait); `plain`: launched after it; `code evicted`: dependent, after other code that evicts the "
             "attention's from the instruction caches.", ""]
    lines += stage_rows(by_mode, STAGES)
    lines.append("")
    lines += [run_line(m, r, "(projection, attention)") for m, r in by_mode.items()]
    lines += ["", f"Command: `python benchmarks/bench_attention_timeline.py {meta['args']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=640)
    ap.add_argument("--position", type=int, default=600)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--evict-code", type=int, default=0, metavar="KB",
                    help="also a dependent run with KB (a multiple of 32) kilobytes of other code before each "
                         "projection: the attention's code is not cached when it starts")
    args = ap.parse_args(argv)
    if not cuda_available():
        return 2
    if not 0 <= args.position < args.seq:
        raise SystemExit(f"--position {args.position} must lie in [0, --seq {args.seq})")
    if args.evict_code < 0 or args.evict_code % 32:
        raise SystemExit(f"--evict-code {args.evict_code}: give a multiple of 32 (kilobytes)")
    runs = [(mode, pdl, 0) for mode, pdl in MODES.items()]
    if args.evict_code:
        runs.append((f"code evicted ({args.evict_code} KB)", 1, args.evict_code))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_probe("attention_timeline", Path(tmp))
        for mode, pdl, evict in runs:
            run = run_probe(exe, args.batch, args.seq, args.position, args.layers, pdl, args.reps, evict)
            rows.append({"mode": mode, "span_us_per_layer_pair": run["span_us"], **block_summary(run),
                         "stages": stage_summary(run, STAGES)})
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    meta.update(batch=args.batch, seq=args.seq, position=args.position, layers=args.layers)
    print(write_outputs(Path(args.out), "attention_timeline", meta, rows, markdown, plot_stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
