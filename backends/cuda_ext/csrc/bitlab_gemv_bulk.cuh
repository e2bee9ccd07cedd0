// BitLab cuda_ext: the bulk-copy GEMV (sm_90+), M <= 16 tokens.
//
// Why: the one-shot GEMV (bitlab_linear.cuh) holds its loads in registers, so a warp has at most
// D chunks of weights in flight and then waits a full DRAM round trip at the first use (ncu: 40 %
// of its stall samples on that one instruction).  Here the bytes in flight live in shared memory:
//
//   * a block owns MT m-tiles (16 rows each) over all of K; its last warp is the producer, whose
//     lane 0 streams the weights (each m-tile's chunks are one contiguous run in the lane-tile
//     layout) and the matching activation rows into a ring of `stages` shared-memory slots with
//     `cp.async.bulk` (one instruction per run; the copy engine moves the bytes);
//   * a slot holds kw chunks; consumer warp w decodes chunk w of every slot (LDS, then the
//     same decode + mma as the one-shot kernel) and releases the slot on its `empty` mbarrier;
//     the producer refills it as soon as all kw consumers have released it;
//   * the consumers' partial sums meet in shared memory at the end (reduce_warps_and_store).
//
// Bytes in flight per block = stages x slot, chosen on the host (~8 KB of weights by default), without
// registers: the per-chunk work of a consumer is the one-shot kernel's body plus two LDS.
#pragma once

#include <cstdlib>
#include <cstring>

#include "bitlab_cp_async.cuh"
#include "bitlab_mma.cuh"

