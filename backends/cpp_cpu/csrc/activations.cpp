// Activation preparation and CPU feature detection.
//
// Buffers written here (owned by the caller, reused between calls):
//   int8:   q[t * Kp + k], k < K: clamp(round_half_even(x * s_t), -127, 127), zero for K <= k < Kp;
//           s_t = float(float(1 / a_t) * 127) with a_t = max(max|x|, 1e-5f) over the row (per_token)
//           or the whole input (per_tensor) -- bit for bit what bitcore.quantize computes, since
//           torch evaluates `127.0 / amax` as `amax.reciprocal() * 127.0` in float32.
//           scale[t] = a_t / 127, qsum[t] = sum_k q[t, k].
//   float:  out[t * Kp + k] = x[t, k], zero for K <= k < Kp.
//   signs:  bit (k % 64) of bits[t * Kw + k / 64] = (x[t, k] >= 0); padding bits are 0.
//           scale[t] = mean|x| over the row or the whole input (accumulated in double).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <vector>

#include "bitlab_cpu.h"

namespace bitlab_cpu {

// ------------------------------------------------------------------ ISA dispatch
namespace {
int g_override = -1;

bool cpu_has_avx2() {
#if BITLAB_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

// The AVX-512 kernels use 512-bit integer ops (avx512f, avx512bw), vpdpbusd (avx512vnni) and
// its 256-bit form (avx512vl).
bool cpu_has_avx512vnni() {
#if BITLAB_X86
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The 256-bit vpdpbusd of AVX-VNNI (Intel client CPUs since Alder Lake, which lack AVX-512), on top of AVX2.
bool cpu_has_avxvnni() {
#if BITLAB_X86
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
#else
  return false;
#endif
}

int env_isa() {
  const char* v = std::getenv("BITLAB_CPU_ISA");
  if (!v || !*v) return -1;
  if (!std::strcmp(v, "scalar")) return 0;
  if (!std::strcmp(v, "avx2")) return 1;
  if (!std::strcmp(v, "avx512vnni")) return 2;
  if (!std::strcmp(v, "avxvnni")) return 3;
  return -1;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::AvxVnni: return "avxvnni";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

bool supported(int isa) {
  switch (isa) {
    case 0: return true;
    case 1: return cpu_has_avx2();
    case 2: return cpu_has_avx512vnni();
    case 3: return cpu_has_avxvnni();
    default: return false;
  }
}

// Where a requested set is missing, the one below it that the CPU has (avx512vnni -> avxvnni -> avx2 -> scalar).
int clamp_to_cpu(int want) {
  static const int below[] = {-1, 0, 3, 1};  // scalar, avx2, avx512vnni, avxvnni
  while (want > 0 && !supported(want)) want = below[want];
  return want < 0 ? 0 : want;
}
}  // namespace

void set_isa_override(int isa) { g_override = isa; }

Isa active_isa() {
  static const int best = clamp_to_cpu(2);
  static const int from_env = env_isa();
  const int want = g_override >= 0 ? g_override : (from_env >= 0 ? from_env : best);
  return static_cast<Isa>(want > 3 ? best : clamp_to_cpu(want));
}

const char* cpu_features() {
  static char text[160];
#if !BITLAB_X86
  std::snprintf(text, sizeof(text), "not x86: no SIMD kernels (active: scalar)");
#else
  __builtin_cpu_init();
  std::snprintf(text, sizeof(text), "%s%s%s%s%s%s%s%s(active: %s)",
                __builtin_cpu_supports("avx2") ? "avx2 " : "",
                __builtin_cpu_supports("fma") ? "fma " : "",
                __builtin_cpu_supports("popcnt") ? "popcnt " : "",
                __builtin_cpu_supports("avxvnni") ? "avxvnni " : "",
                __builtin_cpu_supports("avx512f") ? "avx512f " : "",
                __builtin_cpu_supports("avx512bw") ? "avx512bw " : "",
                __builtin_cpu_supports("avx512vl") ? "avx512vl " : "",
                __builtin_cpu_supports("avx512vnni") ? "avx512vnni " : "",
                isa_name(active_isa()));
#endif
  return text;
}

// ------------------------------------------------------------------ int8 absmax
namespace {

float row_absmax_scalar(const float* x, int64_t K) {
  float m = 0.0f;
  for (int64_t k = 0; k < K; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
}

int32_t quantize_row_scalar(const float* x, int64_t K, float s, int8_t* q) {
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] * s);  // default rounding mode: half to even
    v = std::min(std::max(v, -127.0f), 127.0f);
    q[k] = static_cast<int8_t>(v);
    sum += q[k];
  }
  return sum;
}

#if BITLAB_X86
__attribute__((target("avx2,fma"))) float row_absmax_avx2(const float* x, int64_t K) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    m0 = _mm256_max_ps(m0, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
    m1 = _mm256_max_ps(m1, _mm256_and_ps(_mm256_loadu_ps(x + k + 8), absmask));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float m = 0.0f;
  for (float v : lanes) m = std::max(m, v);
  for (; k < K; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
}

__attribute__((target("avx2,fma"))) int32_t quantize_row_avx2(const float* x, int64_t K, float s,
                                                              int8_t* q) {
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sum = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {
      __m256 f = _mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), vs);
      f = _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      f = _mm256_min_ps(_mm256_max_ps(f, lo), hi);
      v[i] = _mm256_cvtps_epi32(f);
      sum = _mm256_add_epi32(sum, v[i]);
    }
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(p, order));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  int32_t total = 0;
  for (int32_t v : lanes) total += v;
  return total + quantize_row_scalar(x + k, K - k, s, q + k);
}
#else
float row_absmax_avx2(const float* x, int64_t K) { return row_absmax_scalar(x, K); }
int32_t quantize_row_avx2(const float* x, int64_t K, float s, int8_t* q) { return quantize_row_scalar(x, K, s, q); }
#endif

}  // namespace

