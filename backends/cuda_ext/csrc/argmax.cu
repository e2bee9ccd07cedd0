// BitLab cuda_ext: the index of each row's maximum (torch.argmax(x, dim=-1)), one block per row.
//
// Greedy decoding takes the argmax of the logits every step: a row of 128256 values for BitNet 2B.  torch's
// argmax reduces a long row in one block of few threads (39 us on the H100); the chunked form in
// bitmodels/bitnet/sampling.py (pad, per-chunk max, argmax of the chunk maxima, gather) is five kernels.  Here
// one block of 1024 threads reads the row with 16-byte loads, eight in flight per thread (the logits were just
// written, so from L2), each thread keeps its best (value, index), then the warps and the block reduce those
// pairs.
//
// torch's answer exactly: NaN counts as larger than any number (the first NaN wins), and among equal maxima the
// first index wins (every comparison breaks ties by the lower index).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "bitlab_launch.h"
#include "bitlab_norm_math.cuh"

namespace bitlab {
namespace {

constexpr int kArgmaxThreads = 1024;

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

template <typename T, bool kVec>
__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const T* __restrict__ x, long ldx, int V,
                                                                    int64_t* __restrict__ out) {
  __shared__ Best warp_best[kArgmaxThreads / 32];
  const T* __restrict__ row = x + static_cast<long>(blockIdx.x) * ldx;
  Best b = {-INFINITY, V};  // no index yet: any value, -inf included, comes before it
  if (kVec) {
    // kLoads 16-byte loads in flight per thread before any comparison (128256 bf16 values: two rounds)
    constexpr int PER = 16 / sizeof(T), kLoads = 8;
    const int units = V / PER;
#pragma unroll 1
    for (int u0 = threadIdx.x; u0 < units; u0 += kLoads * kArgmaxThreads) {
      uint4 raw[kLoads];
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int u = u0 + l * kArgmaxThreads;
        raw[l] = u < units ? __ldg(reinterpret_cast<const uint4*>(row) + u) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int u = u0 + l * kArgmaxThreads;
        const T* e = reinterpret_cast<const T*>(&raw[l]);
        if (u < units)
#pragma unroll
          for (int k = 0; k < PER; ++k) take_next(b, to_f<T>(e[k]), u * PER + k, V);
      }
    }
    for (int i = units * PER + threadIdx.x; i < V; i += kArgmaxThreads) take_next(b, to_f<T>(row[i]), i, V);
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < V; i += kArgmaxThreads) take_next(b, to_f<T>(row[i]), i, V);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, b.v, o);
    const int i = __shfl_xor_sync(0xffffffffu, b.i, o);
    take(b, v, i);
  }
  if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = b;
  __syncthreads();
  if (threadIdx.x < 32) {
    b = threadIdx.x < blockDim.x / 32 ? warp_best[threadIdx.x] : Best{-INFINITY, V};
    for (int o = 16; o > 0; o >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, b.v, o);
      const int i = __shfl_xor_sync(0xffffffffu, b.i, o);
      take(b, v, i);
    }
    if (threadIdx.x == 0) out[blockIdx.x] = b.i;
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, long ldx, int B, int V, int64_t* out, cudaStream_t stream) {
  const T* rows = static_cast<const T*>(x);
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (ldx * static_cast<long>(sizeof(T))) % 16 == 0;
  if (vec)
    argmax_rows_kernel<T, true><<<B, kArgmaxThreads, 0, stream>>>(rows, ldx, V, out);
  else
    argmax_rows_kernel<T, false><<<B, kArgmaxThreads, 0, stream>>>(rows, ldx, V, out);
  return cudaGetLastError();
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
