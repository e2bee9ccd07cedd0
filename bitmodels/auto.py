"""AutoBitModel: build a registered BitLab model from its config.

Example::

    model = AutoBitModel.from_config(BitMLPConfig(n_layers=3, in_channels=256, hidden_dim=128, out_channels=10))
    model = AutoBitModel.from_config("configs/mlp.yaml")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

from torch import nn

from bitmodels.configs import load_model_config, model_class_for


class AutoBitModel:
    """Factory; not instantiated."""

    def __init__(self) -> None:
        raise TypeError("AutoBitModel is a factory: use AutoBitModel.from_config(...)")

    @classmethod
    def from_config(cls, config: Union[Any, Mapping[str, Any], str, Path]) -> nn.Module:
        """Build the model for a config object, a dict with ``model_type``, or a YAML file / text."""
        if isinstance(config, (str, Path, Mapping)):
            config = load_model_config(config)
        return model_class_for(config)(config)
