# Seed 004 README snippet, verbatim: prebuilt models.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
import torch
from bitmodels import AutoBitModel
from bitmodels.mlp import BitMLPConfig

# Create a quantized MLP with just a few lines!
config = BitMLPConfig(
    n_layers=3,
    in_channels=256,
    hidden_dim=128,
    out_channels=10,
    dropout=0.1,
)

# AutoBitModel handles all the quantization setup for you
model = AutoBitModel.from_config(config)

# Test it
x = torch.randn(1, 256)
output = model(x)
print(f"Auto model output: {output.shape}")
