#!/usr/bin/env python3
"""What each kernel of a BitNet layer adds to the batch-1 decode step, measured in the CUDA graph.

A kernel's own duration says little under programmatic dependent launch: it starts early and waits,
so its profiled time includes the kernel before it.  Here each part of the layer runs twice in every
layer (the second call recomputes the same output from the same inputs, so the tokens do not change),
the step is captured and replayed as usual, and the difference to the plain step divided by the layer
count is what that part adds to the chain: its time after its wait plus one kernel boundary.

Parts (2B4T shape, random ternary weights, the default engine: compiled float ops, fused one-token
attention, the one-kernel MLP, norms that quantize):

* ``input_norm`` residual add + ``input_layernorm`` + quantization (the next layer's, one kernel)
* ``qkv``: the fused q/k/v GEMV;  ``attention``: rotary + cache write + attention (one kernel)
* ``attn_sub_norm`` + quantization;  ``o_proj``: the o GEMV
* ``post_attention_norm``: residual add + ``post_attention_layernorm`` + quantization
* ``mlp``: gate/up, squared-ReLU gate, ``ffn_sub_norm`` + quantization and down (one kernel)

``input_norm`` covers the residual add + norm before layers 2-30 and the final norm (compiled torch, not
quantizing): 30 calls; the first layer's norm of the embeddings (no residual add) is not doubled.  The norms
run as their own kernels (``norm_in_gemv=False``), so that each is a part.

    python benchmarks/bench_bitnet_step_parts.py --out docs/benchmarks
    python benchmarks/bench_bitnet_step_parts.py --plot docs/benchmarks/bitnet_step_parts.json   # redraw
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_bitnet_generate import build_model  # noqa: E402
from bench_output import cuda_available, run_meta, write_outputs  # noqa: E402
from bitmodels.bitnet import BitNetConfig  # noqa: E402
from bitmodels.bitnet.generate import Generator  # noqa: E402

PARTS = ("input_norm", "qkv", "attention", "attn_sub_norm", "o_proj", "post_attention_norm", "mlp")


class Twice:
    """Calls the wrapped callable twice and returns the second result; other attributes pass through."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        self.fn(*args, **kwargs)
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


class ResidualNormsTwice:
    """An ops set whose ``add_rms_norm`` runs twice for one of its two uses, told apart by the norm's weight:
    ``post_attention_norm`` (a layer's post_attention_layernorm) or ``input_norm`` (every other weight: a
    layer's input_layernorm after the layer before it, and the final norm)."""

    def __init__(self, base, part: str, post_attention_weights) -> None:
        self.base, self.part = base, part
        self.post_attention = {id(w) for w in post_attention_weights}
        self.norm_input, self.relu2_gate_norm, self.attention = base.norm_input, base.relu2_gate_norm, base.attention

    def add_rms_norm(self, residual, delta, weight, *args, **kwargs):
        which = "post_attention_norm" if id(weight) in self.post_attention else "input_norm"
        out = self.base.add_rms_norm(residual, delta, weight, *args, **kwargs)
        return self.base.add_rms_norm(residual, delta, weight, *args, **kwargs) if which == self.part else out


class SubNormTwice:
    """The base ops set of the fused attention, with ``norm_input`` (the attention's sub-norm) twice."""

    def __init__(self, base) -> None:
        self.base = base
        self.norm_input = Twice(base.norm_input)

    def __getattr__(self, name):
        return getattr(self.base, name)


def doubled(model, gen: Generator, part: str):
    """Make ``part`` run twice in every layer of ``gen``'s decode step; returns the undo function."""
    import backends.cuda_ext.decode_attention as fused_attention

    layers = model.model.layers
    if part in ("input_norm", "post_attention_norm"):
        gen.decode_ops = ResidualNormsTwice(gen.decode_ops, part,
                                            [layer.post_attention_layernorm.weight for layer in layers])
        return lambda: None
    if part == "attn_sub_norm":
        ops = gen.decode_ops
        if not hasattr(ops, "base"):
            raise RuntimeError(f"the sub-norm part needs the fused attention; decode ops are {type(ops).__name__}")
        base = ops.base
        ops.base = SubNormTwice(base)
        return lambda: setattr(ops, "base", base)
    if part == "attention":
        original = fused_attention.decode_attention
        fused_attention.decode_attention = Twice(original)
        return lambda: setattr(fused_attention, "decode_attention", original)
    if part in ("qkv", "o_proj"):
        saved = [layer.bound[part] for layer in layers]
        for layer in layers:
            layer.bound[part] = Twice(layer.bound[part])

        def undo():
            for layer, b in zip(layers, saved):
                layer.bound[part] = b
        return undo
    if part == "mlp":
        saved = [layer.fused_mlp for layer in layers]
        if any(f is None for f in saved):
            raise RuntimeError("the mlp part needs the one-kernel MLP (cuda_ext.bitnet_mlp)")
        for layer in layers:
            layer.fused_mlp = Twice(layer.fused_mlp)

        def undo():
            for layer, f in zip(layers, saved):
                layer.fused_mlp = f
        return undo
    raise ValueError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")


