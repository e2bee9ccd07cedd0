# Seed 004 README snippet, verbatim: memory comparison.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
import torch
from bitcore.config import BitQuantConfig
from bitlayers.bitlinear import BitLinear

# Compare memory usage
config = BitQuantConfig(activation_dtype="int8", activation_granularity="per_tensor", weight_granularity="per_tensor")

# Regular PyTorch layer
regular_layer = torch.nn.Linear(1000, 1000)
regular_memory = regular_layer.weight.numel() * 4  # 4 bytes per float32

# Quantized BitLab layer  
quantized_layer = BitLinear(1000, 1000, quant_config=config)
quantized_layer.eval()  # Enter eval mode to quantize weights
quantized_memory = quantized_layer.qweight.numel() * 1.58  # 1.58 bits per weight

print(f"Regular layer memory: {regular_memory / 1024:.1f} KB")
print(f"Quantized layer memory: {quantized_memory / 8 / 1024:.1f} KB")  # Convert bits to bytes
print(f"Memory reduction: {(1 - quantized_memory / (regular_memory * 8)) * 100:.1f}%")
