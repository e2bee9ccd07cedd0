// BitLab cuda_ext: one-token (decode) grouped-query attention with rotary embedding and the KV-cache
// write, in one kernel (sm_90: thread-block clusters).
//
// Replaces, per layer and step, the rotary kernels, the cache writes, the score / softmax / value
// kernels and the split combine of the unfused path.  One cluster of C blocks per (row b, KV head h),
// 2 D threads per block; a chunk is KEYS = D keys (TPK = 2 threads per key, C <= 8) or, where one wave
// holds a block for every chunk of D / 2 keys, KEYS = D / 2 (TPK = 4, C <= 16: a non-portable cluster
// size); block r of the cluster takes the chunks r, r + C, ... up to the new token at `slot` (later keys
// are never attended in decode):
//
//   0. a chunk's global loads are issued together: each thread's part of its key row, each warp's
//      KEYS / 8 value rows (D / 32 dimensions per lane); they do not depend on `slot`, so the first
//      chunk's loads leave with the rotary inputs and `slot` itself (one round trip); the next chunk's
//      keys are loaded while this chunk's softmax and values run;
//   1. rotate the G = H / KVH queries and the new key (float32, rounded to T as the cache stores it);
//      block 0 writes the new key and value at `slot`; every block takes their T bits from shared memory
//      in place of the (stale) cache row it loaded for `slot`, and runs them through the same code as any key;
//   2. scores: TPK threads per key (each a D / TPK part), q . k in float32 (queries pre-scaled);
//   3. online softmax across the block's chunks (running max m and sum l per head);
//   4. acc = sum p v: each warp over its keys of the chunk, rescaled when m grows;
//   5. the block's warps sum acc in shared memory; each block stores its (m, l) and its sums for every
//      slice of the G x D outputs in the shared memory of the block that merges that slice (distributed
//      shared memory, before the cluster barrier); after it every block merges its slice from its own
//      shared memory and writes out [B, H * D] in T.
//
// Half chunks at batch 1 of BitNet 2B (640 positions: 10 blocks of 64 keys per KV head instead of 5 of
// 128): attention + sub-norm 11.62 -> 10.39 us per layer on the H200; equal at 2 and 4 rows (notes v16).
//
// It lets the next kernel (attn_sub_norm) launch at its start and, when launched as a programmatic
// dependent of the q/k/v projection (bindings.cpp), starts the first chunk's cache loads, which do not
// depend on that kernel, before it waits.
//
// With the q/k/v projection inside (QKV; launch_decode_qkv_attention, one row): the cluster of KV head h
// computes that head's G D query rows, D key rows and D value rows of the fused projection itself.  Block r
// owns m-tiles [r T / C, (r + 1) T / C) of those T = (G + 2) D / 16, copies their weight tiles into shared
// memory before the wait (the weights are written by no kernel), and after it multiplies them by the int8
// input (the int8 GEMV's decode + mma and epilogue rounding: the same q, k, v bits as the projection's kernel)
// and writes the rows into every block of the cluster (distributed shared memory, one cluster barrier).  Steps
// 1-5 then read q, k, v from shared memory.  This takes the projection's kernel, its launch and its output's
// round trip through L2 out of the step.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "bitlab_cp_async.cuh"
#include "bitlab_gemv_bulk.cuh"
#include "bitlab_launch.h"
#include "bitlab_mma.cuh"
#include "bitlab_timeline.cuh"

