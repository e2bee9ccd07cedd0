// Binary weights with binary activations: XNOR + popcount (XNOR-Net / BNN arithmetic).
//
// Prepared weight layout
// ----------------------
// Row-major 64-bit words w[r * Kw + i]; bit j of word i is the sign code of input
// k = 64 * i + j (1 = +1, 0 = -1), i.e. the canonical little-endian binary packing read
// 8 bytes at a time.  Rows are zero-padded to Kw = a multiple of 4 words (256 inputs) so
// the AVX2 loop reads whole vectors; activations are packed the same way
// (activations.cpp, bit = x >= 0) with zero padding, so padding bits never differ.
//
// For signs a, b in {-1, +1}: a * b = +1 where the bits agree, so over K true inputs
//   sum_k a_k b_k = K - 2 * popcount(wbits XOR xbits)                        (exact)
// AVX2 has no vector popcount: bytes are counted with two 16-entry nibble lookups
// (_mm256_shuffle_epi8) and summed with _mm256_sad_epu8.
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

#if BITLAB_X86
template <int T>
__attribute__((target("avx2,fma,popcnt"))) void mismatches_avx2(const uint64_t* w, int64_t Kw,
                                                                const uint64_t* const* x, int64_t* out) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
  for (int64_t i = 0; i < Kw; i += 4) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    for (int t = 0; t < T; ++t) {
      const __m256i d = _mm256_xor_si256(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + i)));
      const __m256i c = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(d, low)),
                                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(d, 4), low)));
      acc[t] = _mm256_add_epi64(acc[t], _mm256_sad_epu8(c, _mm256_setzero_si256()));
    }
  }
  for (int t = 0; t < T; ++t) {
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[t]);
    out[t] = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  }
}
#endif

template <int T>
void mismatches_scalar(const uint64_t* w, int64_t Kw, const uint64_t* const* x, int64_t* out) {
  for (int t = 0; t < T; ++t) {
    int64_t n = 0;
    for (int64_t i = 0; i < Kw; ++i) n += __builtin_popcountll(w[i] ^ x[t][i]);
    out[t] = n;
  }
}

#if !BITLAB_X86
template <int T>
void mismatches_avx2(const uint64_t* w, int64_t Kw, const uint64_t* const* x, int64_t* out) {
  mismatches_scalar<T>(w, Kw, x, out);
}
#endif

template <bool AVX2>
void run(const uint64_t* w, int64_t N, int64_t Kw, int64_t K, const uint64_t* xbits, const float* x_scale,
         int64_t M, const OutputSpec& o, int threads) {
  for_row_blocks(N, M, threads, [&](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    const uint64_t* xs[kTokenGroup];
    const int T = static_cast<int>(t1 - t0);
    for (int t = 0; t < T; ++t) xs[t] = xbits + (t0 + t) * Kw;
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t* wr = w + r * Kw;
      int64_t n[kTokenGroup];
      if (AVX2) {
        switch (T) {
          case 1: mismatches_avx2<1>(wr, Kw, xs, n); break;
          case 2: mismatches_avx2<2>(wr, Kw, xs, n); break;
          case 3: mismatches_avx2<3>(wr, Kw, xs, n); break;
          default: mismatches_avx2<4>(wr, Kw, xs, n); break;
        }
      } else {
        switch (T) {
          case 1: mismatches_scalar<1>(wr, Kw, xs, n); break;
          case 2: mismatches_scalar<2>(wr, Kw, xs, n); break;
          case 3: mismatches_scalar<3>(wr, Kw, xs, n); break;
          default: mismatches_scalar<4>(wr, Kw, xs, n); break;
        }
      }
      for (int t = 0; t < T; ++t)
        o.y[(t0 + t) * o.ldy + r] = finish(static_cast<float>(K - 2 * n[t]), x_scale[t0 + t], o, r);
    }
  });
}

}  // namespace

void xnor_gemm(const uint64_t* w, int64_t N, int64_t Kw, int64_t K, const uint64_t* xbits,
               const float* x_scale, int64_t M, const OutputSpec& o, int threads) {
  if (active_isa() >= Isa::Avx2) return run<true>(w, N, Kw, K, xbits, x_scale, M, o, threads);
  return run<false>(w, N, Kw, K, xbits, x_scale, M, o, threads);
}

}  // namespace bitlab_cpu
