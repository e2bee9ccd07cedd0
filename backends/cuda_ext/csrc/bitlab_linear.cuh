// BitLab cuda_ext: low-bit linear layers on tensor cores, one kernel family for every weight format.
//
// Weights arrive as prepared lane tiles (layout and bit placement: bitlab_mma.cuh);
// each lane decodes its own weight fragment in registers (no shared memory for
// weights) and feeds mma.sync: m16n8k16 half/bf16 with float32 accumulation for
// float activations, m16n8k32 int8 with exact int32 accumulation for int8 ones.
// The weight is the mma's A operand (16 output rows), activations are B (8 tokens).
//
// GEMV (M <= 16 tokens): a block owns MT m-tiles (16 * MT output rows); its KW warps
//   split K (each warp takes D consecutive 128-column chunks at a time, their weight
//   and activation loads all issued before the first use), activations are read
//   straight from global memory (L1/L2 resident), consecutive k-steps accumulate into
//   independent register sets (no mma waits on the previous one), and the warps'
//   partial sums are reduced through shared memory. NT = 1 (M <= 8) or 2 (M <= 16)
//   n-tiles of 8 tokens.
// GEMM (M > 16): a block owns 128 rows x 128 tokens, 8 warps as 4 (rows, MT = 2)
//   x 2 (tokens, NT = 8); activation tiles are staged in shared memory with
//   cp.async (2 stages, XOR-swizzled 16-byte chunks: conflict-free 16-byte reads),
//   weight fragments are loaded one chunk ahead into registers.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "bitlab_mma.cuh"

namespace bitlab {

// Chunks per pipeline unit (D): each warp streams its units through two register buffers
// (the next unit's weight and activation loads are issued before the current unit is
// decoded), so a buffer holds at most ~40 words per lane and the kernel stays within 128
// registers (two 256-thread blocks, or more smaller ones, per multiprocessor).
template <int FMT, typename X, int MT, int NT>
struct GemvMaxDepth {
  static constexpr int words = MT * LaneTile<FMT>::wpl + NT * PathTraits<X>::xwords;
  static constexpr int value = (40 / words) < 1 ? 1 : ((40 / words) > 4 ? 4 : (40 / words));
};
// Independent accumulator sets: consecutive mma k-steps go to different sets, so a warp
// never waits on the previous mma's result (mma.sync latency is ~30 cycles).
template <int MT, int NT>
struct GemvAccSets {
  static constexpr int value = MT * NT >= 2 ? 2 : 4;
};
constexpr int kGemvMaxWarps = 8;  // __launch_bounds__(256, 2): at most 128 registers per thread

// Load the lane's activations of one chunk for token row `row` (zeros past M).
template <typename X>
__device__ __forceinline__ void load_x_chunk(uint32_t* dst, const X* __restrict__ x, int row, int M, int Kp,
                                             int chunk, int t) {
  constexpr int NV = PathTraits<X>::xwords / 4;
  if (row < M) {
    const uint4* p = reinterpret_cast<const uint4*>(x + static_cast<long>(row) * Kp + chunk * 128 + 32 * t);
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      uint4 q = __ldg(p + v);
      dst[4 * v] = q.x; dst[4 * v + 1] = q.y; dst[4 * v + 2] = q.z; dst[4 * v + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int v = 0; v < 4 * NV; ++v) dst[v] = 0u;
  }
}

// One pipeline unit of a warp: D consecutive chunks (k-group kg) of MT m-tiles (tile group tg).
template <int FMT, typename X, int MT, int NT, int D>
struct GemvUnit {
  uint32_t w[D][MT][LaneTile<FMT>::wpl];
  uint32_t x[D][NT][PathTraits<X>::xwords];