// 2 D threads per block, two blocks per multiprocessor (registers capped at 128: batch 8 of the
// BitNet 2B shape launches 200 blocks; at one block per multiprocessor that was two waves).
namespace bitlab {
namespace attention_detail {

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

}  // namespace attention_detail

namespace {
using namespace attention_detail;

constexpr int kMaxCluster = 16;  // 9-16 blocks only for chunks of D / 2 keys (non-portable cluster sizes)
constexpr int kMaxPortableCluster = 8;

template <typename T, int D, int G, int TPK>
struct AttentionShared {
  static constexpr int PART = D / TPK, QP = PART + 4;  // +4: the parts on different banks, 16-byte rows
  float qs[G][TPK][QP];   // rotated queries times the softmax scale
  alignas(16) T kn[D];    // the new key (rotated, in T as the cache stores it)
  alignas(16) T vn[D];    // and the new value
  float pr[G][2 * D / TPK];  // a chunk's scores, then exp(s - m)
  float m_run[G], l_run[G], alpha[G];
  float acc[G][D];        // pull merges: the block's sum over its warps (read by the merging blocks)
  float wsum[D / 16][G][D];  // per-warp partial sums before the block sum
  float weight[kMaxCluster][G];
  // Push merge: every block's sums for this block's slice of the G x D outputs ([C][per]) and (m, l).
  float gathered[G * D + kMaxCluster];
  float m_part[kMaxCluster][G], l_part[kMaxCluster][G];
};

// TPK threads per key in the score pass (each a D / TPK part of the row): a chunk is 2 D / TPK keys.
// PUSH: the push merge (below); without it a pull merge, a.merge (for A/B: a kernel of its own, as the pull
// merge's registers made the push kernel spill).
// (G + 2) D rows of the fused q/k/v projection serve KV head h: its local row i is global row qkv_row(i).
template <int D, int G>
__device__ __forceinline__ int qkv_row(int i, int h, int H, int KVH) {
  if (i < G * D) return h * G * D + i;
  if (i < (G + 1) * D) return H * D + h * D + (i - G * D);
  return (H + KVH) * D + h * D + (i - (G + 1) * D);
}

// Dynamic shared memory of the QKV kernel for nt weight tiles per block: the input, the tiles, the warps'
// partial sums.
inline int qkv_smem_bytes(int Kp, int nt, int warps) { return Kp + nt * (Kp / 128) * 512 + warps * nt * 16 * 4; }

template <typename T, int D, int G, int TPK, bool PUSH, bool QKV = false>
__global__ void __launch_bounds__(2 * D, 2) decode_attention_kernel(DecodeAttentionArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int NT = 2 * D, KEYS = NT / TPK, PART = D / TPK, WARPS = NT / 32, DPL = D / 32, KPW = KEYS / WARPS;
  constexpr int KU = PART * sizeof(T) / 16;  // 16-byte loads per part of a key row
  using VRaw = typename RawWords<DPL * sizeof(T)>::type;
  using Shared = AttentionShared<T, D, G, TPK>;
  static_assert(TPK == 2 || TPK == 4, "two or four threads per key");
  static_assert(KPW * WARPS == KEYS && KU >= 1, "whole keys per warp in the value pass");
  __shared__ __align__(16) Shared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.x / C;
  const int b = bh / a.KVH, h = bh % a.KVH;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  BITLAB_TIMELINE_BEGIN(a.k_cache);  // (benchmarks/csrc/attention_timeline.cu)
  BITLAB_STAMP(0);
  pdl_launch_dependents();
  // QKV: this block's m-tiles [qt0, qt0 + nqt) of the cluster's q/k/v rows; their weight tiles leave now.
  constexpr int QTILES = (G + 2) * D / 16;
  __shared__ __align__(16) T qkv_rows[QKV ? (G + 2) * D : 8];  // this step's q, k, v (every block: all rows)
  __shared__ __align__(8) uint64_t qkv_bar[1];
  int qt0 = 0, nqt = 0, qchunks = 0;
  unsigned char *qkv_x = nullptr, *qkv_tiles = nullptr;
  int* qkv_part = nullptr;
  if constexpr (QKV) {
    extern __shared__ __align__(128) unsigned char qkv_dynamic[];
    qt0 = rank * QTILES / C;
    nqt = (rank + 1) * QTILES / C - qt0;
    qchunks = a.Kp / 128;
    const int tile_bytes = qchunks * 512;
    qkv_x = qkv_dynamic;
    qkv_tiles = qkv_dynamic + a.Kp;
    qkv_part = reinterpret_cast<int*>(qkv_tiles + nqt * tile_bytes);
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");  // waited on before the row exchange
    if (t == 0 && nqt > 0) {
      mbar_init(qkv_bar, 1);
      mbar_init_fence();
      mbar_arrive_expect_bytes(qkv_bar, nqt * tile_bytes);
#pragma unroll 1
      for (int lt = 0; lt < nqt; ++lt) {
        const long tile = qkv_row<D, G>((qt0 + lt) * 16, h, a.H, a.KVH) / 16;
        bulk_copy_to_shared(qkv_tiles + lt * tile_bytes, a.wq + tile * qchunks * 128, tile_bytes, qkv_bar);
      }
    }
  }
  T* kc = static_cast<T*>(a.k_cache) + static_cast<long>(bh) * a.S * D;
  T* vc = static_cast<T*>(a.v_cache) + static_cast<long>(bh) * a.S * D;
  const int j = t / TPK, hf = t % TPK;  // score pass: key j of the chunk, part hf of its row

  uint4 kraw[KU];
  VRaw vraw[KPW];
  uint8_t kmask = 0;  // the mask byte of this thread's key
  // Loads of chunk c (keys beyond S read as zeros; keys past slot are loaded but never used).
  auto load_keys = [&](int c) {
    const long k0 = static_cast<long>(c) * KEYS;
    const bool kin = k0 + j < a.S;
#pragma unroll
    for (int u = 0; u < KU; ++u)
      kraw[u] = kin ? reinterpret_cast<const uint4*>(kc + (k0 + j) * D + hf * PART)[u] : make_uint4(0, 0, 0, 0);
  };
  auto load_mask = [&](int c) {
    const long key = static_cast<long>(c) * KEYS + j;
    kmask = key < a.S ? a.mask[b * a.mask_row + key] : 0;
  };
  auto load_values = [&](int c) {
    const long k0 = static_cast<long>(c) * KEYS;
#pragma unroll
    for (int i = 0; i < KPW; ++i) {
      const long kk = k0 + warp * KPW + i;
      vraw[i] = kk < a.S ? *reinterpret_cast<const VRaw*>(vc + kk * D + lane * DPL) : VRaw{};
    }
  };
  // The first chunk's cache rows were written by earlier steps, by no kernel that may still run (the
  // caller's promise with dependent_launch; the row at `slot`, written below, is taken from shared memory):
  // their loads leave before the wait for q, k, v.  The mask may be written in this step: read after it.
  const bool first_chunk = static_cast<long>(rank) * KEYS < a.S;
  if (first_chunk) {
    load_keys(rank);
    load_values(rank);
  }
  BITLAB_STAMP(1);  // the first chunk's loads issued
  pdl_wait();
  BITLAB_STAMP(2);  // the wait returned
  if (first_chunk) load_mask(rank);

  if constexpr (QKV) {
    // 0'. q, k, v of KV head h: the int8 input into shared memory (zeros past K), the block's m-tiles multiplied
    // (warp w takes chunks w, w + WARPS, ... of each tile), then its rows into every block of the cluster.
#pragma unroll 1
    for (int i = t; i < a.Kp / 16; i += NT) {
      uint4 piece;
      if (16 * i + 16 <= a.K) {
        piece = __ldg(reinterpret_cast<const uint4*>(a.xq) + i);
      } else {  // the row's tail: bytes one at a time, zeros past K
        uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int k = 0; k < 16; ++k)
          if (16 * i + k < a.K)
            words[k >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(a.xq[16 * i + k])) << (8 * (k & 3));
        piece = make_uint4(words[0], words[1], words[2], words[3]);
      }
      reinterpret_cast<uint4*>(qkv_x)[i] = piece;
    }
    __syncthreads();  // (also: the tiles' barrier is initialised before any thread waits on it)
    if (nqt > 0) {
      mbar_wait(qkv_bar, 0);
      const int g8 = lane >> 2, t4 = lane & 3;
#pragma unroll 1
      for (int lt = 0; lt < nqt; ++lt) {
        int acc[1][1][1][4] = {};
#pragma unroll 1
        for (int c = warp; c < qchunks; c += WARPS) {
          uint32_t w[1][2 * FormatBits<kTernary>::value];
          load_lane_tile_shared<kTernary>(w[0], qkv_tiles + (static_cast<long>(lt) * qchunks + c) * 512, lane);
          uint32_t xb[1][PathTraits<int8_t>::xwords];
          load_x_shared<int8_t>(xb[0], qkv_x + c * 128, g8 == 0, t4);
          mma_chunk<kTernary, int8_t>(acc, w, xb);
        }
        if (t4 == 0) {  // token 0: rows g8 and g8 + 8 of the tile
          qkv_part[(warp * nqt + lt) * 16 + g8] = acc[0][0][0][0];
          qkv_part[(warp * nqt + lt) * 16 + g8 + 8] = acc[0][0][0][2];
        }
      }
    }
    __syncthreads();
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every block of the cluster has started
    const float xsc = *a.x_scale;
#pragma unroll 1
    for (int idx = t; idx < nqt * 16; idx += NT) {
      const int lt = idx / 16, r = idx % 16, i = (qt0 + lt) * 16 + r;
      int sum = 0;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) sum += qkv_part[(w * nqt + lt) * 16 + r];
      // the int8 GEMV's epilogue (epilogue_value): acc * x_scale, then * w_scale[row], rounded to T
      const float w_scale = a.w_scale[qkv_row<D, G>(i, h, a.H, a.KVH)];
      const T v = from_float<T>(__fmul_rn(__fmul_rn(static_cast<float>(sum), xsc), w_scale));
#pragma unroll 1
      for (int k = 0; k < C; ++k) cluster.map_shared_rank(qkv_rows, k)[i] = v;
    }
    cluster.sync();  // every block holds all (G + 2) D rows
  }

