// BitLab cuda_ext: RMSNorm + per-token int8 quantization of a few rows inside the kernel that uses them (the norm
// GEMV of linear_norm.cu, the MLP of bitnet_mlp.cu): every block computes the same int8 rows into its own shared
// memory, exactly as norm_quant.cu computes them, so the result has norm_quant's bits.
//
// norm_quant's block for a row of K <= 8192 values has nw = max(2, ceil(K / 256)) warps, thread i owning piece i
// (8 columns); its sum of squares is a per-thread fma chain over the piece, a xor-shuffle tree per warp, then one
// xor tree over the nw warp sums.  Here a "unit" is (token, one of those nw warps): a warp of the block takes
// whole units, so each unit's tree is the same, and the same single tree adds a token's unit sums.  The maxima
// need no order.
//
// The code runs once per launch, so its loops stay rolled (code that runs once is fetched from L2 every launch);
// the rows arrive by cp.async (each thread first reads only its own copies: no barrier waits for them); three
// block barriers in all.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"
#include "bitlab_norm_math.cuh"

namespace bitlab {

constexpr int kNormRowsMaxTokens = 8;
constexpr int kNormRowsMaxWarps = 16;
constexpr int kNormRowsMaxK = 8192;  // norm_quant.cu's one-piece-per-thread range (nw <= 32)
static_assert(kNormRowsMaxTokens == kNormGemvMaxTokens && kNormRowsMaxTokens == kBitnetMlpMaxTokens,
              "the norm's per-token slots cover both kernels' tokens");
static_assert(kNormRowsMaxK == kNormGemvMaxK, "the norm GEMV's K range is the norm's");

// stat (floats): per-(token, unit) sums of squares [tokens][32], then the maxima of |y| (same shape), then each
// warp's per-token inverse steps [warps][tokens].
constexpr int kNormRowsSums = 0, kNormRowsMax = kNormRowsMaxTokens * 32, kNormRowsInverse = 2 * kNormRowsMax;
constexpr int kNormRowsStatFloats = kNormRowsInverse + kNormRowsMaxWarps * kNormRowsMaxTokens;

// Where the block's shared memory holds the norm's data (16-byte aligned).
struct NormRowsSmem {
  float* stat;            // kNormRowsStatFloats
  unsigned char* weight;  // the norm's weight, [K] of T (norm_rows_copy_weight, before the dependent-launch wait)
  unsigned char* rows_a;  // [M][K] of T: a, then r, then y
  unsigned char* rows_b;  // [M][K] of T (mode 1)
  unsigned char* x;       // the int8 rows, pitch x_pitch bytes, zeros in [K, x_cols)
  int x_pitch, x_cols;
  float* scale;           // [M]: the per-token dequantization scales (written by warp 0)
};

// Bytes of stat, weight, rows_a and rows_b for M rows of K (each a multiple of 16 bytes for K % 8 == 0).
__host__ __device__ inline int norm_rows_stage_bytes(int M, int K, int mode) {
  return kNormRowsStatFloats * 4 + 2 * K + 2 * M * K + (mode == 1 ? 2 * M * K : 0);
}

// stat, weight, rows_a, rows_b laid out from `stage` (norm_rows_stage_bytes of room); x and scale as given.
__device__ __forceinline__ NormRowsSmem norm_rows_smem(unsigned char* stage, int M, int K, unsigned char* x,
                                                       int x_pitch, int x_cols, float* scale) {
  NormRowsSmem s;
  s.stat = reinterpret_cast<float*>(stage);
  s.weight = stage + kNormRowsStatFloats * 4;
  s.rows_a = s.weight + 2 * K;
  s.rows_b = s.rows_a + 2 * M * K;
  s.x = x;
  s.x_pitch = x_pitch;
  s.x_cols = x_cols;
  s.scale = scale;
  return s;
}

// The norm's weight into shared memory by cp.async (one commit group; norm_rows_into_x waits for it).  No kernel
// writes it, so this may run before the dependent-launch wait.
__device__ __forceinline__ void norm_rows_copy_weight(const NormInputArgs& n, unsigned char* weight) {
  for (int p = threadIdx.x; p < n.K / 8; p += blockDim.x)
    cp_async16(weight + 16 * p, static_cast<const uint4*>(n.weight) + p);
  cp_async_commit();
}

template <bool kMax>
__device__ __forceinline__ float warp_tree(float v) {  // norm_quant.cu's block_reduce, warp part
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  return v;
}

// A token's result: the tree over its nw unit results (lanes past nw add zeros); every lane gets it (a xor
// tree adds the same pairs in every lane, and float addition commutes).
template <bool kMax>
__device__ __forceinline__ float token_tree(const float* units, int tok, int nw, int lane) {
  return warp_tree<kMax>(lane < nw ? units[tok * 32 + lane] : 0.f);
}

// x and the per-token scales (into shared memory, or global memory where s points there) from the rows a (and b)
// of NormInputArgs; see the file comment.  Every thread of the block calls it (block barriers inside); in mode 1
// the block with writes_h set writes h (one block of the grid).
template <typename T>
__device__ void norm_rows_into_x(const NormInputArgs& n, int M, const NormRowsSmem& s, bool writes_h) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = blockDim.x >> 5;
  const int np = n.K / 8, nw = (np + 31) / 32 < 2 ? 2 : (np + 31) / 32;  // pieces per row, norm_quant's warps
  float* stat = s.stat;
  uint4* ra = reinterpret_cast<uint4*>(s.rows_a);  // [M][np] pieces: a, then r, then y
  const uint4* rb = reinterpret_cast<const uint4*>(s.rows_b);
  const uint4* wsm = reinterpret_cast<const uint4*>(s.weight);

