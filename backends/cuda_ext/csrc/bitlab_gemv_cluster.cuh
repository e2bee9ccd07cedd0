// BitLab cuda_ext: the cluster GEMV (sm_90+), 1-64 tokens, activations staged once per block.
//
// Why: the one-shot and bulk GEMVs give a block one or two 16-row m-tiles over all of K, so every
// block reads every activation row: at 16 tokens, 8192x8192 in fp16, 134 MB of activations cross
// L2 -> SM for 16.8 MB of weights (docs/backends/cuda_ext_notes.md).  Here a block owns many rows
// and a slice of K, and reads its activations once:
//
//   * grid (KS, row blocks); a thread-block cluster of the KS blocks of one row block splits K into
//     KS slices; warp w of a block owns MT m-tiles (block: 8 MT m-tiles = 128 MT rows);
//   * the block stages its slice of every token row in shared memory with cp.async (16-byte pieces
//     XOR-swizzled: the lanes' 16-byte reads are conflict-free), while its warps' first weight
//     loads are in flight;
//   * each warp streams its m-tiles' weights through two register buffers (the next step's loads
//     in flight while this one is decoded), reads the activations from shared memory and runs the
//     shared decode + mma (`mma_chunk`);
//   * the warps' fragments go to shared memory as [token][row]; after one cluster barrier block r
//     of the cluster sums a 1/KS share of the outputs over the KS blocks through distributed shared
//     memory (fixed order: deterministic, exact on the int8 path) and applies the epilogue.
//
// Activation traffic: (row blocks) x (all activations) instead of (m-tiles / MT) x (all activations):
// 16x less at MT = 2.
//
// Wide variant (NT = 4 or 8 n-tiles: 17-64 tokens, where the GEMM's 128-token tiles leave most of the
// machine idle): the same kernel, one block per multiprocessor; activations are read from shared
// memory one 16-byte piece (two k-steps) per n-tile at a time instead of a whole chunk, so the
// registers hold MT x NT accumulators + 4 NT activation words; the partial sums reuse the staging
// area.
#pragma once

#include <cooperative_groups.h>

#include <cstdio>
#include <cstdlib>

#include "bitlab_cp_async.cuh"
#include "bitlab_mma.cuh"

namespace bitlab {

constexpr int kClusterWarps = 8;
constexpr int kClusterMaxSlices = 8;    // the portable cluster size
constexpr int kClusterMaxChunks = 256;  // K <= 32768: a slice's activations fit in shared memory
constexpr int kClusterStageGroups = 4;  // the slice's activations arrive in 4 cp.async groups
constexpr int kClusterWideMaxTokens = 64;             // NT = 8 n-tiles of 8 tokens
constexpr int kClusterStageBytes = 128 * 1024;        // a slice's staged activations, NT <= 2
constexpr int kClusterWideStageBytes = 192 * 1024;    // NT > 2 (one block per multiprocessor)

// Bytes of one 128-column chunk of M staged token rows.
template <typename X>
constexpr int cluster_chunk_bytes(int M) { return M * 128 * static_cast<int>(sizeof(X)); }

// Whether one of `slices` slices of M staged token rows fits the shared-memory budget of its variant.
template <typename X>
inline bool cluster_slice_fits(int M, int nchunks, int slices) {
  const long limit = M > 16 ? kClusterWideStageBytes : kClusterStageBytes;
  return static_cast<long>((nchunks + slices - 1) / slices) * cluster_chunk_bytes<X>(M) <= limit;
}

// Whether the kernel takes M tokens over nchunks chunks at all (with the most slices, 8).
template <typename X>
inline bool cluster_gemv_fits(int M, int nchunks) {
  return nchunks <= kClusterMaxChunks && cluster_slice_fits<X>(M, nchunks, kClusterMaxSlices);
}

// Shared-memory plan of one block (host-computed, identical for every block).
struct ClusterGemvPlan {
  int slices;        // KS: blocks per cluster = K slices
  int slice_chunks;  // 128-column chunks per slice (the last slice may hold fewer)
  int x_rows;        // staged token rows: M (<= 64)
  int red_offset;    // byte offset of the [token][row] partial sums (after the staged activations; 0 = over them)
  int red_pitch;     // floats / ints per token row of the partial sums: block rows + 4 (no bank conflicts)
  int smem_bytes;
};

// Weight chunks per pipeline step: 16 registers of weights per buffer (two buffers in flight).
template <int FMT, int MT>
struct ClusterDepth {
  static constexpr int per = 16 / (MT * LaneTile<FMT>::wpl);
  static constexpr int value = per < 1 ? 1 : per;
};

// Staged layout: chunk c of the slice, token row r: 128 * sizeof(X) bytes at (c * rows + r), its
// 16-byte piece p at position swizzle_chunk(p, r).
template <typename X>
__device__ __forceinline__ void stage_x_slice(unsigned char* xs, const X* __restrict__ x, int rows, int Kp,
                                              int chunk0, int local0, int chunks) {
  constexpr int PPR = 128 * static_cast<int>(sizeof(X)) / 16;  // pieces per chunk row
  constexpr int ROWB = 128 * static_cast<int>(sizeof(X));
  const int per_row = chunks * PPR;
  const int total = rows * per_row;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int r = idx / per_row, q = idx - r * per_row;  // consecutive threads: one contiguous run per row
    const int c = q / PPR, p = q - c * PPR;
    const X* src = x + static_cast<long>(r) * Kp + (chunk0 + c) * 128 + p * (16 / static_cast<int>(sizeof(X)));
    cp_async16(xs + ((local0 + c) * rows + r) * ROWB + swizzle_chunk(p, r) * 16, src);
  }
}