void quantize_int8(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, bool per_token,
                   int8_t* q, int32_t* qsum, float* scale, int threads) {
  const bool avx2 = active_isa() >= Isa::Avx2;
  auto absmax = [&](const float* row) { return avx2 ? row_absmax_avx2(row, K) : row_absmax_scalar(row, K); };
  float tensor_amax = 0.0f;
  if (!per_token) {  // the maximum over row chunks, in any order: the same value
    std::vector<float> chunk_amax(static_cast<size_t>((M + kRowChunk - 1) / kRowChunk), 0.0f);
    for_row_chunks(M, threads, [&](int64_t t0, int64_t t1) {
      float m = 0.0f;
      for (int64_t t = t0; t < t1; ++t) m = std::max(m, absmax(x + t * ldx));
      chunk_amax[static_cast<size_t>(t0 / kRowChunk)] = m;
    });
    for (float m : chunk_amax) tensor_amax = std::max(tensor_amax, m);
  }
  for_row_chunks(M, threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = x + t * ldx;
      float a = std::max(per_token ? absmax(row) : tensor_amax, 1e-5f);
      float inv = 1.0f / a;
      float s = inv * 127.0f;
      int8_t* qr = q + t * Kp;
      qsum[t] = avx2 ? quantize_row_avx2(row, K, s, qr) : quantize_row_scalar(row, K, s, qr);
      std::memset(qr + K, 0, static_cast<size_t>(Kp - K));
      scale[t] = a / 127.0f;
    }
  });
}

void pad_float(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* out) {
  for (int64_t t = 0; t < M; ++t) {
    std::memcpy(out + t * Kp, x + t * ldx, sizeof(float) * static_cast<size_t>(K));
    std::memset(out + t * Kp + K, 0, sizeof(float) * static_cast<size_t>(Kp - K));
  }
}

void pack_signs(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kw, bool per_token,
                uint64_t* bits, float* scale) {
  double total = 0.0;
  for (int64_t t = 0; t < M; ++t) {
    const float* row = x + t * ldx;
    uint64_t* out = bits + t * Kw;
    double abs_sum = 0.0;
    for (int64_t w = 0; w < Kw; ++w) {
      uint64_t word = 0;
      const int64_t k0 = w * 64;
      const int64_t n = std::min<int64_t>(64, K - k0);
      for (int64_t i = 0; i < n; ++i) {
        const float v = row[k0 + i];
        word |= static_cast<uint64_t>(v >= 0.0f) << i;
        abs_sum += std::fabs(v);
      }
      out[w] = word;
    }
    scale[t] = static_cast<float>(abs_sum / static_cast<double>(K));
    total += abs_sum;
  }
  if (!per_token) {
    const float s = static_cast<float>(total / (static_cast<double>(K) * static_cast<double>(M)));
    for (int64_t t = 0; t < M; ++t) scale[t] = s;
  }
}

}  // namespace bitlab_cpu
