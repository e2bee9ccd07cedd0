"""BitNet b1.58 generation speed at the 2B4T shape with random ternary weights.

Measured in one run, on one GPU:

* **bitlab**: ``BitNetForCausalLM`` whose projections run the registry's kernels for W1.58A8
  (``cuda_ext`` when built, else the best available), decode step in a CUDA graph, float ops
  through ``torch.compile`` (``--no-compile`` to switch off), q/k/v and gate/up fused,
  canonical packed copies offloaded to the CPU after the kernels prepared theirs;
* **bf16 dense**: the same model and engine with every projection a dense bf16 ``F.linear``
  on the dequantized weights (cuBLAS);
* **transformers**: ``BitNetForCausalLM`` of transformers on the same packed weights, eager
  (its ``torch.compile``'d helpers disabled to keep compile time out of the run), batch 1 only.

Per batch size: prefill tokens/s (prompt of ``--prompt-len`` random tokens per row), decode
tokens/s over ``--new-tokens`` steps (all rows), each the median of ``--repeats`` generations after a
warm-up one, and peak GPU memory.  Weights are never zeros:
codes are uniform over {-1, 0, +1}, scales uniform in [0.01, 0.03], embeddings N(0, 1).

Example::

    python benchmarks/bench_bitnet_generate.py --out docs/benchmarks          # GPU
    python benchmarks/bench_bitnet_generate.py --plot docs/benchmarks/bitnet_generate.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_output import cuda_available  # noqa: E402
from bitcore.packing import dequantize, pack_codes  # noqa: E402
from bitmodels.bitnet import BitNetConfig, BitNetForCausalLM  # noqa: E402
from bitmodels.bitnet.generate import Generator  # noqa: E402
from bitmodels.bitnet.model import FUSED_GROUPS, QUANTIZE_IN_NORMS_MAX_TOKENS  # noqa: E402

GB = 1e9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")


def build_model(cfg: BitNetConfig, device, seed: int) -> BitNetForCausalLM:
    """The model with random ternary projections, floats in bf16, all on ``device``."""
    torch.manual_seed(seed)
    model = BitNetForCausalLM(cfg, packed_only=True).to(device=device, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    for _, layer in model.bitlinears():
        codes = torch.randint(0, 3, (layer.out_features, layer.in_features), generator=gen, device=device,
                              dtype=torch.uint8)
        layer.qweight = pack_codes(codes, 2)
        layer.weight_scale = torch.empty(1, device=device).uniform_(0.01, 0.03, generator=gen)
    for norm in [m for n, m in model.named_modules() if n.endswith("norm")]:
        norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


class DenseLinear:
    """bf16 ``F.linear`` on dequantized weights: the baseline a BitLinear replaces."""

    def __init__(self, layers, device) -> None:
        parts = []
        for layer in layers:
            p = layer.packed_weight()  # canonical copy (offloaded to the CPU): dequantize on the GPU
            p = dataclasses.replace(p, data=p.data.to(device), scale=p.scale.to(device))
            parts.append(dequantize(p, torch.bfloat16))
        self.weight = torch.cat(parts)
        self.splits = [layer.out_features for layer in layers] if len(layers) > 1 else None

    def __call__(self, x):
        y = F.linear(x, self.weight)
        return y.split(self.splits, dim=-1) if self.splits else y


def bind_dense(model: BitNetForCausalLM, device) -> None:
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.bound = {
            "qkv": DenseLinear([getattr(attn, n) for n in FUSED_GROUPS["qkv"]], device),
            "gate_up": DenseLinear([getattr(mlp, n) for n in FUSED_GROUPS["gate_up"]], device),
            "o_proj": DenseLinear([attn.o_proj], device),
            "down_proj": DenseLinear([mlp.down_proj], device),
        }


def run_engine(gen: Generator, batch: int, prompt_len: int, new_tokens: int, vocab: int, seed: int,
               repeats: int = 3) -> dict:
    """Median prefill and decode over `repeats` generations after a warm-up one (a prefill is one eager
    forward, timed once per generation: single runs of it vary by up to 2x between runs)."""
    g = torch.Generator().manual_seed(seed + batch)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()
    gen.generate(prompts, new_tokens, stop_token_ids=[], sync_every=10**9)  # compile, capture, warm caches
    _reset_peak()
    outs = [gen.generate(prompts, new_tokens, stop_token_ids=[], sync_every=10**9) for _ in range(repeats)]
    prefill_s = statistics.median(o.prefill_s for o in outs)
    step_s = statistics.median(o.decode_s / o.decode_steps for o in outs)
    return {
        "batch": batch,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "prefill_ms": prefill_s * 1e3,
        "decode_tokens_per_s": batch / step_s,
        "decode_ms_per_step": step_s * 1e3,
        "runs": repeats,
        "prefill_ms_runs": [round(o.prefill_s * 1e3, 3) for o in outs],
        "decode_ms_per_step_runs": [round(o.decode_s / o.decode_steps * 1e3, 4) for o in outs],
        "cuda_graph": outs[0].stats["cuda_graph"],
        "peak_gb": _peak_gb(),
        "sample_tokens": outs[0].tokens[0][:8],
    }


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _print_profile(prof) -> None:
    print(f"  batch {prof['batch']}: device time {prof['kernel_us_per_step']:.0f} us/step in "
          f"{prof['kernels_per_step']:.0f} kernels", flush=True)
    for row in prof["top"][:15]:
        print(f"  {row['us_per_step']:8.1f} us/step  x{row['calls_per_step']:.0f}  {row['kernel']}", flush=True)


def _kernel_times(model: BitNetForCausalLM, gen: Generator, prompts, new_tokens: int) -> dict:
    """{kernel: (total us, calls)} of one eager ``generate`` (device kernels; host-side ops on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = model.compute_device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        gen.generate(prompts, new_tokens, stop_token_ids=[], sync_every=10**9)
    times = {}
    for e in prof.key_averages():
        if on_gpu:
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if not t or e.key.startswith(("cuda", "Memcpy", "Memset", "aten::")):
                continue
        else:
            t = e.self_cpu_time_total
            if not t or not e.key.startswith("aten::"):
                continue
        times[e.key[:120]] = (t, e.count)
    return times


def profile_decode(model: BitNetForCausalLM, vocab: int, compile: bool, triton_attention: Optional[bool] = None,
                   steps: int = 16, batch: int = 1, prompt_len: int = 8) -> dict:
    """Time per kernel of an eager decode step (the kernels the CUDA graph replays), decode steps only: the
    profile of a prefill plus ``steps`` decode steps minus the profile of the same prefill alone."""
    gen = Generator(model, cuda_graph=False, compile=compile, bind=False, triton_attention=triton_attention)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    gen.generate(prompts, steps + 1, stop_token_ids=[], sync_every=10**9)  # warm-up (compile, allocator)
    full = _kernel_times(model, gen, prompts, steps + 1)
    prefill = _kernel_times(model, gen, prompts, 1)
    rows, total, launches = [], 0.0, 0
    for kernel, (t, count) in full.items():
        t0, c0 = prefill.get(kernel, (0.0, 0))
        if count - c0 <= 0:
            continue
        total += t - t0
        launches += count - c0
        rows.append({"kernel": kernel, "us_per_step": (t - t0) / steps, "calls_per_step": (count - c0) / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"batch": batch, "prompt_len": prompt_len, "steps": steps, "kernel_us_per_step": total / steps,
            "kernels_per_step": launches / steps, "top": rows[:25]}


def gen_fused_attention(result: dict) -> bool:
    return result.get("attention_kernel", "").startswith("cuda_ext")


def run_batches(name: str, gen: Generator, batches, args, vocab: int) -> list:
    rows = []
    for b in batches:
        rows.append(run_engine(gen, b, args.prompt_len, args.new_tokens, vocab, args.seed, args.repeats))
        print(name, rows[-1], flush=True)
    return rows


def transformers_model(model: BitNetForCausalLM, cfg: BitNetConfig, device):
    """transformers' BitNetForCausalLM holding the same packed weights (its own packing, 1/scale)."""
    import transformers
    from transformers.integrations.bitnet import pack_weights, replace_with_bitnet_linear
    from transformers.models.bitnet.modeling_bitnet import BitNetRotaryEmbedding
    from transformers.utils.quantization_config import BitNetQuantConfig

    from bitcore.packing import unpack_values

    hf_cfg = transformers.BitNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # transformers' BitLinear computes in the dtype it was built in
    try:
        with torch.device("meta"):
            hf = transformers.BitNetForCausalLM(hf_cfg)
        replace_with_bitnet_linear(hf, modules_to_not_convert=["lm_head"], quantization_config=BitNetQuantConfig())
    finally:
        torch.set_default_dtype(default)
    hf = hf.to_empty(device=device)
    state = {}
    for name, layer in model.bitlinears():
        values = unpack_values(layer.packed_weight()).to(device=device, dtype=torch.float32)
        state[f"{name}.weight"] = pack_weights(values)
        state[f"{name}.weight_scale"] = (1.0 / layer.weight_scale).to(device=device, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        state[name] = p.detach()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"transformers model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    hf.model.rotary_emb = BitNetRotaryEmbedding(hf_cfg).to(device)
    return hf.eval()


@torch.no_grad()
def run_transformers(hf, batch: int, prompt_len: int, new_tokens: int, vocab: int, seed: int,
                     repeats: int = 3) -> dict:
    """Median of `repeats` prefills; one decode of `new_tokens` (eager: seconds per run)."""
    import torch._dynamo

    g = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(hf.device)
    with torch._dynamo.config.patch(disable=True):
        hf(input_ids=ids[:, :16], use_cache=True)  # warm-up
        _sync()
        _reset_peak()
        prefill_runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True)
            _sync()
            t1 = time.perf_counter()
            prefill_runs.append(t1 - t0)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = hf(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync()
        t2 = time.perf_counter()
    return {
        "batch": batch,
        "prefill_tokens_per_s": batch * prompt_len / statistics.median(prefill_runs),
        "prefill_ms": statistics.median(prefill_runs) * 1e3,
        "prefill_ms_runs": [round(t * 1e3, 3) for t in prefill_runs],
        "decode_tokens_per_s": batch * new_tokens / (t2 - t1),
        "decode_ms_per_step": (t2 - t1) / new_tokens * 1e3,
        "cuda_graph": False,
        "peak_gb": _peak_gb(),
    }


@torch.no_grad()
def logits_agreement(model, hf, vocab: int, seed: int) -> dict:
    """Our logits against transformers' on one prompt (bf16 both): relative error and top-1 agreement."""
    import torch._dynamo

    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(seed)).to(hf.device)
    ours = model(ids).float()
    with torch._dynamo.config.patch(disable=True):
        theirs = hf(input_ids=ids).logits.float()
    return {
        "rel_err": float((ours - theirs).norm() / theirs.norm()),
        "top1_agree": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
    }


def head_agreement(model, bits: int, vocab: int, seed: int, activations: str = "float") -> dict:
    """Binds the lm_head quantized to ``bits`` (``activations``: float or int8 per token) and compares the
    logits of one 64-token prompt with the dense head's: relative error, top-1 agreement, the kernel and its
    weight bytes on the GPU."""
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(model.compute_device)
    model.bind_lm_head(None)
    with torch.no_grad():
        dense = model(ids).float()
        kernel = model.bind_lm_head(bits, activations=activations)
        quantized = model(ids).float()
    return {"kernel": kernel, "bits": bits, "activations": activations,
            "rel_err": float((quantized - dense).norm() / dense.norm()),
            "top1_agree": float((quantized.argmax(-1) == dense.argmax(-1)).float().mean()),
            "gpu_gb": model.weight_memory()["quantized_lm_head_gpu"] / GB}


def parse_env_variant(text: str) -> tuple:
    """``NAME:VAR=VALUE`` -> (NAME, VAR, VALUE), with an error that names the malformed part."""
    name, sep, assignment = text.partition(":")
    var, eq, value = assignment.partition("=")
    if not (sep and eq and name and var):
        raise SystemExit(f"--env-variant: got {text!r}; expected NAME:VAR=VALUE, e.g. "
                         "bitlab_norm_per_mode:BITLAB_NORM_KERNEL=per_mode")
    if not var.startswith("BITLAB_"):
        raise SystemExit(f"--env-variant: {var!r} is not one of BitLab's switches (BITLAB_...)")
    return name, var, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3,
                    help="measured generations per model and batch (medians; transformers: prefills)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-triton-attention", action="store_true")
    ap.add_argument("--no-unfused-attention", action="store_true",
                    help="skip the run with the unfused (torch.compile) one-token attention")
    ap.add_argument("--lm-head-bits", type=int, nargs="*", default=[8], choices=[2, 4, 8],
                    help="also run with the lm_head quantized per row to these bits (logit agreement reported)")
    ap.add_argument("--lm-head-a8", action="store_true",
                    help="with each --lm-head-bits run, also one with the head's input quantized per token to int8 "
                         "(lm_head_activations='int8': the int8 tensor-core path; rows bitlab_head<bits>_a8)")
    ap.add_argument("--embedding-on-host", action="store_true",
                    help="with each --lm-head-bits run, also one with the embedding table in pinned host memory "
                         "(its weights on the GPU reported)")
    ap.add_argument("--no-separate-mlp", action="store_true",
                    help="skip the run with each MLP as three kernels (when the one-kernel MLP is in use)")
    ap.add_argument("--norm-in-mlp", action="store_true",
                    help="also run with the one-kernel MLP taking the residual add and post-attention norm itself "
                         "(prepare_for_inference(norm_in_mlp=True))")
    ap.add_argument("--norm-in-gemv", action="store_true",
                    help="also run with input_layernorm inside the q/k/v GEMV and attn_sub_norm inside the o GEMV "
                         "(prepare_for_inference(norm_in_gemv=True)); with --norm-in-mlp also a run with all three")
    ap.add_argument("--gemm-past-16", action="store_true",
                    help="also run batches > 16 as before the wide cluster GEMV: the GEMM past 16 tokens "
                         "(BITLAB_CUDA_GEMV=oneshot) and norm-side quantization up to 16 tokens")
    ap.add_argument("--env-variant", action="append", default=[], metavar="NAME:VAR=VALUE",
                    help="one more row, NAME: the default model with the environment variable VAR set to VALUE while "
                         "its graphs are captured (the kernels' A/B switches, e.g. "
                         "bitlab_norm_per_mode:BITLAB_NORM_KERNEL=per_mode); repeatable")
    ap.add_argument("--profile", action="store_true",
                    help="also list the top kernels of a decode step (decode steps only, eager) at --profile-batches")
    ap.add_argument("--profile-batches", default="1", help="batches profiled with --profile (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script with --tiny")
    ap.add_argument("--tiny", action="store_true", help="a small shape instead of 2B4T (script smoke test)")
    ap.add_argument("--out", default="docs/benchmarks", help="folder for bitnet_generate.{json,md,png}")
    ap.add_argument("--plot", metavar="JSON", help="only redraw the table and plot from a saved JSON")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: at least one measured generation is needed")
    out_dir = Path(args.out)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        write_report(result, Path(args.plot).parent)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not cuda_available():
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    variants = [parse_env_variant(v) for v in args.env_variant]
    shape = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                 num_key_value_heads=2) if args.tiny else {}
    cfg = BitNetConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, **shape)
    result = {"config": {k: v for k, v in cfg.to_dict().items() if k != "quant_config"},
              "quant": cfg.quant_config.describe(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version(),
              "compile": not args.no_compile, "runs": {},
              "args": " ".join(a if a != args.out else "docs/benchmarks" for a in (sys.argv[1:] if argv is None else argv))}
    t_start = time.perf_counter()
    model = build_model(cfg, device, args.seed)
    gen = Generator(model, compile=not args.no_compile, offload_packed=True)
    _sync()
    mem = model.weight_memory()
    result["kernels"] = gen.kernels
    result["norm_quant"] = model.norm_quant
    result["norm_quant_max_tokens"] = model.quantize_in_norms_max_tokens
    result["attention_kernel"] = gen.attention_kernel
    result["mlp_kernel"] = gen.mlp_kernel
    result["argmax_kernel"] = gen.argmax_kernel
    result["advance_kernel"] = gen.advance_kernel
    result["inputs_kernel"] = gen.inputs_kernel
    result["graph_steps"] = gen.graph_steps
    result["qkv_attention"] = gen.qkv_attention
    result["norm_gemv"] = gen.norm_gemv
    result["norm_tail"] = gen.norm_tail
    result["weights"] = {
        "ternary_packed_gb": mem["packed"] / GB,
        "ternary_prepared_on_gpu_gb": mem["prepared_gpu"] / GB,
        "float_gb": mem["float"] / GB,
        "gpu_allocated_after_load_gb": torch.cuda.memory_allocated() / GB if device.type == "cuda" else float("nan"),
    }
    print(f"kernels: {gen.kernels}\nattention: {gen.attention_kernel}\nMLP: {gen.mlp_kernel}\n"
          f"argmax: {gen.argmax_kernel}\nstep bookkeeping: {gen.advance_kernel}\nstep inputs: {gen.inputs_kernel}\n"
          f"graphs: {gen.graph_steps}\nq/k/v projection: {gen.qkv_attention}\n"
          f"norms before q/k/v and o: {gen.norm_gemv}\no projection and post-attention norm: {gen.norm_tail}\n"
          f"weights: {result['weights']}", flush=True)
    result["runs"]["bitlab"] = run_batches("bitlab", gen, batches, args, cfg.vocab_size)
    if args.profile:
        for b in (int(x) for x in args.profile_batches.split(",")):
            key = f"profile_batch{b}"
            result[key] = profile_decode(model, cfg.vocab_size, not args.no_compile, batch=b,
                                         prompt_len=args.prompt_len)
            _print_profile(result[key])
    del gen  # its KV cache and graphs
    _free(device)
    past16 = [b for b in batches if b > 16]
    if args.gemm_past_16 and past16 and device.type == "cuda":
        os.environ["BITLAB_CUDA_GEMV"] = "oneshot"  # read at every launch: the graphs capture the GEMM
        model.quantize_in_norms_max_tokens = 16
        gen_g = Generator(model, compile=not args.no_compile, bind=False)
        result["runs"]["bitlab_gemm_past16"] = run_batches("bitlab_gemm_past16", gen_g, past16, args, cfg.vocab_size)
        del gen_g
        _free(device)
        os.environ.pop("BITLAB_CUDA_GEMV")
        model.quantize_in_norms_max_tokens = QUANTIZE_IN_NORMS_MAX_TOKENS
    for name, var, value in variants:
        # the same model and bindings; the kernels read their A/B switch at each launch, so at graph capture
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            gen_v = Generator(model, compile=not args.no_compile, bind=False)
            result["runs"][name] = run_batches(name, gen_v, batches, args, cfg.vocab_size)
            result.setdefault("env_variants", {})[name] = f"{var}={value}"
            del gen_v
            _free(device)
        finally:
            if old is None:
                os.environ.pop(var)
            else:
                os.environ[var] = old
    layers = model.model.layers
    if not args.no_separate_mlp and any(layer.fused_mlp is not None for layer in layers):
        # the same model and bindings; each MLP as three kernels (GEMV, norm + quantization, GEMV)
        fused = [layer.fused_mlp for layer in layers]
        for layer in layers:
            layer.fused_mlp = None
        gen_s = Generator(model, compile=not args.no_compile, bind=False)
        result["runs"]["bitlab_separate_mlp"] = run_batches("bitlab_separate_mlp", gen_s, batches, args, cfg.vocab_size)
        del gen_s
        _free(device)
        for layer, f in zip(layers, fused):
            layer.fused_mlp = f
    if args.norm_in_mlp:
        takes = [layer.fused_mlp is not None and layer.fused_mlp.norm_max_tokens > 0 for layer in layers]
        if any(takes):
            # the same model and bindings; the MLP kernel also takes the residual add and post-attention norm
            for layer, t in zip(layers, takes):
                layer.norm_in_mlp = t
            gen_n = Generator(model, compile=not args.no_compile, bind=False)
            result["runs"]["bitlab_norm_in_mlp"] = run_batches("bitlab_norm_in_mlp", gen_n, batches, args,
                                                               cfg.vocab_size)
            del gen_n
            _free(device)
            for layer in layers:
                layer.norm_in_mlp = False
        else:
            print(f"--norm-in-mlp: no layer's MLP kernel takes the norm ({model.mlp_kernel})")
    heads = [(bits, act) for bits in args.lm_head_bits for act in ("float", "int8")[:2 if args.lm_head_a8 else 1]]
    for bits, act in heads:
        head = f"bitlab_head{bits}" + ("_a8" if act == "int8" else "")
        agreement = head_agreement(model, bits, cfg.vocab_size, args.seed, act)
        result.setdefault("quantized_lm_head", {})[head] = agreement
        gen_h = Generator(model, compile=not args.no_compile, bind=False)  # the head bound above
        result["runs"][head] = run_batches(head, gen_h, batches, args, cfg.vocab_size)
        print(f"{head}:", agreement, flush=True)
        del gen_h
        _free(device)
        if args.embedding_on_host and device.type == "cuda":
            model.offload_embedding(True)
            mem = model.weight_memory()
            agreement["gpu_weights_with_host_embedding_gb"] = (
                mem["prepared_gpu"] + mem["quantized_lm_head_gpu"] + mem["float_gpu"]) / GB
            gen_e = Generator(model, compile=not args.no_compile, bind=False)
            name = f"{head}_host_embedding"
            result["runs"][name] = run_batches(name, gen_e, batches, args, cfg.vocab_size)
            del gen_e
            _free(device)
        model.bind_lm_head(None)  # brings an offloaded table back too
    # the newest kernels last: a fault there ends the process, and the rows before it are measured by then
    if args.norm_in_gemv:
        from bitmodels.bitnet.bindings import bind_norm_linears

        for layer in layers:  # the same model and bindings; the norms before q/k/v and o inside their GEMVs
            layer.norm_linears, why = bind_norm_linears(layer.bound, layer.norms_before_projections(), layer.eps)
        if any(layer.norm_linears for layer in layers):
            variants = [("bitlab_norm_in_gemv", False)]
            if args.norm_in_mlp:
                variants.append(("bitlab_norms_in_gemv_mlp", True))
            for name, in_mlp in variants:
                for layer in layers:
                    layer.norm_in_mlp = in_mlp and layer.fused_mlp is not None and layer.fused_mlp.norm_max_tokens > 0
                gen_g = Generator(model, compile=not args.no_compile, bind=False)
                result["runs"][name] = run_batches(name, gen_g, batches, args, cfg.vocab_size)
                del gen_g
                _free(device)
        else:
            print(f"--norm-in-gemv: no projection takes its norm ({why})")
        for layer in layers:
            layer.norm_linears, layer.norm_in_mlp = {}, False
    if not args.no_unfused_attention and gen_fused_attention(result):
        # the same model and bindings; one-token attention as compiled torch ops (rotary, cache write,
        # grouped matmul / softmax / matmul) instead of the fused kernel
        gen_u = Generator(model, compile=not args.no_compile, bind=False, fused_attention=False)
        result["runs"]["bitlab_unfused_attn"] = run_batches("bitlab_unfused_attn", gen_u, batches, args, cfg.vocab_size)
        del gen_u
        _free(device)
    if not args.no_triton_attention and "Triton kernel above" in result.get("attention_kernel", ""):
        # the same model and bindings; the fused kernel up to 32 rows and compiled torch above (no Triton)
        gen_n = Generator(model, compile=not args.no_compile, bind=False, triton_attention=False)
        result["runs"]["bitlab_no_triton"] = run_batches("bitlab_no_triton", gen_n, batches, args, cfg.vocab_size)
        del gen_n
        _free(device)
    if not args.no_triton_attention and not args.no_compile and device.type == "cuda":
        try:  # the same model and bindings; one-token attention as the split-KV Triton kernel
            gen_t = Generator(model, compile=True, bind=False, triton_attention=True)
            result["runs"]["bitlab_triton_attn"] = run_batches("bitlab_triton_attn", gen_t, batches, args, cfg.vocab_size)
            if args.profile:
                result["profile_batch1_triton_attn"] = profile_decode(model, cfg.vocab_size, True, True,
                                                                      prompt_len=args.prompt_len)
                _print_profile(result["profile_batch1_triton_attn"])
            del gen_t
        except Exception as exc:  # report, keep the rest of the run
            result["triton_attn_error"] = f"{type(exc).__name__}: {exc}"
            print("triton attention run failed:", result["triton_attn_error"], flush=True)
        _free(device)
    if not args.no_transformers:
        try:
            hf = transformers_model(model, cfg, device)
            result["logits_vs_transformers"] = logits_agreement(model, hf, cfg.vocab_size, args.seed)
            print("logits vs transformers:", result["logits_vs_transformers"], flush=True)
            result["runs"]["transformers"] = [
                run_transformers(hf, 1, args.prompt_len, args.hf_new_tokens, cfg.vocab_size, args.seed, args.repeats)
            ]
            print("transformers", result["runs"]["transformers"][-1], flush=True)
            del hf
        except Exception as exc:  # report, keep the rest of the run
            result["transformers_error"] = f"{type(exc).__name__}: {exc}"
            print("transformers run failed:", result["transformers_error"], flush=True)
        _free(device)
    if not args.no_dense:
        model.release_bindings()
        bind_dense(model, device)
        gen_dense = Generator(model, compile=not args.no_compile, bind=False)  # same engine, dense projections
        result["runs"]["bf16_dense"] = run_batches("bf16_dense", gen_dense, batches, args, cfg.vocab_size)
    result["wall_s"] = time.perf_counter() - t_start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bitnet_generate.json").write_text(json.dumps(result, indent=2))
    write_report(result, out_dir)
    print((out_dir / "bitnet_generate.md").read_text())
    return 0


def write_report(result: dict, out_dir: Path) -> None:
    runs = result["runs"]
    dense = {r["batch"]: r for r in runs.get("bf16_dense", [])}
    lines = [
        f"# BitNet b1.58 generation, 2B4T shape ({result['config']['num_hidden_layers']} layers), random ternary weights",
        "",
        f"{result['device']}, torch {result['torch']}, prompt {result['prompt_len']} tokens, "
        f"{result['new_tokens']} decode steps, {result['quant']}, torch.compile of float ops: {result['compile']}; "
        + (f"medians of {result['repeats']} generations after a warm-up one (transformers: of {result['repeats']} "
           "prefills, one decode)." if "repeats" in result else "one measured generation."),
        f"Kernels: {', '.join(sorted(set(result['kernels'].values())))}; "
        f"norms before the projections quantize (up to {result.get('norm_quant_max_tokens', 16)} tokens) with: "
        f"{result.get('norm_quant', 'none')}; "
        f"one-token attention: {result.get('attention_kernel', 'torch')}; MLP: {result.get('mlp_kernel', 'separate')}"
        + (f"; greedy argmax: {result['argmax_kernel']}" if "argmax_kernel" in result else "")
        + (f"; step bookkeeping: {result['advance_kernel']}" if "advance_kernel" in result else "")
        + (f"; step inputs: {result['inputs_kernel']}" if "inputs_kernel" in result else "")
        + (f"; {result['graph_steps']}" if "graph_steps" in result else "")
        + (f"; q/k/v: {result['qkv_attention']}." if "qkv_attention" in result else "."),
        "",
        "| model | batch | decode tokens/s | ms / step | x bf16 | prefill tokens/s | peak GPU GB | CUDA graph |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows in runs.items():
        for r in rows:
            ratio = ""
            if r["batch"] in dense and name != "bf16_dense":
                ratio = f"{r['decode_tokens_per_s'] / dense[r['batch']]['decode_tokens_per_s']:.2f}"
            lines.append(
                f"| {name} | {r['batch']} | {r['decode_tokens_per_s']:.0f} | {r['decode_ms_per_step']:.2f} | {ratio} | "
                f"{r['prefill_tokens_per_s']:.0f} | {r['peak_gb']:.2f} | {r['cuda_graph']} |"
            )
    w = result["weights"]
    lines += [
        "",
        f"Weights: ternary projections {w['ternary_packed_gb']:.3f} GB packed "
        f"({w['ternary_prepared_on_gpu_gb']:.3f} GB as the kernels' prepared layout on the GPU; the canonical "
        f"copy is offloaded to the CPU), float tensors (embedding tied to lm_head, norms) {w['float_gb']:.3f} GB; "
        f"GPU memory allocated after loading {w['gpu_allocated_after_load_gb']:.3f} GB.",
    ]
    names = {
        "bitlab_separate_mlp": "each MLP as three kernels (GEMV, norm + quantization, GEMV) instead of one",
        "bitlab_norm_in_mlp": "the one-kernel MLP also takes the residual add and the post-attention norm (one "
                              "norm kernel fewer per layer)",
        "bitlab_norm_in_gemv": "input_layernorm inside the q/k/v GEMV and attn_sub_norm inside the o GEMV (two "
                               "norm kernels fewer per layer)",
        "bitlab_norms_in_gemv_mlp": "those two norms inside the GEMVs and the post-attention norm inside the MLP "
                                    "kernel (three norm kernels fewer per layer)",
        "bitlab_unfused_attn": "one-token attention through the compiled torch path instead of cuda_ext's kernel",
        "bitlab_gemm_past16": "batches past 16 as before the wide cluster GEMV: the GEMM past 16 tokens and "
                              "norm-side quantization up to 16 tokens",
        "bitlab_triton_attn": "one-token attention through the split-KV Triton kernel at every batch",
        "bitlab_no_triton": "one-token attention through cuda_ext's kernel up to 32 rows and compiled torch above "
                            "(triton_attention=False; the default before the Triton kernel took 5+ rows)",
    }
    lines += [f"{name}: {text}." for name, text in names.items() if name in runs]
    for key, h in result.get("quantized_lm_head", {}).items():
        # (runs before the int8-activation head keyed these by the bit count alone)
        head, bits = (key, h["bits"]) if "bits" in h else (f"bitlab_head{key}", key)
        inputs = ", the input quantized per token to int8" if h.get("activations") == "int8" else ""
        lines.append(f"{head}: lm_head quantized per row to {bits} bits{inputs} ({h['kernel']}, {h['gpu_gb']:.3f} GB "
                     f"on the GPU besides the bf16 embedding); logits vs the bf16 head (64 tokens): relative error "
                     f"{h['rel_err']:.2e}, top-1 agreement {h['top1_agree']:.3f}.")
        if "gpu_weights_with_host_embedding_gb" in h:
            lines.append(f"{head}_host_embedding: the same head, the embedding table in pinned host memory "
                         f"(rows gathered by the GPU each step): weights on the GPU "
                         f"{h['gpu_weights_with_host_embedding_gb']:.3f} GB (prepared projections, quantized head, "
                         f"norms).")
    if "logits_vs_transformers" in result:
        a = result["logits_vs_transformers"]
        lines.append(f"Logits vs transformers' BitNetForCausalLM (bf16, same weights, 64 tokens): "
                     f"relative error {a['rel_err']:.2e}, top-1 agreement {a['top1_agree']:.3f}.")
    for key in sorted(k for k in result if k.startswith("profile_batch")):
        prof = result[key]
        label = "bitlab_triton_attn" if key.endswith("_triton_attn") else "bitlab"
        top = ", ".join(f"{r['kernel'][:40]} {r['us_per_step']:.0f} us" for r in prof["top"][:4])
        lines.append(f"Batch-{prof.get('batch', 1)} decode step of {label}, eager, decode steps only, profiled: "
                     f"{prof['kernel_us_per_step']:.0f} us of kernel time in {prof['kernels_per_step']:.0f} kernels "
                     f"(top: {top}).")
    for key in ("transformers_error", "triton_attn_error"):
        if key in result:
            lines.append(f"{key}: {result[key]}")
    lines += [f"Note: {n}" for n in result.get("notes", [])]
    lines.append("")
    lines.append(f"Command: `python benchmarks/bench_bitnet_generate.py {result.get('args', '--profile --out docs/benchmarks')}`")
    (out_dir / "bitnet_generate.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(runs)
    batches = sorted({r["batch"] for rows in runs.values() for r in rows})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        by_batch = {r["batch"]: r["decode_tokens_per_s"] for r in runs[name]}
        xs = [j + i * width for j, b in enumerate(batches) if b in by_batch]
        bars = ax.bar(xs, [by_batch[b] for b in batches if b in by_batch], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))])
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"BitNet b1.58 2B4T shape, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bitnet_generate.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
