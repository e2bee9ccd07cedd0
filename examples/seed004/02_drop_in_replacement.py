# Seed 004 README snippet, verbatim: drop in replacement.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
import torch.nn as nn
from bitlayers.bitlinear import BitLinear
from bitcore.config import BitQuantConfig

# Replace this PyTorch model...
class OriginalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(784, 256),  # Regular PyTorch layer
            nn.ReLU(),
            nn.Linear(256, 10)
        )
    
    def forward(self, x):
        return self.layers(x)

# ...with this quantized version (just change nn.Linear to BitLinear!)
class QuantizedModel(nn.Module):
    def __init__(self):
        super().__init__()
        # Create quantization config once
        self.quant_config = BitQuantConfig(
            activation_dtype="int8",
            activation_granularity="per_tensor",
            weight_granularity="per_tensor"
        )
        
        self.layers = nn.Sequential(
            BitLinear(784, 256, quant_config=self.quant_config),  # Quantized!
            nn.ReLU(),
            BitLinear(256, 10, quant_config=self.quant_config)   # Quantized!
        )
    
    def forward(self, x):
        return self.layers(x)

# Use it exactly like a regular PyTorch model
model = QuantizedModel()
x = torch.randn(64, 784)
output = model(x)
print(f"Model output shape: {output.shape}")
