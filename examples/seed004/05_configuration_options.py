# Seed 004 README snippet, verbatim: configuration options.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
from bitcore.config import BitQuantConfig

# Available configurations
config = BitQuantConfig(
    weight_granularity="per_tensor",     # "per_tensor" or "per_channel"
    activation_dtype="int8",             # "float32" or "int8"
    activation_granularity="per_tensor"  # "per_tensor" or "per_channel"
)
