# Seed 004 README snippet, verbatim: check cpp backend.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
from bitcore.kernels import KernelRegistry
from bitcore.config import BitQuantConfig

config = BitQuantConfig(activation_dtype="int8", activation_granularity="per_tensor", weight_granularity="per_tensor")
kernel = KernelRegistry.get_kernel_for_config(config)

print(f"Kernel: {type(kernel).__name__}")
print(f"Has C++ backend: {kernel.has_cpp_backend}")

# Check quantized weight dtype (int8 = C++, float32 = PyTorch fallback)
layer = BitLinear(10, 5, quant_config=config)
layer.eval()
print(f"Quantized weight dtype: {layer.qweight.dtype}")
