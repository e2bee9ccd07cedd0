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
//
// AVX-512 VNNI: one 64-byte load holds two blocks (b, b + 1 of a group) and vpdpbusd
// multiplies 64 unsigned codes by 64 int8 activations, summing fours into int32 lanes (no
// int16 stage, no widening).  The activations are first copied once per call into the order
// those loads need (pair_activations): within each group, pair p of blocks takes 64 * PER
// bytes, and for shift s its 64 bytes are block 2p's 32 inputs for s, then block 2p + 1's.
// A group with an odd block count ends in a lone block, read with a 32-byte load and a zero
// upper half (its activations' upper half is zero too).
#include <cstring>
#include <type_traits>
#include <vector>

#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

template <int NB>
constexpr int codes_per_byte() { return 8 / NB; }

// The one-token kernels that mask code slots in place (dot_int8_inplace_*) multiply codes scaled by up to 2^6: one
// vpdpbusd then adds at most 4 * 240 * 128 < 2^17 to a lane, so a row may take up to 2^14 of them per accumulator
// (one per 32-byte block on AVX-VNNI, one per 64-byte pair on AVX-512) before a lane could pass 2^31.  Longer rows
// (over 2^20 inputs) take the shifting loops.
constexpr int64_t kInplaceMaxSteps = int64_t{1} << 14;

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
      _mm_prefetch(reinterpret_cast<const char*>(w + 32 * b + kPrefetchBytes), _MM_HINT_T0);
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

// AVX-VNNI: the 256-bit vpdpbusd multiplies 32 unsigned codes by 32 int8 activations and sums fours into int32
// lanes, in place of AVX2's maddubs + int16 add + widening (the AVX2 loop's bound).  Same layout and activations
// as AVX2.  R rows (row_bytes apart) against T tokens per call: out[r * T + t]; R = 1 keeps two accumulators per
// token so consecutive vpdpbusd do not wait on each other.  Ternary, two cores of the development machine, G MAC/s
// AVX2 -> one row of this: 2560x2560 at 4 / 64 / 512 tokens 86 / 159 / 142 -> 85 / 168 / 189.
#define BITLAB_AVXVNNI_TARGET "avx2,fma,avxvnni"

template <int NB, int R, int T>
__attribute__((target(BITLAB_AVXVNNI_TARGET))) void dot_int8_rows_avxvnni(const uint8_t* w, int64_t row_bytes,
                                                                         int64_t nblocks, const int8_t* const* x,
                                                                         int32_t* out) {
  constexpr int PER = codes_per_byte<NB>();
  constexpr int A = R == 1 ? 2 : 1;  // accumulators per (row, token)
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << NB) - 1));
  __m256i acc[R][T][A];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < A; ++i) acc[r][t][i] = _mm256_setzero_si256();
  for (int64_t b = 0; b < nblocks; ++b) {
    __m256i v[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + 32 * b + kPrefetchBytes), _MM_HINT_T0);
      v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + 32 * b));
    }
    const int64_t k0 = b * 32 * PER;
#pragma GCC unroll 8
    for (int s = 0; s < PER; ++s) {
      __m256i u[R];
      for (int r = 0; r < R; ++r) u[r] = _mm256_and_si256(_mm256_srli_epi16(v[r], NB * s), mask);
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + k0 + 32 * s));
        for (int r = 0; r < R; ++r) acc[r][t][s % A] = _mm256_dpbusd_avx_epi32(acc[r][t][s % A], u[r], xv);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      out[r * T + t] = hsum_epi32_avx2(A == 2 ? _mm256_add_epi32(acc[r][t][0], acc[r][t][A - 1]) : acc[r][t][0]);
}

// One row against one token with the slots masked in place, as dot_int8_inplace_avx512 below explains: 32 codes per
// load, PER and + PER vpdpbusd, where dot_int8_rows_avxvnni adds PER - 1 shifts.
template <int NB>
__attribute__((target(BITLAB_AVXVNNI_TARGET))) int32_t dot_int8_inplace_avxvnni(const uint8_t* w, int64_t nblocks,
                                                                               const int8_t* x) {
  constexpr int PER = codes_per_byte<NB>();
  __m256i mask[PER], acc[PER];
  for (int s = 0; s < PER; ++s) {
    mask[s] = _mm256_set1_epi8(static_cast<char>(((1 << NB) - 1) << (NB * s)));
    acc[s] = _mm256_setzero_si256();
  }
  for (int64_t b = 0; b < nblocks; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 32 * b + kPrefetchBytes), _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b));
    const int8_t* xb = x + b * 32 * PER;
