"""The sign-code kernels of the numba_cuda backend: ternary / binary weights x float or int8 activations.

Low-bit GEMV/GEMM for 1 to 64 tokens (any count works).  The XNOR kernel is in
:mod:`backends.numba_cuda.xnor`, shared device functions in :mod:`backends.numba_cuda.device`.

Weight layouts are described in :mod:`backends.numba_cuda.layout`; in short,
rows are walked in chunks of 32 ``int64`` words, lane ``l`` holding the codes of
inputs ``c*chunk + j*32 + l``.

Work split
----------
* Block ``(bx, by)`` owns rows ``bx * ROWS + r`` (``r < ROWS``) and tokens
  ``by * TOKENS + t``; its ``WARPS`` warps split the chunks of those rows (warp
  ``w`` takes chunks ``w, w + WARPS, ...``), so even a short, wide layer keeps
  many warps streaming weights.
* Per chunk a lane loads one word per row, then for every code ``j`` loads the
  activation ``x[t, k]`` once and applies it to all ``ROWS`` rows.  Lanes sum
  their partials with warp shuffles, the warps through shared memory (in a
  fixed order), and one thread per output writes the epilogue.
* Rows past ``out_features`` are clamped onto the last valid one for loading (so
  no thread reads out of bounds and no branch splits the warp) and are never
  written.  A token tile never exceeds the token count; the last tile is moved
  back to end at the last token (it may overlap the previous one, whose outputs it
  recomputes bit for bit), so each token's row is a fixed stride from the first.

Arithmetic (see ``bitcore.quantize`` and ``backends/torch_ref`` for the definition)
------------------------------------------------------------------------------
* float activations: each code, shifted to bits 30-31, is the float32 ``2 v``
  (no int-to-float conversion); ``acc = sum(x * 2v)`` in float32 with exact
  products, then ``y = 0.5 acc * w_scale``.
* int8 activations: ``acc = sum(xq * v)`` in int32 (exact), then
  ``acc * x_scale[t] * w_scale``; the quantization itself is done beforehand by
  :func:`bitcore.quantize.quantize_activation_int8` so it matches bit for bit.
* epilogue: ``y = dot * x_scale * w_scale (+ bias)``, then relu / relu2, cast to
  the output dtype (bfloat16 by round-to-nearest-even on the bits, as torch).

Everything here takes numba device arrays (``numba.cuda.as_cuda_array`` views of
torch tensors) or, under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), NumPy
arrays: the same kernels run in CI without a GPU.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, int64, uint64

from backends.numba_cuda.device import (
    EPILOGUE_CODES,
    OUT_KINDS,
    READ_BIAS,
    STORE,
    X_KINDS,
    apply_epilogue,
    clamp_to,
    int_as_float,
    read_bf16_bits,
    read_float,
    read_int,
    warp_reduce,
)
from backends.numba_cuda.layout import LANES, codes_per_word

__all__ = ["EPILOGUE_CODES", "launch", "launch_shape", "sign_code_grid", "sign_code_kernel"]


# ---------------------------------------------------------------- sign-code GEMV family
# Code j of a lane word -> weight.  Float: the code moved to bits 30-31 *is* the float 2v
# (0x40000000 = 2.0, 0xC0000000 = -2.0, 0 = 0.0); binary codes carry only the sign, so bit 30
# is set by hand.  Integer: v itself.
@cuda.jit(device=True)
def ternary_as_float(word, j):
    return int_as_float(((word >> (2 * j)) << 30) & 0xC0000000)


@cuda.jit(device=True)
def binary_as_float(word, j):
    return int_as_float((((word >> j) << 31) & 0x80000000) | 0x40000000)


@cuda.jit(device=True)
def ternary_as_int(word, j):
    code = (word >> (2 * j)) & 3
    return int32((code & 1) - (code & 2))


@cuda.jit(device=True)
def binary_as_int(word, j):
    return int32(1 - 2 * ((word >> j) & 1))


# The same for the top code of a word (bits 62-63, or 63 for binary), used by the looped kernels.
@cuda.jit(device=True)
def top_ternary_as_float(word):
    return int_as_float((word >> 32) & 0xC0000000)


@cuda.jit(device=True)
def top_binary_as_float(word):
    return int_as_float(((word >> 32) & 0x80000000) | 0x40000000)


@cuda.jit(device=True)
def top_ternary_as_int(word):
    code = (word >> 62) & 3
    return int32((code & 1) - (code & 2))


@cuda.jit(device=True)
def top_binary_as_int(word):
    return int32(1 - 2 * ((word >> 63) & 1))


def unrolled_chunk(step, codes: int, tail: bool):
    """Device function ``accumulate(acc, w, x, x_rows, k0, n_in)``: ``step`` for j = 0 .. codes-1, unrolled.

    numba has no unroll pragma, and a loop over ``j`` leaves each bit extraction a
    variable 64-bit shift; writing the calls out with a literal ``j`` makes every
    shift a constant.  The ``tail`` variant stops at the first input >= n_in.
    """
    lines = ["def accumulate(acc, w, x, x_rows, k0, n_in):"]
    for j in range(codes):
        if tail:
            lines += [f"    if k0 + {j * LANES} >= n_in:", "        return"]
        lines.append(f"    step(acc, w, x, x_rows, k0 + {j * LANES}, {j})")
    namespace = {"step": step}
    exec("\n".join(lines), namespace)
    return cuda.jit(device=True)(namespace["accumulate"])


@functools.lru_cache(maxsize=None)
def sign_code_kernel(bits: int, x_kind: str, out_kind: str, bias_kind: str, rows: int, tokens: int, warps: int):
    """Kernel for ternary (bits=2) / binary (bits=1) sign codes; one compiled variant per argument set.

    Signature: ``(out, x, x_stride, words, w_scale, scale_stride, x_scale, bias, has_bias, epilogue,
    n_out, n_in, n_tok)`` with ``x`` a flat view where token t's input k is ``x[t * x_stride + k]``,
    ``words`` ``[n_out, chunks * 32]``, ``w_scale[n * scale_stride]``,
    ``x_scale`` ``[n_tok, 1]`` (used for int8 activations only) and ``out`` ``[n_tok, n_out]``.
    Launch with :func:`sign_code_grid`.
    """
    if bits not in (1, 2) or x_kind not in X_KINDS or out_kind not in OUT_KINDS or bias_kind not in OUT_KINDS:
        raise ValueError(
            f"sign_code_kernel: unsupported variant bits={bits}, x={x_kind}, out={out_kind}, bias={bias_kind}"
        )
    CODES = codes_per_word(bits)
    INTEGER = x_kind == "int8"
    ROWS, TOKENS, WARPS_ = rows, tokens, warps
    OUTPUTS = rows * tokens
    acc_type = int32 if INTEGER else float32
    read_x = {"float": read_float, "bf16bits": read_bf16_bits, "int8": read_int}[x_kind]
    weight_of = {
        (2, False): ternary_as_float,
        (1, False): binary_as_float,
        (2, True): ternary_as_int,
        (1, True): binary_as_int,
    }[bits, INTEGER]
    # float weights are 2v (exact), integer weights are v
    UNIT = 0.5 if not INTEGER else 1.0
    store = STORE[out_kind]
    read_bias = READ_BIAS[bias_kind]

    @cuda.jit(device=True)
    def step(acc, w, x, x_rows, k, j):
        """Apply activation(s) x[:, k] to code j of every row's word."""
        for t in range(TOKENS):
            xv = read_x(x, x_rows[t] + k)
            for r in range(ROWS):
                acc[r, t] += xv * weight_of(w[r], j)

    top_weight = {
        (2, False): top_ternary_as_float,
        (1, False): top_binary_as_float,
        (2, True): top_ternary_as_int,
        (1, True): top_binary_as_int,
    }[bits, INTEGER]

    def looped_chunk(tail: bool):
        """Several tokens: a plain loop (quick to compile) that decodes the top code of each word once
        for all tokens, then shifts the next code up (constant shifts); codes run from j = CODES-1 down.
        Only the ``tail`` variant tests k < n_in, so full chunks keep their address math out of the loop."""

        @cuda.jit(device=True)
        def accumulate(acc, w, x, x_rows, k0, n_in):
            xs = cuda.local.array(TOKENS, acc_type)
            for i in range(CODES):
                k = k0 + (CODES - 1 - i) * LANES
                if not tail or k < n_in:
                    for t in range(TOKENS):
                        xs[t] = read_x(x, x_rows[t] + k)
                    for r in range(ROWS):
                        f = top_weight(w[r])
                        for t in range(TOKENS):
                            acc[r, t] += xs[t] * f
                for r in range(ROWS):
                    w[r] = w[r] << bits

        return accumulate

    if TOKENS == 1:  # the latency-critical GEMV: constant shifts, no bounds tests in full chunks
        accumulate_full = unrolled_chunk(step, CODES, tail=False)
        accumulate_tail = unrolled_chunk(step, CODES, tail=True)
    else:
        accumulate_full, accumulate_tail = looped_chunk(tail=False), looped_chunk(tail=True)

    @cuda.jit
    def kernel(out, x, x_stride, words, w_scale, scale_stride, x_scale, bias, has_bias, epilogue,
               n_out, n_in, n_tok):
        lane = cuda.threadIdx.x % LANES
        warp = cuda.threadIdx.x // LANES
        row0 = cuda.blockIdx.x * ROWS
        tok0 = clamp_to(cuda.blockIdx.y * TOKENS, n_tok - TOKENS)  # TOKENS <= n_tok: the last tile may overlap
        x_rows = cuda.local.array(TOKENS, int64)  # flat offset of each token's row
        for t in range(TOKENS):
            x_rows[t] = (tok0 + t) * x_stride
        acc = cuda.local.array((ROWS, TOKENS), acc_type)
        for t in range(TOKENS):
            for r in range(ROWS):
                acc[r, t] = acc_type(0)
        w = cuda.local.array(ROWS, int64)
        chunk = LANES * CODES
        n_full = n_in // chunk
        # the warps of a block split the chunks of the same rows: warp w takes chunks w, w + WARPS, ...
        for c in range(warp, n_full, WARPS_):
            for r in range(ROWS):
                w[r] = words[uint64(clamp_to(row0 + r, n_out - 1)), uint64(c * LANES + lane)]
            accumulate_full(acc, w, x, x_rows, c * chunk + lane, n_in)
        if n_full * chunk < n_in and warp == n_full % WARPS_:
            for r in range(ROWS):
                w[r] = words[uint64(clamp_to(row0 + r, n_out - 1)), uint64(n_full * LANES + lane)]
            accumulate_tail(acc, w, x, x_rows, n_full * chunk + lane, n_in)
        warp_reduce(acc)
        partial = cuda.shared.array((WARPS_, ROWS, TOKENS), acc_type)
        if lane == 0:
            for t in range(TOKENS):
                for r in range(ROWS):
                    partial[warp, r, t] = acc[r, t]
        cuda.syncthreads()
        i = cuda.threadIdx.x  # thread i < ROWS * TOKENS finishes output (row0 + i // TOKENS, tok0 + i % TOKENS)
        if i < OUTPUTS:
            r = i // TOKENS
            t = i - r * TOKENS
            n = row0 + r
            tok = tok0 + t
            if n < n_out and tok < n_tok:
                total = partial[0, r, t]
                for v in range(1, WARPS_):
                    total += partial[v, r, t]
                y = float32(total) * float32(UNIT)
                if INTEGER:
                    y = y * float32(x_scale[tok, 0])
                y = y * float32(w_scale[n * scale_stride])
                store(out, tok, n, apply_epilogue(y, read_bias(bias, has_bias, n), epilogue))

    return kernel


