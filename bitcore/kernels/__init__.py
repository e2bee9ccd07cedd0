"""Kernel interface, registry and dispatch.

``KernelRegistry`` is the process-wide registry, loaded from plugins on first use::

    from bitcore.kernels import KernelRegistry
    kernel = KernelRegistry.get_kernel_for_config(config)
"""
from bitcore.kernels.interface import (
    ALL_KEYS,
    EPILOGUES,
    Availability,
    BitKernel,
    KernelKey,
    device_type,
    keys_product,
)
from bitcore.kernels.registry import (
    FORCE_ENV,
    BackendStatus,
    Candidate,
    Explanation,
    Registry,
    config_for_key,
)

BitKernelBase = BitKernel  # the name older BitLab code used

KernelRegistry = Registry()

__all__ = [
    "ALL_KEYS",
    "EPILOGUES",
    "Availability",
    "BitKernel",
    "BitKernelBase",
    "KernelKey",
    "KernelRegistry",
    "Registry",
    "Explanation",
    "Candidate",
    "BackendStatus",
    "FORCE_ENV",
    "config_for_key",
    "device_type",
    "keys_product",
]
