// RMSNorm followed by per-token int8 quantization, one kernel: the input of a W*A8 projection.
//
// BitNet runs a norm before each of its projections, and the projection quantizes the norm's
// output per token.  Done as two kernels each pass is latency-bound at decode sizes (one row of
// 2560-6912 values); here one block per row loads the row once into registers, reduces twice
// (sum of squares, then max |y|) and writes the int8 row and its scale.
//
// Math, per row of K values in dtype T (half, bf16 or float), torch's rounding at each step:
//   mode 0: x = a
//   mode 1: h = T(a + b), written to h (the residual stream), x = h
//   mode 2: x = T(T(relu(a)^2) * b)                       (BitNet's squared-ReLU gate)
//   y = T(w * T(x * rsqrt(sum(x^2) / K + eps)))           (transformers' BitNetRMSNorm)
//   amax = max(max|y|, 1e-5); q = clamp(rint(y * (127 / amax)), -127, 127); scale = amax / 127
// with quantize.cu's float32 roundings for the quantization (bitcore.quantize).  The sum of
// squares is reduced in a different order than torch's, so y can differ from torch's in the
// last bit of the mean (tests compare with a tolerance of one quantization step).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"

namespace bitlab {
namespace {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f<T>(from_f<T>(v)); }

template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, v, o);
      v = kMax ? fmaxf(v, other) : v + other;
    }
    if (threadIdx.x == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(VPT == 8 ? 1024 : 512) rms_norm_quant_kernel(NormQuantArgs p) {
  __shared__ float shared[32];
  pdl_wait();               // launched as a dependent: every read and write comes after this
  pdl_launch_dependents();  // the projection after it may start fetching its weights now
  const T* __restrict__ a = static_cast<const T*>(p.a) + static_cast<long>(blockIdx.x) * p.lda;
  const T* __restrict__ b = static_cast<const T*>(p.b) + static_cast<long>(blockIdx.x) * p.ldb;
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  const int K = p.K;
  // All loads first (one memory round trip), then the math, then the stores.
  float va[VPT], vb[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int k = threadIdx.x + i * blockDim.x;
    va[i] = k < K ? to_f<T>(a[k]) : 0.f;
    vb[i] = (p.mode != 0 && k < K) ? to_f<T>(b[k]) : 0.f;
  }
  float v[VPT];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    float x = va[i];
    if (p.mode == 1) {
      x = round_t<T>(va[i] + vb[i]);
    } else if (p.mode == 2) {
      const float r = va[i] > 0.f ? va[i] : 0.f;
      x = round_t<T>(round_t<T>(r * r) * vb[i]);
    }
    v[i] = x;
    ss = __fmaf_rn(x, x, ss);
  }
  if (p.mode == 1) {
    T* __restrict__ h = static_cast<T*>(p.h) + static_cast<long>(blockIdx.x) * K;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int k = threadIdx.x + i * blockDim.x;
      if (k < K) h[k] = from_f<T>(v[i]);
    }
  }
  float vw[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int k = threadIdx.x + i * blockDim.x;
    vw[i] = k < K ? to_f<T>(w[k]) : 0.f;
  }
  ss = block_reduce<false>(ss, shared);
  const float r = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(K)), p.eps));
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int k = threadIdx.x + i * blockDim.x;
    if (k < K) {
      const float y = round_t<T>(__fmul_rn(vw[i], round_t<T>(__fmul_rn(v[i], r))));
      v[i] = y;
      amax = fmaxf(amax, fabsf(y));
    }
  }
  amax = fmaxf(block_reduce<true>(amax, shared), 1e-5f);
  const float inv = __fmul_rn(__frcp_rn(amax), 127.f);
  int8_t* q = p.q + static_cast<long>(blockIdx.x) * K;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int k = threadIdx.x + i * blockDim.x;
    if (k < K) {
      int qi = __float2int_rn(__fmul_rn(v[i], inv));
      q[k] = static_cast<int8_t>(qi > 127 ? 127 : (qi < -127 ? -127 : qi));
    }
  }
  if (threadIdx.x == 0) p.scale[blockIdx.x] = __fmul_rn(amax, 1.f / 127.f);
}

template <typename T>
cudaError_t launch_typed(const NormQuantArgs& p, cudaStream_t stream) {
  // Up to 8 values per thread (K <= 8192 with 1024 threads), else up to 32 (512 threads).
  const int per = p.K <= 8 * 1024 ? 8 : 32;
  int threads = (p.K + per - 1) / per;
  threads = (threads + 31) / 32 * 32;
  threads = threads < 64 ? 64 : threads;
  if (per == 8) return launch_maybe_pdl(rms_norm_quant_kernel<T, 8>, dim3(p.M), dim3(threads), 0, stream, true, p);
  return launch_maybe_pdl(rms_norm_quant_kernel<T, 32>, dim3(p.M), dim3(threads), 0, stream, true, p);
}

}  // namespace

cudaError_t launch_rms_norm_quant(const NormQuantArgs& p, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  if (p.K > kNormQuantMaxK || p.K < 1) return cudaErrorInvalidValue;
  if (p.dtype == kDtypeHalf) return launch_typed<__half>(p, stream);
  if (p.dtype == kDtypeBFloat16) return launch_typed<__nv_bfloat16>(p, stream);
  return launch_typed<float>(p, stream);
}

}  // namespace bitlab
