// Activation quantizers for the int8 and binary paths.
//
// int8 (absmax), exactly bitcore.quantize.quantize_activation_int8:
//   amax = max(max|x|, 1e-5) over a row (per_token) or the whole input (per_tensor),
//   q = clamp(rint_half_even(float(x) * (127 / amax)), -127, 127), scale = amax / 127,
//   with torch's float32 roundings (see quantize_rows_kernel; no fast math).
//   Output xq [M, Kp] int8 with columns K..Kp-1 zero (the mma kernels read whole chunks).
// binary: bit k of xb[m][k / 32] is 1 where x >= 0 (so -0.0 and +0.0 give +1, NaN gives -1),
//   padding bits are 0; rowmean[m] = mean|x[m, :]| in float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"

namespace bitlab {
namespace {

constexpr int kThreads = 512;
constexpr float kEps = 1e-5f;

__device__ __forceinline__ float load_as_float(const void* x, long i, int dtype) {
  if (dtype == kDtypeHalf) return __half2float(static_cast<const __half*>(x)[i]);
  if (dtype == kDtypeBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(x)[i]);
  return static_cast<const float*>(x)[i];
}

__device__ __forceinline__ float block_reduce_max(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_reduce_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

// Four independent loads per thread per step: a decode-size row (one block) is read in a
// few memory round trips instead of K / blockDim dependent ones.
__device__ float row_absmax(const void* x, int dtype, long base, int K, float* shared) {
  float m0 = 0.f, m1 = 0.f, m2 = 0.f, m3 = 0.f;
  const int step = blockDim.x;
  int k = threadIdx.x;
  for (; k + 3 * step < K; k += 4 * step) {
    const float v0 = load_as_float(x, base + k, dtype), v1 = load_as_float(x, base + k + step, dtype);
    const float v2 = load_as_float(x, base + k + 2 * step, dtype), v3 = load_as_float(x, base + k + 3 * step, dtype);
    m0 = fmaxf(m0, fabsf(v0)); m1 = fmaxf(m1, fabsf(v1)); m2 = fmaxf(m2, fabsf(v2)); m3 = fmaxf(m3, fabsf(v3));
  }
  for (; k < K; k += step) m0 = fmaxf(m0, fabsf(load_as_float(x, base + k, dtype)));
  return block_reduce_max(fmaxf(fmaxf(m0, m1), fmaxf(m2, m3)), shared);
}

// One block per row. per_token: the row's own absmax; per_tensor: max over rowmax[0..M).
__global__ void quantize_rows_kernel(const void* x, int dtype, int M, int K, long ldx, int Kp, int per_token,
                                     const float* rowmax, int8_t* xq, float* xs) {
  __shared__ float shared[32];
  pdl_launch_dependents();  // the GEMV may start loading its weights now; it waits for xq itself
  const int row = blockIdx.x;
  const long base = static_cast<long>(row) * ldx;
  float amax;
  if (per_token) {
    amax = row_absmax(x, dtype, base, K, shared);
  } else {
    float m = 0.f;
    for (int r = threadIdx.x; r < M; r += blockDim.x) m = fmaxf(m, rowmax[r]);
    amax = block_reduce_max(m, shared);
  }
  amax = fmaxf(amax, kEps);
  // torch_ref computes 127 / amax as reciprocal(amax) * 127 (Tensor.__rtruediv__) and, on CUDA,
  // amax / 127 as amax * (1 / 127): two roundings each, reproduced here bit for bit.
  const float inv = __fmul_rn(__frcp_rn(amax), 127.f);
  int8_t* out = xq + static_cast<long>(row) * Kp;
#pragma unroll 4
  for (int k = threadIdx.x; k < Kp; k += blockDim.x) {
    int q = 0;
    if (k < K) {
      q = __float2int_rn(__fmul_rn(load_as_float(x, base + k, dtype), inv));
      q = q > 127 ? 127 : (q < -127 ? -127 : q);
    }
    out[k] = static_cast<int8_t>(q);
  }
  if (threadIdx.x == 0 && (per_token || row == 0)) xs[per_token ? row : 0] = __fmul_rn(amax, 1.f / 127.f);
}

// Per token, half / bf16 rows with 16-byte aligned rows and K % 8 == 0: each thread loads up to
// kVecPerThread 16-byte vectors once, keeps them in registers for both the absmax and the rounding, and
// writes 8 codes per store (the scalar kernel above reads each row twice with 2-byte loads).  Same
// float32 operations per element, so the same codes and scale.
constexpr int kVecPerThread = 4;

template <typename T>
__device__ __forceinline__ float vec_elem(const uint4& v, int e) {
  const T* p = reinterpret_cast<const T*>(&v);
  if constexpr (sizeof(T) == 2 && std::is_same<T, __half>::value) return __half2float(p[e]);
  else return __bfloat162float(p[e]);
}

template <typename T>
__global__ void quantize_rows_vec_kernel(const T* __restrict__ x, int K, long ldx, int Kp, int8_t* __restrict__ xq,
                                         float* __restrict__ xs) {
  __shared__ float shared[32];
  pdl_launch_dependents();
  const int row = blockIdx.x;
  const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<long>(row) * ldx);
  const int nvec = K / 8;
  uint4 v[kVecPerThread];
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < kVecPerThread; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    v[i] = idx < nvec ? src[idx] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(vec_elem<T>(v[i], e)));
  }
  const float amax = fmaxf(block_reduce_max(m, shared), kEps);
  const float inv = __fmul_rn(__frcp_rn(amax), 127.f);  // as quantize_rows_kernel
  uint2* out = reinterpret_cast<uint2*>(xq + static_cast<long>(row) * Kp);
#pragma unroll
  for (int i = 0; i < kVecPerThread; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx >= Kp / 8) break;
    uint32_t packed[2] = {0u, 0u};
    if (idx < nvec) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        int q = __float2int_rn(__fmul_rn(vec_elem<T>(v[i], e), inv));
        q = q > 127 ? 127 : (q < -127 ? -127 : q);
        packed[e >> 2] |= (static_cast<uint32_t>(q) & 0xFFu) << (8 * (e & 3));
      }
    }
    out[idx] = make_uint2(packed[0], packed[1]);
  }
  if (threadIdx.x == 0) xs[row] = __fmul_rn(amax, 1.f / 127.f);
}

