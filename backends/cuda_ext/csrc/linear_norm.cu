// The int8 GEMV with the RMSNorm + per-token quantization of its input in the same kernel (a decode step's
// input_layernorm before q/k/v, attn_sub_norm before o): one kernel boundary fewer per norm.
//
// Every block normalizes the whole input itself (M * K <= kNormGemvMaxElements values, a few KB from L2) and
// quantizes it into shared memory, then runs the one-shot GEMV of bitlab_linear.cuh (one m-tile per block,
// the block's warps split K) on x from shared memory.  The norm's weight is copied before the wait for the
// kernel before this one (no kernel writes it), as are each warp's first weight chunks.
//
// Same bits as norm_quant.cu then launch_linear_int8: norm_quant's block for a row of K <= 8192 values has
// nw = max(2, ceil(K / 256)) warps, thread i owning piece i (8 columns); its sum of squares is a per-thread
// fma chain over the piece, a xor-shuffle tree per warp, then one xor tree over the nw warp sums.  Here a
// "unit" is (token, one of those nw warps): a warp of this block takes whole units, so each unit's tree is
// the same, and the same single tree adds a token's unit sums.  The maxima need no order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_linear.cuh"
#include "bitlab_norm_math.cuh"

namespace bitlab {
namespace {

// Byte offsets of the block's shared memory.
struct NormGemvLayout {
  int K, Kp, np, nw;  // columns, padded columns, pieces of 8 per row, norm_quant's warps per row
  int xp;             // x row pitch (bytes): +16 so that token rows start on different banks
  int off_stat, off_w, off_r, off_x, bytes;
};

// stat: per-(token, unit) partial results [kNormGemvMaxTokens][32], then per token r (rsqrt), scale, inverse.
constexpr int kStatFloats = kNormGemvMaxTokens * 32 + 3 * kNormGemvMaxTokens;

NormGemvLayout make_layout(int M, int K, int Kp, int kw) {
  NormGemvLayout L = {};
  L.K = K; L.Kp = Kp; L.np = K / 8;
  L.nw = (L.np + 31) / 32 < 2 ? 2 : (L.np + 31) / 32;
  L.xp = Kp + 16;
  const int red = kw * 4 * 32 * 4;  // reduce_warps_and_store: kw warps x one fragment of 4 x 32 int32
  L.off_stat = (red + 15) / 16 * 16;
  L.off_w = L.off_stat + kStatFloats * 4;
  L.off_r = L.off_w + K * 2;
  L.off_x = L.off_r + M * K * 2;
  L.bytes = L.off_x + M * L.xp;
  return L;
}

template <bool kMax>
__device__ __forceinline__ float warp_tree(float v) {  // norm_quant.cu's block_reduce, warp part
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  return v;
}

// Per token, the tree over its nw unit results (lanes past nw add zeros): thread-block wide, warp w takes
// tokens w, w + kw, ...; lane 0 gets the result.
template <bool kMax>
__device__ __forceinline__ float token_tree(const float* stat, int tok, int nw, int lane) {
  return warp_tree<kMax>(lane < nw ? stat[tok * 32 + lane] : 0.f);
}

// x (int8, pitch L.xp, zeros in [K, Kp)) and the per-token scales into shared memory; see the file comment.
template <typename T>
__device__ void norm_rows_into_x(const NormInputArgs& n, int M, const NormGemvLayout& L, unsigned char* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = blockDim.x >> 5;
  float* stat = reinterpret_cast<float*>(smem + L.off_stat);
  float* rnorm = stat + kNormGemvMaxTokens * 32;
  float* scale = rnorm + kNormGemvMaxTokens;
  float* inverse = scale + kNormGemvMaxTokens;
  const uint4* wsm = reinterpret_cast<const uint4*>(smem + L.off_w);
  uint4* rs = reinterpret_cast<uint4*>(smem + L.off_r);  // [M][np] pieces: r, then y
  const uint4* a = static_cast<const uint4*>(n.a);
  const uint4* b = static_cast<const uint4*>(n.b);
  const int units = M * L.nw;

  // Pass 1: r = a or T(a + b) (block 0 writes h), each unit's sum of squares.  Loads of kBatch units first.
  constexpr int kBatch = 4;
  for (int u0 = warp; u0 < units; u0 += kBatch * kw) {
    uint4 va[kBatch], vb[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int u = u0 + j * kw, tok = u / L.nw, piece = (u % L.nw) * 32 + lane;
      if (u < units && piece < L.np) {
        va[j] = __ldcg(a + tok * L.np + piece);
        if (n.mode == 1) vb[j] = __ldcg(b + tok * L.np + piece);
      }
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int u = u0 + j * kw, tok = u / L.nw, piece = (u % L.nw) * 32 + lane;
      if (u >= units) break;  // the same for the whole warp
      float ss = 0.f;
      if (piece < L.np) {
        T* e = reinterpret_cast<T*>(&va[j]);
        const T* d = reinterpret_cast<const T*>(&vb[j]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float x = n.mode == 1 ? round_t<T>(to_f<T>(e[i]) + to_f<T>(d[i])) : to_f<T>(e[i]);
          e[i] = from_f<T>(x);
          ss = __fmaf_rn(x, x, ss);
        }
        rs[tok * L.np + piece] = va[j];
        if (n.mode == 1 && blockIdx.x == 0) static_cast<uint4*>(n.h)[tok * L.np + piece] = va[j];
      }
      ss = warp_tree<false>(ss);
      if (lane == 0) stat[tok * 32 + u % L.nw] = ss;
    }
  }
  cp_async_wait<0>();  // this thread's copies of the norm's weight
  __syncthreads();
  for (int tok = warp; tok < M; tok += kw) {
    const float ss = token_tree<false>(stat, tok, L.nw, lane);
    if (lane == 0) rnorm[tok] = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(L.K)), n.eps));
  }
  __syncthreads();

  // Pass 2: y = T(w * T(r * rsqrt)) in place, each unit's maximum of |y|.
  for (int u = warp; u < units; u += kw) {
    const int tok = u / L.nw, piece = (u % L.nw) * 32 + lane;
    float amax = 0.f;
    if (piece < L.np) {
      uint4 raw = rs[tok * L.np + piece];
      const uint4 wraw = wsm[piece];
      T* e = reinterpret_cast<T*>(&raw);
      const T* w = reinterpret_cast<const T*>(&wraw);
      const float r = rnorm[tok];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float y = rms_normed<T>(to_f<T>(e[i]), r, to_f<T>(w[i]));
        e[i] = from_f<T>(y);
        amax = fmaxf(amax, fabsf(y));
      }
      rs[tok * L.np + piece] = raw;
    }
    amax = warp_tree<true>(amax);
    if (lane == 0) stat[tok * 32 + u % L.nw] = amax;
  }
  __syncthreads();
  for (int tok = warp; tok < M; tok += kw) {
    const float amax = fmaxf(token_tree<true>(stat, tok, L.nw, lane), 1e-5f);
    if (lane == 0) {
      scale[tok] = quant_scale(amax);
      inverse[tok] = quant_inverse(amax);
    }
  }
  __syncthreads();

  // Pass 3: the int8 rows.
  const int row_pieces = L.Kp / 8;
  for (int i = threadIdx.x; i < M * row_pieces; i += blockDim.x) {
    const int tok = i / row_pieces, pc = i % row_pieces;
    uint2 out = make_uint2(0u, 0u);  // zeros past K
    if (pc < L.np) out = quantize_piece<T>(rs[tok * L.np + pc], inverse[tok]);
    *reinterpret_cast<uint2*>(smem + L.off_x + tok * L.xp + 8 * pc) = out;
  }
  __syncthreads();
}

