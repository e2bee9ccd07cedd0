"""The PyTorch reference backend: every key, CPU and CUDA, simple and obviously right."""