  // 1. rotary (x * cos + rotate_half(x) * sin) of the queries and the new key; cache write.
  const long slot = *a.slot;
  if (t < D) {
    const int d = t;
    const T* q = QKV ? qkv_rows : static_cast<const T*>(a.q) + b * a.q_row + static_cast<long>(h) * G * D;
    const T* kx = QKV ? qkv_rows + G * D : static_cast<const T*>(a.k) + b * a.k_row + static_cast<long>(h) * D;
    const T* vx = QKV ? qkv_rows + (G + 1) * D : static_cast<const T*>(a.v) + b * a.v_row + static_cast<long>(h) * D;
    const float c = to_float(static_cast<const T*>(a.cos)[static_cast<long>(b) * D + d]);
    const float sn = to_float(static_cast<const T*>(a.sin)[static_cast<long>(b) * D + d]);
    constexpr int HALF = D / 2;
    const int pd = d < HALF ? d + HALF : d - HALF;
    const float sign = d < HALF ? -1.f : 1.f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float r = to_float(q[g * D + d]) * c + sign * to_float(q[g * D + pd]) * sn;
      sh.qs[g][d / PART][d % PART] = to_float(from_float<T>(r)) * a.scale;
    }
    const T knew = from_float<T>(to_float(kx[d]) * c + sign * to_float(kx[pd]) * sn);
    const T vnew = vx[d];
    sh.kn[d] = knew;
    sh.vn[d] = vnew;
    if (rank == 0) {
      kc[slot * D + d] = knew;
      vc[slot * D + d] = vnew;
    }
  }
  if (t < G) {
    sh.m_run[t] = -INFINITY;
    sh.l_run[t] = 0.f;
  }
  float acc[G][DPL];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[g][e] = 0.f;
  __syncthreads();
  BITLAB_STAMP(3);  // rotary done, new key and value in shared memory

  const long last = slot < a.S - 1 ? slot : a.S - 1;  // the last attended key
  for (int c = rank; static_cast<long>(c) * KEYS <= last; c += C) {
    if (c != rank) load_values(c);  // (its keys were prefetched during the previous chunk)
    const long k0 = static_cast<long>(c) * KEYS;
    const int nk = static_cast<int>(last - k0 + 1 < KEYS ? last - k0 + 1 : KEYS);
    // 2. scores
    {
      const long key = k0 + j;
      const bool valid = j < nk && kmask != 0;
      float s[G];
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] = 0.f;
      if (valid && key == slot) {  // this step's key: its bits from shared memory (the loaded row is stale)
#pragma unroll
        for (int u = 0; u < KU; ++u) kraw[u] = reinterpret_cast<const uint4*>(sh.kn + hf * PART)[u];
      }
      if (valid) {
#pragma unroll
        for (int u = 0; u < KU; ++u) {
          const T* e = reinterpret_cast<const T*>(&kraw[u]);
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float4 q0 = *reinterpret_cast<const float4*>(&sh.qs[g][hf][u * 8]);
            const float4 q1 = *reinterpret_cast<const float4*>(&sh.qs[g][hf][u * 8 + 4]);
            s[g] += q0.x * to_float(e[0]) + q0.y * to_float(e[1]) + q0.z * to_float(e[2]) + q0.w * to_float(e[3]) +
                    q1.x * to_float(e[4]) + q1.y * to_float(e[5]) + q1.z * to_float(e[6]) + q1.w * to_float(e[7]);
          }
        }
      }
