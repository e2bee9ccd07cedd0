# Seed 004 README snippet, verbatim: first quantized layer.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
import torch
from bitcore.config import BitQuantConfig
from bitlayers.bitlinear import BitLinear

# Step 1: Create quantization configuration
config = BitQuantConfig(
    activation_dtype="int8",           # Use int8 for activations
    activation_granularity="per_tensor",  # Per-tensor quantization
    weight_granularity="per_tensor"    # Per-tensor quantization
)

# Step 2: Create a quantized linear layer (just like nn.Linear!)
layer = BitLinear(
    in_features=512,
    out_features=256,
    bias=True,
    quant_config=config
)

# Step 3: Use the layer
x = torch.randn(32, 512)  # Batch size 32, 512 input features

# Training mode (full precision weights)
layer.train()
output_train = layer(x)
print(f"Training output shape: {output_train.shape}")

# Evaluation mode (quantized weights - this is where the magic happens!)
layer.eval()
output_eval = layer(x)
print(f"Quantized output shape: {output_eval.shape}")

# Check if weights are actually quantized
print(f"Quantized weight dtype: {layer.qweight.dtype}")  # Should be torch.int8
print(f"Memory savings: {layer.qweight.numel() * 1.58 / (layer.qweight.numel() * 32):.1%}")