def sign_code_grid(n_out: int, n_tok: int, rows: int, tokens: int, warps: int) -> tuple:
    """(grid, block) for :func:`sign_code_kernel`: one block per ``rows`` rows and ``tokens`` tokens."""
    return (math.ceil(n_out / rows), math.ceil(n_tok / tokens)), (warps * LANES,)


def launch_shape(n_out: int, n_tok: int) -> tuple:
    """(rows per block, tokens per block, warps per block) of the sign-code kernels: the launch heuristics.

    One token is a GEMV bound by instruction issue (three per weight) about as much
    as by memory: 8 rows per block let each activation load feed 8 rows, and 2 warps
    split the input (measured on an H100 against 4x4, 8x4 and 4x2 at 8192x8192 and
    28672x8192; docs/benchmarks/numba_linear.md).  More tokens use the looped kernel:
    each decoded weight feeds 2, 4 or 8 tokens, and the next token tile re-reads the
    weights, mostly from L2.
    """
    if n_tok == 1:
        return 8, 1, 2
    tokens = 2 if n_tok < 4 else (4 if n_tok < 8 else 8)  # never more than n_tok (see sign_code_kernel)
    return 4, tokens, 4


def launch(kernel, grid, block, stream, *args):
    """Launch on ``stream`` (a numba stream; 0 under the simulator)."""
    kernel[grid, block, stream](*args)

