"""The torch.library op ``bitlab::cuda_ext_linear`` and loading of the extension that defines it.

The schema and CUDA implementation live in ``csrc/bindings.cpp``; the fake (meta)
implementation is registered here, so ``torch.compile`` traces the op and CUDA graphs
capture it.  Loading compiles the extension on first use (or finds the build
``build_extensions.py`` left in the cache).

Example::

    y = torch.ops.bitlab.cuda_ext_linear(x, wq, scale, None, fmt, ACT_FLOAT, 0, n, k, x.dtype)
"""
from __future__ import annotations

import shutil
import threading

import torch

from bitcore.errors import BackendUnavailableError
from bitcore.extensions import load_extension
from bitcore.kernels.interface import Availability

# Activation modes and epilogues, as csrc/bindings.cpp numbers them.
ACT_FLOAT, ACT_INT8_PER_TENSOR, ACT_INT8_PER_TOKEN, ACT_BINARY_PER_TENSOR, ACT_BINARY_PER_TOKEN = range(5)
EPILOGUE_CODE = {"none": 0, "relu": 1, "relu2": 2}

_lock = threading.Lock()
_fake_registered = False


def cheap_availability() -> Availability:
    """Whether this machine could run the backend at all, without compiling or loading anything."""
    if torch.version.cuda is None:
        return Availability.no(f"this torch ({torch.__version__}) is a CPU build; cuda_ext needs a CUDA build")
    if not torch.cuda.is_available():
        return Availability.no("no CUDA device (torch.cuda.is_available() is False)")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return Availability.no("no CUDA toolkit: nvcc not on PATH and CUDA_HOME unset")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return Availability.no(f"GPU compute capability {major}.{minor} < 8.0 (the kernels use sm_80 mma)")
    return Availability.yes(f"{torch.cuda.get_device_name()} (sm_{major}{minor})")


def load():
    """Load (compiling on first use) the extension and register the op's fake implementation."""
    global _fake_registered
    from backends.cuda_ext.build import SPEC

    module = load_extension(SPEC)
    with _lock:
        if not _fake_registered:
            torch.library.register_fake("bitlab::cuda_ext_linear")(_linear_fake)
            torch.library.register_fake("bitlab::cuda_ext_linear_int8")(_linear_int8_fake)
            _fake_registered = True
    return module


def availability() -> Availability:
    """Cheap checks first, then whether the extension builds and loads here."""
    cheap = cheap_availability()
    if not cheap:
        return cheap
    try:
        load()
    except BackendUnavailableError as exc:
        return Availability.no(str(exc))
    return cheap


def _linear_fake(x, wq, w_scale, bias, fmt, act_mode, epilogue, N, K, out_dtype):
    return x.new_empty((x.shape[0], N), dtype=out_dtype)


def _linear_int8_fake(xq, x_scale, wq, w_scale, bias, fmt, epilogue, N, K, out_dtype):
    return xq.new_empty((xq.shape[0], N), dtype=out_dtype)


def _op(name: str):
    """The op, loading the extension first when this process has not (a kernel used directly)."""
    if not _fake_registered:
        load()
    return getattr(torch.ops.bitlab, name)


def linear_int8(xq, x_scale, wq, w_scale, bias, fmt: int, epilogue: int, n: int, k: int, out_dtype: torch.dtype):
    """``torch.ops.bitlab.cuda_ext_linear_int8``: pre-quantized int8 activations, y [tokens, n] in ``out_dtype``."""
    return _op("cuda_ext_linear_int8")(xq, x_scale, wq, w_scale, bias, fmt, epilogue, n, k, out_dtype)


def linear(x, wq, w_scale, bias, fmt: int, act_mode: int, epilogue: int, n: int, k: int, out_dtype: torch.dtype):
    """``torch.ops.bitlab.cuda_ext_linear``: y [tokens, n] in ``out_dtype``."""
    return _op("cuda_ext_linear")(x, wq, w_scale, bias, fmt, act_mode, epilogue, n, k, out_dtype)
