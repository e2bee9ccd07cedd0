"""Device functions shared by the numba_cuda kernels, and the CUDA-simulator stand-ins.

Activations and outputs of dtype bfloat16 travel as their int16 bits (numba has no
bfloat16 arrays); the conversions here match torch (bf16 -> float32: the bits are
the high half; float32 -> bf16: round to nearest even, NaN -> 0x7FC0).

Under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) kernels run as Python
threads on NumPy arrays; the simulator lacks warp shuffles and bit casts and counts
the popcount of a negative number wrongly, so this module swaps in equivalents
there.  Everything else is the same code on the GPU and in the simulator.
"""
from __future__ import annotations

import numpy as np

if not hasattr(np, "row_stack"):
    # numba-cuda <= 0.30 registers an overload for np.row_stack when it first compiles, and
    # NumPy 2.5 removed that alias of np.vstack: put the alias back so compilation can start.
    np.row_stack = np.vstack

from numba import config as numba_config  # noqa: E402
from numba import cuda, float32, int32, int64, uint64  # noqa: E402

from backends.numba_cuda.layout import LANES  # noqa: E402

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)
MAX_THREADS = 1024  # per block
FULL_MASK = 0xFFFFFFFF
EPILOGUE_CODES = {"none": 0, "relu": 1, "relu2": 2}
X_KINDS = ("float", "bf16bits", "int8")  # how activations are read
OUT_KINDS = ("float", "bf16bits")  # how outputs (and biases) are written / read

# ----------------------------------------------------------------------------- bit casts
if SIMULATOR:

    def _int_as_float(i):
        return np.uint32(int(i) & 0xFFFFFFFF).view(np.float32)

    def _float_as_int(f):
        return np.float32(f).view(np.int32)

    def _popc64(v):  # the simulator's popc counts the bits of Python's signed repr
        return bin(int(v) & 0xFFFFFFFFFFFFFFFF).count("1")

    int_as_float = cuda.jit(device=True)(_int_as_float)
    float_as_int = cuda.jit(device=True)(_float_as_int)
    popc64 = cuda.jit(device=True)(_popc64)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def int_as_float(i):
        return libdevice.int_as_float(int32(i))

    @cuda.jit(device=True)
    def float_as_int(f):
        return libdevice.float_as_int(f)

    @cuda.jit(device=True)
    def popc64(v):
        return cuda.popc(v)


@cuda.jit(device=True)
def bf16_bits_to_float(b):
    """bfloat16 bits (read as int16) -> float32: the bf16 bits are the high half of the float."""
    return int_as_float(int32((int32(b) & 0xFFFF) << 16))


@cuda.jit(device=True)
def float_to_bf16_bits(f):
    """float32 -> bfloat16 bits as a signed int16 value, round-to-nearest-even, NaN -> 0x7FC0 (as torch)."""
    if f != f:
        return int32(0x7FC0)
    u = int64(float_as_int(f)) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = r & 0xFFFF
    if r >= 0x8000:
        r -= 0x10000
    return int32(r)


@cuda.jit(device=True)
def apply_epilogue(y, bias_n, epilogue):
    y += bias_n
    if epilogue >= 1:
        if y < float32(0.0):  # NaN stays NaN, as torch.relu
            y = float32(0.0)
        if epilogue == 2:
            y = y * y
    return y


# Activations are read from a flat view at (token row offset + k), the row offsets computed once per
# kernel; unsigned indices spare numba's negative-index wraparound.
@cuda.jit(device=True)
def read_float(x, i):
    return float32(x[uint64(i)])


@cuda.jit(device=True)
def read_bf16_bits(x, i):
    return bf16_bits_to_float(x[uint64(i)])


@cuda.jit(device=True)
def read_int(x, i):
    return int32(x[uint64(i)])


@cuda.jit(device=True)
def read_bias_float(bias, has_bias, n):
    if has_bias:
        return float32(bias[n])
    return float32(0.0)


@cuda.jit(device=True)
def read_bias_bf16_bits(bias, has_bias, n):
    if has_bias:
        return bf16_bits_to_float(bias[n])
    return float32(0.0)



@cuda.jit(device=True)
def store_float(out, t, n, y):
    out[t, n] = y


@cuda.jit(device=True)
def store_bf16_bits(out, t, n, y):
    out[t, n] = float_to_bf16_bits(y)


@cuda.jit(device=True)
def clamp_to(i, last):
    """min(i, last) (numba's builtin min does not compile as a CUDA device call everywhere)."""
    return i if i < last else last


READ_BIAS = {"float": read_bias_float, "bf16bits": read_bias_bf16_bits}
STORE = {"float": store_float, "bf16bits": store_bf16_bits}


if SIMULATOR:
    from numba.cuda.simulator.kernel import _get_kernel_context as _running_launch

    from backends.numba_cuda.simulator_fixes import serialize_shared_allocation

    serialize_shared_allocation()

    # The simulator has no warp shuffles: sum through a per-block shared buffer instead.
    # Every thread of the block reaches this call once, so the barriers match.
    # A plain function, not a simulated device function: the simulator swaps a device
    # function's module globals (``cuda``) on every call from every thread, and one
    # thread's restore could leave another mid-call on the real module ("no attribute
    # threadIdx"). The running launch's fake ``cuda`` module is read directly instead.
    def warp_reduce(a):
        sim = _running_launch()
        buf = sim.shared.array((MAX_THREADS, 64), np.float64)
        tid = sim.threadIdx.x
        start = tid - tid % LANES
        sim.syncthreads()
        buf[tid, : a.size] = a.ravel()
        sim.syncthreads()
        a[...] = buf[start:start + LANES, : a.size].sum(axis=0).reshape(a.shape)
        sim.syncthreads()

else:

    @cuda.jit(device=True)
    def warp_sum(v):
        for offset in (16, 8, 4, 2, 1):
            v += cuda.shfl_xor_sync(FULL_MASK, v, offset)
        return v

    @cuda.jit(device=True)
    def warp_reduce(a):
        """Sum a small 2-D local array over the 32 lanes of the warp, in place (every lane gets the sums)."""
        for i in range(a.shape[0]):
            for t in range(a.shape[1]):
                a[i, t] = warp_sum(a[i, t])