#pragma GCC unroll 8
    for (int s = 0; s < PER; ++s)
      acc[s] = _mm256_dpbusd_avx_epi32(acc[s], _mm256_and_si256(v, mask[s]),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32 * s)));
  }
  __m256i total = acc[0];
  for (int s = 1; s < PER; ++s) total = _mm256_add_epi32(total, _mm256_srai_epi32(acc[s], NB * s));
  return hsum_epi32_avx2(total);
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

#define BITLAB_AVX512_TARGET "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"

// acc[2t], acc[2t + 1] += the integer dot products of code blocks [0, nblocks) of one group of
// a prepared row with the paired activations xp[t] of that group (two accumulators per token
// so consecutive vpdpbusd do not wait on each other).
template <int NB, int T>
__attribute__((target(BITLAB_AVX512_TARGET))) inline void accumulate_pairs_avx512(const uint8_t* w, int64_t nblocks,
                                                                                const int8_t* const* xp,
                                                                                __m512i* acc) {
  constexpr int PER = codes_per_byte<NB>();
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << NB) - 1));
  int64_t b = 0;
  for (; b + 1 < nblocks; b += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 32 * b + kPrefetchBytes), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(w + 32 * b);
    const int64_t k0 = b * 32 * PER;  // pair b / 2 starts at (b / 2) * 64 * PER
#pragma GCC unroll 8
    for (int s = 0; s < PER; ++s) {
      const __m512i u = _mm512_and_si512(_mm512_srli_epi16(v, NB * s), mask);
      for (int t = 0; t < T; ++t)
        acc[2 * t + (s & 1)] = _mm512_dpbusd_epi32(acc[2 * t + (s & 1)], u, _mm512_loadu_si512(xp[t] + k0 + 64 * s));
    }
  }
  if (b < nblocks) {  // a lone last block: 32 bytes, upper half zero
    const __m512i v = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b)));
    const int64_t k0 = b * 32 * PER;
#pragma GCC unroll 8
    for (int s = 0; s < PER; ++s) {
      const __m512i u = _mm512_and_si512(_mm512_srli_epi16(v, NB * s), mask);
      for (int t = 0; t < T; ++t)
        acc[2 * t + (s & 1)] = _mm512_dpbusd_epi32(acc[2 * t + (s & 1)], u, _mm512_loadu_si512(xp[t] + k0 + 64 * s));
    }
  }
}

template <int NB, int T>
__attribute__((target(BITLAB_AVX512_TARGET))) void dot_int8_avx512(const uint8_t* w, int64_t nblocks,
                                                                  const int8_t* const* xp, int32_t* out) {
  __m512i acc[2 * T];
  for (int i = 0; i < 2 * T; ++i) acc[i] = _mm512_setzero_si512();
  accumulate_pairs_avx512<NB, T>(w, nblocks, xp, acc);
  for (int t = 0; t < T; ++t) out[t] = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[2 * t], acc[2 * t + 1]));
}

// One row against one token without shifting the codes: slot s of each byte is masked in place, so vpdpbusd
// multiplies u * 2^(NB*s) (at most 128, 192 or 240 for 1-, 2- and 4-bit codes: still an unsigned byte) by the
// activation.  Each slot keeps its own accumulator, which holds exactly 2^(NB*s) times that slot's dot product, so
// the arithmetic shift back is exact.  Per 64 weight bytes: PER and + PER vpdpbusd, where the shifting loop adds
// PER - 1 shifts on the port vpdpbusd uses.  That port bounds the batch-1 loop, and its rate sets how well the
// weight stream from memory overlaps the arithmetic.  Lane bound: kInplaceMaxSteps.  For 2- and 4-bit codes only:
// binary rows (8 slots, 8 accumulators to fold per row) measured no faster.
template <int NB>
__attribute__((target(BITLAB_AVX512_TARGET))) inline void inplace_step_avx512(const __m512i v, const int8_t* x,
                                                                             const __m512i* mask, __m512i* acc) {
#pragma GCC unroll 8
  for (int s = 0; s < codes_per_byte<NB>(); ++s)
    acc[s] = _mm512_dpbusd_epi32(acc[s], _mm512_and_si512(v, mask[s]), _mm512_loadu_si512(x + 64 * s));
}

