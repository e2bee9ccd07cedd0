// BitLab cuda_ext: one-token (decode) grouped-query attention with rotary embedding and the KV-cache
// write, in one kernel.
//
// Replaces, per layer and step, the rotary kernels, the cache writes, the score / softmax / value
// kernels and the split combine of the unfused path.  Grid (B * KVH, nsplit), 2 D threads per block:
// block (b, h, split) takes the G = H / KVH query heads of KV head h and keys
// [split * D, split * D + D) of the cache (keys after `slot` are never attended in decode: skipped).
//
//   0. every global load is issued first (one round trip): each thread pair's key half-rows, each
//      warp's 16 value rows (D / 32 dimensions per lane), the mask, the rotary inputs;
//   1. rotate the G queries and the new key (float32, rounded to T as the cache stores it); split 0
//      writes the new key and value at `slot`; every block uses them from shared memory for that key;
//   2. scores: two threads per key (each half of D), q . k in float32, times the softmax scale;
//   3. softmax partial over the block's keys (max m, sum l of exp(s - m));
//   4. acc = sum p v: each warp over its 16 keys, the warps summed in shared memory;
//   5. the last block of (b, h) to finish (a counter per (b, h), left at zero again) merges the
//      nsplit partials (their sums loaded while the merge weights are computed) and writes
//      out [B, H * D] in T.
//
// Launched as a programmatic dependent (sm_90): it waits before its first read; it lets the next
// kernel (attn_sub_norm) launch at its start.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"

