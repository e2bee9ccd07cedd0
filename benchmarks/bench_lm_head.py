"""BitNet 2B's lm_head alone at batch 1 (128256 x 2560): cuBLAS bf16 against the quantized heads, and the argmax after it.

Why: the head reads vocab x hidden weights every decode step; at batch 1 it is the largest single kernel outside
the layers (bf16: 656 MB).  Rows: torch's ``F.linear`` on the bf16 weight (cuBLAS), the 4- and 8-bit heads of
``bitmodels.bitnet.bindings.bind_quantized_dense`` on float and on pre-quantized int8 activations under each GEMV
variant (``BITLAB_CUDA_GEMV``: the default rule, one-shot, cluster, bulk), cuda_ext's argmax and torch's on the
logits, and the read bandwidth (a float32 sum over 656 MB) as the roofline.  One weight copy per row (every copy is
larger than L2), CUDA-graph replay, median per call.

Usage: ``python benchmarks/bench_lm_head.py [--out docs/benchmarks]``; ``--plot JSON`` redraws the table and plot
from a saved run.  Writes lm_head.{json,md,png}.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import cuda_available, run_meta, write_outputs  # noqa: E402
from gpu_timing import read_bandwidth, time_graph  # noqa: E402

VOCAB, HIDDEN = 128256, 2560
VARIANTS = ("", "oneshot", "cluster", "bulk")  # "" = the default rule
TIMING = "CUDA-graph replay, one weight copy (> L2), median per call"


def measure() -> list:
    from backends.cuda_ext.argmax import argmax_rows
    from bitcore.quantize import quantize_activation_int8
    from bitmodels.bitnet.bindings import QuantizedActivation, bind_quantized_dense

    torch.manual_seed(0)
    w = (torch.randn(VOCAB, HIDDEN, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(1, 1, HIDDEN, device="cuda").to(torch.bfloat16)
    rows = [{"case": "read bandwidth (float32 sum over 656 MB)",
             "bytes_per_s": read_bandwidth(656 << 20)["bytes_per_s"]}]
    rows.append({"case": "bf16 head, cuBLAS (F.linear)", "bytes": VOCAB * HIDDEN * 2,
                 "us": time_graph([functools.partial(torch.nn.functional.linear, x, w)])["median_us"]})
    logits = torch.nn.functional.linear(x, w).view(1, VOCAB)
    rows.append({"case": "argmax, cuda_ext", "us": time_graph([functools.partial(argmax_rows, logits)])["median_us"]})
    rows.append({"case": "argmax, torch", "us": time_graph([functools.partial(torch.argmax, logits, -1)])["median_us"]})
    q, s = quantize_activation_int8(x.view(1, HIDDEN), "per_token")
    xq = QuantizedActivation(q.view(1, 1, HIDDEN), s.view(1, 1, 1))
    for bits in (4, 8):
        for acts in ("float", "int8"):
            head = bind_quantized_dense(w, bits, torch.device("cuda"), acts)
            inp = xq if acts == "int8" else x
            for variant in VARIANTS:
                os.environ.pop("BITLAB_CUDA_GEMV", None)
                if variant:
                    os.environ["BITLAB_CUDA_GEMV"] = variant
                us = time_graph([functools.partial(head, inp)])["median_us"]
                rows.append({"case": f"{bits}-bit head, {acts} activations, {variant or 'default rule'}",
                             "bytes": VOCAB * HIDDEN * bits // 8, "us": us})
                print(json.dumps(rows[-1]), flush=True)
            os.environ.pop("BITLAB_CUDA_GEMV", None)
            del head
            torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list) -> str:
    peak = next(r["bytes_per_s"] for r in rows if "bytes_per_s" in r)
    cublas = next(r["us"] for r in rows if r["case"].startswith("bf16 head"))
    lines = [f"# BitNet 2B's lm_head alone at batch 1 ({VOCAB} x {HIDDEN}): {meta['device']}", "",
             f"{meta['timing']}; torch {meta['torch']}, {meta['date']}.  Read bandwidth beside it: "
             f"{peak / 1e12:.2f} TB/s.  Weight bytes only (the scales and activations are < 0.1 %).", "",
             "| case | us | TB/s | of the read bandwidth | x cuBLAS bf16 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "us" not in r:
            continue
        rate = r["bytes"] / (r["us"] * 1e-6) if "bytes" in r else None
        cells = (f"{rate / 1e12:.2f}", f"{100 * rate / peak:.0f} %", f"{cublas / r['us']:.2f}") if rate else ("", "", "")
        lines.append(f"| {r['case']} | {r['us']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{' '.join(['python benchmarks/bench_lm_head.py', meta['args']]).strip()}`"]
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines.append("")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [r for r in rows if "bytes" in r]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh([r["case"] for r in heads], [r["us"] for r in heads])
    ax.invert_yaxis()
    ax.set_xlabel("us per call (lower is faster)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--plot", metavar="JSON", help="only redraw the table and plot from a saved JSON")
    args = ap.parse_args(argv)
    if args.plot:
        saved = json.loads(Path(args.plot).read_text())
        print(write_outputs(Path(args.out), "lm_head", saved["meta"], saved["rows"], markdown, plot))
        return 0
    if not cuda_available():
        return 2
    meta = run_meta(" ".join(sys.argv[1:]))
    meta["timing"] = TIMING
    print(write_outputs(Path(args.out), "lm_head", meta, measure(), markdown, plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