// The lane's int8 activations of one chunk for token row `row` from shared memory (zeros past M).
__device__ __forceinline__ void load_x_chunk_shared(uint32_t (&dst)[8], const unsigned char* xs, int row, int M,
                                                    int pitch, int chunk, int t) {
  if (row < M) {
    const uint4* p = reinterpret_cast<const uint4*>(xs + row * pitch + chunk * 128 + 32 * t);
    const uint4 q0 = p[0], q1 = p[1];
    dst[0] = q0.x; dst[1] = q0.y; dst[2] = q0.z; dst[3] = q0.w;
    dst[4] = q1.x; dst[5] = q1.y; dst[6] = q1.z; dst[7] = q1.w;
  } else {
#pragma unroll
    for (int v = 0; v < 8; ++v) dst[v] = 0u;
  }
}

template <int FMT, typename T>
__global__ void __launch_bounds__(256) gemv_norm_kernel(LinearArgs a, NormInputArgs n, NormGemvLayout L,
                                                        int nchunks) {
  using LT = LaneTile<FMT>;
  constexpr int D = GemvDepth<FMT, int8_t, 1, 1>::value;
  constexpr int S = GemvAccSets<1>::value;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x;

  int accs[S][1][1][4];
  zero_acc_sets(accs);
  uint32_t w[D][1][LT::wpl];
  auto load_w = [&](int c0) {
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (c0 + d < nchunks) load_lane_tile<FMT>(w[d][0], a.wq, static_cast<long>(tile0) * nchunks + c0 + d, lane);
  };
  const int stride = kw * D;
  int c0 = warp * D;
  if (c0 < nchunks) load_w(c0);
  for (int p = threadIdx.x; p < L.np; p += blockDim.x)
    cp_async16(smem_raw + L.off_w + 16 * p, static_cast<const uint4*>(n.weight) + p);
  cp_async_commit();
  pdl_launch_dependents();  // the kernel after this one may start fetching its weights
  pdl_wait();               // the input comes from the kernel before this one

  norm_rows_into_x<T>(n, a.M, L, smem_raw);
  const unsigned char* xs = smem_raw + L.off_x;
  while (c0 < nchunks) {
    uint32_t xb[D][1][8];
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (c0 + d < nchunks) load_x_chunk_shared(xb[d][0], xs, g, a.M, L.xp, c0 + d, t);
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (c0 + d < nchunks) mma_chunk<FMT, int8_t>(accs, w[d], xb[d]);
    c0 += stride;
    if (c0 < nchunks) load_w(c0);
  }

  int acc[1][1][4];
  sum_acc_sets(accs, acc);
  LinearArgs out = a;  // the epilogue's activation scales: this block's, in shared memory
  out.x_scale = reinterpret_cast<const float*>(smem_raw + L.off_stat) + kNormGemvMaxTokens * 33;
  out.x_scale_per_row = 1;
  reduce_warps_and_store(out, acc, reinterpret_cast<int*>(smem_raw), kw, tile0);
}

