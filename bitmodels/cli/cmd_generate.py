"""``bitlab generate``: stream text from a BitNet b1.58 checkpoint directory with its own tokenizer (offline).

Example::

    bitlab generate --model checkpoints/bitnet-b1.58-2B-4T --prompt "The capital of France is" --max-new-tokens 64
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a BitNet b1.58 model (transformers or BitLab checkpoint)")
    p.add_argument("--model", required=True, help="local checkpoint directory holding the tokenizer too")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (a single prompt streams as it is generated)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the float ops of the decode step")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-sequence tokens")
    p.add_argument("--lm-head-bits", type=int, choices=[2, 4, 8], default=None,
                   help="quantize the output head per vocabulary row (faster decode, approximate logits)")
    p.add_argument("--lm-head-activations", choices=["float", "int8"], default="float",
                   help="with --lm-head-bits: multiply the head's input as it is (float) or quantized per token (int8: "
                        "the int8 tensor-core path)")
    p.add_argument("--embedding-on-host", action="store_true",
                   help="with --lm-head-bits on CUDA: keep the embedding table in pinned host memory (less GPU memory)")
    p.set_defaults(run=run)


class _TextStream:
    """Prints the new text of one sequence as token chunks arrive (decoding the whole prefix each time,
    so multi-token characters come out whole)."""

    def __init__(self, tokenizer, out=None) -> None:
        # sys.stdout when the stream starts, not when this module was imported (it may have been replaced since)
        self.tokenizer, self.out = tokenizer, sys.stdout if out is None else out
        self.ids, self.shown = [], ""

    def __call__(self, chunks) -> None:
        self.ids.extend(chunks[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from bitmodels.bitnet import BitNetForCausalLM
    from bitmodels.bitnet.generate import Generator
    from bitmodels.bitnet.sampling import SamplingConfig

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.lm_head_activations != "float" and args.lm_head_bits is None:
        print("error: --lm-head-activations int8 needs --lm-head-bits (the dense head takes float input)",
              file=sys.stderr)
        return 2
    if args.embedding_on_host and (args.lm_head_bits is None or device.type != "cuda"):
        print("error: --embedding-on-host needs --lm-head-bits (the dense head reads the tied table on the GPU) "
              f"and a CUDA device (got {device})", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = BitNetForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    gen = Generator(model, cuda_graph=(device.type == "cuda" and not args.no_cuda_graph), compile=args.compile,
                    offload_packed=(device.type == "cuda"), lm_head_bits=args.lm_head_bits,
                    embedding_on_host=args.embedding_on_host, lm_head_activations=args.lm_head_activations)
    prompts = [tokenizer(p)["input_ids"] for p in args.prompt]
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    stops = [] if args.ignore_eos else None
    if tokenizer.eos_token_id is not None and stops is None:
        stops = sorted(set(model.config.stop_token_ids) | {tokenizer.eos_token_id})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
    streamer = _TextStream(tokenizer) if len(prompts) == 1 else None
    if streamer is not None:
        sys.stdout.write(args.prompt[0])
    out = gen.generate(prompts, args.max_new_tokens, sampling, stop_token_ids=stops, pad_token_id=pad,
                       seed=args.seed, stream=streamer, sync_every=1 if streamer else 16)
    if streamer is not None:
        sys.stdout.write("\n")
    else:
        for prompt, tokens in zip(args.prompt, out.tokens):
            print(f"{prompt}{tokenizer.decode(tokens, skip_special_tokens=True)}")
    n = sum(len(t) for t in out.tokens)
    rate = out.decode_steps * len(prompts) / out.decode_s if out.decode_s > 0 else float("nan")
    print(f"[{n} tokens; prefill {out.prefill_s * 1e3:.1f} ms; decode {rate:.1f} tokens/s; "
          f"kernels {sorted(set(gen.kernels.values()))}]", file=sys.stderr)
    return 0
