// BitLab cuda_ext: scalar helpers shared by the kernels that normalize and quantize rows
// (norm_quant.cu, bitnet_mlp.cu), with torch's rounding at each step.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace bitlab {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T and back (the value a tensor of dtype T would hold).
template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f<T>(from_f<T>(v)); }

// BitNet's squared-ReLU gate in dtype T: T(T(relu(gate)^2) * up).
template <typename T>
__device__ __forceinline__ float relu2_gate(float gate, float up) {
  const float r = gate > 0.f ? gate : 0.f;
  return round_t<T>(__fmul_rn(round_t<T>(__fmul_rn(r, r)), up));
}

// transformers' BitNetRMSNorm of one value x, given r = rsqrt(mean(x^2) + eps) and the weight w.
template <typename T>
__device__ __forceinline__ float rms_normed(float x, float r, float w) {
  return round_t<T>(__fmul_rn(w, round_t<T>(__fmul_rn(x, r))));
}

// Eight values of dtype T (one 16-byte piece of a row) normed in place, y = rms_normed(x, r, w) with the matching
// piece of the weight; returns the largest |y|.
template <typename T>
__device__ __forceinline__ float rms_normed_piece(uint4& piece, const uint4& weight, float r) {
  T* e = reinterpret_cast<T*>(&piece);
  const T* w = reinterpret_cast<const T*>(&weight);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float y = rms_normed<T>(to_f<T>(e[i]), r, to_f<T>(w[i]));
    e[i] = from_f<T>(y);
    amax = fmaxf(amax, fabsf(y));
  }
  return amax;
}

// Per-token int8 quantization (bitcore.quantize): inverse step 127 / amax, int8 of y, and the scale.
__device__ __forceinline__ float quant_inverse(float amax) { return __fmul_rn(__frcp_rn(amax), 127.f); }
__device__ __forceinline__ float quant_scale(float amax) { return __fmul_rn(amax, 1.f / 127.f); }
__device__ __forceinline__ int8_t quantize_value(float y, float inv) {
  const int qi = __float2int_rn(__fmul_rn(y, inv));
  return static_cast<int8_t>(qi > 127 ? 127 : (qi < -127 ? -127 : qi));
}

// Eight values of dtype T (one 16-byte piece of a row) quantized with inverse step inv: 8 int8 bytes.
template <typename T>
__device__ __forceinline__ uint2 quantize_piece(const uint4& raw, float inv) {
  const T* e = reinterpret_cast<const T*>(&raw);
  uint32_t packed[2] = {0u, 0u};
#pragma unroll
  for (int k = 0; k < 8; ++k)
    packed[k >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(quantize_value(to_f<T>(e[k]), inv))) << (8 * (k & 3));
  return make_uint2(packed[0], packed[1]);
}

}  // namespace bitlab