// cp.async.wait_group with a run-time count (0 .. kClusterStageGroups - 1).
__device__ __forceinline__ void cp_async_wait_dyn(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    default: cp_async_wait<3>(); break;
  }
}

// The lane's activations of one staged chunk for token row `row` (zeros for rows past the staged ones).
template <typename X>
__device__ __forceinline__ void load_x_staged(uint32_t* dst, const unsigned char* chunk_rows, int row, int rows,
                                              int t) {
  constexpr int NV = PathTraits<X>::xwords / 4;
  constexpr int ROWB = 128 * static_cast<int>(sizeof(X));
  if (row < rows) {
    const unsigned char* base = chunk_rows + row * ROWB;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const uint4 q = *reinterpret_cast<const uint4*>(base + swizzle_chunk(NV * t + v, row) * 16);
      dst[4 * v] = q.x; dst[4 * v + 1] = q.y; dst[4 * v + 2] = q.z; dst[4 * v + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int v = 0; v < 4 * NV; ++v) dst[v] = 0u;
  }
}

// Decode one (m-tile, chunk) of weights and multiply it with NT staged token groups (from group n0), reading the
// activations one 16-byte piece (two k-steps) per n-tile at a time (the wide variant's register diet;
// same k mapping as load_x_staged + mma_chunk: piece v of lane t holds k-steps 2v and 2v + 1).
template <int FMT, typename X, int S, int MT, int NT, typename Acc>
__device__ __forceinline__ void mma_chunk_staged(Acc (&accs)[S][MT][NT][4],
                                                 const uint32_t (&w)[MT][2 * FormatBits<FMT>::value],
                                                 const unsigned char* chunk_rows, int rows, int g, int t, int n0) {
  constexpr int NV = PathTraits<X>::xwords / 4;
  constexpr int ROWB = 128 * static_cast<int>(sizeof(X));
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    uint32_t xb[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int row = (n0 + n) * 8 + g;
      if (row < rows) {
        const uint4 q = *reinterpret_cast<const uint4*>(chunk_rows + row * ROWB + swizzle_chunk(NV * t + v, row) * 16);
        xb[n][0] = q.x; xb[n][1] = q.y; xb[n][2] = q.z; xb[n][3] = q.w;
      } else {
        xb[n][0] = xb[n][1] = xb[n][2] = xb[n][3] = 0u;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) mma_kstep<FMT, X>(accs, w, 2 * v + h, [&](int n) { return &xb[n][2 * h]; });
  }
}

