#!/usr/bin/env python3
"""BitNet b1.58 decode on a CPU: the 2B4T shape (or a smaller one) at batch 1, with random ternary weights.

Rows, all in one process, each the median over ``--repeats`` generations after a warm-up one:

* ``bitlab``: the generation engine as it runs by default on a CPU (cpp_cpu kernels on the CPU's best
  instruction set, torch's ops on one thread during decode and the kernels on all: ``Generator.cpu_threads``);
* ``bitlab_torch_threads``: the same with ``BITLAB_CPU_DECODE_THREADS=torch`` (torch's thread setting for all);
* ``bitlab_short_spin``: the kernels' helper threads sleeping after the default ~40 us spin during decode too,
  instead of the decode loop's ``DECODE_SPIN_US`` (``backends/cpp_cpu/threads.py``);
* ``bitlab_torch_norms`` / ``bitlab_torch_attention``: the norms / the one-token attention as torch operations
  (``BITLAB_CPU_NORM=torch`` / ``BITLAB_CPU_ATTENTION=torch``) instead of one cpp_cpu call each;
* ``bitlab_avx2``: the kernels pinned to AVX2 (``cpu_set_isa(1)``), where the CPU has AVX-512 VNNI;
* ``bitlab_head4_a8`` (and ``..._torch_threads``): the lm_head quantized per row to 4 bits on int8 activations;
* ``bf16_dense``: every projection a dense bf16 ``F.linear`` of the dequantized weights (the same engine).

Weights are never zeros: codes uniform over {-1, 0, +1}, scales in [0.01, 0.03].

Example::

    python benchmarks/bench_bitnet_cpu.py --out docs/benchmarks            # 2B4T shape, ~3 minutes on 2 cores
    python benchmarks/bench_bitnet_cpu.py --layers 2 --new-tokens 4         # quick check
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bitnet_generate import bind_dense, build_model, run_engine  # noqa: E402
from bench_output import write_outputs  # noqa: E402
from bitmodels.bitnet import BitNetConfig  # noqa: E402
from bitmodels.bitnet.cpu_threads import SWITCH  # noqa: E402
from bitmodels.bitnet.generate import Generator  # noqa: E402

ROWS = ["bitlab", "bitlab_torch_threads", "bitlab_short_spin", "bitlab_torch_norms", "bitlab_torch_attention",
        "bitlab_avx2", "bitlab_head4_a8", "bitlab_head4_a8_torch_threads", "bf16_dense"]
NORM_SWITCH = "BITLAB_CPU_NORM"  # torch: the norms as torch operations (the bf16 dense row never prepares, so torch)
ATTENTION_SWITCH = "BITLAB_CPU_ATTENTION"  # torch: one-token attention as torch operations


def run_row(name: str, cfg: BitNetConfig, args) -> dict:
    import backends.cpp_cpu.threads as cpu_threads

    model = build_model(cfg, "cpu", args.seed)
    decode_spin = cpu_threads.DECODE_SPIN_US
    spin = cpu_threads.pool_spin_us() if name.endswith("_short_spin") else decode_spin  # short: the default outside
    cpu_threads.DECODE_SPIN_US = spin
    env_before = {var: os.environ.get(var) for var in (SWITCH, NORM_SWITCH, ATTENTION_SWITCH)}
    if name.endswith("_torch_threads"):
        os.environ[SWITCH] = "torch"
    if name.endswith("_torch_norms"):
        os.environ[NORM_SWITCH] = "torch"
    if name.endswith("_torch_attention"):
        os.environ[ATTENTION_SWITCH] = "torch"
    ops = torch.ops.bitlab
    try:
        if name == "bitlab_avx2":
            ops.cpu_set_isa(1)
        head = dict(lm_head_bits=4, lm_head_activations="int8") if "head4_a8" in name else {}
        gen = Generator(model, bind=name != "bf16_dense", **head)
        if name == "bf16_dense":
            bind_dense(model, torch.device("cpu"))
        timed = run_engine(gen, 1, args.prompt_len, args.new_tokens, cfg.vocab_size, args.seed, args.repeats)
        features = ops.cpu_features()
    finally:
        cpu_threads.DECODE_SPIN_US = decode_spin
        ops.cpu_set_isa(-1)
        for var, value in env_before.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    ms = timed["decode_ms_per_step"]
    if not gen.cpu_threads.startswith("torch ops on 1 thread"):  # no decode loop setting: the default spin
        spin = cpu_threads.pool_spin_us()
    row = {"model": name, "decode_ms_per_token": ms, "tokens_per_s": 1e3 / ms, "runs_ms": timed["decode_ms_per_step_runs"],
           "threads": gen.cpu_threads, "head": gen.head_kernel, "kernels": sorted(set(gen.kernels.values())),
           "norms": gen.cpu_norm, "attention": gen.attention_kernel, "decode_spin_us": spin,
           "cpu_features": features}
    print(f"{name:32s} {ms:8.1f} ms/token  {1e3 / ms:6.2f} tokens/s  runs {row['runs_ms']}", flush=True)
    del gen, model
    return row


def markdown(meta: dict, rows: list) -> str:
    base = next((r for r in rows if r["model"] == "bf16_dense"), None)
    lines = [f"# BitNet b1.58 decode on a CPU, {meta['shape']}", "",
             f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}; batch 1, prompt "
             f"{meta['prompt_len']} tokens, {meta['new_tokens']} decode steps, median of {meta['repeats']} "
             "generations after a warm-up one.", "",
             "| model | ms / token | tokens/s | x bf16 dense | threads: torch ops / kernels |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}" if base else ""
        split = r["threads"].startswith("torch ops on 1 thread")
        threads = f"1 / {meta['threads']}" if split else f"{meta['threads']} / {meta['threads']}"
        lines.append(f"| {r['model']} | {r['decode_ms_per_token']:.1f} | {r['tokens_per_s']:.2f} | {ratio} | "
                     f"{threads} |")
    lines += ["", "Threads during decode (as `Generator.cpu_threads` says it), the head and what runs the norms and the "
              "one-token attention:", ""]
    lines += [f"* {r['model']}: {r['threads']}; head: {r['head']}; norms: {r.get('norms', 'torch')}; attention: "
              f"{r.get('attention', 'torch')}; kernel helpers spin {r.get('decode_spin_us', '?')} us between calls"
              for r in rows]
    lines += ["", f"Kernels: {rows[0]['kernels'] if rows else ''}; CPU features: "
              f"{rows[0]['cpu_features'] if rows else ''}", "", f"Command: `{meta['args']}`", ""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([r["model"] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax.set_xlabel("decode tokens/s, batch 1")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (30: the 2B4T shape)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write bitnet_cpu.{json,md,png} here")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {ROWS}")
    cfg = BitNetConfig(hidden_size=2560, num_hidden_layers=args.layers, intermediate_size=6912,
                       num_attention_heads=20, num_key_value_heads=5, vocab_size=128256,
                       max_position_embeddings=max(256, args.prompt_len + args.new_tokens + 64))
    from backends.cpp_cpu.kernels import load_ops

    load_ops()
    results = [run_row(name, cfg, args) for name in rows]
    meta = {"shape": f"hidden 2560, {args.layers} layers, intermediate 6912, vocab 128256",
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "args": "python benchmarks/bench_bitnet_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.out:
        print(write_outputs(args.out, "bitnet_cpu", meta, results, markdown, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
