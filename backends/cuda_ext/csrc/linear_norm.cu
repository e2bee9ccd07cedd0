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
  int off_stat, off_w, off_a, off_b, off_x, bytes;
};

// stat (floats): per-(token, unit) sums of squares [kNormGemvMaxTokens][32], then maxima of |y| (same shape), the
// epilogue's per-token scales [kNormGemvMaxTokens], each warp's per-token inverse steps [8 warps][tokens].
constexpr int kStatSums = 0, kStatMax = kNormGemvMaxTokens * 32, kStatScale = 2 * kStatMax;
constexpr int kStatInverse = kStatScale + kNormGemvMaxTokens;
constexpr int kStatFloats = kStatInverse + 8 * kNormGemvMaxTokens;

NormGemvLayout make_layout(int M, int K, int Kp, int kw, int mode) {
  NormGemvLayout L = {};
  L.K = K; L.Kp = Kp; L.np = K / 8;
  L.nw = (L.np + 31) / 32 < 2 ? 2 : (L.np + 31) / 32;
  L.xp = Kp + 16;
  const int red = kw * 4 * 32 * 4;  // reduce_warps_and_store: kw warps x one fragment of 4 x 32 int32
  L.off_stat = (red + 15) / 16 * 16;
  L.off_w = L.off_stat + kStatFloats * 4;
  L.off_a = L.off_w + K * 2;                       // the rows a (then r, then y), T
  L.off_b = L.off_a + M * K * 2;                   // the rows b (mode 1)
  L.off_x = L.off_b + (mode == 1 ? M * K * 2 : 0);
  L.bytes = L.off_x + M * L.xp;
  return L;
}
// The launch attribute: more than any block takes (the most is K = 8192, one row, mode 1, 8 warps: 62.3 KB).
constexpr int kNormGemvMaxSmem = 64 * 1024;

template <bool kMax>
__device__ __forceinline__ float warp_tree(float v) {  // norm_quant.cu's block_reduce, warp part
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  return v;
}

// A token's result: the tree over its nw unit results (lanes past nw add zeros); every lane gets it (a xor
// tree adds the same pairs in every lane, and float addition commutes).
template <bool kMax>
__device__ __forceinline__ float token_tree(const float* units, int tok, int nw, int lane) {
  return warp_tree<kMax>(lane < nw ? units[tok * 32 + lane] : 0.f);
}