namespace bitlab {
namespace {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Raw bits of `N` consecutive elements of T (N * sizeof(T) = 4 or 8 bytes).
template <int BYTES> struct RawWords;
template <> struct RawWords<4> { using type = uint32_t; };
template <> struct RawWords<8> { using type = uint2; };

template <typename T, int N>
__device__ __forceinline__ void raw_to_float(const typename RawWords<N * sizeof(T)>::type& raw, float (&out)[N]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(e[i]);
}

template <typename T, int D>
__global__ void __launch_bounds__(2 * D) decode_attention_kernel(DecodeAttentionArgs a) {
  constexpr int NT = 2 * D, KEYS = D, HALF = D / 2, WARPS = NT / 32, DPL = D / 32, KPW = KEYS / WARPS;
  constexpr int G8 = kDecodeAttentionMaxGroup;
  constexpr int KU = HALF * sizeof(T) / 16;  // 16-byte loads per half key row
  using VRaw = typename RawWords<DPL * sizeof(T)>::type;
  static_assert(KPW == 16, "16 keys per warp in the value pass");
  __shared__ float qs[G8][2][HALF + 1];  // rotated, scaled queries (+1: the two halves on different banks)
  __shared__ float kn[D], vn[D];          // the new key (rotated) and value
  __shared__ float pr[G8][KEYS];          // scores, then exp(s - m)
  __shared__ float mrow[G8], lrow[G8];
  __shared__ float scratch[WARPS * G8 * D > 2 * kDecodeAttentionMaxMerge ? WARPS * G8 * D : 2 * kDecodeAttentionMaxMerge];
  __shared__ int is_last;
  const int bh = blockIdx.x, split = blockIdx.y;
  const int b = bh / a.KVH, h = bh % a.KVH, G = a.H / a.KVH;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int d = t < D ? t : t - D;  // the dimension of the rotary and output steps (threads < D)
  if (a.early_trigger) pdl_launch_dependents();
  pdl_wait();
  const long slot = *a.slot;
  const long k0 = static_cast<long>(split) * KEYS;
  long k1 = k0 + KEYS < a.S ? k0 + KEYS : a.S;
  if (k1 > slot + 1) k1 = slot + 1;  // decode never attends past the new token
  const int nk = k1 > k0 ? static_cast<int>(k1 - k0) : 0;
  T* kc = static_cast<T*>(a.k_cache) + static_cast<long>(bh) * a.S * D;
  T* vc = static_cast<T*>(a.v_cache) + static_cast<long>(bh) * a.S * D;

  // Every global load first (one round trip): the thread pair's key half-row for the scores, the
  // warp's 16 value rows (DPL dims per lane) for the output, the mask, the rotary inputs.
  const int j = t >> 1, hf = t & 1;
  const long key = k0 + j;
  uint4 kraw[KU];
  const bool k_cached = j < nk && key != slot;
#pragma unroll
  for (int u = 0; u < KU; ++u)
    kraw[u] = k_cached ? reinterpret_cast<const uint4*>(kc + key * D + hf * HALF)[u] : make_uint4(0, 0, 0, 0);
  const bool valid = j < nk && a.mask[b * a.mask_row + key] != 0;
  VRaw vraw[KPW];
#pragma unroll
  for (int i = 0; i < KPW; ++i) {
    const int jj = warp * KPW + i;
    const long kk = k0 + jj;
    vraw[i] = (jj < nk && kk != slot) ? *reinterpret_cast<const VRaw*>(vc + kk * D + lane * DPL) : VRaw{};
  }

  // 1. rotary (x * cos + rotate_half(x) * sin) of the queries and the new key; cache write.
  if (t < D) {
  const T* q = static_cast<const T*>(a.q) + b * a.q_row + static_cast<long>(h) * G * D;
  const T* kx = static_cast<const T*>(a.k) + b * a.k_row + static_cast<long>(h) * D;
  const T* vx = static_cast<const T*>(a.v) + b * a.v_row + static_cast<long>(h) * D;
  const float c = to_float(static_cast<const T*>(a.cos)[static_cast<long>(b) * D + d]);
  const float sn = to_float(static_cast<const T*>(a.sin)[static_cast<long>(b) * D + d]);
  const int pd = d < HALF ? d + HALF : d - HALF;
  const float sign = d < HALF ? -1.f : 1.f;
#pragma unroll
  for (int g = 0; g < G8; ++g)
    if (g < G) {
      const float r = to_float(q[g * D + d]) * c + sign * to_float(q[g * D + pd]) * sn;
      qs[g][d / HALF][d % HALF] = to_float(from_float<T>(r)) * a.scale;
    }
  const T knew = from_float<T>(to_float(kx[d]) * c + sign * to_float(kx[pd]) * sn);
  const T vnew = vx[d];
  kn[d] = to_float(knew);
  vn[d] = to_float(vnew);
  if (split == 0) {
    kc[slot * D + d] = knew;
    vc[slot * D + d] = vnew;
  }
  }
  __syncthreads();

  // 2. scores: thread pair (2 j, 2 j + 1) takes key k0 + j, one half of D each.
  {
    float s[G8];
#pragma unroll
    for (int g = 0; g < G8; ++g) s[g] = 0.f;
    if (valid && key == slot) {
      for (int i = 0; i < HALF; ++i) {
        const float kv = kn[hf * HALF + i];
#pragma unroll
        for (int g = 0; g < G8; ++g)
          if (g < G) s[g] += qs[g][hf][i] * kv;
      }
    } else if (valid) {
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const T* e = reinterpret_cast<const T*>(&kraw[u]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float kv = to_float(e[i]);
#pragma unroll
          for (int g = 0; g < G8; ++g)
            if (g < G) s[g] += qs[g][hf][u * 8 + i] * kv;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < G8; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], 1);
    if (hf == 0)
#pragma unroll
      for (int g = 0; g < G8; ++g)
        if (g < G) pr[g][j] = valid ? s[g] : -INFINITY;
  }
  __syncthreads();

  // 3. softmax partial: warp w takes heads w, w + WARPS, ...
  for (int g = warp; g < G; g += WARPS) {
    float m = -INFINITY;
    for (int jj = lane; jj < KEYS; jj += 32) m = fmaxf(m, pr[g][jj]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int jj = lane; jj < KEYS; jj += 32) {
      const float p = m == -INFINITY ? 0.f : __expf(pr[g][jj] - m);
      pr[g][jj] = p;
      l += p;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      mrow[g] = m;
      lrow[g] = l;
    }
  }
  __syncthreads();

  // 4. values: warp w sums its 16 keys for the lane's DPL dimensions; the warps meet in shared memory.
  float acc[G8][DPL];
#pragma unroll
  for (int g = 0; g < G8; ++g)
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[g][e] = 0.f;
#pragma unroll
  for (int i = 0; i < KPW; ++i) {
    const int jj = warp * KPW + i;
    if (jj < nk) {
      float vv[DPL];
      if (k0 + jj == slot) {
#pragma unroll
        for (int e = 0; e < DPL; ++e) vv[e] = vn[lane * DPL + e];
      } else {
        raw_to_float<T, DPL>(vraw[i], vv);
      }
#pragma unroll
      for (int g = 0; g < G8; ++g)
        if (g < G) {
          const float p = pr[g][jj];
#pragma unroll
          for (int e = 0; e < DPL; ++e) acc[g][e] += p * vv[e];
        }
    }
  }
#pragma unroll
  for (int g = 0; g < G8; ++g)
    if (g < G)
#pragma unroll
      for (int e = 0; e < DPL; ++e) scratch[(warp * G8 + g) * D + lane * DPL + e] = acc[g][e];
  __syncthreads();
  float total[G8];
#pragma unroll
  for (int g = 0; g < G8; ++g) {
    total[g] = 0.f;
    if (g < G)
#pragma unroll
      for (int w = 0; w < WARPS; ++w) total[g] += scratch[(w * G8 + g) * D + d];
  }

  T* out = static_cast<T*>(a.out) + static_cast<long>(b) * a.H * D + static_cast<long>(h) * G * D;
  if (a.nsplit == 1) {
    if (t < D)
#pragma unroll
      for (int g = 0; g < G8; ++g)
        if (g < G) out[g * D + d] = from_float<T>(total[g] / lrow[g]);
    if (!a.early_trigger) pdl_launch_dependents();
    return;
  }
  // 5. partials [B * KVH, nsplit, G, D + 2] (acc, then m and l); the last block of (b, h) merges them.
  float* w = a.work + (static_cast<long>(bh) * a.nsplit + split) * G * (D + 2);
  if (t < D)
#pragma unroll
    for (int g = 0; g < G8; ++g)
      if (g < G) w[g * (D + 2) + d] = total[g];
  if (t < G) {
    w[t * (D + 2) + D] = mrow[t];
    w[t * (D + 2) + D + 1] = lrow[t];
  }
  __threadfence();
  __syncthreads();
  if (t == 0) is_last = atomicAdd(&a.counters[bh], 1) == a.nsplit - 1;
  __syncthreads();
  if (!is_last) {
    if (!a.early_trigger) pdl_launch_dependents();
    return;
  }
  __threadfence();
  // Merge: the first MB splits' partial sums are loaded before (and while) the weights are computed.
  constexpr int MB = 8;
  const float* base = a.work + static_cast<long>(bh) * a.nsplit * G * (D + 2);
  const int dd = t & (D - 1), half_split = t >= D;  // two threads per dimension: even / odd splits
  float part[MB / 2][G8];
#pragma unroll
  for (int u = 0; u < MB / 2; ++u)
#pragma unroll
    for (int g = 0; g < G8; ++g) {
      const int sp = 2 * u + half_split;
      part[u][g] = (g < G && sp < a.nsplit) ? __ldcg(base + (sp * G + g) * (D + 2) + dd) : 0.f;
    }
  const int parts = a.nsplit * G;  // <= kDecodeAttentionMaxMerge (checked on the host)
  float* pm = scratch;                              // m of (split, head), then its merge weight
  float* pl = scratch + kDecodeAttentionMaxMerge;   // l of (split, head)
  for (int i = t; i < parts; i += NT) {
    pm[i] = __ldcg(base + i * (D + 2) + D);
    pl[i] = __ldcg(base + i * (D + 2) + D + 1);
  }
  __syncthreads();
  if (t < G) {
    float M = -INFINITY;
    for (int sp = 0; sp < a.nsplit; ++sp) M = fmaxf(M, pm[sp * G + t]);
    float L = 0.f;
    for (int sp = 0; sp < a.nsplit; ++sp) {
      const float ms = pm[sp * G + t];
      if (ms != -INFINITY) L += pl[sp * G + t] * __expf(ms - M);
    }
    mrow[t] = M;
    lrow[t] = L;
  }
  __syncthreads();
  for (int i = t; i < parts; i += NT) {
    const int g = i % G;
    pm[i] = pm[i] == -INFINITY ? 0.f : __expf(pm[i] - mrow[g]) / lrow[g];
  }
  __syncthreads();
  float A[G8];
#pragma unroll
  for (int g = 0; g < G8; ++g) {
    A[g] = 0.f;
#pragma unroll
    for (int u = 0; u < MB / 2; ++u) {
      const int sp = 2 * u + half_split;
      if (g < G && sp < a.nsplit) A[g] += part[u][g] * pm[sp * G + g];
    }
  }
  for (int s0 = MB; s0 < a.nsplit; s0 += MB) {  // long caches: further batches of MB splits
#pragma unroll
    for (int u = 0; u < MB / 2; ++u)
#pragma unroll
      for (int g = 0; g < G8; ++g) {
        const int sp = s0 + 2 * u + half_split;
        part[u][g] = (g < G && sp < a.nsplit) ? __ldcg(base + (sp * G + g) * (D + 2) + dd) : 0.f;
      }
#pragma unroll
    for (int g = 0; g < G8; ++g)
#pragma unroll
      for (int u = 0; u < MB / 2; ++u) {
        const int sp = s0 + 2 * u + half_split;
        if (g < G && sp < a.nsplit) A[g] += part[u][g] * pm[sp * G + g];
      }
  }
  // the odd-split half hands its sums to the even-split thread of the same dimension
  __syncthreads();
  if (half_split)
#pragma unroll
    for (int g = 0; g < G8; ++g)
      if (g < G) scratch[g * D + dd] = A[g];
  __syncthreads();
  if (!half_split)
#pragma unroll
    for (int g = 0; g < G8; ++g)
      if (g < G) out[g * D + dd] = from_float<T>(A[g] + scratch[g * D + dd]);
  if (t == 0) a.counters[bh] = 0;  // ready for the next call (and the next graph replay)
  if (!a.early_trigger) pdl_launch_dependents();
}

template <typename T, int D>
cudaError_t launch_decode_attention_t(const DecodeAttentionArgs& a, cudaStream_t stream) {
  return launch_maybe_pdl(decode_attention_kernel<T, D>, dim3(a.B * a.KVH, a.nsplit), dim3(2 * D), 0, stream,
                          a.pdl != 0, a);
}

}  // namespace

int decode_attention_keys_per_block(int head_dim) { return head_dim; }

cudaError_t launch_decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  const bool half = a.dtype == kDtypeHalf;
  if (a.dtype != kDtypeHalf && a.dtype != kDtypeBFloat16) return cudaErrorInvalidValue;
  if (a.D == 128) return half ? launch_decode_attention_t<__half, 128>(a, stream)
                              : launch_decode_attention_t<__nv_bfloat16, 128>(a, stream);
  if (a.D == 64) return half ? launch_decode_attention_t<__half, 64>(a, stream)
                             : launch_decode_attention_t<__nv_bfloat16, 64>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace bitlab