#pragma unroll
      for (int o = 1; o < TPK; o <<= 1)
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
      if (hf == 0)
#pragma unroll
        for (int g = 0; g < G; ++g) sh.pr[g][j] = valid ? s[g] : -INFINITY;
    }
    if (static_cast<long>(c + C) * KEYS <= last) {  // in flight during softmax and values
      load_keys(c + C);
      load_mask(c + C);
    }
    __syncthreads();
    BITLAB_STAMP(4);  // scores of the chunk
    // 3. online softmax: warp w takes heads w, w + WARPS, ...
    for (int g = warp; g < G; g += WARPS) {
      float m = -INFINITY;
      for (int jj = lane; jj < KEYS; jj += 32) m = fmaxf(m, sh.pr[g][jj]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      const float m_old = sh.m_run[g];
      const float m_new = fmaxf(m_old, m);
      float l = 0.f;
      for (int jj = lane; jj < KEYS; jj += 32) {
        const float p = m_new == -INFINITY ? 0.f : __expf(sh.pr[g][jj] - m_new);
        sh.pr[g][jj] = p;
        l += p;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
      __syncwarp();
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
        sh.alpha[g] = alpha;
        sh.l_run[g] = sh.l_run[g] * alpha + l;
        sh.m_run[g] = m_new;
      }
    }
    __syncthreads();
    BITLAB_STAMP(5);  // softmax of the chunk
    // 4. values
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float al = sh.alpha[g];
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[g][e] *= al;
    }
