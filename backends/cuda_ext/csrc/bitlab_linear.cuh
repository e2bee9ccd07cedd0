// BitLab cuda_ext: low-bit linear layers on tensor cores, one kernel family for every weight format.
//
// Weights arrive as prepared lane tiles (layout and bit placement: bitlab_mma.cuh);
// each lane decodes its own weight fragment in registers (no shared memory for
// weights) and feeds mma.sync: m16n8k16 half/bf16 with float32 accumulation for
// float activations, m16n8k32 int8 with exact int32 accumulation for int8 ones.
// The weight is the mma's A operand (16 output rows), activations are B (8 tokens).
//
// GEMV (M <= 16 tokens): one block per MT m-tiles; each warp issues the weight and activation
//   loads of D chunks before the first use; the block's warps split K and meet in shared memory.
//   Consecutive k-steps accumulate into independent register sets (no mma waits on the
//   previous one). NT = 1 (M <= 8) or 2 (M <= 16) n-tiles of 8 tokens.  On sm_90 large float
//   layers at one token take the bulk-copy GEMV instead (bitlab_gemv_bulk.cuh), and 2-16 tokens
//   mostly the cluster GEMV (bitlab_gemv_cluster.cuh); the rule is in launch_linear_fmt.
// Wide cluster GEMV (17-64 tokens, sm_90): the cluster GEMV with 4 or 8 n-tiles (bitlab_gemv_cluster.cuh).
// GEMM (M > 16 elsewhere): a block owns 128 rows x 128 tokens, 8 warps as 4 (rows, MT = 2)
//   x 2 (tokens, NT = 8); activation tiles are staged in shared memory with
//   cp.async (2 stages, XOR-swizzled 16-byte chunks: conflict-free 16-byte reads),
//   weight fragments are loaded one chunk ahead into registers.
#pragma once

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "bitlab_cp_async.cuh"
#include "bitlab_gemv_bulk.cuh"
#include "bitlab_gemv_cluster.cuh"
#include "bitlab_gemv_prefetch.cuh"
#include "bitlab_mma.cuh"