def decode_ms(gen: Generator, prompt, new_tokens: int, repeats: int) -> tuple:
    """Median decode ms per step over ``repeats`` generations (after one that compiles and captures) and
    the first tokens of the last one."""
    gen.generate([prompt], new_tokens, stop_token_ids=[], sync_every=10**9)
    times, out = [], None
    for _ in range(repeats):
        out = gen.generate([prompt], new_tokens, stop_token_ids=[], sync_every=10**9)
        times.append(out.decode_s / out.decode_steps * 1e3)
    return statistics.median(times), out.tokens[0][:16]


def markdown(meta: dict, rows: list) -> str:
    base = meta["base_ms"]
    lines = [
        "# What each part of a BitNet layer adds to the batch-1 decode step",
        "",
        f"{meta['device']}, torch {meta['torch']}, {meta['layers']} layers of the 2B4T shape, prompt "
        f"{meta['prompt_len']} tokens, {meta['new_tokens']} decode steps, median of {meta['repeats']} "
        "generations; each part run twice in every layer, step captured in a CUDA graph.  Plain step: "
        f"{base * 1e3:.0f} us ({1e3 / base:.0f} tokens/s; {meta['base_ms_runs']} ms in the plain runs).",
        "",
        "| part run twice | ms / step | + us per step | + us per layer | tokens equal |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['part']} | {r['ms_per_step']:.3f} | {r['added_us_per_step']:.1f} | "
                     f"{r['added_us_per_layer']:.2f} | {r['tokens_equal']} |")
    total = sum(r["added_us_per_layer"] for r in rows)
    lines += ["", f"Sum over the parts: {total:.1f} us per layer; the plain step spends "
              f"{meta['layer_us']:.1f} us per layer if the head and sampling take {meta['rest_us']:.0f} us.",
              "", f"Command: `python benchmarks/bench_bitnet_step_parts.py {meta['args']}`"]
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines.append("")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([r["part"] for r in rows][::-1], [r["added_us_per_layer"] for r in rows][::-1])
    ax.set_xlabel("us added per layer when the part runs twice")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    ap.add_argument("--rest-us", type=float, default=185.0,
                    help="head + sampling per step, subtracted for the per-layer figure (profile: ~170-190 us)")
    ap.add_argument("--plot", metavar="JSON", help="only redraw the table and plot from a saved JSON")
    args = ap.parse_args(argv)
    if args.plot:
        saved = json.loads(Path(args.plot).read_text())
        (Path(args.plot).with_suffix(".md")).write_text(markdown(saved["meta"], saved["rows"]))
        plot(saved["rows"], Path(args.plot).with_suffix(".png"))
        return 0
    if not cuda_available():
        return 2
    device = torch.device("cuda")
    cfg = BitNetConfig(num_hidden_layers=args.layers, max_position_embeddings=4096)
    model = build_model(cfg, device, seed=0)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

    bound = []  # the first engine prepares the weights; later ones reuse them

    def measure(part=None):
        # the norms as their own kernels (norm_in_gemv=False whatever BITLAB_NORM_GEMV says): each is a part here
        gen = Generator(model, compile=True, bind=not bound, offload_packed=True, norm_in_gemv=False)
        bound.append(True)
        undo = doubled(model, gen, part) if part else (lambda: None)
        try:
            return decode_ms(gen, prompt, args.new_tokens, args.repeats)
        finally:
            undo()
            del gen
            gc.collect()
            torch.cuda.empty_cache()

    base_ms, base_tokens = measure()
    print(f"plain step {base_ms * 1e3:.1f} us", flush=True)
    rows, plain = [], [base_ms]
    for part in args.parts:
        ms, tokens = measure(part)
        rows.append({"part": part, "ms_per_step": ms, "added_us_per_step": (ms - base_ms) * 1e3,
                     "added_us_per_layer": (ms - base_ms) * 1e3 / args.layers, "tokens_equal": tokens == base_tokens})
        print(rows[-1], flush=True)
        again, _ = measure()
        plain.append(again)
    base_ms = statistics.median(plain)  # the plain step measured between the parts
    for r in rows:
        r["added_us_per_step"] = (r["ms_per_step"] - base_ms) * 1e3
        r["added_us_per_layer"] = r["added_us_per_step"] / args.layers
    meta = run_meta(" ".join(sys.argv[1:] if argv is None else argv))
    meta.update({"timing": "CUDA-graph replay of the whole decode step, median of generations",
                 "layers": args.layers, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "repeats": args.repeats, "base_ms": base_ms, "base_ms_runs": [round(p, 4) for p in plain],
                 "rest_us": args.rest_us, "layer_us": (base_ms * 1e3 - args.rest_us) / args.layers})
    print(write_outputs(Path(args.out), "bitnet_step_parts", meta, rows, markdown, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
