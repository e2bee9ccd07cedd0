// Binary / ternary / int2 / int4 weights with float32 activations.
//
// Prepared weight layout ("dword-interleaved", n = bits per code, PER = 32 / n codes per dword)
// -----------------------------------------------------------------------------------
// Each row is padded to Kp = a multiple of 8 * PER inputs and stored as Kp / (8 * PER)
// blocks of 8 little-endian 32-bit words.  Bits [n*s, n*s + n) of word i of block b hold
// the code t of input k = b * 8 * PER + 8 * s + i, as an n-bit two's complement number:
//
//   format   n  code t            value w = gamma * t + delta
//   binary   1  (w - 1) / 2       2t + 1      t in {-1, 0}
//   ternary  2  w                 t           t in {-1, 0, 1}
//   int2     2  (w - 1) / 2       2t + 1      t in {-2 .. 1}
//   int4     4  w                 t           t in {-8 .. 7}
//
// Why not the byte-interleaved layout of the int8 kernels: float math needs each weight in
// a 32-bit lane, and widening bytes to dwords is a lane-crossing shuffle (vpmovsxbd), one
// per 8 weights, which saturates the single shuffle port.  Here one shift left (the code
// to the top of its lane) and one arithmetic shift right sign-extend 8 codes in place, so
// 8 weights cost 2-4 simple integer ops, a convert and one FMA per token.  Padding codes
// are 0 and padded activations are 0.
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

template <int NB>
constexpr int codes_per_word() { return 32 / NB; }

#if BITLAB_X86
// P independent accumulators per token hide the FMA latency (4 chains for GEMV, 2 when
// several tokens already give several chains).
template <int NB, bool ODD, int T>
__attribute__((target("avx2,fma"))) void dot_avx2(const uint32_t* w, int64_t nblocks, const float* const* x,
                                                   float* out) {
  constexpr int PER = codes_per_word<NB>();
  constexpr int P = T == 1 ? 4 : 2;
  const __m256i one = _mm256_set1_epi32(1);
  __m256 acc[T][P];
  for (int t = 0; t < T; ++t)
    for (int p = 0; p < P; ++p) acc[t][p] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblocks; ++b) {
    __m256i cur = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * b));
    const int64_t k0 = b * 8 * PER;
#pragma GCC unroll 32
    for (int s = PER - 1; s >= 0; --s) {
      // the code of step s sits in the top n bits of `cur` now
      __m256i t = _mm256_srai_epi32(cur, 32 - NB);
      cur = _mm256_slli_epi32(cur, NB);
      if (ODD) t = _mm256_or_si256(_mm256_add_epi32(t, t), one);  // 2t + 1
      const __m256 f = _mm256_cvtepi32_ps(t);
      for (int tk = 0; tk < T; ++tk)
        acc[tk][s % P] = _mm256_fmadd_ps(f, _mm256_loadu_ps(x[tk] + k0 + 8 * s), acc[tk][s % P]);
    }
  }
  for (int tk = 0; tk < T; ++tk) {
    __m256 a = acc[tk][0];
    for (int p = 1; p < P; ++p) a = _mm256_add_ps(a, acc[tk][p]);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[tk] = _mm_cvtss_f32(s);
  }
}
#endif

template <int NB, bool ODD, int T>
void dot_scalar(const uint32_t* w, int64_t nblocks, const float* const* x, float* out) {
  constexpr int PER = codes_per_word<NB>();
  for (int tk = 0; tk < T; ++tk) {
    float sum = 0.0f;
    for (int64_t b = 0; b < nblocks; ++b)
      for (int s = 0; s < PER; ++s)
        for (int i = 0; i < 8; ++i) {
          // sign-extend the n-bit code: move it to the top, arithmetic shift back
          const int32_t top = static_cast<int32_t>(w[8 * b + i] << (32 - NB - NB * s));
          int32_t t = top >> (32 - NB);
          if (ODD) t = 2 * t + 1;
          sum += static_cast<float>(t) * x[tk][b * 8 * PER + 8 * s + i];
        }
    out[tk] = sum;
  }
}

