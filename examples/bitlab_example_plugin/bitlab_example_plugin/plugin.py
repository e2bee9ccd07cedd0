"""The plugin module named by this package's ``bitlab.backends`` entry point.

It shows the whole contract: one ``@hookimpl`` returning a ``BackendSpec`` with
kernels that declare their keys, devices and priority.  Its kernel dequantizes
the weight once in ``prepare`` and runs a dense matmul: fast to write, not
memory-efficient, and ranked below the reference (priority -10) so it is only
used when forced (``backend="example_dense"``).
"""
from __future__ import annotations

import torch

from bitcore.hookspecs import BackendSpec, hookimpl
from bitcore.kernels import BitKernel, keys_product
from bitcore.packing import dequantize

_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DequantDenseKernel(BitKernel):
    """Float-activation keys for every weight width: ``x @ dequantize(W).T`` in float32."""

    backend = "example_dense"
    keys = keys_product(activation_dtypes=("float32", "float16", "bfloat16"))
    devices = frozenset({"cpu", "cuda"})
    priority = -10

    def prepare(self, packed, config):
        return dequantize(packed, torch.float32), _FLOAT[config.activation_dtype]

    def forward(self, x, prepared, bias=None, activation="none"):
        weight, act_dtype = prepared
        y = x.to(act_dtype).to(torch.float32) @ weight.T
        if bias is not None:
            y = y + bias.float()
        if activation == "relu":
            y = torch.relu(y)
        elif activation == "relu2":
            y = torch.relu(y).square()
        return y.to(x.dtype)


@hookimpl
def bitlab_register_backend() -> BackendSpec:
    return BackendSpec(
        name="example_dense",
        kernels=[DequantDenseKernel()],
        description="example third-party plugin (dequantize + dense matmul)",
        version="0.1.0",
    )