  __device__ __forceinline__ void load(const LinearArgs& a, int nchunks, int tg, int kg, int lane) {
    const X* __restrict__ xp = static_cast<const X*>(a.x);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int c = kg * D + d;
      if (c < nchunks) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
          load_lane_tile<FMT>(w[d][m], a.wq, static_cast<long>(tg * MT + m) * nchunks + c, lane);
#pragma unroll
        for (int n = 0; n < NT; ++n) load_x_chunk<X>(x[d][n], xp, n * 8 + g, a.M, a.Kp, c, t);
      }
    }
  }

  template <typename Acc, int S>
  __device__ __forceinline__ void compute(Acc (&accs)[S][MT][NT][4], int nchunks, int kg) const {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (kg * D + d < nchunks) {
#pragma unroll
        for (int j = 0; j < PathTraits<X>::ksteps; ++j) {
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            uint32_t ar[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) ar[r] = decode<FMT, X>(w[d][m], 4 * j + r);
#pragma unroll
            for (int n = 0; n < NT; ++n) mma(accs[j % S][m][n], ar, &x[d][n][2 * j], X());
          }
        }
      }
    }
  }
};

// Position of a warp in its unit stream: tile group tg, unit kk (0..gpw-1) of that group.
struct GemvCursor {
  int tg, kk;
  __device__ __forceinline__ void next(int gpw) {
    if (++kk == gpw) { kk = 0; tg += gridDim.x; }
  }
};

// Persistent GEMV: block b handles tile groups b, b + gridDim.x, ... (MT m-tiles each); its kw
// warps split K into k-groups of D chunks (warp w takes k-groups w, w + kw, ...: gpw units per
// tile group, the same count for every warp). Each warp streams its units through two register
// buffers (the loads of unit u + 1 are in flight while unit u is decoded and multiplied, across
// tile-group boundaries too); at the end of a tile group the warps' partial sums are reduced
// through shared memory and the epilogue writes the outputs.
template <int FMT, typename X, int MT, int NT, int D>
__global__ void __launch_bounds__(256, 2) gemv_kernel(LinearArgs a, int nchunks, int ntg, int gpw) {
  using PT = PathTraits<X>;
  using Acc = typename PT::Acc;
  constexpr int S = GemvAccSets<MT, NT>::value;
  constexpr int E = MT * NT * 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = blockDim.x >> 5;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* red = reinterpret_cast<Acc*>(smem_raw);

  Acc accs[S][MT][NT][4];
  const int my_groups = blockIdx.x < ntg ? (ntg - 1 - static_cast<int>(blockIdx.x)) / gridDim.x + 1 : 0;
  const int total = my_groups * gpw;

  // Reset the accumulators at the first unit of a tile group; reduce and store at its last.
  auto process = [&](const GemvUnit<FMT, X, MT, NT, D>& u, const GemvCursor& cur) {
    if (cur.kk == 0) {
#pragma unroll
      for (int q = 0; q < S; ++q)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) accs[q][m][n][i] = Acc(0);
    }
    u.compute(accs, nchunks, warp + cur.kk * kw);
    if (cur.kk == gpw - 1) {
      const int tile0 = cur.tg * MT;
      Acc acc[MT][NT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            Acc v = accs[0][m][n][i];
#pragma unroll
            for (int q = 1; q < S; ++q) v += accs[q][m][n][i];
            acc[m][n][i] = v;
          }
      if (kw > 1) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[(warp * E + (m * NT + n) * 4 + i) * 32 + lane] = acc[m][n][i];
        __syncthreads();
        for (int idx = threadIdx.x; idx < E * 32; idx += blockDim.x) {
          const int e = idx >> 5, ln = idx & 31;
          Acc s = Acc(0);
          for (int w = 0; w < kw; ++w) s += red[(w * E + e) * 32 + ln];
          const int i = e & 3, n = (e >> 2) % NT, m = (e >> 2) / NT;
          const int row = (tile0 + m) * 16 + (ln >> 2) + (i >= 2 ? 8 : 0);
          const int token = n * 8 + 2 * (ln & 3) + (i & 1);
          epilogue_store(a, token, row, s);
        }
        __syncthreads();  // `red` is rewritten by the next tile group
      } else {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int row = (tile0 + m) * 16 + g + (i >= 2 ? 8 : 0);
              const int token = n * 8 + 2 * t + (i & 1);
              epilogue_store(a, token, row, acc[m][n][i]);
            }
      }
    }
  };

  GemvUnit<FMT, X, MT, NT, D> b0, b1;
  GemvCursor lc{static_cast<int>(blockIdx.x), 0}, pc = lc;  // load and process cursors
  if (total > 0) b0.load(a, nchunks, lc.tg, warp + lc.kk * kw, lane);
  lc.next(gpw);
  for (int u = 0; u < total; u += 2) {
    if (u + 1 < total) b1.load(a, nchunks, lc.tg, warp + lc.kk * kw, lane);
    lc.next(gpw);
    process(b0, pc);
    pc.next(gpw);
    if (u + 1 < total) {
      if (u + 2 < total) b0.load(a, nchunks, lc.tg, warp + lc.kk * kw, lane);
      lc.next(gpw);
      process(b1, pc);
      pc.next(gpw);
    }
  }
}

