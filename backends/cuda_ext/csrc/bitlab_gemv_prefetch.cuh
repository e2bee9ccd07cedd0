// BitLab cuda_ext: the prefetch-all GEMV (sm_90+), 1 to 8 tokens.
//
// Why: the one-shot GEMV (bitlab_linear.cuh) holds its loads in registers, so a warp waits a full DRAM
// round trip per iteration; the bulk and stream GEMVs (bitlab_gemv_bulk.cuh, notes v5 / v10) keep a ring
// of shared-memory slots that consumers release and a producer refills.  Here there is no ring: where a
// block's whole share of the weight fits in shared memory and every block is resident in one wave, the
// first thread requests all of it with `cp.async.bulk` the moment the block starts (before the
// dependent-launch wait: weights are never written by an earlier kernel), one mbarrier per piece of kw
// chunks, and the warps consume the pieces in arrival order.  Every weight byte of the layer is in flight
// from the start; nothing is released or refilled.
//
//   * block b owns MT m-tiles (16 rows each) over all K: in the lane-tile layout that is one contiguous
//     run of MT * nchunks * TB bytes, copied verbatim (shared image = global image);
//   * piece q = chunks [q kw, q kw + kw) of each of the MT m-tiles (MT copies, one mbarrier);
//   * warp w decodes chunk q kw + w of piece q (its activations read from global / L2 one piece ahead),
//     with the one-shot kernel's decode + mma; the partial sums meet in shared memory at the end.
#pragma once

#include <cstdlib>

#include "bitlab_cp_async.cuh"
#include "bitlab_gemv_bulk.cuh"
#include "bitlab_mma.cuh"

namespace bitlab {

constexpr int kPrefetchWarps = 8;
constexpr int kPrefetchMaxPieces = 64;
constexpr int kPrefetchBarrierBytes = kPrefetchMaxPieces * 8;
constexpr int kSmemReservedPerBlock = 1024;  // the runtime's share of each block

// The device's shared-memory limits (227 KB per block and 228 KB per multiprocessor on sm_90).
struct SmemLimits {
  int per_block;
  int per_sm;
};
inline SmemLimits device_smem_limits() {
  static SmemLimits limits{0, 0};
  if (limits.per_block == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&limits.per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&limits.per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    if (limits.per_block <= 0) limits.per_block = 48 * 1024;
    if (limits.per_sm <= 0) limits.per_sm = limits.per_block;
  }
  return limits;
}

template <int FMT, typename X, int MT>
__global__ void __launch_bounds__(32 * kPrefetchWarps, 2) gemv_prefetch_kernel(LinearArgs a, int nchunks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using PT = PathTraits<X>;
  using Acc = typename PT::Acc;
  using L = LaneTile<FMT>;
  constexpr int TB = 128 * L::wpl;  // bytes of one (m-tile, chunk)
  constexpr int S = GemvAccSets<MT>::value;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw);
  unsigned char* wsm = smem_raw + kPrefetchBarrierBytes;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * MT;
  const int npieces = (nchunks + kw - 1) / kw;

  if (threadIdx.x == 0) {
    for (int q = 0; q < npieces; ++q) mbar_init(&full[q], 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned char* src = reinterpret_cast<const unsigned char*>(a.wq) + static_cast<long>(tile0) * nchunks * TB;
    for (int q = 0; q < npieces; ++q) {
      const int c0 = q * kw, cnt = min(kw, nchunks - c0);
      mbar_arrive_expect_bytes(&full[q], MT * cnt * TB);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const long off = (static_cast<long>(m) * nchunks + c0) * TB;
        bulk_copy_to_shared(wsm + off, src + off, cnt * TB, &full[q]);
      }
    }
  }
  pdl_launch_dependents();  // a dependent (the next norm) may launch and wait for this grid
  pdl_wait();               // the weights are in flight while the producer of x finishes

  // Activations from global memory (L2), one piece ahead: measured faster than one bulk copy of the
  // token rows into shared memory, whose round trip every warp then waits for before its first piece.
  const X* __restrict__ x = static_cast<const X*>(a.x);
  Acc accs[S][MT][1][4];
  zero_acc_sets(accs);
  uint32_t xb[2][1][PT::xwords];
  if (warp < nchunks) load_x_chunk<X>(xb[0][0], x, g, a.M, a.Kp, warp, t);
  // Two pieces per trip so the activation double buffer is indexed with constants.
  for (int q = 0; q < npieces; q += 2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = (q + h) * kw + warp;
      if (c < nchunks) {
        if (c + kw < nchunks) load_x_chunk<X>(xb[h ^ 1][0], x, g, a.M, a.Kp, c + kw, t);
        mbar_wait(&full[q + h], 0);
        uint32_t w[MT][L::wpl];
#pragma unroll
        for (int m = 0; m < MT; ++m)
          load_lane_tile_shared<FMT>(w[m], wsm + (static_cast<long>(m) * nchunks + c) * TB, lane);
        mma_chunk<FMT, X>(accs, w, xb[h]);
      }
    }
  }

  Acc acc[MT][1][4];
  sum_acc_sets(accs, acc);
  const size_t red_offset = kPrefetchBarrierBytes + static_cast<size_t>(MT) * nchunks * TB;
  reduce_warps_and_store(a, acc, reinterpret_cast<Acc*>(smem_raw + red_offset), kw, tile0);
