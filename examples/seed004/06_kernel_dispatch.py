# Seed 004 README snippet, verbatim: kernel dispatch.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
from bitcore.kernels import KernelRegistry
from bitcore.config import BitQuantConfig

# The registry automatically selects the best kernel
config = BitQuantConfig(activation_dtype="int8", activation_granularity="per_tensor", weight_granularity="per_tensor")
kernel = KernelRegistry.get_kernel_for_config(config)
print(f"Selected kernel: {type(kernel).__name__}")