// TS (wide variant only): warps per group of m-tiles, each taking NT / TS of the n-tiles; TS = 2 runs 16
// warps per block (half the accumulators per warp) and decodes every weight twice.
template <int FMT, typename X, int MT, int NT, int TS = 1>
__global__ void __launch_bounds__(32 * kClusterWarps * TS, NT > 2 ? 1 : 2) gemv_cluster_kernel(LinearArgs a, int nchunks,
                                                                                            ClusterGemvPlan p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using PT = PathTraits<X>;
  using Acc = typename PT::Acc;
  using L = LaneTile<FMT>;
  static_assert(NT % TS == 0 && (TS == 1 || NT > 2), "token split: wide variant only");
  constexpr int NTW = NT / TS;  // n-tiles of one warp
  constexpr int D = ClusterDepth<FMT, MT>::value;
  constexpr int S = MT * NTW >= 4 ? 1 : GemvAccSets<MT>::value;  // independent mma chains per k-step
  constexpr int ROWB = 128 * static_cast<int>(sizeof(X));
  constexpr int BLOCK_ROWS = kClusterWarps * MT * 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cg::cluster_group cluster = cg::this_cluster();
  const int slice = static_cast<int>(cluster.block_rank());  // == blockIdx.x: cluster dims (KS, 1, 1)
  const int lane = threadIdx.x & 31, warp = TS == 1 ? threadIdx.x >> 5 : (threadIdx.x >> 5) % kClusterWarps;
  const int n0 = TS == 1 ? 0 : (threadIdx.x >> 5) / kClusterWarps * NTW;  // first n-tile of this warp
  const int g = lane >> 2, t = lane & 3;
  const int tiles = (a.N + 127) / 128 * 8;
  const int tile0 = (static_cast<int>(blockIdx.y) * kClusterWarps + warp) * MT;
  const int c_begin = slice * p.slice_chunks;
  const int kc = max(0, min(nchunks, c_begin + p.slice_chunks) - c_begin);
  const X* __restrict__ x = static_cast<const X*>(a.x);

  Acc accs[S][MT][NTW][4];
  zero_acc_sets(accs);

  // m-tiles past the weight's last one (the last row block) re-read that tile; their rows are >= N
  // and never stored.
  uint32_t wbuf[2][D][MT][L::wpl];
  auto load_w = [&](uint32_t (&w)[D][MT][L::wpl], int c) {
#pragma unroll
    for (int d = 0; d < D; ++d)
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (c + d < kc) {
          const int tile = min(tile0 + m, tiles - 1);
          load_lane_tile<FMT>(w[d][m], a.wq, static_cast<long>(tile) * nchunks + c_begin + c + d, lane);
        }
  };
  auto step = [&](const uint32_t (&w)[D][MT][L::wpl], int c) {
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (c + d < kc) {
        const unsigned char* chunk_rows = smem_raw + (c + d) * p.x_rows * ROWB;
        if constexpr (NT > 2) {
          mma_chunk_staged<FMT, X>(accs, w[d], chunk_rows, p.x_rows, g, t, n0);
        } else {
          uint32_t xb[NT][PT::xwords];
#pragma unroll
          for (int n = 0; n < NT; ++n) load_x_staged<X>(xb[n], chunk_rows, n * 8 + g, p.x_rows, t);
          mma_chunk<FMT, X>(accs, w[d], xb);
        }
      }
  };

  // Two steps of weights in flight from the start (before the wait for x), then each buffer is
  // refilled as soon as it has been decoded.
  load_w(wbuf[0], 0);
  load_w(wbuf[1], D);
  pdl_launch_dependents();  // a dependent (the next norm) may launch and wait for this grid
  pdl_wait();               // weights are in flight; x is written by the previous kernel
  // The slice's activations in kClusterStageGroups cp.async groups of whole steps: the first steps
  // start once their group has landed (one block barrier per group, block-uniform).
  constexpr int G = kClusterStageGroups;
  const int per = max(D, ((kc + G - 1) / G + D - 1) / D * D);
  for (int gi = 0; gi < G; ++gi) {
    const int lo = gi * per;
    stage_x_slice<X>(smem_raw, x, p.x_rows, a.Kp, c_begin + lo, lo, max(0, min(kc, lo + per) - lo));
    cp_async_commit();
  }
  int landed = -1;
  auto await_x = [&](int c) {
    const int group = c / per;
    if (group > landed) {
      cp_async_wait_dyn(G - 1 - group);
      __syncthreads();
      landed = group;
    }
  };
  for (int c = 0; c < kc; c += 2 * D) {
    await_x(c);
    step(wbuf[0], c);
    load_w(wbuf[0], c + 2 * D);
    if (c + D >= kc) break;
    await_x(c + D);
    step(wbuf[1], c + D);
    load_w(wbuf[1], c + 3 * D);
  }

  // Partial sums as [token][block row]: lane (g, t) writes rows g, g + 8 of tokens 2t, 2t + 1 per
  // fragment; the pitch (block rows + 4) puts the 32 lanes' stores on 32 banks.
  Acc acc[MT][NTW][4];
  sum_acc_sets(accs, acc);
  if constexpr (NT > 2) {  // the partial sums reuse the staging area (red_offset 0): every warp is done reading it
    cp_async_wait<0>();
    __syncthreads();
  }
  Acc* red = reinterpret_cast<Acc*>(smem_raw + p.red_offset);
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NTW; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = (warp * MT + m) * 16 + g + (i >= 2 ? 8 : 0);
        const int token = (n0 + n) * 8 + 2 * t + (i & 1);
        red[token * p.red_pitch + row] = acc[m][n][i];
      }
  cluster.sync();  // every block's partial sums are visible to the cluster

  // Block `slice` finishes outputs slice, slice + KS, ... (in units of one block of threads),
  // rows fastest: coalesced reads of the partial sums and coalesced stores.
  const int outputs = a.M * BLOCK_ROWS;
  const int row_base = static_cast<int>(blockIdx.y) * BLOCK_ROWS;
  for (int idx = slice * blockDim.x + threadIdx.x; idx < outputs; idx += p.slices * blockDim.x) {
    const int token = idx / BLOCK_ROWS, row = idx - token * BLOCK_ROWS;
    const int off = token * p.red_pitch + row;
    Acc s = Acc(0);
    if constexpr (NT > 2) {  // many outputs per thread: every remote read issued before the first add
      Acc part[kClusterMaxSlices];
#pragma unroll
      for (int r = 0; r < kClusterMaxSlices; ++r) part[r] = r < p.slices ? cluster.map_shared_rank(red, r)[off] : Acc(0);
#pragma unroll
      for (int r = 0; r < kClusterMaxSlices; ++r) s += part[r];
    } else {
      for (int r = 0; r < p.slices; ++r) s += cluster.map_shared_rank(red, r)[off];
    }
    epilogue_store(a, token, row_base + row, s);
  }
  cluster.sync();  // the other blocks' shared memory stays alive until every block has read it