template <int FMT, typename T>
cudaError_t launch_fmt(const LinearArgs& a, const NormInputArgs& n, cudaStream_t stream) {
  const int nchunks = a.Kp / 128;
  constexpr int D = GemvDepth<FMT, int8_t, 1, 1>::value;
  int kw = nchunks / D;  // warps per block as launch_gemv_oneshot chooses them
  kw = kw < 1 ? 1 : (kw > 8 ? 8 : kw);
  const NormGemvLayout L = make_layout(a.M, n.K, a.Kp, kw);
  const int tiles = (a.N + 127) / 128 * 8;
  return launch_maybe_pdl(gemv_norm_kernel<FMT, T>, dim3(tiles), dim3(32 * kw), static_cast<size_t>(L.bytes), stream,
                          a.pdl != 0, a, n, L, nchunks);
}

template <typename T>
cudaError_t launch_typed(const LinearArgs& a, const NormInputArgs& n, cudaStream_t stream) {
  switch (a.fmt) {
    case kBinary: return launch_fmt<kBinary, T>(a, n, stream);
    case kTernary: return launch_fmt<kTernary, T>(a, n, stream);
    case kInt2: return launch_fmt<kInt2, T>(a, n, stream);
    case kInt4: return launch_fmt<kInt4, T>(a, n, stream);
    case kInt8: return launch_fmt<kInt8, T>(a, n, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool norm_gemv_serves(int M, int K) {
  return M >= 1 && M <= kNormGemvMaxTokens && K >= 8 && K % 8 == 0 && K <= kNormGemvMaxK &&
         M * K <= kNormGemvMaxElements;
}

cudaError_t launch_linear_int8_norm(const LinearArgs& a, const NormInputArgs& n, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (!norm_gemv_serves(a.M, n.K) || a.Kp != (n.K + 127) / 128 * 128 || (n.mode != 0 && n.mode != 1))
    return cudaErrorInvalidValue;
  if (n.dtype == kDtypeHalf) return launch_typed<__half>(a, n, stream);
  if (n.dtype == kDtypeBFloat16) return launch_typed<__nv_bfloat16>(a, n, stream);
  return cudaErrorInvalidValue;
}

}  // namespace bitlab