// ------------------------------------------------------------------------ GEMM
constexpr int kGemmRows = 128, kGemmTokens = 128, kGemmThreads = 256;
constexpr int kGemmMT = 2, kGemmNT = 8;

__device__ __forceinline__ int swizzle_chunk(int c, int r) { return c ^ (r & 1) ^ (((c >> 3) & 1) << 1); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

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

  Acc acc[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][n][i] = Acc(0);

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
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * jj + h;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t ar[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) ar[r] = decode<FMT, X>(wa[m], 4 * j + r);
#pragma unroll
          for (int n = 0; n < NT; ++n) mma(acc[m][n], ar, &xb[n][2 * h], X());
        }
      }
    }
    __syncthreads();
    if (more) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int w = 0; w < L::wpl; ++w) wa[m][w] = wn[m][w];
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = (tile0 + m) * 16 + g + (i >= 2 ? 8 : 0);
        const int token = token0 + wt * 64 + n * 8 + 2 * t + (i & 1);
        epilogue_store(a, token, row, acc[m][n][i]);
      }
}

// ------------------------------------------------------------------------ launch heuristics
inline int device_sm_count() {
  static int count = 0;
  if (count == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
    if (count <= 0) count = 132;
  }
  return count;
}

// Resident blocks per multiprocessor of one GEMV instantiation for kw warps (cached).
template <int FMT, typename X, int MT, int NT, int D>
int gemv_blocks_per_sm(int kw) {
  static int cache[kGemvMaxWarps + 1] = {0};
  if (cache[kw] == 0) {
    using Acc = typename PathTraits<X>::Acc;
    const size_t smem = kw > 1 ? static_cast<size_t>(kw) * MT * NT * 4 * 32 * sizeof(Acc) : 0;
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, gemv_kernel<FMT, X, MT, NT, D>, 32 * kw, smem) !=
            cudaSuccess || n < 1) {
      cudaGetLastError();
      n = 1;
    }
    cache[kw] = n;
  }
  return cache[kw];
}

// GEMV launch choice for one depth D: warps per block kw and the persistent grid. Cost model:
// a warp's time is (tile groups per block, rounded up) x (units per tile group, rounded up) x D
// chunks, scaled up when fewer than 16 warps per multiprocessor are resident (latency hiding).
struct GemvChoice {
  double cost;
  int d, kw, grid, gpw;
};
// Tuning knob: BITLAB_CUDA_GEMV="D,kw" (read once per process) restricts the search to that
// depth and / or warp count (0 = free); benchmarks use it to check the cost model.
struct GemvForce {
  int d = 0, kw = 0;
};
inline const GemvForce& gemv_force() {
  static const GemvForce f = [] {
    GemvForce r;
    if (const char* env = std::getenv("BITLAB_CUDA_GEMV")) {
      if (std::sscanf(env, "%d,%d", &r.d, &r.kw) < 1) r = GemvForce();
    }
    return r;
  }();
  return f;
}

