#!/usr/bin/env python3
"""Where BitNet's MLP kernel spends its time: stage clocks of every block, BitNet 2B shape.

Builds ``benchmarks/csrc/mlp_timeline.cu`` (which compiles ``backends/cuda_ext/csrc/bitnet_mlp.cu`` with its
``BITLAB_TIMELINE`` stamps) with nvcc for the current GPU and replays a CUDA graph of LAYERS (producer, MLP)
pairs: the producer reads 1.6 MB of weight bytes (the o projection's) and then writes the int8 rows x, letting
the MLP kernel start early as in BitNet's decode.  In one more replay thread 0 of every block of the last
layer's MLP records ``clock64()`` at each stage.  Per token count, the table gives the median block's
microseconds since its start and since the stage before, and the slowest block's; a second table splits the
blocks by their tiles (gate/up pair tiles and down tiles per block: the grid barrier waits for the slowest
block of phase A, the step for the slowest of phase B).

``--evict-code KB`` adds, per token count, a run with KB kilobytes of other code before each producer
(``benchmarks/csrc/code_flush.cuh``): the MLP kernel then starts with none of its code in the instruction caches,
as in a model step whose layer runs more code than they hold; its replay time includes that code's kernels.

    python benchmarks/bench_mlp_timeline.py --out docs/benchmarks [--norm-in] [--evict-code 256]

Writes mlp_timeline.json, .md and .png into --out.
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

STAGES = ("gate/up copies issued", "dependent-launch wait returned", "x in shared memory (sync)",
          "first gate/up pair tile landed (warp 0)", "gate and up multiplied (sync)", "m written (thread 0's part)",
          "grid barrier passed", "all of m in shared memory (sync)", "sub-norm sums of squares (sync)",
          "normed, absolute maxima (sync)", "quantized (sync)", "first down tile landed (warp 0)",
          "down multiplied (sync)", "y written (thread 0's part)")
# Stages reported per group of blocks (indices into STAGES).
GROUP_STAGES = (3, 4, 5, 6, 11, 12, 13)


def tiles_of_block(plan: list, block: int) -> tuple:
    """(gate/up pair tiles, down tiles) of `block`: the kernel's split of PA and PB tiles over G blocks."""
    G, PA, PB = plan
    return ((block + 1) * PA // G - block * PA // G, (block + 1) * PB // G - block * PB // G)


def group_summary(run: dict) -> list:
    """Per (pair tiles, down tiles) group: block count and the median us from start at GROUP_STAGES."""
    groups = {}
    for b in run["blocks"]:
        groups.setdefault(tiles_of_block(run["plan"], b["index"]), []).append(b)
    out = []
    for key in sorted(groups):
        stages = stage_summary(run, STAGES, groups[key])
        out.append({"pair_tiles": key[0], "down_tiles": key[1], "blocks": len(groups[key]),
                    "us_from_start": {STAGES[s]: stages[s]["us_from_start"] for s in GROUP_STAGES}})
    return out


def markdown(meta: dict, rows: list) -> str:
    by_mode = {r["mode"]: r for r in rows}
    lines = [f"# BitNet's MLP kernel, stage by stage: {meta['device']}", "",
             f"torch {meta['torch']}, {meta['date']}.  BitNet 2B shape (hidden 2560, intermediate 6912, bfloat16), "
             f"{meta['layers']} (producer, MLP) pairs in a CUDA graph, the MLP launched as a programmatic dependent "
             "of the producer; stage clocks of thread 0 of every block of the last layer's MLP (`clock64()`, SM "
             "clock from the device attribute): median block and slowest block, us since the block started.  "
             "`code evicted`: other code ran before each producer, so the MLP kernel starts with none of its code "
             "in the instruction caches.", ""]
    lines += stage_rows(by_mode, STAGES, with_max=True)
    lines.append("")
    lines += [run_line(m, r, "(producer, MLP)") for m, r in by_mode.items()]
    for m, r in by_mode.items():
        names = [STAGES[s] for s in GROUP_STAGES]
        lines += ["", f"Blocks by their tiles, `{m}` (median us since the block started):", "",
                  "| pair tiles | down tiles | blocks | " + " | ".join(names) + " |",
                  "|---:|---:|---:|" + "---:|" * len(names)]
        for g in r["groups"]:
            cells = ["" if g["us_from_start"][n] is None else f"{g['us_from_start'][n]:.2f}" for n in names]
            lines.append(f"| {g['pair_tiles']} | {g['down_tiles']} | {g['blocks']} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `python benchmarks/bench_mlp_timeline.py {meta['args']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2], help="token counts (1-8), one run each")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--norm-in", action="store_true",
                    help="also run each token count with the kernel taking the residual add and post-attention norm "
                         "(norm_in_mlp; stage 3 is then the norm's x)")
    ap.add_argument("--evict-code", type=int, default=0, metavar="KB",
                    help="also run each token count with KB (a multiple of 32) kilobytes of other code before each "
                         "producer: the MLP kernel's code is not cached when it starts")
    args = ap.parse_args(argv)
    if not cuda_available():
        return 2
    if any(not 1 <= t <= 8 for t in args.tokens):
        raise SystemExit(f"--tokens {args.tokens}: the MLP kernel serves 1 to 8 tokens")
    if args.evict_code < 0 or args.evict_code % 32:
        raise SystemExit(f"--evict-code {args.evict_code}: give a multiple of 32 (kilobytes)")
    variants = [(False, 0)] + ([(True, 0)] if args.norm_in else [])
    variants += [(False, args.evict_code)] if args.evict_code else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_probe("mlp_timeline", Path(tmp))
        for tokens in args.tokens:
            for norm_in, evict in variants:
                run = run_probe(exe, tokens, args.layers, args.reps, int(norm_in), evict)
                mode = (f"{tokens} token" + ("s" if tokens > 1 else "") + (", norm in" if norm_in else "")
                        + (f", code evicted ({evict} KB)" if evict else ""))
                rows.append({"mode": mode, "tokens": tokens, "norm_in": norm_in, "evicted_code_kb": evict,
                             "span_us_per_layer_pair": run["span_us"], "plan": run["plan"], **block_summary(run),
                             "stages": stage_summary(run, STAGES), "groups": group_summary(run)})
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    meta.update(layers=args.layers)
    print(write_outputs(Path(args.out), "mlp_timeline", meta, rows, markdown, plot_stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
