# Seed 004 README snippet, verbatim: benchmark sizes.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
# Example: Compare model sizes
import torch
from bitcore.config import BitQuantConfig
from bitlayers.bitlinear import BitLinear

# 1M parameter model
config = BitQuantConfig(activation_dtype="int8", activation_granularity="per_tensor", weight_granularity="per_tensor")

# Regular PyTorch
regular_model = torch.nn.Linear(1000, 1000)  # 1M parameters
regular_size = regular_model.weight.numel() * 4  # 4MB

# Quantized BitLab
quantized_model = BitLinear(1000, 1000, quant_config=config)
quantized_model.eval()  # Quantize weights
quantized_size = quantized_model.qweight.numel() * 1.58 / 8  # ~200KB

print(f"Regular model: {regular_size / 1024 / 1024:.1f} MB")
print(f"Quantized model: {quantized_size / 1024:.1f} KB")
print(f"Size reduction: {(1 - quantized_size / regular_size) * 100:.1f}%")
