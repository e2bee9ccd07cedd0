"""AutoBitModel: build a registered BitLab model from its config.

Example::

    model = AutoBitModel.from_config(BitMLPConfig(n_layers=3, in_channels=256, hidden_dim=128, out_channels=10))
    model = AutoBitModel.from_config("configs/mlp.yaml")
    model = AutoBitModel.from_pretrained(hf_model_or_dir, quant_config=BitQuantConfig(weight_bits=8))
    AutoBitModel.save_pretrained(model, "out/dir")
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

    @classmethod
    def from_pretrained(cls, model_or_path, quant_config=None, modules_to_not_convert=None, **kwargs) -> nn.Module:
        """Convert a transformers model (object or local dir), or load a saved / BitNet checkpoint.

        See :func:`bitmodels.hf.convert.from_pretrained` for the keyword arguments.
        """
        from bitmodels.hf.convert import from_pretrained

        return from_pretrained(model_or_path, quant_config, modules_to_not_convert, **kwargs)

    @staticmethod
    def save_pretrained(model: nn.Module, directory: Union[str, Path]) -> Path:
        """Save a converted transformers model as packed safetensors + ``bitlab_config.json``."""
        from bitmodels.hf.checkpoint import save_pretrained

        return save_pretrained(model, directory)