#pragma unroll
    for (int i = 0; i < KPW; ++i) {
      const int jj = warp * KPW + i;
      if (jj < nk) {
        if (k0 + jj == slot) vraw[i] = *reinterpret_cast<const VRaw*>(sh.vn + lane * DPL);  // this step's value
        float vv[DPL];
        raw_to_float<T, DPL>(vraw[i], vv);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float p = sh.pr[g][jj];
#pragma unroll
          for (int e = 0; e < DPL; ++e) acc[g][e] += p * vv[e];
        }
      }
    }
    __syncthreads();  // pr and alpha are rewritten by the next chunk
    BITLAB_STAMP(6);  // values of the chunk
  }

  // 5. the block's sum over its warps, then the cluster's merge: block r merges the slice [r per, (r + 1) per)
  // of the G x D outputs (block 0 all of them with kAttentionMergeBlock0).  Push: before the cluster barrier,
  // each block stores its sums for every slice, and its (m, l), in the merging block's shared memory; after it
  // every block reads only its own, and leaves without a second barrier.  Pull (A/B): each block keeps its
  // sums, and the merging blocks read them after the barrier through distributed shared memory, one round
  // trip for (m, l) and one for the sums, then a second barrier keeps every block alive until all have read.
  // Either way the partial sums are added in the order of r: the outputs are the same bits.
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < DPL; ++e) sh.wsum[warp][g][lane * DPL + e] = acc[g][e];
  __syncthreads();
  BITLAB_STAMP(7);  // per-warp sums stored
  constexpr bool push = PUSH;
  const int per = a.merge == kAttentionMergeBlock0 ? G * D : (G * D + C - 1) / C;
  // push: two iterations per thread, 3.4 KB more of once-run code unrolled (the pull A/B kernels keep the unroll)
