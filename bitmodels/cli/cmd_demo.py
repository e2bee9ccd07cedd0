"""``bitlab demo``: the main job end to end on an embedded default.

Train a ternary BitMLP (W1.58A8) with quantization-aware training on
scikit-learn's bundled digits data, freeze it (packed 2-bit weights, latent
weights dropped), then print the test accuracy, the true weight memory against
fp32, and the forward latency of the frozen model under every backend the
kernel registry has for this machine (forced one at a time); backends that
cannot serve the model say why.

Example::

    report = run_demo(print_fn=lambda *a: None)
    assert report.accuracy >= 0.93
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

DEMO_VARIANT = "W1.58A8"
ACCURACY_FLOOR = 0.93


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a ternary BitMLP on digits, freeze it, print accuracy, memory, latency per backend")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling (default 0)")
    p.add_argument("--repeats", type=int, default=7, help="timed forward runs per backend; the median is shown (default 7)")
    p.add_argument("--device", action="append", choices=["cpu", "cuda"], default=None,
                   help="time on this device (repeatable; default: cpu, and cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the latency runs (default: torch's default for this machine)")
    p.set_defaults(run=run)


@dataclass
class BackendTiming:
    """Latency of the frozen model with ``backend`` forced on ``device`` (or why it could not run)."""

    device: str
    backend: str
    kernels: List[str] = field(default_factory=list)
    batch_ms: Optional[float] = None  # median of one forward over the whole test set
    single_ms: Optional[float] = None  # median of one forward of a single sample
    batch_best_ms: Optional[float] = None  # fastest run: the figure least disturbed by other load
    single_best_ms: Optional[float] = None
    accuracy: Optional[float] = None
    reason: str = ""  # why the backend cannot serve the model here

    @property
    def ran(self) -> bool:
        return self.batch_ms is not None


@dataclass
class DemoReport:
    accuracy: float
    correct: int
    n_test: int
    frozen_matches_eval: bool
    memory: "MemoryReport"  # noqa: F821 (imported lazily: keeps `bitlab --help` fast)
    train_seconds: float
    timings: List[BackendTiming]
    fp32_timings: List[BackendTiming]
    threads: int
    model: object = None


def _interleaved_times_ms(
    fns: Sequence[Callable[[], object]], repeats: int, sync: Callable[[], None]
) -> List[Tuple[float, float]]:
    """(median, best) wall time of each ``fn``; rounds visit every fn once, so load spikes hit all alike."""
    for fn in fns:
        fn()
        fn()  # warm-up: kernel selection, prepare (re-layout) and allocator caches
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t) * 1e3, min(t) * 1e3) for t in times]


def _bit_layers(model) -> list:
    from bitlayers.bitlinear import BitLinear

    return [m for m in model.modules() if isinstance(m, BitLinear)]


def _backend_blocker(model, backend: str, device: str) -> str:
    """Empty when ``backend`` can serve every BitLinear of ``model`` on ``device``, else the registry's reasons."""
    from bitcore.kernels import KernelRegistry

    reasons: List[str] = []
    for layer in _bit_layers(model):
        exp = KernelRegistry.explain(
            layer.quant_config, device, backend=backend, in_features=layer.in_features, out_features=layer.out_features
        )
        if exp.chosen is None:
            ours = [f"{c.kernel}: {c.reason}" for c in exp.candidates if c.backend == backend]
            for r in ours or [f"backend {backend!r} registers no kernels"]:
                if r not in reasons:
                    reasons.append(r)
    return "; ".join(reasons)


def _forced(backend: Optional[str], fn: Callable[[], object]) -> Callable[[], object]:
    from bitcore.kernels import KernelRegistry

    if backend is None:
        return fn

    def call():
        with KernelRegistry.force_backend(backend):
            return fn()

    return call


def time_device(model, reference, x, y, device: str, repeats: int) -> List[BackendTiming]:
    """Force each registered backend in turn on ``device``; time those that can serve ``model``.

    The last entry times ``reference`` (an fp32 nn.Linear model of the same shapes) for comparison.
    """
    import torch

    from bitcore.kernels import KernelRegistry

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timings = [BackendTiming(device=device, backend=b) for b in KernelRegistry.backend_names()]
    runnable = []
    with torch.inference_mode():
        for t in timings:
            t.reason = _backend_blocker(model, t.backend, device)
            if t.reason:
                continue
            with KernelRegistry.force_backend(t.backend):
                t.kernels = sorted({layer.kernel(device).name for layer in _bit_layers(model)})
                t.accuracy = float((model(x).argmax(dim=-1) == y).float().mean())
            runnable.append((t, t.backend, model))
        fp32 = BackendTiming(device=device, backend="fp32 nn.Linear", kernels=["torch (same shapes, for reference)"])
        runnable.append((fp32, None, reference))
        fns = []
        for _, backend, m in runnable:
            fns.append(_forced(backend, lambda m=m: m(x)))
            fns.append(_forced(backend, lambda m=m: m(x[:1])))
        measured = _interleaved_times_ms(fns, repeats, sync)
    for i, (t, _, _) in enumerate(runnable):
        (t.batch_ms, t.batch_best_ms), (t.single_ms, t.single_best_ms) = measured[2 * i], measured[2 * i + 1]
    return timings + [fp32]