#else
  __trap();  // launched only on sm_90+ (gemv_choice)
#endif
}

// ------------------------------------------------------------------------ host: plan and launch
// Thread-block clusters are placed inside one GPC, so fewer blocks run at once than the
// multiprocessor count suggests (H100, 8-block clusters of this kernel: 30 clusters = 240 blocks, not
// 264; ncu showed a 256-block grid running 2 of its 32 clusters as a second wave, 1.6x the time).
// The plan therefore asks the runtime how many clusters of each size fit.
// Allows the kernel the device's whole opt-in shared memory (once per instantiation).
template <int FMT, typename X, int MT, int NT, int TS = 1>
cudaError_t configure_gemv_cluster() {
  static cudaError_t status = [] {
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return cudaFuncSetAttribute(gemv_cluster_kernel<FMT, X, MT, NT, TS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                optin);
  }();
  return status;
}

template <int FMT, typename X, int MT, int NT, int TS = 1>
int cluster_gemv_capacity(int slices, int smem_bytes) {
  static int cached_smem[kClusterMaxSlices + 1] = {}, cached[kClusterMaxSlices + 1] = {};
  if (cached_smem[slices] == smem_bytes) return cached[slices];
  auto kernel = gemv_cluster_kernel<FMT, X, MT, NT, TS>;
  configure_gemv_cluster<FMT, X, MT, NT, TS>();
  const ClusterLaunch launch(dim3(slices, 1), slices, smem_bytes, nullptr, 32 * kClusterWarps * TS);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.cfg) != cudaSuccess || clusters < 1) {
    cudaGetLastError();  // clear it: a plan without the query still runs, one cluster at a time
    clusters = 1;
  }
  cached_smem[slices] = smem_bytes;
  cached[slices] = clusters;
  return clusters;
}