#pragma unroll(PUSH ? 1 : 4)
  for (int idx = t; idx < G * D; idx += NT) {
    const int g = idx / D, d = idx % D;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += sh.wsum[w][g][d];
    if (push) {
      const int k = idx / per;
      cluster.map_shared_rank(&sh, k)->gathered[rank * per + idx - k * per] = s;
    } else {
      sh.acc[g][d] = s;
    }
  }
  if (push && t < C * G) {
    Shared* merger = cluster.map_shared_rank(&sh, t / G);
    merger->m_part[rank][t % G] = sh.m_run[t % G];
    merger->l_part[rank][t % G] = sh.l_run[t % G];
  }
  cluster.sync();  // every block's (m, l) and sums are visible where they are merged
  BITLAB_STAMP(8);  // the cluster's partial sums visible
  const int lo = rank * per;
  if (lo < G * D) {
    // thread (g, r) of the first G x 16 threads: the 16 ranks of a head in half a warp (whole warps take
    // part in the shuffles); the max and the weighted sum of l over the ranks by shuffles.
    constexpr int WT = (G * kMaxCluster + 31) / 32 * 32;
    static_assert(WT <= NT, "a thread per (head, rank)");
    if (t < WT) {
      const int g = t / kMaxCluster, r = t % kMaxCluster;
      float m = -INFINITY, l = 0.f;
      if (g < G && r < C) {
        if (push) {
          m = sh.m_part[r][g];
          l = sh.l_part[r][g];
        } else {
          const Shared* other = cluster.map_shared_rank(&sh, r);
          m = other->m_run[g];
          l = other->l_run[g];
        }
      }
      float M = m;
#pragma unroll
      for (int o = kMaxCluster / 2; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
      const float e = m == -INFINITY ? 0.f : __expf(m - M);
      float L = l * e;
#pragma unroll
      for (int o = kMaxCluster / 2; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
      if (g < G) sh.weight[r][g] = m == -INFINITY ? 0.f : e / L;
    }
    __syncthreads();
    BITLAB_STAMP(9);  // the weights of the cluster's blocks
    T* out = static_cast<T*>(a.out) + static_cast<long>(b) * a.H * D + static_cast<long>(h) * G * D;
    const int hi = lo + per < G * D ? lo + per : G * D;
    for (int idx = lo + t; idx < hi; idx += NT) {
      const int g = idx / D, d = idx % D;
      float v = 0.f;
#pragma unroll
      for (int r = 0; r < kMaxCluster; ++r)
        if (r < C) v += (push ? sh.gathered[r * per + idx - lo] : cluster.map_shared_rank(&sh, r)->acc[g][d]) * sh.weight[r][g];
      out[idx] = from_float<T>(v);
    }
  }
  BITLAB_STAMP(10);  // this block's slice merged and written
  if (!push) cluster.sync();  // pull: every block's shared memory stays alive until the others have read it
  BITLAB_STAMP(11);  // the end
#else
  __trap();  // sm_90 only (launch_decode_attention checks the device)
#endif
}

// Blocks per cluster (key chunks split over the cluster): the most (up to max_cluster and the chunk count)
// that keep the grid within one wave of two blocks per multiprocessor, rounded down to a power of two when
// the cluster does not cover every chunk, at least 1 (then one block per (row, KV head) walks its chunks
// alone, no cluster merge).  H100, BitNet 2B heads, 601 keys (5 chunks), attention + sub-norm, us per
// layer (docs/benchmarks/decode_attention.md): batch 1, 5 blocks 11.5 vs 4 15.2; batch 8, 5 blocks (200)
// 16.7 vs 4 21.9; batch 16, 2 blocks 28.5 vs 3 (240 blocks, not one wave) 31.5 vs 5 31.4; batch 32, 1 block
// 41.3 vs 2 41.3 (before, with 5: 92.6 vs 86.8 in the first run, eager norms).
// BITLAB_ATTN_MAX_CLUSTER=1..16 caps it (read per launch, for benchmarks).
inline int attention_cluster_size(int rows_x_heads, int chunks, int max_cluster) {
  int c = 2 * device_sm_count() / (rows_x_heads > 0 ? rows_x_heads : 1);
  if (const char* env = std::getenv("BITLAB_ATTN_MAX_CLUSTER")) {
    const int cap = std::atoi(env);
    if (cap >= 1 && cap < c) c = cap;
  }
  c = c < max_cluster ? c : max_cluster;
  if (c >= chunks) return chunks;
  int pow2 = 1;
  while (2 * pow2 <= c) pow2 *= 2;
  return pow2;
}

template <typename T, int D, int G, int TPK>
cudaError_t launch_decode_attention_tpk(const DecodeAttentionArgs& args, int C, cudaStream_t stream) {
  DecodeAttentionArgs a = args;
  a.merge = env_is("BITLAB_ATTN_MERGE", "spread")   ? kAttentionMergeSpread  // for A/B timing (read per launch)
            : env_is("BITLAB_ATTN_MERGE", "block0") ? kAttentionMergeBlock0
                                                    : kAttentionMergePush;
  ClusterLaunch launch(dim3(a.B * a.KVH * C), C, 0, stream, 2 * D);
  if (a.pdl && device_has_pdl()) launch.as_dependent();
  return a.merge == kAttentionMergePush ? cudaLaunchKernelEx(&launch.cfg, decode_attention_kernel<T, D, G, TPK, true>, a)
                                        : cudaLaunchKernelEx(&launch.cfg, decode_attention_kernel<T, D, G, TPK, false>, a);
}

// Whether clusters of C blocks of the half-chunk kernel can be resident (C > 8 is a non-portable size:
// the kernel must allow it, and the GPU must have C / 2 free multiprocessors in one GPC); cached per C.
template <typename T, int D, int G>
bool large_clusters_fit(int C) {
  static int fits[kMaxCluster + 1] = {};  // 0 unknown, 1 yes, -1 no
  if (C <= kMaxPortableCluster) return true;
  if (fits[C] == 0) {
    const ClusterLaunch launch(dim3(C), C, 0, nullptr, 2 * D);
    auto fits_kernel = [&](auto kernel) {  // (the push and the pull kernel are each allowed the size)
      int n = 0;
      return cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess &&
             cudaOccupancyMaxActiveClusters(&n, kernel, &launch.cfg) == cudaSuccess && n > 0;
    };
    const bool ok = fits_kernel(decode_attention_kernel<T, D, G, 4, true>) && fits_kernel(decode_attention_kernel<T, D, G, 4, false>);
    cudaGetLastError();  // a refused query leaves no error behind for the launch
    fits[C] = ok ? 1 : -1;
  }
  return fits[C] == 1;
}

// Chunks of D keys (two threads per key) or, where one wave holds a block for every chunk of D / 2 keys
// and such a cluster fits, chunks of D / 2 keys (four threads per key: half the keys, loads and math per
// block, up to 16 blocks per cluster).  BITLAB_ATTN_KEYS=full / half forces one (read per launch).
template <typename T, int D, int G>
cudaError_t launch_decode_attention_g(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const int rows = a.B * a.KVH;
  const int chunks = (a.S + D - 1) / D, half_chunks = (a.S + D / 2 - 1) / (D / 2);
  const bool force_full = env_is("BITLAB_ATTN_KEYS", "full"), force_half = env_is("BITLAB_ATTN_KEYS", "half");
  const int C_half = attention_cluster_size(rows, half_chunks, kMaxCluster);
  const bool half = !force_full && (force_half || C_half == half_chunks) && large_clusters_fit<T, D, G>(C_half);
  if (half) return launch_decode_attention_tpk<T, D, G, 4>(a, C_half, stream);
  return launch_decode_attention_tpk<T, D, G, 2>(a, attention_cluster_size(rows, chunks, kMaxPortableCluster), stream);
}

// f(std::integral_constant<int, G>{}) for the group sizes G = H / KVH the kernels are instantiated for, else
// `unserved`: the one dispatch over G of the attention launch and the QKV kernel's layout and launch.
template <typename R, typename F>
R with_group_size(int G, R unserved, F&& f) {
  switch (G) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return unserved;
  }
}

