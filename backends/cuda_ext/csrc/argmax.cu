// BitLab cuda_ext: the index of each row's maximum (torch.argmax(x, dim=-1)).
//
// Greedy decoding takes the argmax of the logits every step: a row of 128256 values for BitNet 2B.  torch's
// argmax reduces a long row in one block of few threads (39 us on the H100); the chunked form in
// bitmodels/bitnet/sampling.py (pad, per-chunk max, argmax of the chunk maxima, gather) is five kernels.  Here
// a row is read with 16-byte loads, eight in flight per thread (the logits were just written, so from L2), each
// thread keeps its best (value, index), then the warps and the block reduce those pairs.  Two layouts:
//
// * a cluster of kArgmaxCluster blocks per row (sm_90, long rows, few rows): block r takes the r-th slice of
//   the row, pushes its best into block 0's shared memory, and block 0 reduces the slices after the cluster
//   barrier.  One block of 1024 threads per row is bound by its own compare instructions (~16 per 16-byte load
//   for bf16): at batch 1 it is one multiprocessor working on 128256 values;
// * one block of 1024 threads per row otherwise.
//
// Both wait for the kernel before them as programmatic dependents (sm_90), so their launch overlaps its tail.
// torch's answer exactly: NaN counts as larger than any number (the first NaN wins), and among equal maxima the
// first index wins (every comparison breaks ties by the lower index).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"
#include "bitlab_norm_math.cuh"

namespace bitlab {
namespace {

constexpr int kArgmaxThreads = 1024;       // one block per row
constexpr int kArgmaxClusterThreads = 512;  // per block of a row's cluster
constexpr int kArgmaxCluster = 8;           // blocks per row (a portable cluster size)
constexpr int kArgmaxClusterMinV = 8192;    // shorter rows: one block

struct Best {
  float v;
  int i;
};

// Whether (v, i) comes before the best so far in torch's order: NaN first, then larger values, then lower index.
__device__ __forceinline__ bool before(float v, int i, const Best& b) {
  const bool vn = v != v, bn = b.v != b.v;
  if (vn || bn) return vn && (!bn || i < b.i);
  return v > b.v || (v == b.v && i < b.i);
}

__device__ __forceinline__ void take(Best& b, float v, int i) {
  if (before(v, i, b)) b = {v, i};
}

// take() for a thread's own values, which come in increasing index order, so ties never replace: the first
// value, then any larger one or a first NaN (!(v <= b.v) holds for larger v and for NaN v).
__device__ __forceinline__ void take_next(Best& b, float v, int i, int none) {
  if (b.i == none || (!(v <= b.v) && b.v == b.v)) b = {v, i};
}

__device__ __forceinline__ Best warp_best(Best b) {
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, b.v, o);
    const int i = __shfl_xor_sync(0xffffffffu, b.i, o);
    take(b, v, i);
  }
  return b;
}

// This thread's best of row[lo, hi) (indices in the row; V marks "none yet").  kVec: 16-byte loads, kLoads in
// flight per thread before any comparison, from lo (a multiple of the values per load) to the last whole load
// below hi, then the rest one by one.
template <typename T, bool kVec, int kThreads>
__device__ __forceinline__ Best thread_best(const T* __restrict__ row, int lo, int hi, int V) {
  Best b = {-INFINITY, V};  // no index yet: any value, -inf included, comes before it
  int rest = lo;
  if (kVec) {
    constexpr int PER = 16 / sizeof(T), kLoads = 8;
    const int u_lo = lo / PER, u_hi = hi / PER;
#pragma unroll 1
    for (int u0 = u_lo + threadIdx.x; u0 < u_hi; u0 += kLoads * kThreads) {
      uint4 raw[kLoads];
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int u = u0 + l * kThreads;
        raw[l] = u < u_hi ? __ldg(reinterpret_cast<const uint4*>(row) + u) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int u = u0 + l * kThreads;
        const T* e = reinterpret_cast<const T*>(&raw[l]);
        if (u < u_hi)
#pragma unroll
          for (int k = 0; k < PER; ++k) take_next(b, to_f<T>(e[k]), u * PER + k, V);
      }
    }
    rest = u_hi * PER > lo ? u_hi * PER : lo;
  }
#pragma unroll 4
  for (int i = rest + threadIdx.x; i < hi; i += kThreads) take_next(b, to_f<T>(row[i]), i, V);
  return b;
}

// The block's best (in thread 0; the other threads' values are partial); V marks "no index".
template <int kThreads>
__device__ __forceinline__ Best block_best(Best b, int V) {
  __shared__ Best warps[kThreads / 32];
  b = warp_best(b);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = b;
  __syncthreads();
  if (threadIdx.x < 32) b = warp_best(threadIdx.x < kThreads / 32 ? warps[threadIdx.x] : Best{-INFINITY, V});
  return b;
}

