// One-token (decode) attention of a BitNet layer on the CPU: rotary on the new query and key, the KV-cache write, and
// grouped-query attention over the cache, in two calls around one softmax instead of the ~15 torch operations of
// bitmodels.bitnet.ops.attention's decode branch (whose two small bf16 matmuls alone took ~95 and ~45 us per layer in
// the development machine's decode loop).
//
// For q [B, H, D], new k, v [B, KVH, D], cos, sin [B, D], caches [B, KVH, S, D] and mask [B, S], in dtype T (float32
// or bfloat16), rounding to T where torch's operations do:
//   rotary  r = T(T(x * cos) + T(rot(x) * sin)),  rot(x) = (-x[D/2:], x[:D/2])       (torch's bits)
//   cache   k_cache[b, :, slot] = r(k),  v_cache[b, :, slot] = v
//   scores  s = T(T(r(q) . k_j) * scale) for attended j, -inf elsewhere
//   probs   p = T(softmax_float32(s))                      (the softmax is torch's own, taken by ops.cpp between the calls)
//   out     o = T(sum over attended j of p_j * v_j)
// The dot products and the value sums are added in float32 in this file's order, not in that of torch's bf16 matmul,
// so a score or an output can differ from the torch path's by a unit in T's last place.  Work items are (row, KV
// head) pairs spread over the kernel threads; each computes the G = H / KVH query heads that share its KV head.
#include <cmath>
#include <limits>
#include <type_traits>

#include "bitlab_bf16.h"
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

template <typename D>
using Ptr = const typename D::Storage*;

// The rotary embedding of one head's D values into `out` (float values already rounded to T).
template <typename D>
void rotate(Ptr<D> x, Ptr<D> cos, Ptr<D> sin, int64_t n, float* out) {
  const int64_t half = n / 2;
  for (int64_t d = 0; d < n; ++d) {
    const float rot = d < half ? -D::load(x[d + half]) : D::load(x[d - half]);
    out[d] = D::round(D::round(D::load(x[d]) * D::load(cos[d])) + D::round(rot * D::load(sin[d])));
  }
}

template <typename D>
float dot_scalar(const float* q, Ptr<D> k, int64_t n, int64_t from = 0, float acc = 0.f) {
  for (int64_t d = from; d < n; ++d) acc += q[d] * D::load(k[d]);
  return acc;
}

template <typename D>
void add_scaled_scalar(float* acc, float p, Ptr<D> v, int64_t n, int64_t from = 0) {
  for (int64_t d = from; d < n; ++d) acc[d] += p * D::load(v[d]);
}

#if BITLAB_X86
#define BITLAB_ATTN_AVX2 __attribute__((target("avx2,fma")))

template <typename D>
BITLAB_ATTN_AVX2 inline __m256 load8(Ptr<D> p) {
  if constexpr (std::is_same<D, BFloat16>::value)
    return load_bf16x8(p);
  else
    return _mm256_loadu_ps(p);
}

// Two accumulators of eight lanes, then their sum and a fixed horizontal order.
template <typename D>
BITLAB_ATTN_AVX2 float dot_avx2(const float* q, Ptr<D> k, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8<D>(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8<D>(k + d + 8), a1);
  }
  for (; d + 8 <= n; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8<D>(k + d), a0);
  __m256 s = _mm256_add_ps(a0, a1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return dot_scalar<D>(q, k, n, d, _mm_cvtss_f32(h));
}

template <typename D>
BITLAB_ATTN_AVX2 void add_scaled_avx2(float* acc, float p, Ptr<D> v, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load8<D>(v + d), _mm256_loadu_ps(acc + d)));
  add_scaled_scalar<D>(acc, p, v, n, d);
}
#endif

template <typename D>
float dot(const float* q, Ptr<D> k, int64_t n, bool avx2) {
#if BITLAB_X86
  if (avx2) return dot_avx2<D>(q, k, n);
#endif
  (void)avx2;
  return dot_scalar<D>(q, k, n);
}

template <typename D>
void add_scaled(float* acc, float p, Ptr<D> v, int64_t n, bool avx2) {
#if BITLAB_X86
  if (avx2) return add_scaled_avx2<D>(acc, p, v, n);
#endif
  (void)avx2;
  add_scaled_scalar<D>(acc, p, v, n);
}