template <typename T, int D>
cudaError_t launch_decode_attention_d(const DecodeAttentionArgs& a, cudaStream_t stream) {
  return with_group_size(a.H / a.KVH, cudaErrorInvalidValue,
                         [&](auto g) { return launch_decode_attention_g<T, D, decltype(g)::value>(a, stream); });
}

// The QKV kernel's layout for one row: the attention kernel's chunk layout and cluster size
// (launch_decode_attention_g), with at least the blocks that hold the cluster's weight tiles within
// kQkvAttentionTileBytes each (more blocks than chunks is allowed: a block past the last chunk adds nothing to the
// merge); past 8 blocks the half-chunk layout (up to 16).  C = 0 where no cluster of that kernel fits.
struct QkvLayout {
  int C = 0, tpk = 0, smem = 0;
};

// Whether clusters of C blocks of the QKV kernel with smem bytes of dynamic shared memory can be resident; the
// kernel's attributes are set on the way (cached per C for the last smem asked).
template <typename T, int D, int G, int TPK>
bool qkv_cluster_fits(int C, int smem) {
  static int fits_smem[kMaxCluster + 1] = {}, fits[kMaxCluster + 1] = {};
  if (fits_smem[C] != smem) {
    auto kernel = decode_attention_kernel<T, D, G, TPK, true, true>;
    bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess &&
              (C <= kMaxPortableCluster ||
               cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess);
    if (ok) {
      const ClusterLaunch launch(dim3(C), C, smem, nullptr, 2 * D);
      int n = 0;
      ok = cudaOccupancyMaxActiveClusters(&n, kernel, &launch.cfg) == cudaSuccess && n > 0;
    }
    cudaGetLastError();  // a refused query leaves no error behind for the launch
    fits[C] = ok ? 1 : -1;
    fits_smem[C] = smem;
  }
  return fits[C] == 1;
}

template <typename T, int D, int G>
QkvLayout qkv_layout(int KVH, int K, int S) {
  constexpr int TILES = (G + 2) * D / 16, WARPS = 2 * D / 32;
  const int Kp = (K + 127) / 128 * 128, tile_bytes = Kp / 128 * 512;
  const int need = (TILES * tile_bytes + kQkvAttentionTileBytes - 1) / kQkvAttentionTileBytes;
  const int chunks = (S + D - 1) / D, half_chunks = (S + D / 2 - 1) / (D / 2);
  const bool force_full = env_is("BITLAB_ATTN_KEYS", "full"), force_half = env_is("BITLAB_ATTN_KEYS", "half");
  const int C_half = attention_cluster_size(KVH, half_chunks, kMaxCluster);
  bool half = !force_full && (force_half || C_half == half_chunks);
  int C = half ? C_half : attention_cluster_size(KVH, chunks, kMaxPortableCluster);
  if (C < need) C = need;
  if (C > kMaxPortableCluster) half = true;
  QkvLayout L;
  if (C > kMaxCluster || C > TILES) return L;
  const int smem = qkv_smem_bytes(Kp, (TILES + C - 1) / C, WARPS);
  if (!(half ? qkv_cluster_fits<T, D, G, 4>(C, smem) : qkv_cluster_fits<T, D, G, 2>(C, smem))) return L;
  L.C = C;
  L.tpk = half ? 4 : 2;
  L.smem = smem;
  return L;
}