template <int FMT, typename X, int MT, int NT, int TS = 1>
ClusterGemvPlan cluster_gemv_plan_for(int M, int nchunks, int slices) {
  using Acc = typename PathTraits<X>::Acc;
  constexpr int ROWB = 128 * static_cast<int>(sizeof(X));
  ClusterGemvPlan p{};
  p.slices = slices;
  p.slice_chunks = (nchunks + slices - 1) / slices;
  p.x_rows = M;
  const int staged = (p.slice_chunks * M * ROWB + 15) / 16 * 16;
  p.red_pitch = kClusterWarps * MT * 16 + 4;
  const int red = 8 * NT * p.red_pitch * static_cast<int>(sizeof(Acc));
  // Wide variant: the partial sums overwrite the staged activations (red_offset 0; the kernel waits for
  // every warp first), so 64 tokens fit in one block's shared memory.
  p.red_offset = NT > 2 ? 0 : staged;
  p.smem_bytes = NT > 2 ? (staged > red ? staged : red) : staged + red;
  return p;
}

// Cost of a plan in units of one warp's (m-tile, chunk): waves x (MT x chunks per slice + the fixed
// part: staging, barriers, reduction, worth about kClusterFixedUnits units).
constexpr int kClusterFixedUnits = 8;
struct ClusterChoice {
  ClusterGemvPlan plan;
  long cost;
};

// The slice count 1..8 of least cost; BITLAB_CUDA_CLUSTER_KS forces one where it is valid (at most
// nchunks slices, a slice's staged activations within cluster_slice_fits' budget; the launcher takes this
// kernel only where cluster_gemv_fits, so 8 slices always fit).
template <int FMT, typename X, int MT, int NT, int TS = 1>
ClusterChoice cluster_gemv_choose(int M, int N, int nchunks) {
  const int tiles = (N + 127) / 128 * 8;
  const int row_blocks = (tiles + kClusterWarps * MT - 1) / (kClusterWarps * MT);
  int forced = 0;
  if (const char* env = std::getenv("BITLAB_CUDA_CLUSTER_KS")) forced = std::atoi(env);
  auto fits = [&](int ks) { return ks == kClusterMaxSlices || cluster_slice_fits<X>(M, nchunks, ks); };
  if (forced < 1 || forced > kClusterMaxSlices || forced > nchunks || !fits(forced)) forced = 0;
  ClusterChoice best{cluster_gemv_plan_for<FMT, X, MT, NT, TS>(M, nchunks, 1), -1};
  for (int ks = 1; ks <= kClusterMaxSlices && ks <= nchunks; ++ks) {
    if ((forced && ks != forced) || !fits(ks)) continue;
    const ClusterGemvPlan p = cluster_gemv_plan_for<FMT, X, MT, NT, TS>(M, nchunks, ks);
    const int capacity = cluster_gemv_capacity<FMT, X, MT, NT, TS>(ks, p.smem_bytes);
    const long waves = (row_blocks + capacity - 1) / capacity;
    const long cost = waves * (static_cast<long>(MT) * p.slice_chunks + kClusterFixedUnits);
    if (best.cost < 0 || cost < best.cost) best = ClusterChoice{p, cost};
  }
  return best;
}

template <int FMT, typename X, int MT, int NT, int TS = 1>
cudaError_t launch_gemv_cluster(const LinearArgs& a, int nchunks, const ClusterGemvPlan& p, cudaStream_t stream) {
  auto kernel = gemv_cluster_kernel<FMT, X, MT, NT, TS>;
  const cudaError_t configured = configure_gemv_cluster<FMT, X, MT, NT, TS>();
  if (configured != cudaSuccess) return configured;
  const int tiles = (a.N + 127) / 128 * 8;
  const int row_blocks = (tiles + kClusterWarps * MT - 1) / (kClusterWarps * MT);
  ClusterLaunch launch(dim3(p.slices, row_blocks), p.slices, p.smem_bytes, stream, 32 * kClusterWarps * TS);
  // Float path only: as the dependent of the int8 path's quantizer the kernel measured up to 1.5x
  // slower (14336x4096, 16 tokens: 28.5 us, 18.7 launched plainly; docs/backends/cuda_ext_notes.md v6),
  // while on the float path dependent launch helped at every shape (8192x8192 21.4 -> 20.1).
  if (a.pdl != 0 && sizeof(X) == 2 && device_has_pdl()) launch.as_dependent();
  return cudaLaunchKernelEx(&launch.cfg, kernel, a, nchunks, p);
}

