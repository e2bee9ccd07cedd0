"""CUDA C++ extension backend: low-bit GEMV/GEMM on tensor cores (see docs/backends/cuda_ext.md)."""