// x (int8, pitch L.xp, zeros in [K, Kp)) and the per-token scales into shared memory; see the file comment.
// The code runs once per launch, so its loops stay rolled (its size costs instruction fetches); the rows
// arrive by cp.async (each thread's own pieces: no barrier before it uses them), three block barriers in all.
template <typename T>
__device__ void norm_rows_into_x(const NormInputArgs& n, int M, const NormGemvLayout& L, unsigned char* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = blockDim.x >> 5;
  float* stat = reinterpret_cast<float*>(smem + L.off_stat);
  uint4* ra = reinterpret_cast<uint4*>(smem + L.off_a);  // [M][np] pieces: a, then r, then y
  const uint4* rb = reinterpret_cast<const uint4*>(smem + L.off_b);
  const uint4* wsm = reinterpret_cast<const uint4*>(smem + L.off_w);

  // A unit (tok, v): pieces 32 v + lane of row tok; warp w takes units v = w, w + kw, ... of every row.
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
    for (int v = warp; v < L.nw; v += kw) {  // this thread's pieces of the rows, all in flight at once
      const int piece = 32 * v + lane, at = tok * L.np + piece;
      if (piece < L.np) {
        cp_async16(ra + at, static_cast<const uint4*>(n.a) + at);
        if (n.mode == 1) cp_async16(smem + L.off_b + 16 * at, static_cast<const uint4*>(n.b) + at);
      }
    }
  cp_async_commit();
  cp_async_wait<0>();  // this thread's copies (and, from before the wait, its pieces of the norm's weight)

  // Pass 1: r = a or T(a + b) in place (block 0 writes h), each unit's sum of squares.
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
  for (int v = warp; v < L.nw; v += kw) {
    const int piece = 32 * v + lane, at = tok * L.np + piece;
    float ss = 0.f;
    if (piece < L.np) {
      uint4 va = ra[at];
      const uint4 vb = n.mode == 1 ? rb[at] : va;
      T* e = reinterpret_cast<T*>(&va);
      const T* d = reinterpret_cast<const T*>(&vb);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float x = n.mode == 1 ? round_t<T>(to_f<T>(e[i]) + to_f<T>(d[i])) : to_f<T>(e[i]);
        e[i] = from_f<T>(x);
        ss = __fmaf_rn(x, x, ss);
      }
      if (n.mode == 1) {
        ra[at] = va;
        if (blockIdx.x == 0) static_cast<uint4*>(n.h)[at] = va;
      }
    }
    ss = warp_tree<false>(ss);
    if (lane == 0) stat[kStatSums + tok * 32 + v] = ss;
  }
  __syncthreads();

  // Pass 2: y = T(w * T(r * rsqrt(mean + eps))) in place, each unit's maximum of |y|.
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
  for (int v = warp; v < L.nw; v += kw) {
    const int piece = 32 * v + lane, at = tok * L.np + piece;
    const float ss = token_tree<false>(stat + kStatSums, tok, L.nw, lane);
    const float r = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(L.K)), n.eps));
    float amax = 0.f;
    if (piece < L.np) {
      uint4 raw = ra[at];
      const uint4 wraw = wsm[piece];
      T* e = reinterpret_cast<T*>(&raw);
      const T* w = reinterpret_cast<const T*>(&wraw);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float y = rms_normed<T>(to_f<T>(e[i]), r, to_f<T>(w[i]));
        e[i] = from_f<T>(y);
        amax = fmaxf(amax, fabsf(y));
      }
      ra[at] = raw;
    }
    amax = warp_tree<true>(amax);
    if (lane == 0) stat[kStatMax + tok * 32 + v] = amax;
  }
  __syncthreads();

  // Each warp's inverse steps per token (warp 0 also stores the scales for the epilogue), then the int8 rows.
  float* inverse = stat + kStatInverse + warp * kNormGemvMaxTokens;
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok) {
    const float amax = fmaxf(token_tree<true>(stat + kStatMax, tok, L.nw, lane), 1e-5f);
    if (lane == 0) {
      inverse[tok] = quant_inverse(amax);
      if (warp == 0) stat[kStatScale + tok] = quant_scale(amax);
    }
  }
  __syncwarp();
  const int row_pieces = L.Kp / 8;
#pragma unroll 1
  for (int tok = 0; tok < M; ++tok)
#pragma unroll 1
  for (int pc = threadIdx.x; pc < row_pieces; pc += blockDim.x) {
    const uint2 out = pc < L.np ? quantize_piece<T>(ra[tok * L.np + pc], inverse[tok]) : make_uint2(0u, 0u);
    *reinterpret_cast<uint2*>(smem + L.off_x + tok * L.xp + 8 * pc) = out;  // zeros past K
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
  out.x_scale = reinterpret_cast<const float*>(smem_raw + L.off_stat) + kStatScale;
  out.x_scale_per_row = 1;
  reduce_warps_and_store(out, acc, reinterpret_cast<int*>(smem_raw), kw, tile0);
}

template <int FMT, typename T>
cudaError_t launch_fmt(const LinearArgs& a, const NormInputArgs& n, cudaStream_t stream) {
  const int nchunks = a.Kp / 128;
  constexpr int D = GemvDepth<FMT, int8_t, 1, 1>::value;
  int kw = nchunks / D;  // warps per block as launch_gemv_oneshot chooses them
  kw = kw < 1 ? 1 : (kw > 8 ? 8 : kw);
  const NormGemvLayout L = make_layout(a.M, n.K, a.Kp, kw, n.mode);
  if (L.bytes > kNormGemvMaxSmem) return cudaErrorInvalidValue;
  static bool configured = false;  // per instantiation: past 48 KB the kernel needs the attribute
  if (!configured) {
    const cudaError_t err = cudaFuncSetAttribute(gemv_norm_kernel<FMT, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 kNormGemvMaxSmem);
    if (err != cudaSuccess) return err;
    configured = true;
  }
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