__global__ void row_absmax_kernel(const void* x, int dtype, int K, long ldx, float* rowmax) {
  __shared__ float shared[32];
  const float m = row_absmax(x, dtype, static_cast<long>(blockIdx.x) * ldx, K, shared);
  if (threadIdx.x == 0) rowmax[blockIdx.x] = m;
}

// One block per row; each thread builds whole 32-bit words of sign bits.
__global__ void binarize_kernel(const void* x, int dtype, int K, long ldx, int Kp, uint32_t* xb, float* rowmean) {
  __shared__ float shared[32];
  const long base = static_cast<long>(blockIdx.x) * ldx;
  const int words = Kp / 32;
  float s = 0.f;
  for (int w = threadIdx.x; w < words; w += blockDim.x) {
    uint32_t bits = 0u;
    for (int b = 0; b < 32; ++b) {
      const int k = w * 32 + b;
      if (k < K) {
        const float v = load_as_float(x, base + k, dtype);
        s += fabsf(v);
        bits |= (v >= 0.f ? 1u : 0u) << b;
      }
    }
    xb[static_cast<long>(blockIdx.x) * words + w] = bits;
  }
  s = block_reduce_sum(s, shared);
  if (threadIdx.x == 0) rowmean[blockIdx.x] = K > 0 ? __fdiv_rn(s, static_cast<float>(K)) : 0.f;
}

}  // namespace

cudaError_t launch_quantize_int8(const void* x, int x_dtype, int M, int K, long ldx, int Kp, int per_token,
                                 int8_t* xq, float* xs, float* workspace, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (!per_token) {
    row_absmax_kernel<<<M, kThreads, 0, stream>>>(x, x_dtype, K, ldx, workspace);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const bool vec = per_token && (x_dtype == kDtypeHalf || x_dtype == kDtypeBFloat16) && K % 8 == 0 &&
                   ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && Kp / 8 <= kVecPerThread * kThreads;
  if (vec) {
    // Threads: enough for the row's vectors at kVecPerThread each, in whole warps (>= 1).
    const int threads = ((Kp / 8 + kVecPerThread - 1) / kVecPerThread + 31) / 32 * 32;
    if (x_dtype == kDtypeHalf)
      quantize_rows_vec_kernel<__half><<<M, threads, 0, stream>>>(static_cast<const __half*>(x), K, ldx, Kp, xq, xs);
    else
      quantize_rows_vec_kernel<__nv_bfloat16><<<M, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), K, ldx,
                                                                          Kp, xq, xs);
    return cudaGetLastError();
  }
  quantize_rows_kernel<<<M, kThreads, 0, stream>>>(x, x_dtype, M, K, ldx, Kp, per_token, workspace, xq, xs);
  return cudaGetLastError();
}

cudaError_t launch_binarize(const void* x, int x_dtype, int M, int K, long ldx, int Kp, uint32_t* xb,
                            float* rowmean, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  binarize_kernel<<<M, kThreads, 0, stream>>>(x, x_dtype, K, ldx, Kp, xb, rowmean);
  return cudaGetLastError();
}

}  // namespace bitlab
