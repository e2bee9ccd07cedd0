"""The XNOR kernel of the numba_cuda backend: binary weights x binary activations.

Weights are the canonical sign bits read as int64 words (:func:`backends.numba_cuda.layout.weight_sign_words`:
input ``64 q + j`` at bit ``j``, 1 for +1).  Each warp owns ``ROWS`` rows; lane ``l`` takes words
``q = l, l + 32, ...``, packs the activation signs of the same 64 inputs itself (once per token, reused for
all rows), and counts ``popcount(w ^ x)``; ``dot = in_features - 2 * differing bits`` is exact (padding bits
are 0 on both sides).  Epilogue ``y = dot * x_scale * w_scale (+ bias)``, relu / relu2, as the other kernels.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, int64

from backends.numba_cuda.device import OUT_KINDS, READ_BIAS, STORE, apply_epilogue, clamp_to, popc64, warp_reduce
from backends.numba_cuda.layout import LANES

XNOR_WARPS = 4  # warps per block, each owning its own rows


@functools.lru_cache(maxsize=None)
def xnor_kernel(out_kind: str, bias_kind: str, rows: int, tokens: int):
    """Binary weights x binary activations.

    Signature: as :func:`sign_code_kernel`, with ``x`` the flat int8 signs in {-1, +1} (token t's input k at
    ``t * x_stride + k``) and ``words`` the sign words ``[n_out, ceil(n_in / 64)]``.
    Lane ``l`` packs the signs of inputs ``64 q + j`` of its words ``q = l, l + 32, ...`` itself, once per
    token, and reuses them for all ``ROWS`` rows.
    """
    if out_kind not in OUT_KINDS or bias_kind not in OUT_KINDS:
        raise ValueError(f"xnor_kernel: unsupported variant out={out_kind!r}, bias={bias_kind!r}; kinds are {OUT_KINDS}")
    ROWS, TOKENS = rows, tokens
    store = STORE[out_kind]
    read_bias = READ_BIAS[bias_kind]

    @cuda.jit
    def kernel(out, signs, x_stride, words, w_scale, scale_stride, x_scale, bias, has_bias, epilogue,
               n_out, n_in, n_tok):
        lane = cuda.threadIdx.x % LANES
        warp = cuda.blockIdx.x * (cuda.blockDim.x // LANES) + cuda.threadIdx.x // LANES
        row0 = warp * ROWS
        tok0 = cuda.blockIdx.y * TOKENS
        differ = cuda.local.array((ROWS, TOKENS), int32)
        for t in range(TOKENS):
            for r in range(ROWS):
                differ[r, t] = 0
        w = cuda.local.array(ROWS, int64)
        for q in range(lane, words.shape[1], LANES):
            for r in range(ROWS):
                w[r] = words[clamp_to(row0 + r, n_out - 1), q]
            for t in range(TOKENS):
                row = clamp_to(tok0 + t, n_tok - 1) * x_stride
                xw = int64(0)
                for j in range(64):
                    k = q * 64 + j
                    if k >= n_in:
                        break
                    if signs[row + k] > 0:
                        xw |= int64(1) << j
                for r in range(ROWS):
                    differ[r, t] += popc64(w[r] ^ xw)
        warp_reduce(differ)
        for t in range(TOKENS):
            for r in range(ROWS):
                total = differ[r, t]
                n = row0 + r
                tok = tok0 + t
                if lane == 0 and n < n_out and tok < n_tok:
                    dot = n_in - 2 * total
                    y = float32(dot) * float32(x_scale[tok, 0]) * float32(w_scale[n * scale_stride])
                    store(out, tok, n, apply_epilogue(y, read_bias(bias, has_bias, n), epilogue))

    return kernel


# ------------------------------------------------------------------------------ launch

def xnor_grid(n_out: int, n_tok: int, rows: int, tokens: int) -> tuple:
    """(grid, block) for :func:`xnor_kernel`: each of the ``XNOR_WARPS`` warps of a block owns ``rows`` rows."""
    return (math.ceil(n_out / (XNOR_WARPS * rows)), math.ceil(n_tok / tokens)), (XNOR_WARPS * LANES,)