// One block per row: out[blockIdx.x].
template <typename T, bool kVec>
__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const T* __restrict__ x, long ldx, int V,
                                                                    int64_t* __restrict__ out) {
  pdl_wait();  // the logits come from the kernel before this one
  pdl_launch_dependents();
  const T* __restrict__ row = x + static_cast<long>(blockIdx.x) * ldx;
  const Best b = block_best<kArgmaxThreads>(thread_best<T, kVec, kArgmaxThreads>(row, 0, V, V), V);
  if (threadIdx.x == 0) out[blockIdx.x] = b.i;
}

// A cluster of kArgmaxCluster blocks per row (blockIdx.y): block r reduces slice r of the row (whole 16-byte
// loads per slice where kVec; the last block also takes the values after the last whole load) and pushes its
// best into block 0's shared memory; block 0 reduces the slices after the cluster barrier.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kArgmaxClusterThreads) argmax_rows_cluster_kernel(const T* __restrict__ x,
                                                                                   long ldx, int V,
                                                                                   int64_t* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // launched on sm_90 only (argmax_uses_clusters)
  namespace cg = cooperative_groups;
  __shared__ Best slices[kArgmaxCluster];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  pdl_wait();
  pdl_launch_dependents();
  constexpr int PER = kVec ? 16 / sizeof(T) : 1;
  const int units = V / PER, per = (units + kArgmaxCluster - 1) / kArgmaxCluster;
  const int lo = min(rank * per, units) * PER;
  const int hi = rank == kArgmaxCluster - 1 ? V : min((rank + 1) * per, units) * PER;
  const T* __restrict__ row = x + static_cast<long>(blockIdx.y) * ldx;
  const Best b = block_best<kArgmaxClusterThreads>(thread_best<T, kVec, kArgmaxClusterThreads>(row, lo, hi, V), V);
  if (threadIdx.x == 0) cluster.map_shared_rank(slices, 0)[rank] = b;
  cluster.sync();  // every slice's best is in block 0
  if (rank == 0 && threadIdx.x < 32) {
    const Best r = warp_best(threadIdx.x < kArgmaxCluster ? slices[threadIdx.x] : Best{-INFINITY, V});
    if (threadIdx.x == 0) out[blockIdx.y] = r.i;
  }
#endif
}

// Whether a row gets a cluster: sm_90, rows of at least kArgmaxClusterMinV values, and every row's cluster
// resident at once (B x kArgmaxCluster blocks of 512 threads, four per multiprocessor).  BITLAB_CUDA_ARGMAX=block
// / cluster forces one (cluster still needs sm_90; read per launch, for A/B runs and tests).
bool argmax_uses_clusters(int B, int V) {
  if (device_major() < 9 || B > 65535) return false;
  if (env_is("BITLAB_CUDA_ARGMAX", "block")) return false;
  if (env_is("BITLAB_CUDA_ARGMAX", "cluster")) return true;
  return V >= kArgmaxClusterMinV && B * kArgmaxCluster <= 4 * device_sm_count();
}

template <typename T, bool kVec>
cudaError_t launch_layout(const T* rows, long ldx, int B, int V, int64_t* out, cudaStream_t stream) {
  if (!argmax_uses_clusters(B, V))
    return launch_maybe_pdl(argmax_rows_kernel<T, kVec>, dim3(B), dim3(kArgmaxThreads), 0, stream, true, rows, ldx,
                            V, out);
  ClusterLaunch launch(dim3(kArgmaxCluster, B), kArgmaxCluster, 0, stream, kArgmaxClusterThreads);
  if (device_has_pdl()) launch.as_dependent();
  return cudaLaunchKernelEx(&launch.cfg, argmax_rows_cluster_kernel<T, kVec>, rows, ldx, V, out);
}

template <typename T>
cudaError_t launch_typed(const void* x, long ldx, int B, int V, int64_t* out, cudaStream_t stream) {
  const T* rows = static_cast<const T*>(x);
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (ldx * static_cast<long>(sizeof(T))) % 16 == 0;
  return vec ? launch_layout<T, true>(rows, ldx, B, V, out, stream)
             : launch_layout<T, false>(rows, ldx, B, V, out, stream);
}

}  // namespace

cudaError_t launch_argmax_rows(const void* x, int dtype, long ldx, int B, int V, int64_t* out, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (V < 1 || V > (1 << 30)) return cudaErrorInvalidValue;
  if (dtype == kDtypeHalf) return launch_typed<__half>(x, ldx, B, V, out, stream);
  if (dtype == kDtypeBFloat16) return launch_typed<__nv_bfloat16>(x, ldx, B, V, out, stream);
  return launch_typed<float>(x, ldx, B, V, out, stream);
}

}  // namespace bitlab
