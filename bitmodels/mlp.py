"""BitMLP: a multilayer perceptron of BitLinear layers.

Example::

    model = AutoBitModel.from_config(BitMLPConfig(n_layers=3, in_channels=256, hidden_dim=128, out_channels=10))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import ConfigError
from bitlayers.bitlinear import BitLinear
from bitmodels.configs import ModelConfigMixin, register_model


@dataclass
class BitMLPConfig(ModelConfigMixin):
    """``n_layers`` BitLinear layers: in -> hidden (x n_layers-1) -> out, ReLU and dropout between.

    ``norm`` puts a LayerNorm before every hidden BitLinear (BitNet's SubLN habit:
    quantized layers see normalized inputs), which makes low-bit training stable.
    """

    model_type = "bit_mlp"

    n_layers: int = 3
    in_channels: int = 256
    hidden_dim: int = 128
    out_channels: int = 10
    dropout: float = 0.0
    norm: bool = True
    bias: bool = True
    quant_config: BitQuantConfig = field(default_factory=BitQuantConfig)

    def __post_init__(self) -> None:
        for name in ("n_layers", "in_channels", "hidden_dim", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: got {value!r}; expected a positive integer")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout: got {self.dropout!r}; expected a number in [0, 1)")
        if isinstance(self.quant_config, dict):
            self.quant_config = BitQuantConfig.from_dict(self.quant_config)


class BitMLP(nn.Module):
    def __init__(self, config: BitMLPConfig) -> None:
        super().__init__()
        self.config = config
        dims = [config.in_channels] + [config.hidden_dim] * (config.n_layers - 1) + [config.out_channels]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if config.norm:
                layers.append(nn.LayerNorm(d_in))
            layers.append(BitLinear(d_in, d_out, bias=config.bias, quant_config=config.quant_config))
            if i < config.n_layers - 1:
                layers.append(nn.ReLU())
                if config.dropout > 0:
                    layers.append(nn.Dropout(config.dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


register_model(BitMLPConfig, BitMLP)
