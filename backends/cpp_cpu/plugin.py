"""pluggy plugin registering the C++ CPU backend.

Registering is cheap: no compiler runs at import.  The registry's first availability
probe builds the extension (or loads it from the cache filled by
``python build_extensions.py``); when that fails, the backend reports itself unavailable
with the reason and dispatch falls back to the other backends.
"""
from backends.cpp_cpu.kernels import KERNELS, backend_availability
from bitcore.hookspecs import BackendSpec, hookimpl


@hookimpl
def bitlab_register_backend() -> BackendSpec:
    return BackendSpec(
        name="cpp_cpu",
        kernels=[kernel() for kernel in KERNELS],
        description="C++ CPU kernels: bit-packed weights, AVX2 (run-time detected) or scalar, OpenMP over rows",
        version="0.1",
        availability=backend_availability,
    )
