"""Small models with BitLinear layers covering the main key families (shared by the integration tests)."""
from __future__ import annotations

import torch

from bitcore.config import BitQuantConfig
from bitlayers import BitLinear

CONFIGS = [
    BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token"),
    BitQuantConfig(weight_bits=1.58, activation_dtype="float32"),
    BitQuantConfig(weight_bits=1, activation_dtype="binary", weight_granularity="per_channel"),
    BitQuantConfig(weight_bits=4, activation_dtype="int8", weight_granularity="per_group", group_size=16),
    BitQuantConfig(weight_bits=2, activation_dtype="bfloat16", weight_granularity="per_channel"),
]


def bit_mlp(in_features: int = 37, hidden: int = 29, seed: int = 0, configs=CONFIGS) -> torch.nn.Sequential:
    """nn.Linear -> BitLinear(cfg) -> ReLU ... -> nn.Linear, one BitLinear per config, in eval mode."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(in_features, hidden)]
    for i, cfg in enumerate(configs):
        act = "relu2" if i % 2 else "none"
        layers += [BitLinear(hidden, hidden, quant_config=cfg, fused_activation=act), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(hidden, 5))
    return torch.nn.Sequential(*layers).eval()