template <int NB>
__attribute__((target(BITLAB_AVX512_TARGET))) int32_t dot_int8_inplace_avx512(const uint8_t* w, int64_t nblocks,
                                                                             const int8_t* xp) {
  constexpr int PER = codes_per_byte<NB>();
  __m512i mask[PER], acc[PER];
  for (int s = 0; s < PER; ++s) {
    mask[s] = _mm512_set1_epi8(static_cast<char>(((1 << NB) - 1) << (NB * s)));
    acc[s] = _mm512_setzero_si512();
  }
  int64_t b = 0;
  for (; b + 1 < nblocks; b += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 32 * b + kPrefetchBytes), _MM_HINT_T0);
    inplace_step_avx512<NB>(_mm512_loadu_si512(w + 32 * b), xp + b * 32 * PER, mask, acc);
  }
  if (b < nblocks)  // a lone last block: 32 bytes, upper half zero (its activations' upper half is zero too)
    inplace_step_avx512<NB>(_mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b))),
                            xp + b * 32 * PER, mask, acc);
  __m512i total = acc[0];
  for (int s = 1; s < PER; ++s) total = _mm512_add_epi32(total, _mm512_srai_epi32(acc[s], NB * s));
  return _mm512_reduce_add_epi32(total);
}

// R consecutive rows (row_bytes apart) against T tokens at once: out[r * T + t].  Each 64-byte load of activations
// serves R rows, so a token group costs R * T vpdpbusd per R activation loads and R shift-and-masks, where the one-row
// kernel spends one activation load per vpdpbusd.  Used for two or more tokens (GEMM): a 2560x2560 ternary layer at
// 512 tokens ran at ~180 G MAC/s on the development machine's two cores with the one-row kernel.
// One 64-byte load of each of R rows (two blocks, or a lone block in the lower half) against T tokens' activations
// at k0: acc[r][t] += the integer dot products.
template <int NB, int R, int T>
__attribute__((target(BITLAB_AVX512_TARGET))) inline void rows_step_avx512(const __m512i (&v)[R], int64_t k0,
                                                                          const int8_t* const* xp,
                                                                          __m512i (&acc)[R][T]) {
  constexpr int PER = codes_per_byte<NB>();
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << NB) - 1));
#pragma GCC unroll 8
  for (int s = 0; s < PER; ++s) {
    __m512i u[R];
    for (int r = 0; r < R; ++r) u[r] = _mm512_and_si512(_mm512_srli_epi16(v[r], NB * s), mask);
    for (int t = 0; t < T; ++t) {
      const __m512i x = _mm512_loadu_si512(xp[t] + k0 + 64 * s);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], u[r], x);
    }
  }
}

// R consecutive rows (row_bytes apart) against T tokens at once: out[r * T + t].  Each 64-byte load of activations
// serves R rows, so a token group costs R * T vpdpbusd per T activation loads and R shift-and-masks, where the
// one-row kernel spends one activation load per vpdpbusd.  Used for two or more tokens (GEMM).
template <int NB, int R, int T>
__attribute__((target(BITLAB_AVX512_TARGET))) void dot_int8_rows_avx512(const uint8_t* w, int64_t row_bytes,
                                                                       int64_t nblocks, const int8_t* const* xp,
                                                                       int32_t* out) {
  constexpr int PER = codes_per_byte<NB>();
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  int64_t b = 0;
  for (; b + 1 < nblocks; b += 2) {
    __m512i v[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + 32 * b + kPrefetchBytes), _MM_HINT_T0);
      v[r] = _mm512_loadu_si512(w + r * row_bytes + 32 * b);
    }
    rows_step_avx512<NB, R, T>(v, b * 32 * PER, xp, acc);
  }
  if (b < nblocks) {  // a lone last block: 32 bytes, upper half zero (its activations' upper half is zero too)
    __m512i v[R];
    for (int r = 0; r < R; ++r)
      v[r] = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + 32 * b)));
    rows_step_avx512<NB, R, T>(v, b * 32 * PER, xp, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * T + t] = _mm512_reduce_add_epi32(acc[r][t]);
}