namespace bitlab {

// Chunks whose weight and activation loads are all issued before the first use (bytes in
// flight per lane); halved for two n-tiles, or two m-tiles of float activations, to stay
// within 128 registers (two 256-thread blocks per multiprocessor).
template <int FMT, typename X, int MT, int NT>
struct GemvDepth {
  static constexpr int base = FormatBits<FMT>::value >= 8 ? 1 : (FormatBits<FMT>::value == 4 ? 2 : 4);
  static constexpr bool wide = NT > 1 || (MT > 1 && sizeof(X) == 2);
  static constexpr int value = (wide && base > 2) ? 2 : base;
};
// The one-shot GEMV's work for one block (gemv_oneshot_kernel; also the first part of linear_norm_tail.cu's
// kernel): y rows of the block's MT m-tiles stored with a's epilogue.  Uses the dynamic shared memory
// (launch_gemv_oneshot's size) and leaves it free at its end only after a block barrier.
template <int FMT, typename X, int MT, int NT, bool PIPE>
__device__ __forceinline__ void gemv_oneshot_block(const LinearArgs& a, int nchunks) {
  using PT = PathTraits<X>;
  using Acc = typename PT::Acc;
  using L = LaneTile<FMT>;
  constexpr int D = GemvDepth<FMT, X, MT, NT>::value;
  constexpr int S = GemvAccSets<MT>::value;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * MT;
  const X* __restrict__ x = static_cast<const X*>(a.x);

  Acc accs[S][MT][NT][4];
  zero_acc_sets(accs);

  // PIPE: weights double-buffered in registers, the next iteration's loads in flight while this
  // one is decoded.  Measured (H100): it pays where warps run two iterations of at most 4 units
  // (the second one's DRAM latency leaves the critical path: 13824x2560 fp16 12.7 -> 10.5 us);
  // with 8 units per iteration (int8, MT = 2, D = 4: 64 registers of weights) or four
  // iterations it cost 5-13 %, so the plain loop is kept there (launch_gemv_oneshot).
  uint32_t wbuf[PIPE ? 2 : 1][D][MT][L::wpl];
  auto load_w = [&](uint32_t (&w)[D][MT][L::wpl], int c0) {
#pragma unroll
    for (int d = 0; d < D; ++d)
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (c0 + d < nchunks) load_lane_tile<FMT>(w[d][m], a.wq, static_cast<long>(tile0 + m) * nchunks + c0 + d, lane);
  };
  auto step = [&](const uint32_t (&w)[D][MT][L::wpl], int c0) {
    uint32_t xb[D][NT][PT::xwords];
#pragma unroll
    for (int d = 0; d < D; ++d)
#pragma unroll
      for (int n = 0; n < NT; ++n)
        if (c0 + d < nchunks) load_x_chunk<X>(xb[d][n], x, n * 8 + g, a.M, a.Kp, c0 + d, t);
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (c0 + d < nchunks) mma_chunk<FMT, X>(accs, w[d], xb[d]);
  };
  const int stride = kw * D;
  int c0 = warp * D;
  if (c0 < nchunks) load_w(wbuf[0], c0);
  pdl_launch_dependents();  // a dependent (the next norm) may launch and wait for this grid
  pdl_wait();  // the first weight loads are in flight while the producer of x finishes
  if constexpr (PIPE) {
    while (c0 < nchunks) {
      if (c0 + stride < nchunks) load_w(wbuf[PIPE ? 1 : 0], c0 + stride);
      step(wbuf[0], c0);
      c0 += stride;
      if (c0 >= nchunks) break;
      if (c0 + stride < nchunks) load_w(wbuf[0], c0 + stride);
      step(wbuf[PIPE ? 1 : 0], c0);
      c0 += stride;
    }
  } else {
    while (c0 < nchunks) {
      step(wbuf[0], c0);
      c0 += stride;
      if (c0 < nchunks) load_w(wbuf[0], c0);
    }
  }

  Acc acc[MT][NT][4];
  sum_acc_sets(accs, acc);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  reduce_warps_and_store(a, acc, reinterpret_cast<Acc*>(smem_raw), kw, tile0);
}

template <int FMT, typename X, int MT, int NT, bool PIPE>
__global__ void __launch_bounds__(256, PIPE ? 2 : 1) gemv_oneshot_kernel(LinearArgs a, int nchunks) {
  gemv_oneshot_block<FMT, X, MT, NT, PIPE>(a, nchunks);
}

// ------------------------------------------------------------------------ GEMM
constexpr int kGemmRows = 128, kGemmTokens = 128, kGemmThreads = 256;
constexpr int kGemmMT = 2, kGemmNT = 8;


template <typename X>
__device__ __forceinline__ void stage_x_tile(unsigned char* stage, const X* __restrict__ x, int token0, int M, int Kp,
                                             int chunk) {
  constexpr int CPR = 128 * sizeof(X) / 16;  // 16-byte chunks per row
  constexpr int ROWB = 128 * sizeof(X);
#pragma unroll
  for (int it = 0; it < kGemmTokens * CPR / kGemmThreads; ++it) {
    const int idx = it * kGemmThreads + threadIdx.x;
    const int r = idx / CPR, c = idx % CPR;
    const int token = token0 + r;
    const bool valid = token < M;
    const X* src = x + static_cast<long>(valid ? token : 0) * Kp + chunk * 128 + c * (16 / sizeof(X));
    cp_async16(stage + r * ROWB + swizzle_chunk(c, r) * 16, src, valid);
  }
}

template <int FMT, typename X>
__global__ void __launch_bounds__(kGemmThreads, 1) gemm_kernel(LinearArgs a, int nchunks) {
  using PT = PathTraits<X>;
  using Acc = typename PT::Acc;
  using L = LaneTile<FMT>;
  constexpr int MT = kGemmMT, NT = kGemmNT;
  constexpr int ROWB = 128 * sizeof(X);
  constexpr int STAGE = kGemmTokens * ROWB;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wr = warp & 3, wt = warp >> 2;
  const int tile0 = blockIdx.x * (kGemmRows / 16) + wr * MT;
  const int token0 = blockIdx.y * kGemmTokens;
  const X* __restrict__ x = static_cast<const X*>(a.x);

  Acc accs[1][MT][NT][4];  // one accumulator set: MT x NT independent mma chains already
  zero_acc_sets(accs);

  uint32_t wa[MT][L::wpl], wn[MT][L::wpl];
  stage_x_tile<X>(smem_raw, x, token0, a.M, a.Kp, 0);
  cp_async_commit();
#pragma unroll
  for (int m = 0; m < MT; ++m) load_lane_tile<FMT>(wa[m], a.wq, static_cast<long>(tile0 + m) * nchunks, lane);

  for (int c = 0; c < nchunks; ++c) {
    const bool more = c + 1 < nchunks;
    if (more) {
      stage_x_tile<X>(smem_raw + ((c + 1) & 1) * STAGE, x, token0, a.M, a.Kp, c + 1);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        load_lane_tile<FMT>(wn[m], a.wq, static_cast<long>(tile0 + m) * nchunks + c + 1, lane);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const unsigned char* st = smem_raw + (c & 1) * STAGE;
#pragma unroll
    for (int jj = 0; jj < PT::ksteps / 2; ++jj) {
      uint32_t xb[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int r = wt * 64 + n * 8 + g;
        const int cidx = (32 * sizeof(X) / 16) * t + jj;
        const uint4 q = *reinterpret_cast<const uint4*>(st + r * ROWB + swizzle_chunk(cidx, r) * 16);
        xb[n][0] = q.x; xb[n][1] = q.y; xb[n][2] = q.z; xb[n][3] = q.w;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) mma_kstep<FMT, X>(accs, wa, 2 * jj + h, [&](int n) { return &xb[n][2 * h]; });
    }
    __syncthreads();
    if (more) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int w = 0; w < L::wpl; ++w) wa[m][w] = wn[m][w];
    }
  }