template <int FMT, typename X, int MT, int NT, int D>
void gemv_consider(GemvChoice& best, int ntg, int nchunks, double penalty, bool honor_force = true) {
  const int sms = device_sm_count();
  const int G = (nchunks + D - 1) / D;
  const int kws[] = {8, 6, 5, 4, 3, 2, 1};
  const GemvForce force = honor_force ? gemv_force() : GemvForce();
  if (force.d > 0 && force.d != D) return;
  for (int kw : kws) {
    if (force.kw > 0 && kw != force.kw && !(force.kw > G && kw == 1)) continue;
    if (kw > G && kw > 1) continue;
    const int slots = sms * gemv_blocks_per_sm<FMT, X, MT, NT, D>(kw);
    const int grid = ntg < slots ? ntg : slots;
    const int rounds = (ntg + grid - 1) / grid;
    const int gpw = (G + kw - 1) / kw;
    double warps_per_sm = static_cast<double>(grid) * kw / sms;
    if (warps_per_sm > 16.0) warps_per_sm = 16.0;
    const double cost = penalty * rounds * gpw * D * (16.0 / (warps_per_sm < 1.0 ? 1.0 : warps_per_sm));
    if (cost < best.cost) best = GemvChoice{cost, D, kw, grid, gpw};
  }
}

template <int FMT, typename X, int MT, int NT, int D>
cudaError_t launch_gemv_d(const LinearArgs& a, int nchunks, const GemvChoice& c, cudaStream_t stream) {
  using Acc = typename PathTraits<X>::Acc;
  const int ntg = (a.N + 127) / 128 * 8 / MT;
  const size_t smem = c.kw > 1 ? static_cast<size_t>(c.kw) * MT * NT * 4 * 32 * sizeof(Acc) : 0;
  gemv_kernel<FMT, X, MT, NT, D><<<c.grid, 32 * c.kw, smem, stream>>>(a, nchunks, ntg, c.gpw);
  return cudaGetLastError();
}

template <int FMT, typename X, int MT, int NT>
cudaError_t launch_gemv_mt_nt(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  constexpr int DM = GemvMaxDepth<FMT, X, MT, NT>::value;
  const int ntg = (a.N + 127) / 128 * 8 / MT;
  GemvChoice best{1e30, 1, 1, 1, 1};
  gemv_consider<FMT, X, MT, NT, DM>(best, ntg, nchunks, 1.0);
  // One chunk per unit: finer K split (fewer idle warps at small K) but half the bytes in flight.
  if constexpr (DM > 1) gemv_consider<FMT, X, MT, NT, 1>(best, ntg, nchunks, 1.25);
  if (best.cost >= 1e30) {  // a forced depth this instantiation lacks: fall back to the free choice
    gemv_consider<FMT, X, MT, NT, DM>(best, ntg, nchunks, 1.0, false);
  }
  if (best.d == DM) return launch_gemv_d<FMT, X, MT, NT, DM>(a, nchunks, best, stream);
  if constexpr (DM > 1) return launch_gemv_d<FMT, X, MT, NT, 1>(a, nchunks, best, stream);
  return cudaErrorInvalidValue;
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
  if (a.M > 16) return launch_gemm<FMT, X>(a, nchunks, stream);
  if (a.M <= 8) {
    // Two m-tiles per warp halve the activation traffic per weight byte: worth it from 5
    // tokens on (the activations of 8 tokens are 4x the weight bytes of a unit), when the
    // tile groups still fill two blocks per multiprocessor.
    const int tiles = (a.N + 127) / 128 * 8;
    if (FormatBits<FMT>::value <= 4 && a.M > 4 && tiles >= 2 * 2 * device_sm_count())
      return launch_gemv_mt_nt<FMT, X, 2, 1>(a, nchunks, stream);
    return launch_gemv_mt_nt<FMT, X, 1, 1>(a, nchunks, stream);
  }
  return launch_gemv_mt_nt<FMT, X, 1, 2>(a, nchunks, stream);
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
