// RMSNorm of rows (transformers' BitNetRMSNorm), with the residual add or BitNet's squared-ReLU gate before it, in
// one pass per row: a CPU decode step's norms as one call each instead of about eight torch operations.
//
// Per row of K values in dtype T (float32 or bfloat16), rounding to T where torch's operations do:
//   mode 0: x = a
//   mode 1: x = h = T(a + b)                           (h is written)
//   mode 2: x = T(T(relu(a)^2) * b)                    (BitNet's squared-ReLU gate)
//   y = T(w * T(x * (1 / sqrt(mean(x^2) + eps))))
// in two passes around the mean of squares, which the caller (ops.cpp) takes with torch's own pow and mean: a sum
// added in any other order could move y by a bit, so torch's operations on the same x give the same bits.
#include <cmath>
#include <cstring>

#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as c10::BFloat16 does (NaN stays NaN, made quiet).  Without branches, so that the
// loops below vectorize: a 6912-wide gate-and-norm row took 46 us with the branch.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
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

// One loop per mode (no branch inside: the compiler vectorizes each).
template <typename D, int kMode>
void inputs_mode(const typename D::Storage* a, const typename D::Storage* b, typename D::Storage* h, float* x,
                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
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

template <typename D>
void inputs(const void* a_, const void* b_, void* h_, float* x, int64_t M, int64_t K, int mode) {
  using S = typename D::Storage;
  const S* a = static_cast<const S*>(a_);
  const S* b = static_cast<const S*>(b_);
  S* h = static_cast<S*>(h_);
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
    for (int64_t k = 0; k < K; ++k) y[m * K + k] = D::store(D::load(w[k]) * D::round(x[m * K + k] * r));
  }
}

}  // namespace

void rms_norm_inputs(const void* a, const void* b, void* h, float* x, int64_t M, int64_t K, int mode, bool bf16) {
  if (bf16)
    inputs<BFloat16>(a, b, h, x, M, K, mode);
  else
    inputs<Float32>(a, b, h, x, M, K, mode);
}

void rms_norm_outputs(const float* x, const float* mean_sq, const void* weight, void* y, int64_t M, int64_t K,
                      float eps, bool bf16) {
  if (bf16)
    outputs<BFloat16>(x, mean_sq, weight, y, M, K, eps);
  else
    outputs<Float32>(x, mean_sq, weight, y, M, K, eps);
}

}  // namespace bitlab_cpu
