"""A small, trainer-free training loop for quantization-aware training (QAT).

BitLinear layers in train mode keep full-precision latent weights and run a
fake-quantized forward with straight-through gradients
(:mod:`bitcore.quantize`), so QAT is ordinary PyTorch training: this module
only adds the loop (seeded shuffling, AdamW, warmup + cosine learning rate,
optional autocast), evaluation, and the deploy step (:func:`freeze_model`,
which packs every BitLinear and reports the true memory).

Example::

    model = BitMLP(BitMLPConfig(in_channels=64, hidden_dim=256, quant_config=cfg))
    train_classifier(model, split.x_train, split.y_train, TrainConfig(epochs=30))
    report = freeze_model(model)
    print(accuracy(model, split.x_test, split.y_test), report)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from bitlayers.bitlinear import BitLinear

Batch = Union[Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :func:`train_loop`; validated on construction."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1  # share of the steps with a rising learning rate, then cosine decay
    seed: int = 0  # shuffling order (model initialization is the caller's: seed before building)
    autocast_dtype: Optional[torch.dtype] = None  # torch.bfloat16 / torch.float16 mixed precision
    max_grad_norm: Optional[float] = None
    latent_lr_scale: float = 1.0  # learning-rate multiplier of BitLinear latent weights (see param_groups)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}: got {value!r}; expected a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr: got {self.lr!r}; expected a positive number")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay: got {self.weight_decay!r}; expected a number >= 0")
        if not (isinstance(self.warmup_fraction, (int, float)) and 0.0 <= self.warmup_fraction < 1.0):
            raise ValueError(f"TrainConfig.warmup_fraction: got {self.warmup_fraction!r}; expected a number in [0, 1)")
        if self.autocast_dtype is not None and self.autocast_dtype not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"TrainConfig.autocast_dtype: got {self.autocast_dtype!r}; allowed values are "
                f"None, {', '.join(str(d) for d in _AUTOCAST_DTYPES)}"
            )
        if not (isinstance(self.latent_lr_scale, (int, float)) and self.latent_lr_scale >= 0):
            raise ValueError(f"TrainConfig.latent_lr_scale: got {self.latent_lr_scale!r}; expected a number >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm: got {self.max_grad_norm!r}; expected None or a positive number")


@dataclass
class TrainResult:
    """Mean training loss of every epoch, the number of optimizer steps and the wall time."""

    epoch_losses: List[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _batch_size_of(data: Batch) -> int:
    tensors = list(data.values()) if isinstance(data, Mapping) else list(data)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("training data must be a non-empty tuple or dict of tensors")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"training tensors disagree on the number of samples (first dimension): {sorted(sizes)}")
    return sizes.pop()


def _take(data: Batch, index: torch.Tensor) -> Batch:
    if isinstance(data, Mapping):
        return {k: v[index.to(v.device)] for k, v in data.items()}
    return tuple(t[index.to(t.device)] for t in data)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to ``config.lr`` over ``warmup_fraction`` of the steps, then cosine decay to 0."""
    warmup = int(round(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, lr: float, latent_lr_scale: float = 1.0) -> List[dict]:
    """Optimizer parameter groups: BitLinear latent weights at ``lr * latent_lr_scale``, the rest at ``lr``.

    BitNet trains its latent weights with a large learning rate because a small
    update rarely flips a quantized weight; with Adam-style optimizers (which
    normalize gradient magnitudes) scaling the step of those weights is how a
    gradient scale takes effect.  Works with any ``torch.optim`` optimizer::

        torch.optim.AdamW(param_groups(model, lr=1e-3, latent_lr_scale=3.0))

    Each group carries ``lr_scale`` so a schedule can rescale both together.
    """
    latent = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear) and m.weight is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in latent], "lr": lr * latent_lr_scale, "lr_scale": latent_lr_scale},
        {"params": [p for p in params if id(p) not in latent], "lr": lr, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def train_loop(model: nn.Module, data: Batch, loss_fn: LossFn, config: TrainConfig = TrainConfig()) -> TrainResult:
    """Train ``model`` in place on ``data`` (a tuple or dict of tensors sharing dimension 0).

    Every epoch visits the samples in a fresh order drawn from ``config.seed``;
    ``loss_fn(model, batch)`` returns the scalar loss of one batch (same
    structure as ``data``).  Returns the mean loss of every epoch.
    """
    n = _batch_size_of(data)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (is it frozen?)")
    optimizer = torch.optim.AdamW(
        param_groups(model, config.lr, config.latent_lr_scale), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total = config.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(config.seed)
    device_type = params[0].device.type
    result = TrainResult()
    start = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            batch = _take(data, order[i * config.batch_size:(i + 1) * config.batch_size])
            lr = lr_at(result.steps, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with torch.autocast(device_type, dtype=config.autocast_dtype or torch.bfloat16, enabled=config.autocast_dtype is not None):
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {result.steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            loss_sum += float(loss.detach())
            result.steps += 1
        result.epoch_losses.append(loss_sum / steps_per_epoch)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def cross_entropy_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``loss_fn`` for ``(inputs, labels)`` batches of a classifier returning logits."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def train_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig = TrainConfig()
) -> TrainResult:
    """Cross-entropy training of a logits classifier on ``x [n, features]``, ``y [n]`` (int64)."""
    return train_loop(model, (x, y), cross_entropy_loss, config)


# ----------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """Class predictions (argmax of the logits) in eval mode; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        chunks = [x] if batch_size is None else list(x.split(batch_size))
        return torch.cat([model(chunk).argmax(dim=-1) for chunk in chunks])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: Optional[int] = None) -> float:
    """Fraction of ``x`` whose predicted class equals ``y``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"accuracy: {x.shape[0]} inputs but {y.shape[0]} labels")
    return float((predict(model, x, batch_size) == y.to(x.device)).float().mean())


# ----------------------------------------------------------------- deployment
@dataclass(frozen=True)
class MemoryReport:
    """Weight memory of a model in true bytes.

    ``packed_bytes`` counts every BitLinear's packed codes plus its float32
    scales (a ternary weight costs 2 bits, a binary one 1 bit); ``other_bytes``
    counts every other parameter and buffer at its dtype (biases, norms, layers
    left in floating point).  The fp32 figures are the same model with every
    BitLinear weight stored as float32.
    """

    quantized_weights: int
    packed_bytes: int
    other_bytes: int

    @property
    def fp32_weight_bytes(self) -> int:
        return 4 * self.quantized_weights

    @property
    def total_bytes(self) -> int:
        return self.packed_bytes + self.other_bytes

    @property
    def fp32_total_bytes(self) -> int:
        return self.fp32_weight_bytes + self.other_bytes

    @property
    def bits_per_weight(self) -> float:
        """Packed bits per quantized weight, scales included."""
        return 8 * self.packed_bytes / self.quantized_weights if self.quantized_weights else 0.0

    def __str__(self) -> str:
        if not self.quantized_weights:
            return f"{self.total_bytes / 1024:.1f} KiB (no BitLinear layers; all floating point)"
        return (
            f"{self.total_bytes / 1024:.1f} KiB vs {self.fp32_total_bytes / 1024:.1f} KiB fp32 "
            f"({self.fp32_total_bytes / self.total_bytes:.1f}x smaller; BitLinear weights "
            f"{self.packed_bytes / 1024:.1f} KiB vs {self.fp32_weight_bytes / 1024:.1f} KiB, "
            f"{self.bits_per_weight:.2f} bits/weight with scales)"
        )


def model_memory(model: nn.Module) -> MemoryReport:
    """True weight memory of ``model``; BitLinear layers count as packed (quantizing them if needed)."""
    quantized = packed = other = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if isinstance(module, BitLinear):
            quantized += module.out_features * module.in_features
            packed += module.weight_memory_bytes()
            own = [(n, t) for n, t in own if n not in ("weight", "qweight", "weight_scale")]
        other += sum(t.numel() * t.element_size() for _, t in own if t is not None)
    return MemoryReport(quantized_weights=quantized, packed_bytes=packed, other_bytes=other)


def freeze_model(model: nn.Module) -> MemoryReport:
    """Freeze every BitLinear of ``model`` (pack, drop latent weights), set eval mode, report memory."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BitLinear layers to freeze")
    for layer in layers:
        layer.freeze()
    model.eval()
    return model_memory(model)
