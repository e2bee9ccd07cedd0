// BitLab cuda_ext: one-token (decode) grouped-query attention with rotary embedding and the KV-cache
// write, in one kernel.
//
// Replaces, per layer and step, the rotary kernels, the cache writes, the score / softmax / value
// kernels and the split combine of the unfused path.  Grid (B * KVH, nsplit): block (b, h, split)
// takes the G = H / KVH query heads of KV head h and keys [split * KEYS, split * KEYS + KEYS) of
// the cache (KEYS = D / 2; keys after `slot` are never attended in decode and are skipped).
//
//   1. rotate the G queries and the new key (float32, rounded to T as the cache stores it); split 0
//      writes the new key and value at `slot`; every block uses them from shared memory for that key;
//   2. scores: two threads per key (each half of D), q . k in float32, times the softmax scale;
//   3. softmax partial over the block's keys (max m, sum l of exp(s - m)), then acc = sum p v with one
//      thread per output dimension;
//   4. the last block of (b, h) to finish (a counter per (b, h), left at zero again) merges the
//      nsplit partials and writes out [B, H * D] in T.
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

template <typename T, int D>
__global__ void __launch_bounds__(D) decode_attention_kernel(DecodeAttentionArgs a) {
  constexpr int KEYS = D / 2, HALF = D / 2, WARPS = D / 32;
  __shared__ float qs[kDecodeAttentionMaxGroup][2][HALF + 1];  // rotated, scaled queries (+1: no bank conflict)
  __shared__ float kn[D], vn[D];                                // the new key (rotated) and value
  __shared__ float pr[kDecodeAttentionMaxGroup][KEYS];          // scores, then exp(s - m)
  __shared__ float mrow[kDecodeAttentionMaxGroup], lrow[kDecodeAttentionMaxGroup];
  __shared__ int is_last;
  const int bh = blockIdx.x, split = blockIdx.y;
  const int b = bh / a.KVH, h = bh % a.KVH, G = a.H / a.KVH;
  const int d = threadIdx.x, lane = d & 31, warp = d >> 5;
  pdl_launch_dependents();
  pdl_wait();
  const long slot = *a.slot;

  // 1. rotary (x * cos + rotate_half(x) * sin) of the queries and the new key; cache write.
  const T* q = static_cast<const T*>(a.q) + b * a.q_row + static_cast<long>(h) * G * D;
  const T* kx = static_cast<const T*>(a.k) + b * a.k_row + static_cast<long>(h) * D;
  const T* vx = static_cast<const T*>(a.v) + b * a.v_row + static_cast<long>(h) * D;
  const float c = to_float(static_cast<const T*>(a.cos)[static_cast<long>(b) * D + d]);
  const float sn = to_float(static_cast<const T*>(a.sin)[static_cast<long>(b) * D + d]);
  const int pd = d < HALF ? d + HALF : d - HALF;
  const float sign = d < HALF ? -1.f : 1.f;
  for (int g = 0; g < G; ++g) {
    const float r = to_float(q[g * D + d]) * c + sign * to_float(q[g * D + pd]) * sn;
    qs[g][d / HALF][d % HALF] = to_float(from_float<T>(r)) * a.scale;
  }
  const T knew = from_float<T>(to_float(kx[d]) * c + sign * to_float(kx[pd]) * sn);
  kn[d] = to_float(knew);
  vn[d] = to_float(vx[d]);
  T* kc = static_cast<T*>(a.k_cache) + static_cast<long>(bh) * a.S * D;
  T* vc = static_cast<T*>(a.v_cache) + static_cast<long>(bh) * a.S * D;
  if (split == 0) {
    kc[slot * D + d] = knew;
    vc[slot * D + d] = vx[d];
  }
  __syncthreads();

  // 2. scores of the block's keys: thread pair (2 j, 2 j + 1) takes key k0 + j, one half of D each.
  const long k0 = static_cast<long>(split) * KEYS;
  long k1 = k0 + KEYS < a.S ? k0 + KEYS : a.S;
  if (k1 > slot + 1) k1 = slot + 1;
  const int nk = k1 > k0 ? static_cast<int>(k1 - k0) : 0;
  {
    const int j = d >> 1, hf = d & 1;
    const long key = k0 + j;
    const bool valid = j < nk && a.mask[b * a.mask_row + key] != 0;
    float s[kDecodeAttentionMaxGroup];
#pragma unroll
    for (int g = 0; g < kDecodeAttentionMaxGroup; ++g) s[g] = 0.f;
    if (valid) {
      if (key == slot) {
        for (int i = 0; i < HALF; ++i) {
          const float kv = kn[hf * HALF + i];
#pragma unroll
          for (int g = 0; g < kDecodeAttentionMaxGroup; ++g)
            if (g < G) s[g] += qs[g][hf][i] * kv;
        }
      } else {
        const uint4* row = reinterpret_cast<const uint4*>(kc + key * D + hf * HALF);
#pragma unroll
        for (int u = 0; u < HALF / 8; ++u) {
          const uint4 raw = row[u];
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float kv = to_float(e[i]);
#pragma unroll
            for (int g = 0; g < kDecodeAttentionMaxGroup; ++g)
              if (g < G) s[g] += qs[g][hf][u * 8 + i] * kv;
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kDecodeAttentionMaxGroup; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], 1);
    if (hf == 0)
#pragma unroll
      for (int g = 0; g < kDecodeAttentionMaxGroup; ++g)
        if (g < G) pr[g][j] = valid ? s[g] : -INFINITY;
  }
  __syncthreads();

  // 3. softmax partial: warp w takes heads w, w + WARPS, ...
  for (int g = warp; g < G; g += WARPS) {
    float m = -INFINITY;
    for (int j = lane; j < KEYS; j += 32) m = fmaxf(m, pr[g][j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int j = lane; j < KEYS; j += 32) {
      const float p = m == -INFINITY ? 0.f : __expf(pr[g][j] - m);
      pr[g][j] = p;
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
  float acc[kDecodeAttentionMaxGroup];
#pragma unroll
  for (int g = 0; g < kDecodeAttentionMaxGroup; ++g) acc[g] = 0.f;
#pragma unroll 4
  for (int j = 0; j < nk; ++j) {
    const long key = k0 + j;
    const float vv = key == slot ? vn[d] : to_float(vc[key * D + d]);
#pragma unroll
    for (int g = 0; g < kDecodeAttentionMaxGroup; ++g)
      if (g < G) acc[g] += pr[g][j] * vv;
  }

  T* out = static_cast<T*>(a.out) + static_cast<long>(b) * a.H * D + static_cast<long>(h) * G * D;
  if (a.nsplit == 1) {
#pragma unroll
    for (int g = 0; g < kDecodeAttentionMaxGroup; ++g)
      if (g < G) out[g * D + d] = from_float<T>(acc[g] / lrow[g]);
    return;
  }
  // 4. partials [B * KVH, nsplit, G, D + 2] (acc, then m and l); the last block merges them.
  float* w = a.work + (static_cast<long>(bh) * a.nsplit + split) * G * (D + 2);
#pragma unroll
  for (int g = 0; g < kDecodeAttentionMaxGroup; ++g)
    if (g < G) w[g * (D + 2) + d] = acc[g];
  if (d < G) {
    w[d * (D + 2) + D] = mrow[d];
    w[d * (D + 2) + D + 1] = lrow[d];
  }
  __threadfence();
  __syncthreads();
  if (d == 0) is_last = atomicAdd(&a.counters[bh], 1) == a.nsplit - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const float* base = a.work + static_cast<long>(bh) * a.nsplit * G * (D + 2);
  for (int g = 0; g < G; ++g) {
    float M = -INFINITY;
    for (int s = 0; s < a.nsplit; ++s) M = fmaxf(M, __ldcg(base + (s * G + g) * (D + 2) + D));
    float L = 0.f, A = 0.f;
    for (int s = 0; s < a.nsplit; ++s) {
      const float* part = base + (s * G + g) * (D + 2);
      const float ms = __ldcg(part + D);
      if (ms == -INFINITY) continue;
      const float e = __expf(ms - M);
      L += __ldcg(part + D + 1) * e;
      A += __ldcg(part + d) * e;
    }
    out[g * D + d] = from_float<T>(A / L);
  }
  if (d == 0) a.counters[bh] = 0;  // ready for the next call (and the next graph replay)
}

template <typename T, int D>
cudaError_t launch_decode_attention_t(const DecodeAttentionArgs& a, cudaStream_t stream) {
  return launch_maybe_pdl(decode_attention_kernel<T, D>, dim3(a.B * a.KVH, a.nsplit), dim3(D), 0, stream, true, a);
}

}  // namespace

int decode_attention_keys_per_block(int head_dim) { return head_dim / 2; }

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