namespace bitlab {

constexpr int kBulkMaxStages = 16;
constexpr int kBulkBarrierBytes = 2 * kBulkMaxStages * 8;  // full[] then empty[] mbarriers
constexpr int kBulkMaxWarps = 8;                             // consumers; + 1 producer warp

// Shared-memory plan of one block (host-computed, identical for every block).
struct BulkGemvPlan {
  int kw;           // consumer warps = chunks per slot
  int stages;       // ring slots
  int x_rows;       // token rows staged per slot: min(M, 8 NT)
  int x_pitch;      // bytes per staged token row: kw * 128 * sizeof(X) + 16 (rows on different banks)
  int x_offset;     // byte offset of the token rows inside a slot (after MT * kw weight tiles)
  int slot_bytes;   // multiple of 128
  int red_offset;   // byte offset of the reduction area
  int smem_bytes;   // total dynamic shared memory
};

// The lane's words of one (m-tile, chunk) from a tile copied verbatim into shared memory.
template <int FMT>
__device__ __forceinline__ void load_lane_tile_shared(uint32_t* dst, const unsigned char* tile, int lane) {
  using L = LaneTile<FMT>;
  const uint32_t* base = reinterpret_cast<const uint32_t*>(tile) + lane * L::unit;
#pragma unroll
  for (int v = 0; v < L::nu; ++v) {
    if constexpr (L::unit == 4) {
      const uint4 q = *reinterpret_cast<const uint4*>(base + v * 32 * 4);
      dst[4 * v] = q.x; dst[4 * v + 1] = q.y; dst[4 * v + 2] = q.z; dst[4 * v + 3] = q.w;
    } else {
      const uint2 q = *reinterpret_cast<const uint2*>(base);
      dst[0] = q.x; dst[1] = q.y;
    }
  }
}

// The lane's activations of one chunk from a staged token row (zeros for rows past M).
template <typename X>
__device__ __forceinline__ void load_x_shared(uint32_t* dst, const unsigned char* row_chunk, bool valid, int t) {
  constexpr int NV = PathTraits<X>::xwords / 4;
  if (valid) {
    const uint4* p = reinterpret_cast<const uint4*>(row_chunk + 32 * t * sizeof(X));
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const uint4 q = p[v];
      dst[4 * v] = q.x; dst[4 * v + 1] = q.y; dst[4 * v + 2] = q.z; dst[4 * v + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int v = 0; v < 4 * NV; ++v) dst[v] = 0u;
  }
}

template <int FMT, typename X, int MT>
__device__ __forceinline__ void bulk_gemv_produce(const LinearArgs& a, int nchunks, const BulkGemvPlan& p,
                                                  unsigned char* slots, uint64_t* full, uint64_t* empty) {
  constexpr int TB = 128 * LaneTile<FMT>::wpl;  // bytes of one (m-tile, chunk)
  const int kw = p.kw;
  const int nstages = (nchunks + kw - 1) / kw;
  const unsigned char* w = reinterpret_cast<const unsigned char*>(a.wq);
  const unsigned char* x = static_cast<const unsigned char*>(a.x);
  const long tile0 = static_cast<long>(blockIdx.x) * MT;
  auto issue_weights = [&](int s) {
    const int slot = s % p.stages, c0 = s * kw, cnt = min(kw, nchunks - c0);
    unsigned char* dst = slots + slot * p.slot_bytes;
    mbar_arrive_expect_bytes(&full[slot], cnt * (MT * TB + p.x_rows * 128 * static_cast<int>(sizeof(X))));
#pragma unroll
    for (int m = 0; m < MT; ++m)
      bulk_copy_to_shared(dst + m * kw * TB, w + ((tile0 + m) * nchunks + c0) * TB, cnt * TB, &full[slot]);
  };
  auto issue_x = [&](int s) {
    const int slot = s % p.stages, c0 = s * kw, cnt = min(kw, nchunks - c0);
    unsigned char* dst = slots + slot * p.slot_bytes + p.x_offset;
    for (int r = 0; r < p.x_rows; ++r)
      bulk_copy_to_shared(dst + r * p.x_pitch, x + (static_cast<long>(r) * a.Kp + c0 * 128) * sizeof(X),
                          cnt * 128 * sizeof(X), &full[slot]);
  };
  // The first slots' weights go out before waiting for the kernel that writes x.
  const int first = min(p.stages, nstages);
  for (int s = 0; s < first; ++s) issue_weights(s);
  pdl_wait();
  for (int s = 0; s < first; ++s) issue_x(s);
  for (int s = first; s < nstages; ++s) {
    mbar_wait(&empty[s % p.stages], ((s / p.stages) + 1) & 1);
    issue_weights(s);
    issue_x(s);
  }
}

template <int FMT, typename X, int MT, int NT>
__global__ void __launch_bounds__(32 * (kBulkMaxWarps + 1)) gemv_bulk_kernel(LinearArgs a, int nchunks,
                                                                             BulkGemvPlan p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using PT = PathTraits<X>;
  using Acc = typename PT::Acc;
  using L = LaneTile<FMT>;
  constexpr int TB = 128 * L::wpl;
  constexpr int S = GemvAccSets<MT>::value;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw);
  uint64_t* empty = full + kBulkMaxStages;
  unsigned char* slots = smem_raw + kBulkBarrierBytes;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kw = p.kw;
  if (threadIdx.x == 0) {
    for (int s = 0; s < p.stages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kw);
    }
    mbar_init_fence();
  }
  __syncthreads();
  pdl_launch_dependents();  // a dependent (the next norm) may launch and wait for this grid

  if (warp == kw) {
    if (lane == 0) bulk_gemv_produce<FMT, X, MT>(a, nchunks, p, slots, full, empty);
    return;
  }

  const int g = lane >> 2, t = lane & 3;
  Acc accs[S][MT][NT][4];
  zero_acc_sets(accs);

  const int nstages = (nchunks + kw - 1) / kw;
  for (int s = 0; s < nstages; ++s) {
    const int slot = s % p.stages;
    mbar_wait(&full[slot], (s / p.stages) & 1);
    if (s * kw + warp < nchunks) {
      const unsigned char* st = slots + slot * p.slot_bytes;
      uint32_t w[MT][L::wpl];
#pragma unroll
      for (int m = 0; m < MT; ++m) load_lane_tile_shared<FMT>(w[m], st + (m * kw + warp) * TB, lane);
      uint32_t xb[NT][PT::xwords];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int row = n * 8 + g;
        load_x_shared<X>(xb[n], st + p.x_offset + row * p.x_pitch + warp * 128 * sizeof(X), row < p.x_rows, t);
      }
      mma_chunk<FMT, X>(accs, w, xb);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[slot]);
  }

  Acc acc[MT][NT][4];
  sum_acc_sets(accs, acc);
  pdl_wait();  // (already satisfied: the producer waited before its first activation copy)
  reduce_warps_and_store(a, acc, reinterpret_cast<Acc*>(smem_raw + p.red_offset), kw, static_cast<int>(blockIdx.x) * MT);
#else
  __trap();  // launched only on sm_90+ (gemv_choice)
#endif
}

