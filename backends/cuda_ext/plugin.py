"""pluggy plugin registering the cuda_ext backend (imports no extension; availability says why not)."""
from backends.cuda_ext import ops
from backends.cuda_ext.kernels import KERNELS
from bitcore.hookspecs import BackendSpec, hookimpl


@hookimpl
def bitlab_register_backend() -> BackendSpec:
    return BackendSpec(
        name="cuda_ext",
        kernels=[k() for k in KERNELS],
        description="CUDA C++ extension: low-bit GEMV/GEMM on tensor cores (sm_80+), W1A1 popcount",
        version="0.1",
        availability=ops.cheap_availability,
    )
