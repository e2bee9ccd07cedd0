// bfloat16 rows in and out of the float32 kernels: the ops' x.to(float32) and out.to(bfloat16) as one loop each over
// a reused buffer, instead of two torch operations per call (each ~7-11 us at one thread in a CPU decode step, where
// a BitNet layer runs four projections).  The same values as torch's conversions: widening is exact, narrowing rounds
// to nearest even with NaN kept quiet (bitlab_bf16.h).
#include "bitlab_bf16.h"
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

#if BITLAB_X86
BITLAB_BF16_AVX2 void widen_row_avx2(const uint16_t* x, int64_t K, float* out) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, load_bf16x8(x + k));
  for (; k < K; ++k) out[k] = bf16_to_float(x[k]);
}

BITLAB_BF16_AVX2 void narrow_avx2(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store_bf16x8(out + i, _mm256_loadu_ps(x + i));
  for (; i < n; ++i) out[i] = float_to_bf16(x[i]);
}
#endif

}  // namespace

void widen_bf16_rows(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, float* out, int threads) {
  const bool avx2 = BITLAB_X86 && active_isa() >= Isa::Avx2;
  for_row_chunks(M, threads, [&](int64_t t0, int64_t t1) {
    for (int64_t m = t0; m < t1; ++m) {
#if BITLAB_X86
      if (avx2) {
        widen_row_avx2(x + m * ldx, K, out + m * K);
        continue;
      }
#endif
      for (int64_t k = 0; k < K; ++k) out[m * K + k] = bf16_to_float(x[m * ldx + k]);
    }
  });
}

void narrow_to_bf16(const float* x, int64_t M, int64_t N, uint16_t* out, int threads) {
  const bool avx2 = BITLAB_X86 && active_isa() >= Isa::Avx2;
  for_row_chunks(M, threads, [&](int64_t t0, int64_t t1) {
    const int64_t begin = t0 * N, n = (t1 - t0) * N;
#if BITLAB_X86
    if (avx2) return narrow_avx2(x + begin, n, out + begin);
#endif
    for (int64_t i = begin; i < begin + n; ++i) out[i] = float_to_bf16(x[i]);
  });
}

}  // namespace bitlab_cpu
