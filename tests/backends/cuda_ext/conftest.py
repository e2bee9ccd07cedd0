"""Shared fixture of the cuda_ext GPU tests: skip without a CUDA device, fail if cuda_ext cannot load on one."""
import pytest
import torch


@pytest.fixture(scope="session")
def cuda_ext_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch.cuda.is_available() is False")
    from backends.cuda_ext import ops

    status = ops.availability()
    assert status, f"cuda_ext unavailable on a CUDA machine: {status.reason}"
    return ops
