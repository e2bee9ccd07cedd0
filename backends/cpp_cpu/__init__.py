"""C++ CPU backend: bit-packed AVX2 / scalar kernels built as a PyTorch extension (see docs/backends/cpp_cpu.md)."""