def run_demo(
    seed: int = 0,
    repeats: int = 7,
    devices: Optional[Sequence[str]] = None,
    print_fn: Callable[..., None] = print,
    threads: Optional[int] = None,
) -> DemoReport:
    """Train, freeze, measure; prints as it goes through ``print_fn`` and returns the figures."""
    import torch

    from bitcore.kernels import KernelRegistry
    from bitmodels.training.data import load_digits_split
    from bitmodels.training.digits import DIGITS_MLP, VARIANTS, build_digits_model, float_twin, run_variant, training_for

    if repeats < 1:
        raise ValueError(f"repeats: got {repeats}; expected a positive integer")
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise ValueError(f"device: got {d!r}; allowed values are ['cpu', 'cuda']")
        if d == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: got {threads!r}; expected a positive integer")
    default_threads = torch.get_num_threads()
    threads = threads or default_threads
    quant = VARIANTS[DEMO_VARIANT]
    split = load_digits_split()
    mlp = DIGITS_MLP
    dims = "-".join(str(d) for d in [mlp.in_channels] + [mlp.hidden_dim] * (mlp.n_layers - 1) + [mlp.out_channels])
    training = training_for(DEMO_VARIANT, seed)
    print_fn(f"bitlab demo: ternary BitMLP ({DEMO_VARIANT}) trained with QAT on scikit-learn's digits, then frozen")
    print_fn(f"  data      {len(split.y_train)} train / {len(split.y_test)} test samples, 64 features, 10 classes (fixed stratified split)")
    print_fn(f"  model     BitMLP {dims}, LayerNorm before each BitLinear, {quant.describe()}")

    # Tiny matmuls: one thread trains as fast as several and does not stall on a busy machine.
    torch.set_num_threads(1)
    try:
        model = build_digits_model(quant, seed=seed, via="bitmlp")
        run = run_variant(model, DEMO_VARIANT, split, training)
    finally:
        torch.set_num_threads(threads)
    n_test = len(split.y_test)
    correct = int(round(run.accuracy * n_test))
    print_fn(
        f"  training  {training.epochs} epochs, AdamW lr {training.lr:g}, batch {training.batch_size}, "
        f"seed {seed}: {run.training.seconds:.1f} s, final loss {run.training.epoch_losses[-1]:.3f}"
    )
    print_fn("  frozen    weights packed, latent fp32 weights dropped")
    print_fn("")
    verdict = "ok" if run.accuracy >= ACCURACY_FLOOR else f"BELOW the {ACCURACY_FLOOR} floor"
    print_fn(f"accuracy   {run.accuracy:.4f} on the test split ({correct}/{n_test} correct; {verdict})")
    print_fn(
        "           frozen model predicts exactly as the trained model in eval mode on every test sample: "
        + ("yes" if run.frozen_matches_eval else "NO")
    )
    mem = run.memory
    n_scales = sum(layer.weight_scale.numel() for layer in _bit_layers(model))
    print_fn(
        f"memory     BitLinear weights {mem.packed_bytes:,} B = {mem.packed_bytes / 1024:.1f} KiB "
        f"(2 bits per ternary weight x {mem.quantized_weights:,} weights + {n_scales} float32 scale(s)) "
        f"vs {mem.fp32_weight_bytes / 1024:.1f} KiB fp32: {mem.fp32_weight_bytes / mem.packed_bytes:.1f}x smaller"
    )
    print_fn(
        f"           whole model {mem.total_bytes / 1024:.1f} KiB vs {mem.fp32_total_bytes / 1024:.1f} KiB fp32 "
        f"(biases and LayerNorm stay fp32): {mem.fp32_total_bytes / mem.total_bytes:.1f}x smaller"
    )
    print_fn("")
    print_fn(
        f"latency    frozen model forward in ms, median and best of {repeats} interleaved runs after 2 warm-ups, "
        f"{threads} CPU thread(s); every backend forced in turn"
    )
    header = (
        f"  {'device':<6} {'backend':<15} {'batch ' + str(n_test) + ' median (best)':>26} "
        f"{'batch 1 median (best)':>24} {'test acc':>8}  kernel(s)"
    )
    print_fn(header)
    timings: List[BackendTiming] = []
    fp32_timings: List[BackendTiming] = []
    reference = float_twin(DIGITS_MLP).eval()  # random weights: only its speed is of interest
    try:
        for device in devices:
            frozen = model if device == "cpu" else copy.deepcopy(model).to(device)
            x, y = split.x_test.to(device), split.y_test.to(device)
            *device_timings, fp32 = time_device(frozen, copy.deepcopy(reference).to(device), x, y, device, repeats)
            timings += device_timings
            fp32_timings.append(fp32)
            for t in [t for t in device_timings if t.ran] + [fp32]:
                acc = "" if t.accuracy is None else f"{t.accuracy:.4f}"
                print_fn(
                    f"  {device:<6} {t.backend:<15} {t.batch_ms:>12.3f} ms ({t.batch_best_ms:>7.3f}) "
                    f"{t.single_ms:>10.3f} ms ({t.single_best_ms:>7.3f}) {acc:>8}  {', '.join(t.kernels)}"
                )
    finally:
        torch.set_num_threads(default_threads)
    blocked = [t for t in timings if not t.ran]
    if blocked:
        print_fn("  cannot serve this model here:")
        for t in blocked:
            print_fn(f"    {t.device:<6} {t.backend:<15} {t.reason}")
    return DemoReport(
        accuracy=run.accuracy,
        correct=correct,
        n_test=n_test,
        frozen_matches_eval=run.frozen_matches_eval,
        memory=mem,
        train_seconds=run.training.seconds,
        timings=timings,
        fp32_timings=fp32_timings,
        threads=threads,
        model=model,
    )


def run(args) -> int:
    start = time.perf_counter()
    report = run_demo(seed=args.seed, repeats=args.repeats, devices=args.device, threads=args.threads)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0 if report.accuracy >= ACCURACY_FLOOR and report.frozen_matches_eval else 1
