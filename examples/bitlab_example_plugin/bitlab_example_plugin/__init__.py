"""Example third-party BitLab backend: dequantize-once dense kernels (a template for plugin authors)."""