  // A unit (tok, v): pieces 32 v + lane of row tok; warp w takes units v = w, w + kw, ... of every row.
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
    for (int v = warp; v < nw; v += kw) {  // this thread's pieces of the rows, all in flight at once
      const int piece = 32 * v + lane, at = tok * np + piece;
      if (piece < np) {
        cp_async16(ra + at, static_cast<const uint4*>(n.a) + at);
        if (n.mode == 1) cp_async16(s.rows_b + 16 * at, static_cast<const uint4*>(n.b) + at);
      }
    }
  cp_async_commit();
  cp_async_wait<0>();  // this thread's copies (and, from before the wait, its pieces of the norm's weight)

  // Pass 1: r = a or T(a + b) in place (writes_h: also to h), each unit's sum of squares.
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
  for (int v = warp; v < nw; v += kw) {
    const int piece = 32 * v + lane, at = tok * np + piece;
    float ss = 0.f;
    if (piece < np) {
      uint4 va = ra[at];
      const uint4 vb = n.mode == 1 ? rb[at] : va;
      T* e = reinterpret_cast<T*>(&va);
      const T* d = reinterpret_cast<const T*>(&vb);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float x = n.mode == 1 ? round_t<T>(to_f<T>(e[i]) + to_f<T>(d[i])) : to_f<T>(e[i]);
        e[i] = from_f<T>(x);
        ss = __fmaf_rn(x, x, ss);
      }
      if (n.mode == 1) {
        ra[at] = va;
        if (writes_h) static_cast<uint4*>(n.h)[at] = va;
      }
    }
    ss = warp_tree<false>(ss);
    if (lane == 0) stat[kNormRowsSums + tok * 32 + v] = ss;
  }
  __syncthreads();

  // Pass 2: y = T(w * T(r * rsqrt(mean + eps))) in place, each unit's maximum of |y|.
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
  for (int v = warp; v < nw; v += kw) {
    const int piece = 32 * v + lane, at = tok * np + piece;
    const float ss = token_tree<false>(stat + kNormRowsSums, tok, nw, lane);
    const float r = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(n.K)), n.eps));
    float amax = 0.f;
    if (piece < np) {
      uint4 raw = ra[at];
      amax = rms_normed_piece<T>(raw, wsm[piece], r);
      ra[at] = raw;
    }
    amax = warp_tree<true>(amax);
    if (lane == 0) stat[kNormRowsMax + tok * 32 + v] = amax;
  }
  __syncthreads();

  // Each warp's inverse steps per token (warp 0 also stores the scales for the epilogue), then the int8 rows.
  float* inverse = stat + kNormRowsInverse + warp * kNormRowsMaxTokens;
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok) {
    const float amax = fmaxf(token_tree<true>(stat + kNormRowsMax, tok, nw, lane), 1e-5f);
    if (lane == 0) {
      inverse[tok] = quant_inverse(amax);
      if (warp == 0) s.scale[tok] = quant_scale(amax);
    }
  }
  __syncwarp();
  const int row_pieces = s.x_cols / 8;
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
  for (int pc = threadIdx.x; pc < row_pieces; pc += blockDim.x) {
    const uint2 out = pc < np ? quantize_piece<T>(ra[tok * np + pc], inverse[tok]) : make_uint2(0u, 0u);
    *reinterpret_cast<uint2*>(s.x + tok * s.x_pitch + 8 * pc) = out;  // zeros past K
  }
  __syncthreads();
}

}  // namespace bitlab
