"""The digits recipe shared by ``bitlab train``, ``bitlab demo`` and the tests.

One MLP shape (:class:`BitMLP`: LayerNorm -> Linear, ReLU between) trained
on :func:`load_digits_split` in four precisions:

==========  ===================================================  ==============
name        quantization                                         target acc.
==========  ===================================================  ==============
float       none (nn.Linear)                                     >= 0.97
W1.58A8     ternary absmean weights, int8 per-token activations  >= 0.95
W1A16       binary weights, float16 activations                  >= 0.93
W1A1        binary weights, binary per-token activations         >= 0.88
==========  ===================================================  ==============

Example::

    split = load_digits_split()
    run = run_variant(build_digits_model(VARIANTS["W1.58A8"]), "W1.58A8", split)
    print(run.accuracy, run.memory)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitlayers.bitlinear import BitLinear
from bitlayers.convert import convert_to_bitlinear
from bitmodels.mlp import BitMLP, BitMLPConfig
from bitmodels.training.data import DigitsSplit
from bitmodels.training.qat import (
    LossFn,
    MemoryReport,
    TrainConfig,
    TrainResult,
    cross_entropy_loss,
    freeze_model,
    model_memory,
    predict,
    train_loop,
)

VARIANTS: Dict[str, Optional[BitQuantConfig]] = {
    "float": None,
    "W1.58A8": BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token"),
    "W1A16": BitQuantConfig(weight_bits=1, activation_dtype="float16"),
    "W1A1": BitQuantConfig(weight_bits=1, activation_dtype="binary", activation_granularity="per_token"),
}
TARGETS: Dict[str, float] = {"float": 0.97, "W1.58A8": 0.95, "W1A16": 0.93, "W1A1": 0.88}

DIGITS_MLP = BitMLPConfig(n_layers=3, in_channels=64, hidden_dim=256, out_channels=10, dropout=0.1, norm=True)
DIGITS_TRAINING = TrainConfig(epochs=30, batch_size=64, lr=3e-3, seed=0)
# The float net prefers a smaller step; latent low-bit weights want a large one (BitNet's
# "large learning rate": small updates rarely flip a quantized weight).
FLOAT_TRAINING = TrainConfig(epochs=40, batch_size=64, lr=1e-3, seed=0)


def training_for(name: str, seed: int = 0) -> TrainConfig:
    """The recipe's training hyperparameters for variant ``name`` with shuffling ``seed``."""
    base = FLOAT_TRAINING if VARIANTS.get(name, 0) is None else DIGITS_TRAINING
    return replace(base, seed=seed)


def float_twin(config: BitMLPConfig) -> BitMLP:
    """:class:`BitMLP` with every BitLinear swapped for an ``nn.Linear`` holding the same initial weights.

    Built under a seed it starts from the very weights ``BitMLP(config)`` would, and
    ``convert_to_bitlinear`` turns it back into the BitMLP structure.
    """
    model = BitMLP(config)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, BitLinear):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(layer.weight)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def build_digits_model(
    quant_config: Optional[BitQuantConfig],
    seed: int = 0,
    mlp: BitMLPConfig = DIGITS_MLP,
    via: str = "convert",
) -> nn.Module:
    """A freshly initialized (seeded) digits MLP: float when ``quant_config`` is None.

    ``via="convert"`` builds the float twin and swaps its Linear layers with
    ``convert_to_bitlinear``; ``via="bitmlp"`` builds :class:`BitMLP` directly.
    Both give the same layers and, for one seed, the same initial weights.
    """
    if via not in ("convert", "bitmlp"):
        raise ValueError(f"via: got {via!r}; allowed values are ['convert', 'bitmlp']")
    torch.manual_seed(seed)
    if quant_config is None:
        return float_twin(mlp)
    if via == "bitmlp":
        return BitMLP(replace(mlp, quant_config=quant_config))
    return convert_to_bitlinear(float_twin(mlp), quant_config)


@torch.no_grad()
def qat_predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predictions of the training-time (fake-quantized) forward with dropout off; mode restored after."""
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    try:
        return model(x).argmax(dim=-1)
    finally:
        model.train(was_training)


@dataclass
class DigitsRun:
    """Outcome of one variant: test accuracy of the deployed model, its memory, and deploy checks."""

    name: str
    quant_config: Optional[BitQuantConfig]
    accuracy: float
    memory: MemoryReport
    training: TrainResult
    model: nn.Module
    frozen_matches_eval: bool  # frozen predictions == the trained model's eval-mode predictions, every sample
    qat_agreement: float  # share of test samples where frozen == fake-quantized training forward

    @property
    def target(self) -> float:
        return TARGETS.get(self.name, 0.0)


def run_variant(
    model: nn.Module,
    name: str,
    split: DigitsSplit,
    training: Optional[TrainConfig] = None,
    loss_fn: Optional[LossFn] = None,
) -> DigitsRun:
    """Train ``model`` on the split, freeze its BitLinear layers (if any), evaluate on the test set.

    ``training`` defaults to the recipe's settings for ``name`` (:func:`training_for`);
    ``loss_fn`` (e.g. a :class:`~bitmodels.training.distill.Distiller`) defaults to cross-entropy.
    """
    training = training or training_for(name)
    result = train_loop(model, (split.x_train, split.y_train), loss_fn or cross_entropy_loss, training)
    has_bit_layers = any(isinstance(m, BitLinear) for m in model.modules())
    if not has_bit_layers:
        preds = predict(model, split.x_test)
        acc = float((preds == split.y_test).float().mean())
        return DigitsRun(name, None, acc, model_memory(model), result, model, True, 1.0)
    eval_preds = predict(model, split.x_test)
    qat_preds = qat_predictions(model, split.x_test)
    memory = freeze_model(model)
    frozen_preds = predict(model, split.x_test)
    quant_config = next(m.quant_config for m in model.modules() if isinstance(m, BitLinear))
    return DigitsRun(
        name=name,
        quant_config=quant_config,
        accuracy=float((frozen_preds == split.y_test).float().mean()),
        memory=memory,
        training=result,
        model=model,
        frozen_matches_eval=bool(torch.equal(frozen_preds, eval_preds)),
        qat_agreement=float((frozen_preds == qat_preds).float().mean()),
    )
