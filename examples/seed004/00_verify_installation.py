# Seed 004 README snippet, verbatim: verify installation.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
from bitcore.config import BitQuantConfig
from bitcore.kernels import KernelRegistry
from bitlayers.bitlinear import BitLinear

# Create config
config = BitQuantConfig(
    activation_dtype='int8',
    activation_granularity='per_tensor',
    weight_granularity='per_tensor'
)

# Test kernel dispatch
kernel = KernelRegistry.get_kernel_for_config(config)
print(f'✅ BitLab installation successful!')
print(f'Kernel: {type(kernel).__name__}')
print(f'Has C++ backend: {kernel.has_cpp_backend}')