#else
  __trap();  // launched only on sm_90+ (gemv_choice)
#endif
}

template <int FMT, typename X, int MT>
size_t prefetch_gemv_smem(int nchunks, int kw) {
  using Acc = typename PathTraits<X>::Acc;
  return kPrefetchBarrierBytes + static_cast<size_t>(MT) * nchunks * 128 * LaneTile<FMT>::wpl +
         static_cast<size_t>(kw) * MT * 4 * 32 * sizeof(Acc);
}

// Resident blocks per multiprocessor of the MT instantiation at this share (0: it does not fit): two
// when two blocks' shared memory fits the multiprocessor (__launch_bounds__(256, 2) guarantees their
// registers), else one.  Counted, not queried, so kernels.gemv_kernel mirrors it exactly.
template <int FMT, typename X, int MT>
int prefetch_gemv_occupancy(int nchunks, int kw) {
  const size_t smem = prefetch_gemv_smem<FMT, X, MT>(nchunks, kw);
  const SmemLimits limits = device_smem_limits();
  if (smem > static_cast<size_t>(limits.per_block)) return 0;
  return 2 * (smem + kSmemReservedPerBlock) <= static_cast<size_t>(limits.per_sm) ? 2 : 1;
}

inline int prefetch_gemv_warps(int nchunks) { return nchunks < kPrefetchWarps ? nchunks : kPrefetchWarps; }

// m-tiles per block for the prefetch GEMV: the largest of 4, 2, 1 whose grid is resident in one wave
// (every byte requested at once) and still gives at least 95 % of the multiprocessors a block, else the
// smallest resident one; 0 when none is resident (the layer is too large for shared memory, or K too
// long for kPrefetchMaxPieces pieces).  BITLAB_CUDA_PREFETCH_MT=1/2/4 forces one (if it fits at all).
// Mirrored in kernels.prefetch_gemv_mt.
template <int FMT, typename X>
int prefetch_gemv_mt(int N, int nchunks) {
  const int kw = prefetch_gemv_warps(nchunks);
  if (kw < 1 || (nchunks + kw - 1) / kw > kPrefetchMaxPieces) return 0;
  const int tiles = (N + 127) / 128 * 8;
  const long sms = device_sm_count();
  const char* env = std::getenv("BITLAB_CUDA_PREFETCH_MT");
  const int forced = env ? env[0] - '0' : 0;
  const int occ[3] = {prefetch_gemv_occupancy<FMT, X, 1>(nchunks, kw), prefetch_gemv_occupancy<FMT, X, 2>(nchunks, kw),
                      prefetch_gemv_occupancy<FMT, X, 4>(nchunks, kw)};
  if (forced == 1 || forced == 2 || forced == 4) return occ[forced / 2] > 0 ? forced : 0;
  int fallback = 0;
  for (int i = 2; i >= 0; --i) {
    const long blocks = tiles >> i;
    if (occ[i] == 0 || blocks > occ[i] * sms) continue;
    if (blocks * 100 >= 95 * sms) return 1 << i;
    fallback = 1 << i;  // resident but leaves multiprocessors idle: only if no smaller MT is resident
  }
  return fallback;
}

template <int FMT, typename X, int MT>
cudaError_t launch_gemv_prefetch(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  const int kw = prefetch_gemv_warps(nchunks);
  const size_t smem = prefetch_gemv_smem<FMT, X, MT>(nchunks, kw);
  static size_t configured = 0;  // per instantiation: the largest dynamic shared memory allowed so far
  if (smem > 48 * 1024 && smem > configured) {
    cudaError_t err = cudaFuncSetAttribute(gemv_prefetch_kernel<FMT, X, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    configured = smem;
  }
  const int tiles = (a.N + 127) / 128 * 8;
  return launch_maybe_pdl(gemv_prefetch_kernel<FMT, X, MT>, dim3(tiles / MT), dim3(32 * kw),
                          smem, stream, a.pdl != 0, a, nchunks);
}

// The prefetch GEMV at mt m-tiles per block (from prefetch_gemv_mt, nonzero).
template <int FMT, typename X>
cudaError_t launch_gemv_prefetch_mt(const LinearArgs& a, int nchunks, int mt, cudaStream_t stream) {
  if (mt == 4) return launch_gemv_prefetch<FMT, X, 4>(a, nchunks, stream);
  if (mt == 2) return launch_gemv_prefetch<FMT, X, 2>(a, nchunks, stream);
  return launch_gemv_prefetch<FMT, X, 1>(a, nchunks, stream);
}

}  // namespace bitlab
