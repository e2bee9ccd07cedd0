// RMSNorm of rows (transformers' BitNetRMSNorm), with the residual add or BitNet's squared-ReLU gate before it, in
// one pass per row: a CPU decode step's norms as one call each instead of about eight torch operations.
//
// Per row of K values in dtype T (float32 or bfloat16), rounding to T where torch's operations do:
//   mode 0: x = a
//   mode 1: x = h = T(a + b)                           (h is written)
//   mode 2: x = T(T(relu(a)^2) * b)                    (BitNet's squared-ReLU gate)
//   y = T(w * T(x * (1 / sqrt(mean(x^2) + eps))))
// in two passes around the mean of squares, which the caller (ops.cpp) takes with torch's own mean of the squares
// x * x (squares below; torch's pow(x, 2) computes x * x): a sum
// added in any other order could move y by a bit, so torch's operations on the same x give the same bits.
#include <cmath>
#include <cstring>
#include <type_traits>

#include "bitlab_bf16.h"
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

// One loop per mode; `from` lets the AVX2 loops below hand their tail to it.
template <typename D, int kMode>
void inputs_mode(const typename D::Storage* a, const typename D::Storage* b, typename D::Storage* h, float* x,
                 int64_t n, int64_t from = 0) {
  for (int64_t i = from; i < n; ++i) {
    float v = D::load(a[i]);
    if (kMode == 1) {
      v = D::round(v + D::load(b[i]));
      h[i] = D::store(v);
    } else if (kMode == 2) {
      const float g = v > 0.f ? v : 0.f;
      v = D::round(D::round(g * g) * D::load(b[i]));
    }
    x[i] = v;
  }
}

#if BITLAB_X86
// bfloat16 rows eight values at a time (GCC does not vectorize the scalar loops: the bf16 rounding's NaN test and
// the ReLU are branches to it).  A 6912-wide gated row took 46 us through cpu_rms_norm with the scalar loops on the
// development machine.  Same bits as the scalar code: the same float operations, the same rounding.
#define BITLAB_NORM_AVX2 BITLAB_BF16_AVX2

template <int kMode>
BITLAB_NORM_AVX2 void inputs_bf16_avx2(const uint16_t* a, const uint16_t* b, uint16_t* h, float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = load_bf16x8(a + i);
    if (kMode == 1) {
      v = round_bf16x8(_mm256_add_ps(v, load_bf16x8(b + i)));
      store_bf16x8(h + i, v);
    } else if (kMode == 2) {
      const __m256 g = _mm256_and_ps(v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));  // v > 0 ? v : +0
      v = round_bf16x8(_mm256_mul_ps(round_bf16x8(_mm256_mul_ps(g, g)), load_bf16x8(b + i)));
    }
    _mm256_storeu_ps(x + i, v);
  }
  inputs_mode<BFloat16, kMode>(a, b, h, x, n, i);
}

BITLAB_NORM_AVX2 void outputs_bf16_avx2(const float* x, float r, const uint16_t* w, uint16_t* y, int64_t K) {
  const __m256 rv = _mm256_set1_ps(r);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    store_bf16x8(y + k, _mm256_mul_ps(load_bf16x8(w + k), round_bf16x8(_mm256_mul_ps(_mm256_loadu_ps(x + k), rv))));
  for (; k < K; ++k) y[k] = BFloat16::store(BFloat16::load(w[k]) * BFloat16::round(x[k] * r));
}
#endif

template <typename D>
void inputs(const void* a_, const void* b_, void* h_, float* x, int64_t M, int64_t K, int mode) {
  using S = typename D::Storage;
  const S* a = static_cast<const S*>(a_);
  const S* b = static_cast<const S*>(b_);
  S* h = static_cast<S*>(h_);
#if BITLAB_X86
  if (std::is_same<D, BFloat16>::value && active_isa() >= Isa::Avx2) {
    const auto* a16 = reinterpret_cast<const uint16_t*>(a);
    const auto* b16 = reinterpret_cast<const uint16_t*>(b);
    auto* h16 = reinterpret_cast<uint16_t*>(h);
    if (mode == 1)
      inputs_bf16_avx2<1>(a16, b16, h16, x, M * K);
    else if (mode == 2)
      inputs_bf16_avx2<2>(a16, b16, h16, x, M * K);
    else
      inputs_bf16_avx2<0>(a16, b16, h16, x, M * K);
    return;
  }
#endif
  if (mode == 1)
    inputs_mode<D, 1>(a, b, h, x, M * K);
  else if (mode == 2)
    inputs_mode<D, 2>(a, b, h, x, M * K);
  else
    inputs_mode<D, 0>(a, b, h, x, M * K);
}

template <typename D>
void outputs(const float* x, const float* mean_sq, const void* w_, void* y_, int64_t M, int64_t K, float eps) {
  using S = typename D::Storage;
  const S* w = static_cast<const S*>(w_);
  S* y = static_cast<S*>(y_);
  for (int64_t m = 0; m < M; ++m) {
    const float r = 1.f / std::sqrt(mean_sq[m] + eps);
#if BITLAB_X86
    if (std::is_same<D, BFloat16>::value && active_isa() >= Isa::Avx2) {
      outputs_bf16_avx2(x + m * K, r, reinterpret_cast<const uint16_t*>(w), reinterpret_cast<uint16_t*>(y) + m * K,
                        K);
      continue;
    }
#endif
    for (int64_t k = 0; k < K; ++k) y[m * K + k] = D::store(D::load(w[k]) * D::round(x[m * K + k] * r));
  }
}

}  // namespace

void rms_norm_inputs(const void* a, const void* b, void* h, float* x, int64_t M, int64_t K, int mode, bool bf16,
                     int threads) {
  const int64_t elem = bf16 ? 2 : 4;  // bytes per value of a, b and h
  const auto at = [&](const void* p, int64_t t0) -> void* {
    return p ? const_cast<char*>(static_cast<const char*>(p)) + t0 * K * elem : nullptr;
  };
  for_row_chunks(M, threads, [&](int64_t t0, int64_t t1) {
    if (bf16)
      inputs<BFloat16>(at(a, t0), at(b, t0), at(h, t0), x + t0 * K, t1 - t0, K, mode);
    else
      inputs<Float32>(at(a, t0), at(b, t0), at(h, t0), x + t0 * K, t1 - t0, K, mode);
  });
}

void squares(const float* x, int64_t M, int64_t K, float* out, int threads) {
  for_row_chunks(M, threads, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0 * K; i < t1 * K; ++i) out[i] = x[i] * x[i];  // torch's pow(x, 2) is x * x: the same bits
  });
}

void rms_norm_outputs(const float* x, const float* mean_sq, const void* weight, void* y, int64_t M, int64_t K,
                      float eps, bool bf16, int threads) {
  const int64_t elem = bf16 ? 2 : 4;
  for_row_chunks(M, threads, [&](int64_t t0, int64_t t1) {
    void* yt = static_cast<char*>(y) + t0 * K * elem;
    if (bf16)
      outputs<BFloat16>(x + t0 * K, mean_sq + t0, weight, yt, t1 - t0, K, eps);
    else
      outputs<Float32>(x + t0 * K, mean_sq + t0, weight, yt, t1 - t0, K, eps);
  });
}

}  // namespace bitlab_cpu
