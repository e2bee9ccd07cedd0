// int8 weights with int8 activations.
//
// Prepared weight layout
// ----------------------
// Row-major int8 values w[r * Kp + k] (the canonical code minus 128), each row zero-padded
// from in_features to Kp = a multiple of 32.  No re-coding: 8-bit weights are already
// bytes; the padding lets every row be read in whole 32-byte vectors.  per_group weights:
// each group of group_size inputs is zero-padded on its own to group_len, a multiple of 32.
//
// Product: _mm256_maddubs_epi16 needs one unsigned operand, so it gets |w| and the
// activation takes w's sign (_mm256_sign_epi8(x, w)).  With |w| <= 128 and |x| <= 127 a
// pair sums to at most 2 * 128 * 127 = 32512 < 2^15: no saturation, exact int16, widened
// to int32 at once with _mm256_madd_epi16.
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

#if BITLAB_X86
// acc[t] += sum over k in [k_begin, k_end) of w[k] * x[t][k] (the sign trick: |w| * (x * sign(w))).
template <int T>
__attribute__((target("avx2,fma"))) inline void accumulate_int8_avx2(const int8_t* w, int64_t k_begin, int64_t k_end,
                                                                     const int8_t* const* x, __m256i* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = k_begin; k < k_end; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i aw = _mm256_abs_epi8(wv);
    for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + k));
      const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
      acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones));
    }
  }
}

template <int T>
__attribute__((target("avx2,fma"))) void dot_avx2(const int8_t* w, int64_t Kp, const int8_t* const* x,
                                                   int32_t* out) {
  __m256i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
  accumulate_int8_avx2<T>(w, 0, Kp, x, acc);
  for (int t = 0; t < T; ++t) out[t] = hsum_epi32_avx2(acc[t]);
}

// per_group weights: out[t] = sum_g scale[g] * (group g's integer dot); each group's total is
// formed exactly before its one float rounding, as in the reference.
template <int T>
__attribute__((target("avx2,fma"))) void dot_grouped_avx2(const int8_t* w, int64_t groups, int64_t len,
                                                           const float* scale, const int8_t* const* x, float* out) {
  float y[T];
  for (int t = 0; t < T; ++t) y[t] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    accumulate_int8_avx2<T>(w, g * len, (g + 1) * len, x, acc);
    for (int t = 0; t < T; ++t) y[t] += static_cast<float>(hsum_epi32_avx2(acc[t])) * scale[g];
  }
  for (int t = 0; t < T; ++t) out[t] = y[t];
}
#endif

template <int T>
void dot_scalar(const int8_t* w, int64_t Kp, const int8_t* const* x, int32_t* out) {
  for (int t = 0; t < T; ++t) {
    int32_t sum = 0;
    for (int64_t k = 0; k < Kp; ++k) sum += static_cast<int32_t>(w[k]) * x[t][k];
    out[t] = sum;
  }
}

template <int T>
void dot_grouped_scalar(const int8_t* w, int64_t groups, int64_t len, const float* scale, const int8_t* const* x,
                        float* out) {
  for (int t = 0; t < T; ++t) out[t] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* xg[T];
    for (int t = 0; t < T; ++t) xg[t] = x[t] + g * len;
    int32_t dots[T];
    dot_scalar<T>(w + g * len, len, xg, dots);
    for (int t = 0; t < T; ++t) out[t] += static_cast<float>(dots[t]) * scale[g];
  }
}

#if !BITLAB_X86
template <int T>
void dot_avx2(const int8_t* w, int64_t Kp, const int8_t* const* x, int32_t* out) {
  dot_scalar<T>(w, Kp, x, out);
}
template <int T>
void dot_grouped_avx2(const int8_t* w, int64_t groups, int64_t len, const float* scale, const int8_t* const* x,
                      float* out) {
  dot_grouped_scalar<T>(w, groups, len, scale, x, out);
}
#endif

template <bool AVX2>
void run(const int8_t* w, int64_t N, int64_t Kp, const Int8Activations& a, int64_t M, const OutputSpec& o,
         int threads) {
  const int64_t G = a.groups, len = a.group_len;  // len == Kp when G == 1
  for_row_blocks(N, M, threads, [&](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    const int T = static_cast<int>(t1 - t0);
    const int8_t* xs[kTokenGroup];
    for (int t = 0; t < T; ++t) xs[t] = a.q + (t0 + t) * a.ldq;
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* wr = w + r * Kp;
      if (G == 1) {
        int32_t dots[kTokenGroup];
        if (AVX2) {
          switch (T) {
            case 1: dot_avx2<1>(wr, Kp, xs, dots); break;
            case 2: dot_avx2<2>(wr, Kp, xs, dots); break;
            case 3: dot_avx2<3>(wr, Kp, xs, dots); break;
            default: dot_avx2<4>(wr, Kp, xs, dots); break;
          }
        } else {
          switch (T) {
            case 1: dot_scalar<1>(wr, Kp, xs, dots); break;
            case 2: dot_scalar<2>(wr, Kp, xs, dots); break;
            case 3: dot_scalar<3>(wr, Kp, xs, dots); break;
            default: dot_scalar<4>(wr, Kp, xs, dots); break;
          }
        }
        for (int t = 0; t < T; ++t)
          o.y[(t0 + t) * o.ldy + r] = finish(static_cast<float>(dots[t]), a.scale[t0 + t], o, r);
        continue;
      }
      const float* sr = o.w_scale + r * G;
      float dots[kTokenGroup];
      if (AVX2) {
        switch (T) {
          case 1: dot_grouped_avx2<1>(wr, G, len, sr, xs, dots); break;
          case 2: dot_grouped_avx2<2>(wr, G, len, sr, xs, dots); break;
          case 3: dot_grouped_avx2<3>(wr, G, len, sr, xs, dots); break;
          default: dot_grouped_avx2<4>(wr, G, len, sr, xs, dots); break;
        }
      } else {
        switch (T) {
          case 1: dot_grouped_scalar<1>(wr, G, len, sr, xs, dots); break;
          case 2: dot_grouped_scalar<2>(wr, G, len, sr, xs, dots); break;
          case 3: dot_grouped_scalar<3>(wr, G, len, sr, xs, dots); break;
          default: dot_grouped_scalar<4>(wr, G, len, sr, xs, dots); break;
        }
      }
      for (int t = 0; t < T; ++t) o.y[(t0 + t) * o.ldy + r] = epilogue(dots[t] * a.scale[t0 + t], o, r);
    }
  }, rows_per_item(N, Kp, threads));
}

}  // namespace

void int8_int8_gemm(const int8_t* w, int64_t N, int64_t Kp, const Int8Activations& a, int64_t M,
                    const OutputSpec& o, int threads) {
  if (active_isa() >= Isa::Avx2) return run<true>(w, N, Kp, a, M, o, threads);
  return run<false>(w, N, Kp, a, M, o, threads);
}

}  // namespace bitlab_cpu