// per_group weights, as dot_int8_grouped_avx2: each group's exact integer total, then one rounding.
// pair_len: paired activation bytes per group (group_blocks rounded up to even, times 32 * PER).
template <int NB, int T>
__attribute__((target(BITLAB_AVX512_TARGET))) void dot_int8_grouped_avx512(
    const uint8_t* w, int64_t groups, int64_t group_blocks, int64_t pair_len, const float* scale,
    const int8_t* const* xp, const int32_t* const* gsum, int alpha, int beta, float* out) {
  float y[T];
  for (int t = 0; t < T; ++t) y[t] = 0.0f;
  const int8_t* xg[T];
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[2 * T];
    for (int i = 0; i < 2 * T; ++i) acc[i] = _mm512_setzero_si512();
    for (int t = 0; t < T; ++t) xg[t] = xp[t] + g * pair_len;
    accumulate_pairs_avx512<NB, T>(w + g * group_blocks * 32, group_blocks, xg, acc);
    for (int t = 0; t < T; ++t) {
      const int32_t dot = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[2 * t], acc[2 * t + 1]));
      y[t] += static_cast<float>(alpha * dot - beta * gsum[t][g]) * scale[g];
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
// Declared only: run_int8_on never instantiates the AVX-512 and AVX-VNNI paths off x86.
template <int NB>
int32_t dot_int8_inplace_avx512(const uint8_t* w, int64_t nblocks, const int8_t* xp);
template <int NB>
int32_t dot_int8_inplace_avxvnni(const uint8_t* w, int64_t nblocks, const int8_t* x);
template <int NB, int T>
void dot_int8_avx512(const uint8_t* w, int64_t nblocks, const int8_t* const* x, int32_t* out);
template <int NB, int R, int T>
void dot_int8_rows_avx512(const uint8_t* w, int64_t row_bytes, int64_t nblocks, const int8_t* const* xp,
                          int32_t* out);
template <int NB, int R, int T>
void dot_int8_rows_avxvnni(const uint8_t* w, int64_t row_bytes, int64_t nblocks, const int8_t* const* x,
                           int32_t* out);
template <int NB, int T>
void dot_int8_grouped_avx512(const uint8_t* w, int64_t groups, int64_t group_blocks, int64_t pair_len,
                             const float* scale, const int8_t* const* x, const int32_t* const* gsum, int alpha,
                             int beta, float* out);
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

// Calls f(std::integral_constant<int, T>{}) with T = n for n in 1..kTokenGroup.
template <typename F>
inline void with_token_count(int n, F f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// The activations in the order of the AVX-512 kernels' 64-byte weight loads (see the top of
// this file): returns the row stride of the copy, G * pair_len.
template <int NB>
int64_t pair_activations(const Int8Activations& a, int64_t M, int64_t pair_len, std::vector<int8_t>& out) {
  constexpr int PER = codes_per_byte<NB>();
  const int64_t nblocks = a.group_len / (32 * PER);
  const int64_t ldp = a.groups * pair_len;
  out.assign(static_cast<size_t>(M * ldp), 0);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t g = 0; g < a.groups; ++g) {
      const int8_t* src = a.q + t * a.ldq + g * a.group_len;
      int8_t* dst = out.data() + t * ldp + g * pair_len;
      for (int64_t b = 0; b < nblocks; ++b)
        for (int s = 0; s < PER; ++s)
          std::memcpy(dst + (b / 2) * 64 * PER + 64 * s + 32 * (b % 2), src + b * 32 * PER + 32 * s, 32);
    }
  return ldp;
}

constexpr int kMultiRows = 4;  // rows per dot_int8_rows_avx512 call (R * T <= 16 accumulators)