// Which GEMV runs on this device: BITLAB_CUDA_GEMV=oneshot / bulk / cluster / prefetch forces one (bulk,
// cluster and prefetch need sm_90; read at every launch, so tests and benchmarks can compare them in one process);
// unset or "auto" leaves the choice to launch_linear_fmt's rule.
enum GemvChoice { kGemvAuto = 0, kGemvOneshot = 1, kGemvBulk = 2, kGemvCluster = 3, kGemvPrefetch = 4 };
inline GemvChoice gemv_choice() {
  if (device_major() < 9) return kGemvOneshot;
  if (env_is("BITLAB_CUDA_GEMV", "oneshot")) return kGemvOneshot;
  if (env_is("BITLAB_CUDA_GEMV", "bulk")) return kGemvBulk;
  if (env_is("BITLAB_CUDA_GEMV", "cluster")) return kGemvCluster;
  if (env_is("BITLAB_CUDA_GEMV", "prefetch")) return kGemvPrefetch;
  return kGemvAuto;
}

// Consumer warps: the count in 4..8 (fewer only for K < 4 chunks) that leaves the fewest idle
// chunk positions in the last slot; ties go to more warps.
inline int bulk_gemv_warps(int nchunks) {
  if (nchunks <= 4) return nchunks;
  int best = kBulkMaxWarps, best_waste = 1 << 30;
  for (int kw = kBulkMaxWarps; kw >= 4; --kw) {
    const int waste = (nchunks + kw - 1) / kw * kw - nchunks;
    if (waste < best_waste) best = kw, best_waste = waste;
  }
  return best;
}

template <int FMT, typename X, int MT, int NT>
BulkGemvPlan bulk_gemv_plan(int M, int nchunks) {
  constexpr int TB = 128 * LaneTile<FMT>::wpl;
  using Acc = typename PathTraits<X>::Acc;
  BulkGemvPlan p{};
  p.kw = bulk_gemv_warps(nchunks);
  p.x_rows = M < 8 * NT ? M : 8 * NT;
  p.x_pitch = p.kw * 128 * static_cast<int>(sizeof(X)) + 16;
  p.x_offset = MT * p.kw * TB;
  p.slot_bytes = (p.x_offset + p.x_rows * p.x_pitch + 127) / 128 * 128;
  // Bytes of weights in flight per block: BITLAB_CUDA_BULK_INFLIGHT (default 8 KB: 8, 16 and 32 KB
  // measured, 8 best or equal at every shape where the kernel is chosen).
  const char* env = std::getenv("BITLAB_CUDA_BULK_INFLIGHT");
  const int target = env ? std::atoi(env) : 8 * 1024;
  const int weights_per_slot = MT * p.kw * TB;
  int stages = (target + weights_per_slot - 1) / weights_per_slot;
  const int nstages = (nchunks + p.kw - 1) / p.kw;
  stages = stages < 2 ? 2 : (stages > kBulkMaxStages ? kBulkMaxStages : stages);
  if (stages > nstages) stages = nstages;
  const int red_bytes = p.kw * MT * NT * 4 * 32 * static_cast<int>(sizeof(Acc));
  while (stages > 1 && kBulkBarrierBytes + stages * p.slot_bytes + red_bytes > 200 * 1024) --stages;
  p.stages = stages;
  p.red_offset = kBulkBarrierBytes + stages * p.slot_bytes;
  p.smem_bytes = p.red_offset + red_bytes;
  return p;
}

template <int FMT, typename X, int MT, int NT>
cudaError_t launch_gemv_bulk(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  const BulkGemvPlan p = bulk_gemv_plan<FMT, X, MT, NT>(a.M, nchunks);
  static int configured = 0;  // per instantiation: the largest dynamic shared memory allowed so far
  if (p.smem_bytes > 48 * 1024 && p.smem_bytes > configured) {
    cudaError_t err = cudaFuncSetAttribute(gemv_bulk_kernel<FMT, X, MT, NT>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem_bytes);
    if (err != cudaSuccess) return err;
    configured = p.smem_bytes;
  }
  const int tiles = (a.N + 127) / 128 * 8;
  return launch_maybe_pdl(gemv_bulk_kernel<FMT, X, MT, NT>, dim3(tiles / MT), dim3(32 * (p.kw + 1)),
                          static_cast<size_t>(p.smem_bytes), stream, a.pdl != 0, a, nchunks, p);
}

}  // namespace bitlab
