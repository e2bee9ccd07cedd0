"""``bitlab train``: quantization-aware training on scikit-learn's digits in four precisions.

Trains the float MLP, then the same MLP converted with ``convert_to_bitlinear``
to ternary W1.58A8, binary-weight W1A16 and fully binary W1A1, freezes each
low-bit model (packed weights, latent weights dropped) and prints the test
accuracy and the frozen model's true memory.
"""
from __future__ import annotations

import time

from bitmodels.training.digits import TARGETS, VARIANTS


def register(sub) -> None:
    p = sub.add_parser("train", help="QAT on digits: float, W1.58A8, W1A16, W1A1; accuracy and frozen memory")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                   help=f"which models to train (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs for every variant")
    p.add_argument("--distill", action="store_true",
                   help="train the low-bit models as students of the float model (KL on soft targets + labels)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these matmuls are too small to gain from more)")
    p.set_defaults(run=run)


def run(args) -> int:
    from dataclasses import replace

    import torch

    from bitmodels.training.data import load_digits_split
    from bitmodels.training.digits import DIGITS_MLP, build_digits_model, run_variant, training_for
    from bitmodels.training.distill import DistillConfig, Distiller

    if args.threads < 1:
        raise SystemExit(f"--threads: got {args.threads}; expected a positive integer")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"--epochs: got {args.epochs}; expected a positive integer")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = load_digits_split()
    mlp = DIGITS_MLP
    dims = "-".join(str(d) for d in [mlp.in_channels] + [mlp.hidden_dim] * (mlp.n_layers - 1) + [mlp.out_channels])
    print(
        f"digits: {len(split.y_train)} train / {len(split.y_test)} test samples (stratified, fixed split), "
        f"MLP {dims} with LayerNorm, seed {args.seed}, {args.threads} thread(s)"
    )
    names = [n for n in VARIANTS if n in args.variants]
    if args.distill and "float" not in names:
        names.insert(0, "float")  # the teacher
    header = f"{'model':<9} {'quantization':<30} {'test acc':>8} {'target':>7} {'frozen memory':>14} {'fp32':>10} {'ratio':>6} {'train s':>8}"
    print(header)
    print("-" * len(header))
    teacher = None
    missed, mismatched = [], []
    for name in names:
        quant = VARIANTS[name]
        training = training_for(name, args.seed)
        if args.epochs is not None:
            training = replace(training, epochs=args.epochs)
        model = build_digits_model(quant, seed=args.seed)
        loss_fn = None
        if args.distill and teacher is not None and quant is not None:
            loss_fn = Distiller(model, teacher, DistillConfig(temperature=2.0, alpha=0.7))
        result = run_variant(model, name, split, training, loss_fn=loss_fn)
        if quant is None:
            teacher = result.model
        label = "fp32 (nn.Linear)" if quant is None else quant.describe()
        mem = result.memory
        print(
            f"{name:<9} {label:<30} {result.accuracy:>8.4f} {'>=' + format(TARGETS[name], '.2f'):>7} "
            f"{mem.total_bytes / 1024:>10.1f} KiB {mem.fp32_total_bytes / 1024:>6.1f} KiB {mem.fp32_total_bytes / mem.total_bytes:>5.1f}x "
            f"{result.training.seconds:>8.1f}"
        )
        if result.accuracy < TARGETS[name]:
            missed.append(f"{name} {result.accuracy:.4f} < {TARGETS[name]:.2f}")
        if not result.frozen_matches_eval:
            mismatched.append(name)
    print()
    print(
        "memory: true bytes of every weight, bias and norm parameter; BitLinear weights counted packed "
        "(ternary 2 bits/weight, binary 1 bit/weight) plus their float32 scales"
    )
    print(
        "frozen models predict exactly as the trained models in eval mode on every test sample: "
        + ("yes" if not mismatched else f"NO for {mismatched}")
    )
    print(f"total {time.perf_counter() - start:.1f} s")
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 1 if missed or mismatched else 0