  store_fragment(a, accs[0], tile0, g, t, token0 + wt * 64);
}

// ------------------------------------------------------------------------ launch heuristics

// v2 GEMV: one block per MT m-tiles, all of a warp's loads issued before the first use.
template <int FMT, typename X, int MT, int NT>
cudaError_t launch_gemv_oneshot(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  constexpr int D = GemvDepth<FMT, X, MT, NT>::value;
  int kw = nchunks / D;
  kw = kw < 1 ? 1 : (kw > 8 ? 8 : kw);
  const int tiles = (a.N + 127) / 128 * 8;
  using Acc = typename PathTraits<X>::Acc;
  const size_t smem = kw > 1 ? static_cast<size_t>(kw) * MT * NT * 4 * 32 * sizeof(Acc) : 0;
  const int iterations = (nchunks + kw * D - 1) / (kw * D);  // of the busiest warp
  if (iterations == 2 && D * MT <= 4)
    return launch_maybe_pdl(gemv_oneshot_kernel<FMT, X, MT, NT, true>, dim3(tiles / MT), dim3(32 * kw), smem, stream,
                            a.pdl != 0, a, nchunks);
  return launch_maybe_pdl(gemv_oneshot_kernel<FMT, X, MT, NT, false>, dim3(tiles / MT), dim3(32 * kw), smem, stream,
                          a.pdl != 0, a, nchunks);
}

