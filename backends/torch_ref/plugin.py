"""pluggy plugin registering the PyTorch reference backend."""
import torch

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.hookspecs import BackendSpec, hookimpl


@hookimpl
def bitlab_register_backend() -> BackendSpec:
    return BackendSpec(
        name="torch_ref",
        kernels=[TorchReferenceKernel()],
        description="PyTorch reference: every key, CPU and CUDA; the definition other backends are tested against",
        version=torch.__version__,
    )