// BITLAB_CUDA_CLUSTER_TRACE=1 prints each launch's plan to stderr (for tuning; off by default).
inline void trace_cluster_plan(const LinearArgs& a, int mt, const ClusterChoice& c) {
  static const bool on = [] {
    const char* env = std::getenv("BITLAB_CUDA_CLUSTER_TRACE");
    return env && env[0] == '1';
  }();
  if (on) {
    std::fprintf(stderr, "bitlab cluster GEMV: M=%d N=%d Kp=%d MT=%d slices=%d chunks/slice=%d smem=%d cost=%ld\n",
                 a.M, a.N, a.Kp, mt, c.plan.slices, c.plan.slice_chunks, c.plan.smem_bytes, c.cost);
  }
}

// m-tiles per warp: 2 or 4 (4 only for 1- and 2-bit weights: wider ones spill), whichever plan costs
// less, 4 on a tie (4 reads the activations half as often but has half the row blocks); the wide
// variant (NT > 2) takes 1 or 2, 2 on a tie.  BITLAB_CUDA_CLUSTER_MT=1 / 2 / 4 forces one (4: not wide).
template <int FMT, typename X, int NT, int TS = 1>
cudaError_t launch_gemv_cluster_auto(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  const char* env = std::getenv("BITLAB_CUDA_CLUSTER_MT");
  const int forced = env ? std::atoi(env) : 0;
  auto launch_one = [&](const ClusterChoice& one) {
    trace_cluster_plan(a, 1, one);
    return launch_gemv_cluster<FMT, X, 1, NT, TS>(a, nchunks, one.plan, stream);
  };
  if (forced == 1) return launch_one(cluster_gemv_choose<FMT, X, 1, NT, TS>(a.M, a.N, nchunks));
  const ClusterChoice two = cluster_gemv_choose<FMT, X, 2, NT, TS>(a.M, a.N, nchunks);
  if constexpr (NT > 2) {
    if (forced != 2) {
      const ClusterChoice one = cluster_gemv_choose<FMT, X, 1, NT, TS>(a.M, a.N, nchunks);
      if (one.cost < two.cost) return launch_one(one);
    }
  } else if (FormatBits<FMT>::value <= 2 && forced != 2) {
    const ClusterChoice four = cluster_gemv_choose<FMT, X, 4, NT>(a.M, a.N, nchunks);
    if (forced == 4 || four.cost <= two.cost) {
      trace_cluster_plan(a, 4, four);
      return launch_gemv_cluster<FMT, X, 4, NT>(a, nchunks, four.plan, stream);
    }
  }
  trace_cluster_plan(a, 2, two);
  return launch_gemv_cluster<FMT, X, 2, NT, TS>(a, nchunks, two.plan, stream);
}

// The wide variant (17-64 tokens): NT = 4 n-tiles up to 32 tokens, 8 above; on the int8 path above 32
// tokens two warps per group of m-tiles (TS = 2, 16 warps per block).  H100, us, W1.58A8 at 64 tokens
// (docs/benchmarks/gpu_gemv_wide_split.md): 13824x2560 30.5 -> 26.7, 3840x2560 14.8 -> 14.0, 2560x6912
// 19.1 -> 18.7, 8192x8192 and 28672x8192 equal; at 24-32 tokens and on the float path it lost at most
// shapes (28672x8192 fp16, 32 tokens: 106.6 vs 128.8).  BITLAB_CUDA_CLUSTER_TSPLIT=1 / 2 forces it where
// it exists (int8 activations, 33-64 tokens); read per launch.
template <int FMT, typename X>
cudaError_t launch_gemv_cluster_wide(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  if (a.M <= 32) return launch_gemv_cluster_auto<FMT, X, 4>(a, nchunks, stream);
  if constexpr (sizeof(X) == 1) {
    const char* env = std::getenv("BITLAB_CUDA_CLUSTER_TSPLIT");
    if (!env || env[0] != '1') return launch_gemv_cluster_auto<FMT, X, 8, 2>(a, nchunks, stream);
  }
  return launch_gemv_cluster_auto<FMT, X, 8>(a, nchunks, stream);
}

}  // namespace bitlab