template <typename D>
struct Pass {
  const DecodeAttentionArgs& a;
  bool avx2;

  using S = typename D::Storage;
  const S* cache(const void* base, int64_t b, int64_t kv, int64_t j) const {
    return static_cast<const S*>(base) + ((b * a.KVH + kv) * a.S + j) * a.D;
  }
  bool attended(int64_t b, int64_t j) const { return a.mask[b * a.mask_stride + j] != 0; }

  // Rotary + cache write of KV head kv of row b, then the scores of its G query heads.
  void scores(int64_t item) const {
    const int64_t b = item / a.KVH, kv = item % a.KVH, G = a.H / a.KVH, n = a.D;
    const S* cos = static_cast<const S*>(a.cos) + b * a.cos_stride;
    const S* sin = static_cast<const S*>(a.sin) + b * a.sin_stride;
    float* rot = a.q_rot + (b * a.H + kv * G) * n;  // the G rotated query heads of this KV head
    S* kc = const_cast<S*>(cache(a.k_cache, b, kv, a.slot));
    S* vc = const_cast<S*>(cache(a.v_cache, b, kv, a.slot));
    const S* k = static_cast<const S*>(a.k) + b * a.k_stride + kv * n;
    const S* v = static_cast<const S*>(a.v) + b * a.v_stride + kv * n;
    float* krot = a.k_rot + item * n;
    rotate<D>(k, cos, sin, n, krot);
    for (int64_t d = 0; d < n; ++d) {
      kc[d] = D::store(krot[d]);
      vc[d] = v[d];
    }
    for (int64_t g = 0; g < G; ++g) {
      const S* q = static_cast<const S*>(a.q) + b * a.q_stride + (kv * G + g) * n;
      rotate<D>(q, cos, sin, n, rot + g * n);
    }
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < G; ++g) {
      float* s = a.scores + (b * a.H + kv * G + g) * a.S;
      for (int64_t j = 0; j < a.S; ++j)
        s[j] = attended(b, j) ? D::round(D::round(dot<D>(rot + g * n, cache(a.k_cache, b, kv, j), n, avx2)) * a.scale)
                              : neg_inf;
    }
  }

  // out[b, h] = T(sum over attended j of T(p[b, h, j]) * v_j) for the G heads of KV head kv of row b.
  void values(int64_t item) const {
    const int64_t b = item / a.KVH, kv = item % a.KVH, G = a.H / a.KVH, n = a.D;
    float* acc = a.k_rot + item * n;  // the item's scratch row (its rotated key is written by now)
    bool any = false;
    for (int64_t j = 0; j < a.S && !any; ++j) any = attended(b, j);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kv * G + g;
      const float* p = a.probs + (b * a.H + h) * a.S;
      for (int64_t d = 0; d < n; ++d) acc[d] = any ? 0.f : std::numeric_limits<float>::quiet_NaN();  // torch: NaN
      for (int64_t j = 0; j < a.S; ++j)
        if (attended(b, j)) add_scaled<D>(acc, D::round(p[j]), cache(a.v_cache, b, kv, j), n, avx2);
      S* out = static_cast<S*>(a.out) + (b * a.H + h) * n;
      for (int64_t d = 0; d < n; ++d) out[d] = D::store(acc[d]);
    }
  }
};

template <typename D, bool kScores>
void run(const DecodeAttentionArgs& a) {
  const Pass<D> pass{a, BITLAB_X86 && active_isa() >= Isa::Avx2};
  parallel_items(a.B * a.KVH, a.threads,
                 [](void* ctx, int64_t item) {
                   const auto& p = *static_cast<const Pass<D>*>(ctx);
                   if (kScores)
                     p.scores(item);
                   else
                     p.values(item);
                 },
                 const_cast<Pass<D>*>(&pass));
}

}  // namespace

void decode_attention_scores(const DecodeAttentionArgs& a) {
  if (a.bf16)
    run<BFloat16, true>(a);
  else
    run<Float32, true>(a);
}

void decode_attention_values(const DecodeAttentionArgs& a) {
  if (a.bf16)
    run<BFloat16, false>(a);
  else
    run<Float32, false>(a);
}

}  // namespace bitlab_cpu
