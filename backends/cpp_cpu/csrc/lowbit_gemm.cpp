// Binary / ternary / int2 / int4 weights with int8 activations.
//
// Prepared weight layout ("interleaved", n = bits per code, PER = 8 / n codes per byte)
// -------------------------------------------------------------------------------
// Each row is padded to Kp = a multiple of 32 * PER inputs and stored as Kp / (32 * PER)
// blocks of 32 bytes.  Byte j of block b holds PER codes; bits [n*s, n*s + n) of it hold
// the code u of input k = b * 32 * PER + 32 * s + j.  So one 32-byte load, a shift by n*s
// and a mask give 32 codes of 32 *consecutive* inputs, lined up with a plain 32-byte load
// of int8 activations (the bitnet.cpp I2_S idea of decoding in registers, not memory).
//
//   format   n  code u      value w = alpha * u - beta
//   binary   1  c in {0,1}  2u - 1          (alpha 2, beta 1)
//   ternary  2  w + 1       u - 1           (alpha 1, beta 1)
//   int2     2  (w + 3)/2   2u - 3          (alpha 2, beta 3)
//   int4     4  w + 8       u - 8           (alpha 1, beta 8)
//
// Padding codes are 0 and padded activations are 0, so padding never contributes.
// per_group weights: each group of group_size inputs is padded on its own to a whole number
// of blocks (the row is groups * group_len inputs) and the activations are laid out to match.
//
// int8 activations: u is unsigned, so _mm256_maddubs_epi16(u, x) multiplies and adds
// adjacent pairs without saturation (|pair| <= 2 * 15 * 127); int16 partial sums are
// widened to int32 every few blocks, well before they could overflow.  Then
//   sum_k w_k x_k = alpha * sum_k u_k x_k - beta * sum_k x_k      (exact integers)
// with sum_k x_k computed once per token when the activation is quantized.
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

template <int NB>
constexpr int codes_per_byte() { return 8 / NB; }

// ------------------------------------------------------------------ int8 activations
#if BITLAB_X86
// acc[t] += the integer dot products of code blocks [b_begin, b_end) of one prepared row with
// activation row t.  Blocks are summed in int16 before widening:
// |lane| <= blocks * PER * 2 * (2^NB - 1) * 127 < 2^15.
template <int NB, int T>
__attribute__((target("avx2,fma"))) inline void accumulate_blocks_avx2(const uint8_t* w, int64_t b_begin,
                                                                       int64_t b_end, const int8_t* const* x,
                                                                       __m256i* acc) {
  constexpr int PER = codes_per_byte<NB>();
  constexpr int64_t kWiden = NB == 4 ? 4 : 8;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << NB) - 1));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b0 = b_begin; b0 < b_end; b0 += kWiden) {
    const int64_t b1 = b0 + kWiden < b_end ? b0 + kWiden : b_end;
    __m256i s16[T];
    for (int t = 0; t < T; ++t) s16[t] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b));
      const int64_t k0 = b * 32 * PER;
#pragma GCC unroll 8
      for (int s = 0; s < PER; ++s) {
        const __m256i u = _mm256_and_si256(v, mask);
        v = _mm256_srli_epi16(v, NB);
        for (int t = 0; t < T; ++t) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + k0 + 32 * s));
          s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(u, xv));
        }
      }
    }
    for (int t = 0; t < T; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16[t], ones));
  }
}

template <int NB, int T>
__attribute__((target("avx2,fma"))) void dot_int8_avx2(const uint8_t* w, int64_t nblocks,
                                                        const int8_t* const* x, int32_t* out) {
  __m256i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
  accumulate_blocks_avx2<NB, T>(w, 0, nblocks, x, acc);
  for (int t = 0; t < T; ++t) out[t] = hsum_epi32_avx2(acc[t]);
}

// per_group weights: out[t] = sum_g scale[g] * (alpha * sum_{k in g} u_k x_k - beta * gsum[t][g]).
// Each group's integer total is formed exactly before its one float rounding, as in the
// reference (scaling partial lanes instead could round far worse under cancellation).
template <int NB, int T>
__attribute__((target("avx2,fma"))) void dot_int8_grouped_avx2(const uint8_t* w, int64_t groups,
                                                                int64_t group_blocks, const float* scale,
                                                                const int8_t* const* x, const int32_t* const* gsum,
                                                                int alpha, int beta, float* out) {
  float y[T];
  for (int t = 0; t < T; ++t) y[t] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    accumulate_blocks_avx2<NB, T>(w, g * group_blocks, (g + 1) * group_blocks, x, acc);
    for (int t = 0; t < T; ++t) {
      const int32_t d = alpha * hsum_epi32_avx2(acc[t]) - beta * gsum[t][g];
      y[t] += static_cast<float>(d) * scale[g];
    }
  }
  for (int t = 0; t < T; ++t) out[t] = y[t];
}
#endif

template <int NB, int T>
void dot_int8_scalar(const uint8_t* w, int64_t nblocks, const int8_t* const* x, int32_t* out) {
  constexpr int PER = codes_per_byte<NB>();
  for (int t = 0; t < T; ++t) {
    int32_t sum = 0;
    for (int64_t b = 0; b < nblocks; ++b)
      for (int s = 0; s < PER; ++s)
        for (int j = 0; j < 32; ++j) {
          const int u = (w[32 * b + j] >> (NB * s)) & ((1 << NB) - 1);
          sum += u * x[t][b * 32 * PER + 32 * s + j];
        }
    out[t] = sum;
  }
}

