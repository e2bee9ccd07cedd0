// RMSNorm + per-token int8 quantization as device code, shared by the standalone kernel
// (norm_quant.cu) and the GEMV that normalizes its own input (linear_norm.cu).
//
// Math, per row of K values in dtype T (half, bf16 or float), torch's rounding at each step:
//   mode 0: x = a
//   mode 1: h = T(a + b), written to h (the residual stream), x = h
//   mode 2: x = T(T(relu(a)^2) * b)                       (BitNet's squared-ReLU gate)
//   y = T(w * T(x * rsqrt(sum(x^2) / K + eps)))           (transformers' BitNetRMSNorm)
//   amax = max(max|y|, 1e-5); q = clamp(rint(y * (127 / amax)), -127, 127); scale = amax / 127
// with quantize.cu's float32 roundings for the quantization (bitcore.quantize).  The sum of
// squares is reduced in another order than torch's (and than each other: it depends on the block
// size), so y can differ in the last bit of the mean; tests allow one quantization step.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "bitlab_launch.h"

namespace bitlab {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f<T>(from_f<T>(v)); }

// Sum (or max) of v over the block; every thread calls it and gets the result.  shared: 32 floats.
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

// x of one element from a and b by mode (above).
template <typename T>
__device__ __forceinline__ float norm_input_value(float a, float b, int mode) {
  if (mode == 1) return round_t<T>(a + b);
  if (mode == 2) {
    const float r = a > 0.f ? a : 0.f;
    return round_t<T>(round_t<T>(r * r) * b);
  }
  return a;
}

// int8 of y at 127 / amax (inv), clamped to +-127.
__device__ __forceinline__ int8_t quantize_value(float y, float inv) {
  const int qi = __float2int_rn(__fmul_rn(y, inv));
  return static_cast<int8_t>(qi > 127 ? 127 : (qi < -127 ? -127 : qi));
}

// Eight consecutive values of a row from column k0 (zeros past K); 16-byte loads when vec.
template <typename T>
__device__ __forceinline__ void load8(float (&v)[8], const T* __restrict__ row, int k0, int K, bool vec) {
  if (vec && k0 + 8 <= K) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + k0);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f<T>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = k0 + i < K ? to_f<T>(row[k0 + i]) : 0.f;
  }
}

// The M rows of a GEMV's input, normalized and quantized by the whole block into shared memory:
// q [M][Kp] int8 (zero past K), scales [M] the dequantization scale.  xs: Kp values of T (scratch
// for one row), scratch: 32 floats.  Each thread owns 8 consecutive columns per step, so it reads
// back only what it wrote (xs needs no barrier).  `first` (one block of the grid) also writes the
// residual sum h (mode 1) and, when given, copies of q and the scales (n.q_out, n.scale_out).
template <typename T>
__device__ void norm_quant_rows_to_shared(const NormInputArgs& n, int M, int Kp, int8_t* q, float* scales, T* xs,
                                          float* scratch, bool first) {
  const int K = n.K, step = 8 * blockDim.x;
  const T* __restrict__ w = static_cast<const T*>(n.weight);
  const bool vec = K % 8 == 0 && n.lda % 8 == 0 && (n.mode == 0 || n.ldb % 8 == 0) &&
                   reinterpret_cast<uintptr_t>(n.a) % 16 == 0 && reinterpret_cast<uintptr_t>(n.b) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(n.weight) % 16 == 0;
  for (int r = 0; r < M; ++r) {
    const T* __restrict__ a = static_cast<const T*>(n.a) + static_cast<long>(r) * n.lda;
    const T* __restrict__ b = static_cast<const T*>(n.b) + static_cast<long>(r) * n.ldb;
    T* h = (first && n.mode == 1) ? static_cast<T*>(n.h) + static_cast<long>(r) * K : nullptr;
    float ss = 0.f;
    for (int k0 = 8 * threadIdx.x; k0 < K; k0 += step) {
      float va[8], vb[8];
      load8<T>(va, a, k0, K, vec);
      if (n.mode != 0) load8<T>(vb, b, k0, K, vec);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (k0 + i >= K) break;
        const float x = norm_input_value<T>(va[i], n.mode != 0 ? vb[i] : 0.f, n.mode);
        xs[k0 + i] = from_f<T>(x);
        if (h) h[k0 + i] = from_f<T>(x);
        ss = __fmaf_rn(x, x, ss);
      }
    }
    ss = block_reduce<false>(ss, scratch);
    const float rs = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(K)), n.eps));
    float amax = 0.f;
    for (int k0 = 8 * threadIdx.x; k0 < K; k0 += step) {
      float vw[8];
      load8<T>(vw, w, k0, K, vec);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (k0 + i >= K) break;
        const float y = round_t<T>(__fmul_rn(vw[i], round_t<T>(__fmul_rn(to_f<T>(xs[k0 + i]), rs))));
        xs[k0 + i] = from_f<T>(y);
        amax = fmaxf(amax, fabsf(y));
      }
    }
    amax = fmaxf(block_reduce<true>(amax, scratch), 1e-5f);
    const float inv = __fmul_rn(__frcp_rn(amax), 127.f);
    int8_t* qr = q + static_cast<long>(r) * Kp;
    int8_t* copy = first && n.q_out ? n.q_out + static_cast<long>(r) * K : nullptr;
    for (int k0 = 8 * threadIdx.x; k0 < Kp; k0 += step) {
      uint32_t packed[2] = {0u, 0u};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int8_t v = k0 + i < K ? quantize_value(to_f<T>(xs[k0 + i]), inv) : int8_t(0);
        packed[i >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(v)) << (8 * (i & 3));
        if (copy && k0 + i < K) copy[k0 + i] = v;
      }
      *reinterpret_cast<uint2*>(qr + k0) = make_uint2(packed[0], packed[1]);  // Kp and k0: multiples of 8
    }
    if (threadIdx.x == 0) {
      scales[r] = __fmul_rn(amax, 1.f / 127.f);
      if (first && n.scale_out) n.scale_out[r] = scales[r];
    }
  }
  __syncthreads();
}

}  // namespace bitlab