#if !BITLAB_X86
template <int NB, bool ODD, int T>
void dot_avx2(const uint32_t* w, int64_t nblocks, const float* const* x, float* out) {
  dot_scalar<NB, ODD, T>(w, nblocks, x, out);
}
#endif

// Inputs per k-chunk: a group of 4 tokens' float32 chunk (16 KiB) stays in L1 while every
// row of the row block streams past it.
constexpr int64_t kChunk = 1024;

template <int NB, bool ODD, bool AVX2>
void run(const uint32_t* w, int64_t N, int64_t Kp, const float* x, int64_t M, const OutputSpec& o, int threads) {
  constexpr int PER = codes_per_word<NB>();
  const int64_t row_words = Kp / PER;
  const int64_t nblocks = Kp / (8 * PER);
  const int64_t chunk_blocks = kChunk / (8 * PER);
  for_row_blocks(N, M, threads, [&](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    const int T = static_cast<int>(t1 - t0);
    float acc[kRowBlock][kTokenGroup] = {};
    for (int64_t kb = 0; kb < nblocks; kb += chunk_blocks) {
      const int64_t nb = kb + chunk_blocks < nblocks ? chunk_blocks : nblocks - kb;
      const float* xs[kTokenGroup];
      for (int t = 0; t < T; ++t) xs[t] = x + (t0 + t) * Kp + kb * 8 * PER;
      for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* wr = w + r * row_words + kb * 8;
        float dots[kTokenGroup];
        if (AVX2) {
          switch (T) {
            case 1: dot_avx2<NB, ODD, 1>(wr, nb, xs, dots); break;
            case 2: dot_avx2<NB, ODD, 2>(wr, nb, xs, dots); break;
            case 3: dot_avx2<NB, ODD, 3>(wr, nb, xs, dots); break;
            default: dot_avx2<NB, ODD, 4>(wr, nb, xs, dots); break;
          }
        } else {
          switch (T) {
            case 1: dot_scalar<NB, ODD, 1>(wr, nb, xs, dots); break;
            case 2: dot_scalar<NB, ODD, 2>(wr, nb, xs, dots); break;
            case 3: dot_scalar<NB, ODD, 3>(wr, nb, xs, dots); break;
            default: dot_scalar<NB, ODD, 4>(wr, nb, xs, dots); break;
          }
        }
        for (int t = 0; t < T; ++t) acc[r - r0][t] += dots[t];
      }
    }
    for (int64_t r = r0; r < r1; ++r)
      for (int t = 0; t < T; ++t) o.y[(t0 + t) * o.ldy + r] = finish(acc[r - r0][t], 1.0f, o, r);
  });
}

template <int NB, bool ODD>
void dispatch(const uint32_t* w, int64_t N, int64_t Kp, const float* x, int64_t M, const OutputSpec& o,
              int threads) {
  if (active_isa() >= Isa::Avx2) return run<NB, ODD, true>(w, N, Kp, x, M, o, threads);
  return run<NB, ODD, false>(w, N, Kp, x, M, o, threads);
}

}  // namespace

void lowbit_float_gemm(int nbits, bool odd, const uint32_t* w, int64_t N, int64_t Kp, const float* x, int64_t M,
                       const OutputSpec& o, int threads) {
  if (nbits == 1) return dispatch<1, true>(w, N, Kp, x, M, o, threads);
  if (nbits == 2 && odd) return dispatch<2, true>(w, N, Kp, x, M, o, threads);
  if (nbits == 2) return dispatch<2, false>(w, N, Kp, x, M, o, threads);
  return dispatch<4, false>(w, N, Kp, x, M, o, threads);
}

}  // namespace bitlab_cpu