template <int NB, int T>
void dot_int8_grouped_scalar(const uint8_t* w, int64_t groups, int64_t group_blocks, const float* scale,
                             const int8_t* const* x, const int32_t* const* gsum, int alpha, int beta, float* out) {
  constexpr int PER = codes_per_byte<NB>();
  for (int t = 0; t < T; ++t) out[t] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* xg[T];
    for (int t = 0; t < T; ++t) xg[t] = x[t] + g * group_blocks * 32 * PER;
    int32_t dots[T];
    dot_int8_scalar<NB, T>(w + g * group_blocks * 32, group_blocks, xg, dots);
    for (int t = 0; t < T; ++t) out[t] += static_cast<float>(alpha * dots[t] - beta * gsum[t][g]) * scale[g];
  }
}

#if !BITLAB_X86
template <int NB, int T>
void dot_int8_avx2(const uint8_t* w, int64_t nblocks, const int8_t* const* x, int32_t* out) {
  dot_int8_scalar<NB, T>(w, nblocks, x, out);
}
template <int NB, int T>
void dot_int8_grouped_avx2(const uint8_t* w, int64_t groups, int64_t group_blocks, const float* scale,
                           const int8_t* const* x, const int32_t* const* gsum, int alpha, int beta, float* out) {
  dot_int8_grouped_scalar<NB, T>(w, groups, group_blocks, scale, x, gsum, alpha, beta, out);
}
#endif

template <int NB, bool AVX2>
void run_int8(int alpha, int beta, const uint8_t* w, int64_t N, int64_t Kp, const Int8Activations& a,
              int64_t M, const OutputSpec& o, int threads) {
  constexpr int PER = codes_per_byte<NB>();
  const int64_t row_bytes = Kp / PER;
  const int64_t G = a.groups;
  const int64_t nblocks = a.group_len / (32 * PER);  // per group (the whole row when G == 1)
  for_row_blocks(N, M, threads, [&](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    const int T = static_cast<int>(t1 - t0);
    const int8_t* xs[kTokenGroup];
    for (int t = 0; t < T; ++t) xs[t] = a.q + (t0 + t) * a.ldq;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = w + r * row_bytes;
      if (G == 1) {
        int32_t dots[kTokenGroup];
        if (AVX2) {
          switch (T) {
            case 1: dot_int8_avx2<NB, 1>(wr, nblocks, xs, dots); break;
            case 2: dot_int8_avx2<NB, 2>(wr, nblocks, xs, dots); break;
            case 3: dot_int8_avx2<NB, 3>(wr, nblocks, xs, dots); break;
            default: dot_int8_avx2<NB, 4>(wr, nblocks, xs, dots); break;
          }
        } else {
          switch (T) {
            case 1: dot_int8_scalar<NB, 1>(wr, nblocks, xs, dots); break;
            case 2: dot_int8_scalar<NB, 2>(wr, nblocks, xs, dots); break;
            case 3: dot_int8_scalar<NB, 3>(wr, nblocks, xs, dots); break;
            default: dot_int8_scalar<NB, 4>(wr, nblocks, xs, dots); break;
          }
        }
        for (int t = 0; t < T; ++t) {
          const int32_t d = alpha * dots[t] - beta * a.qsum[t0 + t];
          o.y[(t0 + t) * o.ldy + r] = finish(static_cast<float>(d), a.scale[t0 + t], o, r);
        }
        continue;
      }
      // per_group: sum_g s_g * (alpha * dot_g - beta * xsum_g)
      const float* sr = o.w_scale + r * G;
      const int32_t* gs[kTokenGroup];
      for (int t = 0; t < T; ++t) gs[t] = a.qsum + (t0 + t) * G;
      float dots[kTokenGroup];
      if (AVX2) {
        switch (T) {
          case 1: dot_int8_grouped_avx2<NB, 1>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
          case 2: dot_int8_grouped_avx2<NB, 2>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
          case 3: dot_int8_grouped_avx2<NB, 3>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
          default: dot_int8_grouped_avx2<NB, 4>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
        }
      } else {
        switch (T) {
          case 1: dot_int8_grouped_scalar<NB, 1>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
          case 2: dot_int8_grouped_scalar<NB, 2>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
          case 3: dot_int8_grouped_scalar<NB, 3>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
          default: dot_int8_grouped_scalar<NB, 4>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots); break;
        }
      }
      for (int t = 0; t < T; ++t) o.y[(t0 + t) * o.ldy + r] = epilogue(dots[t] * a.scale[t0 + t], o, r);
    }
  });
}

}  // namespace

void lowbit_int8_gemm(int nbits, int alpha, int beta, const uint8_t* w, int64_t N, int64_t Kp,
                      const Int8Activations& a, int64_t M, const OutputSpec& o, int threads) {
  const bool avx2 = active_isa() == Isa::Avx2;
  switch (nbits) {
    case 1: return avx2 ? run_int8<1, true>(alpha, beta, w, N, Kp, a, M, o, threads)
                        : run_int8<1, false>(alpha, beta, w, N, Kp, a, M, o, threads);
    case 2: return avx2 ? run_int8<2, true>(alpha, beta, w, N, Kp, a, M, o, threads)
                        : run_int8<2, false>(alpha, beta, w, N, Kp, a, M, o, threads);
    default: return avx2 ? run_int8<4, true>(alpha, beta, w, N, Kp, a, M, o, threads)
                         : run_int8<4, false>(alpha, beta, w, N, Kp, a, M, o, threads);
  }
}

}  // namespace bitlab_cpu
