"""Quantization-aware training, distillation and the deploy step (freeze + true memory).

Example::

    from bitmodels.training import TrainConfig, freeze_model, load_digits_split, train_classifier
"""
from bitmodels.training.data import DigitsSplit, load_digits_split
from bitmodels.training.distill import DistillConfig, Distiller, distill, hidden_state_loss, soft_target_loss
from bitmodels.training.qat import (
    MemoryReport,
    TrainConfig,
    TrainResult,
    accuracy,
    freeze_model,
    model_memory,
    param_groups,
    predict,
    train_classifier,
    train_loop,
)

__all__ = [
    "DigitsSplit",
    "load_digits_split",
    "DistillConfig",
    "Distiller",
    "distill",
    "hidden_state_loss",
    "soft_target_loss",
    "MemoryReport",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "freeze_model",
    "model_memory",
    "param_groups",
    "predict",
    "train_classifier",
    "train_loop",
]
