"""The torch.library ops of cuda_ext and loading of the extension that defines them.

* ``bitlab::cuda_ext_linear``: the low-bit linear layer (every format; quantizes int8 / binary
  activations itself);
* ``bitlab::cuda_ext_linear_int8``: the same with int8 activations the caller quantized;
* ``bitlab::cuda_ext_rms_norm_quant``: RMSNorm + per-token int8 quantization (the input of a
  W*A8 projection, one kernel);
* ``bitlab::cuda_ext_linear_int8_norm``: that norm and the projection after it in one kernel, for a few
  tokens (:mod:`backends.cuda_ext.norm_linear`);
* ``bitlab::cuda_ext_linear_int8_norm_tail``: a projection, then the residual add and that norm of its output,
  in one kernel, for a few tokens (:mod:`backends.cuda_ext.norm_tail`);
* ``bitlab::cuda_ext_decode_attention``: one-token attention with rotary and the KV-cache write
  (:mod:`backends.cuda_ext.decode_attention`);
* ``bitlab::cuda_ext_bitnet_mlp``: BitNet's MLP for up to 8 tokens in one kernel
  (:mod:`backends.cuda_ext.bitnet_mlp`);
* ``bitlab::cuda_ext_gather_host_rows``: rows of a pinned host table gathered by GPU indices (an embedding
  kept off the GPU, :mod:`backends.cuda_ext.host_embedding`);
* ``bitlab::cuda_ext_gather_step_inputs``: a decode step's embedding rows and rotary rows in one kernel
  (:mod:`backends.cuda_ext.step_inputs`);
* ``bitlab::cuda_ext_decode_advance``: a decode step's bookkeeping after its tokens are picked
  (:mod:`backends.cuda_ext.decode_advance`);
* ``bitlab::cuda_ext_argmax_rows``: the index of each row's maximum, torch.argmax's answer in one kernel
  (greedy decoding, :mod:`backends.cuda_ext.argmax`).

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


def sm90_why_not(device: torch.device, holder: str, needs: str) -> str:
    """``""`` where ``device`` is a CUDA GPU of compute capability 9.0 or later; else why not (``holder``: what
    lies on ``device``; ``needs``: the sm_90 features the kernel uses)."""
    if device.type != "cuda":
        return f"{holder} on {device}, not CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"GPU compute capability {major}.{minor}: the kernel needs 9.0 ({needs})"
    return ""


def load():
    """Load (compiling on first use) the extension and register the op's fake implementation."""
    global _fake_registered
    from backends.cuda_ext.build import SPEC

    module = load_extension(SPEC)
    with _lock:
        if not _fake_registered:
            torch.library.register_fake("bitlab::cuda_ext_linear")(_linear_fake)
            torch.library.register_fake("bitlab::cuda_ext_linear_int8")(_linear_int8_fake)
            torch.library.register_fake("bitlab::cuda_ext_rms_norm_quant")(_rms_norm_quant_fake)
            from backends.cuda_ext import (argmax, bitnet_mlp, decode_advance, decode_attention, host_embedding,
                                           norm_linear, norm_tail, step_inputs)

            argmax.register_fake()
            decode_advance.register_fake()
            decode_attention.register_fake()
            norm_linear.register_fake()
            norm_tail.register_fake()
            bitnet_mlp.register_fake()
            host_embedding.register_fake()
            step_inputs.register_fake()
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


def _rms_norm_quant_fake(a, b, weight, eps, mode):
    m, k = a.shape
    h = a.new_empty((m, k)) if mode == 1 else a.new_empty((0,))
    return h, a.new_empty((m, k), dtype=torch.int8), a.new_empty((m,), dtype=torch.float32)


def _op(name: str):
    """The op, loading the extension first when this process has not (a kernel used directly)."""
    if not _fake_registered:
        load()
    return getattr(torch.ops.bitlab, name)


def linear_int8(xq, x_scale, wq, w_scale, bias, fmt: int, epilogue: int, n: int, k: int, out_dtype: torch.dtype):
    """``torch.ops.bitlab.cuda_ext_linear_int8``: pre-quantized int8 activations, y [tokens, n] in ``out_dtype``."""
    return _op("cuda_ext_linear_int8")(xq, x_scale, wq, w_scale, bias, fmt, epilogue, n, k, out_dtype)


NORM_QUANT_MODES = {"norm": 0, "add_norm": 1, "relu2_gate_norm": 2}


def rms_norm_quant(a, b, weight, eps: float, mode: int):
    """``torch.ops.bitlab.cuda_ext_rms_norm_quant``: RMSNorm then per-token int8 quantization of the rows of
    ``a [M, K]`` (mode 0), of ``a + b`` (1; also returns the sum) or of ``relu(a)**2 * b`` (2).

    Returns ``(h, q, scale)``: ``h`` the sum in mode 1 (else empty), ``q [M, K]`` int8, ``scale [M]`` float32.
    """
    check_norm_quant_inputs(a, b, weight, mode)
    return _op("cuda_ext_rms_norm_quant")(a, b, weight, eps, mode)


NORM_QUANT_MAX_K = 16 * 1024  # csrc/bitlab_launch.h kNormQuantMaxK


def check_norm_quant_inputs(a, b, weight, mode: int) -> None:
    """ValueError naming the problem with :func:`rms_norm_quant`'s inputs (the op checks again)."""
    if mode not in (0, 1, 2):
        raise ValueError(f"mode: got {mode!r}; expected 0 (norm), 1 (add, norm) or 2 (relu2 gate, norm)")
    if not a.is_cuda or a.dim() != 2 or a.stride(1) != 1 or a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"a must be a 2-D float16/bfloat16/float32 CUDA tensor with contiguous rows; got "
                         f"{a.dtype} {tuple(a.shape)} strides {a.stride()} on {a.device}")
    if not 1 <= a.shape[1] <= NORM_QUANT_MAX_K:
        raise ValueError(f"row length {a.shape[1]} not in [1, {NORM_QUANT_MAX_K}]")
    if weight.dim() != 1 or weight.numel() != a.shape[1] or weight.dtype != a.dtype or not weight.is_contiguous() \
            or weight.device != a.device:
        raise ValueError(f"weight must be contiguous [{a.shape[1]}] in {a.dtype} on {a.device}; got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if mode and (b is None or b.shape != a.shape or b.dtype != a.dtype or b.stride(1) != 1 or b.device != a.device):
        got = "None" if b is None else f"{b.dtype} {tuple(b.shape)} strides {b.stride()}"
        raise ValueError(f"mode {mode} needs b shaped like a ({a.dtype} {tuple(a.shape)}, contiguous rows); got {got}")


def linear(x, wq, w_scale, bias, fmt: int, act_mode: int, epilogue: int, n: int, k: int, out_dtype: torch.dtype):
    """``torch.ops.bitlab.cuda_ext_linear``: y [tokens, n] in ``out_dtype``."""
    return _op("cuda_ext_linear")(x, wq, w_scale, bias, fmt, act_mode, epilogue, n, k, out_dtype)