template <typename T, int D, int G>
cudaError_t launch_decode_qkv_attention_g(const DecodeAttentionArgs& args, cudaStream_t stream) {
  const QkvLayout L = qkv_layout<T, D, G>(args.KVH, args.K, args.S);
  if (L.C == 0) return cudaErrorNotSupported;
  DecodeAttentionArgs a = args;
  a.merge = kAttentionMergePush;
  ClusterLaunch launch(dim3(a.KVH * L.C), L.C, L.smem, stream, 2 * D);
  if (a.pdl && device_has_pdl()) launch.as_dependent();
  return L.tpk == 4 ? cudaLaunchKernelEx(&launch.cfg, decode_attention_kernel<T, D, G, 4, true, true>, a)
                    : cudaLaunchKernelEx(&launch.cfg, decode_attention_kernel<T, D, G, 2, true, true>, a);
}

// The QKV kernel's dispatch over the head dim and group size (the instantiations launch_decode_attention has):
// its cluster size (0: not served) or its launch.
template <typename T, int D>
int qkv_cluster_d(int G, int KVH, int K, int S) {
  return with_group_size(G, 0, [&](auto g) { return qkv_layout<T, D, decltype(g)::value>(KVH, K, S).C; });
}
template <typename T>
int qkv_cluster_t(int D, int G, int KVH, int K, int S) {
  return D == 128 ? qkv_cluster_d<T, 128>(G, KVH, K, S) : D == 64 ? qkv_cluster_d<T, 64>(G, KVH, K, S) : 0;
}
template <typename T, int D>
cudaError_t launch_qkv_d(const DecodeAttentionArgs& a, cudaStream_t stream) {
  return with_group_size(a.H / a.KVH, cudaErrorInvalidValue,
                         [&](auto g) { return launch_decode_qkv_attention_g<T, D, decltype(g)::value>(a, stream); });
}
template <typename T>
cudaError_t launch_qkv_t(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (a.D == 128) return launch_qkv_d<T, 128>(a, stream);
  return a.D == 64 ? launch_qkv_d<T, 64>(a, stream) : cudaErrorInvalidValue;
}

}  // namespace

int decode_qkv_attention_cluster(int dtype, int H, int KVH, int D, int K, int S) {
  if (device_major() < 9 || KVH < 1 || H % KVH != 0 || K < 1 || S < 1) return 0;
  if (dtype == kDtypeHalf) return qkv_cluster_t<__half>(D, H / KVH, KVH, K, S);
  if (dtype == kDtypeBFloat16) return qkv_cluster_t<__nv_bfloat16>(D, H / KVH, KVH, K, S);
  return 0;
}

cudaError_t launch_decode_qkv_attention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (device_major() < 9) return cudaErrorNotSupported;
  if (a.B != 1 || a.xq == nullptr || a.wq == nullptr || a.Kp % 128 != 0 || a.K < 1 || a.K > a.Kp ||
      a.KVH < 1 || a.H % a.KVH != 0)
    return cudaErrorInvalidValue;
  if (a.dtype == kDtypeHalf) return launch_qkv_t<__half>(a, stream);
  if (a.dtype == kDtypeBFloat16) return launch_qkv_t<__nv_bfloat16>(a, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (device_major() < 9) return cudaErrorNotSupported;
  const bool half = a.dtype == kDtypeHalf;
  if (a.dtype != kDtypeHalf && a.dtype != kDtypeBFloat16) return cudaErrorInvalidValue;
  if (a.D == 128) return half ? launch_decode_attention_d<__half, 128>(a, stream)
                              : launch_decode_attention_d<__nv_bfloat16, 128>(a, stream);
  if (a.D == 64) return half ? launch_decode_attention_d<__half, 64>(a, stream)
                             : launch_decode_attention_d<__nv_bfloat16, 64>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace bitlab