template <int NB, Isa ISA>
void run_int8(int alpha, int beta, const uint8_t* w, int64_t N, int64_t Kp, const Int8Activations& a,
              int64_t M, const OutputSpec& o, int threads) {
  constexpr int PER = codes_per_byte<NB>();
  const int64_t row_bytes = Kp / PER;
  const int64_t G = a.groups;
  const int64_t nblocks = a.group_len / (32 * PER);  // per group (the whole row when G == 1)
  // The activations the dot products read: as quantized, or paired for the AVX-512 loads.
  const int8_t* xq = a.q;
  int64_t ldx = a.ldq;
  const int64_t pair_len = (nblocks + 1) / 2 * 64 * PER;
  static thread_local std::vector<int8_t> paired;
  if (ISA == Isa::Avx512Vnni) {
    ldx = pair_activations<NB>(a, M, pair_len, paired);
    xq = paired.data();
  }
  for_row_blocks(N, M, threads, [&](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    with_token_count(static_cast<int>(t1 - t0), [&](auto token_count) {
      constexpr int T = decltype(token_count)::value;
      const int8_t* xs[T];
      for (int t = 0; t < T; ++t) xs[t] = xq + (t0 + t) * ldx;
      // Rows [r, r + n) of the dot products dots[i * T + t] -> outputs (the code-offset correction, the epilogue).
      const auto store_rows = [&](int64_t r, int n, const int32_t* dots) {
        for (int i = 0; i < n; ++i)
          for (int t = 0; t < T; ++t) {
            const int32_t d = alpha * dots[i * T + t] - beta * a.qsum[t0 + t];
            o.y[(t0 + t) * o.ldy + r + i] = finish(static_cast<float>(d), a.scale[t0 + t], o, r + i);
          }
      };
      int64_t r = r0;
      if constexpr ((ISA == Isa::Avx512Vnni || ISA == Isa::AvxVnni) && T > 1) {
        // Two or more tokens: R rows per call share each activation load (R * T accumulators: 16 zmm, 8 ymm).
        constexpr int R = ISA == Isa::Avx512Vnni ? kMultiRows : 2;
        for (; G == 1 && r + R <= r1; r += R) {
          int32_t dots[R * T];
          if constexpr (ISA == Isa::Avx512Vnni)
            dot_int8_rows_avx512<NB, R, T>(w + r * row_bytes, row_bytes, nblocks, xs, dots);
          else
            dot_int8_rows_avxvnni<NB, R, T>(w + r * row_bytes, row_bytes, nblocks, xs, dots);
          store_rows(r, R, dots);
        }
      }
      for (; r < r1; ++r) {
        const uint8_t* wr = w + r * row_bytes;
        if (G == 1) {
          int32_t dots[T];
          // One token, 2- or 4-bit codes: the kernels that mask code slots in place.
          const bool inplace = T == 1 && NB > 1;
          if constexpr (ISA == Isa::Avx512Vnni) {
            if (inplace && nblocks <= 2 * kInplaceMaxSteps) dots[0] = dot_int8_inplace_avx512<NB>(wr, nblocks, xs[0]);
            else dot_int8_avx512<NB, T>(wr, nblocks, xs, dots);
          } else if constexpr (ISA == Isa::AvxVnni) {
            if (inplace && nblocks <= kInplaceMaxSteps) dots[0] = dot_int8_inplace_avxvnni<NB>(wr, nblocks, xs[0]);
            else dot_int8_rows_avxvnni<NB, 1, T>(wr, row_bytes, nblocks, xs, dots);
          } else if constexpr (ISA == Isa::Avx2) {
            dot_int8_avx2<NB, T>(wr, nblocks, xs, dots);
          } else {
            dot_int8_scalar<NB, T>(wr, nblocks, xs, dots);
          }
          store_rows(r, 1, dots);
          continue;
        }
        // per_group: sum_g s_g * (alpha * dot_g - beta * xsum_g)
        const float* sr = o.w_scale + r * G;
        const int32_t* gs[T];
        for (int t = 0; t < T; ++t) gs[t] = a.qsum + (t0 + t) * G;
        float dots[T];
        if constexpr (ISA == Isa::Avx512Vnni)
          dot_int8_grouped_avx512<NB, T>(wr, G, nblocks, pair_len, sr, xs, gs, alpha, beta, dots);
        else if constexpr (ISA == Isa::Avx2 || ISA == Isa::AvxVnni)  // per_group: AVX2 code at the AVX-VNNI level
          dot_int8_grouped_avx2<NB, T>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots);
        else
          dot_int8_grouped_scalar<NB, T>(wr, G, nblocks, sr, xs, gs, alpha, beta, dots);
        for (int t = 0; t < T; ++t) o.y[(t0 + t) * o.ldy + r] = epilogue(dots[t] * a.scale[t0 + t], o, r);
      }
    });
  }, rows_per_item(N, row_bytes, threads));
}

template <int NB>
void run_int8_on(Isa isa, int alpha, int beta, const uint8_t* w, int64_t N, int64_t Kp, const Int8Activations& a,
                 int64_t M, const OutputSpec& o, int threads) {
  switch (isa) {
#if BITLAB_X86
    case Isa::Avx512Vnni: return run_int8<NB, Isa::Avx512Vnni>(alpha, beta, w, N, Kp, a, M, o, threads);
    case Isa::AvxVnni: return run_int8<NB, Isa::AvxVnni>(alpha, beta, w, N, Kp, a, M, o, threads);
#endif
    case Isa::Avx2: return run_int8<NB, Isa::Avx2>(alpha, beta, w, N, Kp, a, M, o, threads);
    default: return run_int8<NB, Isa::Scalar>(alpha, beta, w, N, Kp, a, M, o, threads);
  }
}

}  // namespace

void lowbit_int8_gemm(int nbits, int alpha, int beta, const uint8_t* w, int64_t N, int64_t Kp,
                      const Int8Activations& a, int64_t M, const OutputSpec& o, int threads) {
  const Isa isa = active_isa();
  switch (nbits) {
    case 1: return run_int8_on<1>(isa, alpha, beta, w, N, Kp, a, M, o, threads);
    case 2: return run_int8_on<2>(isa, alpha, beta, w, N, Kp, a, M, o, threads);
    default: return run_int8_on<4>(isa, alpha, beta, w, N, Kp, a, M, o, threads);
  }
}

}  // namespace bitlab_cpu