template <int FMT, typename X>
cudaError_t launch_gemm(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  const size_t smem = 2 * kGemmTokens * 128 * sizeof(X);
  static bool configured = false;  // per instantiation; the attribute is per kernel
  if (!configured) {
    cudaError_t err = cudaFuncSetAttribute(gemm_kernel<FMT, X>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    configured = true;
  }
  const dim3 grid((a.N + kGemmRows - 1) / kGemmRows, (a.M + kGemmTokens - 1) / kGemmTokens);
  gemm_kernel<FMT, X><<<grid, kGemmThreads, smem, stream>>>(a, nchunks);
  return cudaGetLastError();
}

template <int FMT, typename X>
cudaError_t launch_linear_fmt(const LinearArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  const int nchunks = a.Kp / 128;
  if (a.M > 16) {
    // 17-64 tokens: the wide cluster GEMV on sm_90 where a slice's activations fit (4 or 8 n-tiles),
    // unless BITLAB_CUDA_GEMV=oneshot / bulk (then the GEMM, as below sm_90 and past 64 tokens).
    // Mirrored in kernels.gemv_kernel.
    const GemvChoice wide = a.M <= kClusterWideMaxTokens ? gemv_choice() : kGemvOneshot;
    if ((wide == kGemvAuto || wide == kGemvCluster) && cluster_gemv_fits<X>(a.M, nchunks))
      return launch_gemv_cluster_wide<FMT, X>(a, nchunks, stream);
    return launch_gemm<FMT, X>(a, nchunks, stream);
  }
  // Two m-tiles per block (half the activation traffic per weight byte) once that still leaves
  // about three blocks per multiprocessor.
  const int tiles = (a.N + 127) / 128 * 8;
  const bool two_tiles = 2 * tiles >= 3 * 2 * device_sm_count();
  // The bulk-copy GEMV where it measured faster (H100, docs/backends/cuda_ext_notes.md v5): float
  // activations, 1- or 2-bit weights, at least ~6 m-tiles per multiprocessor, K >= 4096 and one token
  // or more than 8 (batch 1: 14336x4096 12.7 -> 11.2 us, 28672x8192 37.2 -> 32.0; batch 16: 28672x8192
  // 123 -> 75).  The one-shot kernel won at 8192x8192, at K = 2560 (13824x2560 9.7 vs 11.5), at 2 to 8
  // tokens (14336x4096 batch 8: 14.4 vs 19.8), on the int8 path and for 4- and 8-bit weights (mixed).
  // BITLAB_CUDA_BULK_MT=1/2 forces the m-tiles per bulk block.  Mirrored in kernels.gemv_kernel.
  const GemvChoice choice = gemv_choice();
  // The cluster GEMV (bitlab_gemv_cluster.cuh; activations read once per 256 or 512 rows) where it
  // measured faster (H100, docs/backends/cuda_ext_notes.md v6): float activations at 9-16 tokens with
  // >= 6 m-tiles per multiprocessor or K >= 6144 (8192x8192 batch 16 36.3 -> 20.0 us, 28672x8192 125 ->
  // 46, 2560x6912 17.6 -> 10.9; it lost at 3840x2560, 7.3 vs 9.1, and tied at 4096x4096) and at 2-8
  // tokens with >= 6 m-tiles per multiprocessor (28672x8192 batch 8 44.3 -> 34.2, 14336x4096 15.2 ->
  // 13.0; it lost at 8192x8192, 13.8 vs 16.3); int8 activations at 9-16 tokens with >= 6 m-tiles per
  // multiprocessor (launched plainly: 28672x8192 59.3 -> 43.4, 14336x4096 21.0 -> 18.7, 13824x2560
  // 17.9 -> 15.7; it lost at 8192x8192, 4096x4096 and 2560x6912).  One token with float activations
  // (H200, notes v13): 4- and 8-bit weights with >= 6 m-tiles per multiprocessor (128256x2560 W4A16 72.5 ->
  // 53.7 us, W8A16 94.5 -> 85.9, 32000x4096 W4A16 26.9 -> 23.1, 13824x2560 11.4 -> 9.6; it lost at 8192x8192),
  // 1- and 2-bit weights with >= 32 m-tiles per multiprocessor (128256x2560 W1.58A16 47.2 (bulk) -> 37.5; the
  // bulk and one-shot kernels won at 13-15 per multiprocessor and below).  Other one-token cases keep the
  // kernels below.  Mirrored in kernels.gemv_kernel.
  const bool many_tiles = tiles >= 6 * device_sm_count();
  // The prefetch-all GEMV (bitlab_gemv_prefetch.cuh: the layer's whole weight requested into one wave of
  // blocks' shared memory at the start) where it measured faster (H200, notes v14): float activations,
  // 1- or 2-bit weights, 1-8 tokens, at least 6 m-tiles per multiprocessor and K <= 4096, where a resident
  // plan exists (13824x2560 W1.58A16 one token 8.0 -> 7.2 us, 8 tokens 9.4 -> 7.9; 14336x4096 10.4 -> 10.0,
  // 12.4 -> 11.2; W1A16 7.5 -> 6.5 and 9.4 -> 8.5).  It lost at 8192x8192, 4096x4096, on the int8 path
  // (mixed, within 5 %) and for 4- and 8-bit weights (not resident).  BITLAB_CUDA_GEMV=prefetch forces it
  // wherever a plan is resident.  Mirrored in kernels.gemv_kernel.
  const bool prefetch_pays = sizeof(X) == 2 && FormatBits<FMT>::value <= 2 && many_tiles && nchunks <= 32;
  if (a.M <= 8 && (choice == kGemvPrefetch || (choice == kGemvAuto && prefetch_pays))) {
    const int mt = prefetch_gemv_mt<FMT, X>(a.N, nchunks);
    if (mt > 0) return launch_gemv_prefetch_mt<FMT, X>(a, nchunks, mt, stream);
  }
  const bool one_token_pays = FormatBits<FMT>::value >= 4 ? many_tiles : tiles >= 32 * device_sm_count();
  const bool cluster_pays =
      sizeof(X) == 2 ? (a.M > 8 ? (many_tiles || nchunks >= 48) : (a.M > 1 ? many_tiles : one_token_pays))
                     : (a.M > 8 && many_tiles);
  if (nchunks <= kClusterMaxChunks && (choice == kGemvCluster || (choice == kGemvAuto && cluster_pays))) {
    if (a.M <= 8) return launch_gemv_cluster_auto<FMT, X, 1>(a, nchunks, stream);
    return launch_gemv_cluster_auto<FMT, X, 2>(a, nchunks, stream);
  }
  const bool bulk_pays = sizeof(X) == 2 && FormatBits<FMT>::value <= 2 && tiles >= 6 * device_sm_count() &&
                         nchunks >= 32 && (a.M == 1 || a.M > 8);
  const bool bulk = choice == kGemvBulk || (choice == kGemvAuto && bulk_pays);
  if (bulk) {
    const char* env = std::getenv("BITLAB_CUDA_BULK_MT");
    const bool mt2 = env ? env[0] == '2' : two_tiles;
    if (a.M <= 8) return mt2 ? launch_gemv_bulk<FMT, X, 2, 1>(a, nchunks, stream) : launch_gemv_bulk<FMT, X, 1, 1>(a, nchunks, stream);
    return mt2 ? launch_gemv_bulk<FMT, X, 2, 2>(a, nchunks, stream) : launch_gemv_bulk<FMT, X, 1, 2>(a, nchunks, stream);
  }
  if (a.M <= 8) {
    // Four m-tiles per block for 1- and 2-bit weights where the grid is large and K short (H100,
    // docs/backends/cuda_ext_notes.md v7: 13824x2560 fp16 9.7 -> 8.1 us at one token, 10.9 -> 9.1 at
    // eight; W1.58A8 11.8 -> 11.4, 12.4 -> 11.9); two or one elsewhere (four lost at 3840x2560,
    // 2560x6912, 8192x8192, and on the int8 path at 14336x4096).  BITLAB_CUDA_ONESHOT_MT=1/2/4 forces one.
    const bool four_tiles = FormatBits<FMT>::value <= 2 && tiles >= 6 * device_sm_count() && nchunks <= 24;
    // Two m-tiles per block also for int8 activations, 1- or 2-bit weights, one or two tokens and K <= 3072 once
    // the grid holds a block per multiprocessor at one m-tile (H200, BitNet 2B decode, q/k/v 3840x2560 and o
    // 2560x2560: batch 1 889 -> 927 tokens/s, twice; batch 2 1681 -> 1690; four m-tiles lost, 814; notes v24).
    // Longer K and other token counts were not measured.
    const bool int8_pair = sizeof(X) == 1 && FormatBits<FMT>::value <= 2 && a.M <= 2 && nchunks <= 24 &&
                           tiles >= device_sm_count();
    const char* mt_env = std::getenv("BITLAB_CUDA_ONESHOT_MT");
    const int mt = mt_env ? mt_env[0] - '0' : (four_tiles ? 4 : (two_tiles || int8_pair ? 2 : 1));
    if (mt == 4) return launch_gemv_oneshot<FMT, X, 4, 1>(a, nchunks, stream);
    if (mt == 2) return launch_gemv_oneshot<FMT, X, 2, 1>(a, nchunks, stream);
    return launch_gemv_oneshot<FMT, X, 1, 1>(a, nchunks, stream);
  }
  return launch_gemv_oneshot<FMT, X, 1, 2>(a, nchunks, stream);
}

template <typename X>
cudaError_t launch_linear_x(const LinearArgs& a, cudaStream_t stream) {
  switch (a.fmt) {
    case kBinary: return launch_linear_fmt<kBinary, X>(a, stream);
    case kTernary: return launch_linear_fmt<kTernary, X>(a, stream);
    case kInt2: return launch_linear_fmt<kInt2, X>(a, stream);
    case kInt4: return launch_linear_fmt<kInt4, X>(a, stream);
    case kInt8: return launch_linear_fmt<kInt8, X>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace bitlab
