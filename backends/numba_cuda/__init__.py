"""The numba_cuda backend: low-bit linear kernels written in Python with numba.cuda (see docs/backends/numba_cuda.md)."""
