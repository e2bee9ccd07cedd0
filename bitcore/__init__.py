"""bitcore: BitLab's interfaces and shared pieces (config, quantizers, packing, kernel registry).

No kernels live here; backends under ``backends/`` register them through pluggy.
"""
__version__ = "0.1.0"

from bitcore.config import BitQuantConfig  # noqa: E402

__all__ = ["BitQuantConfig", "__version__"]
