// bfloat16 <-> float32 as torch rounds (c10::BFloat16: round to nearest even, NaN kept and made quiet), scalar and
// eight at a time on AVX2, for the cpp_cpu kernels that compute in float32 and round where torch's bf16 operations
// round (norms.cpp, decode_attention.cpp).  Included by those translation units only.
#pragma once

#include <cstdint>
#include <cstring>

#include "bitlab_cpu.h"

namespace bitlab_cpu {

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as c10::BFloat16 does (NaN stays NaN, made quiet).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct Float32 {
  using Storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static float round(float v) { return v; }
};
struct BFloat16 {
  using Storage = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
  static float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

#if BITLAB_X86
#define BITLAB_BF16_AVX2 __attribute__((target("avx2")))

BITLAB_BF16_AVX2 inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// float_to_bf16 of eight floats, as 32-bit patterns (the bf16 bits in the upper half, zeros below): a float that
// holds the rounded value.
BITLAB_BF16_AVX2 inline __m256i bf16_bits_x8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  const __m256i is_nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  return _mm256_and_si256(_mm256_blendv_epi8(rounded, quiet_nan, is_nan),
                          _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
}

BITLAB_BF16_AVX2 inline __m256 round_bf16x8(__m256 f) { return _mm256_castsi256_ps(bf16_bits_x8(f)); }

BITLAB_BF16_AVX2 inline void store_bf16x8(uint16_t* p, __m256 f) {
  const __m256i bits = _mm256_srli_epi32(bf16_bits_x8(f), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

}  // namespace bitlab_cpu
