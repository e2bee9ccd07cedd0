// The int8 GEMV with the RMSNorm + per-token quantization of its input in the same kernel (a decode step's
// input_layernorm before q/k/v, attn_sub_norm before o): one kernel boundary fewer per norm.
//
// Every block normalizes the whole input itself (M * K <= kNormGemvMaxElements values, a few KB from L2) and
// quantizes it into shared memory (bitlab_norm_rows.cuh: norm_quant.cu's bits), then runs the one-shot GEMV of
// bitlab_linear.cuh (one m-tile per block, the block's warps split K) on x from shared memory, so the result
// has the bits of norm_quant.cu then launch_linear_int8.  The norm's weight is copied before the wait for the
// kernel before this one (no kernel writes it), as are each warp's first weight chunks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_linear.cuh"
#include "bitlab_norm_rows.cuh"

namespace bitlab {
namespace {

// Byte offsets of the block's shared memory: the GEMV's partial sums, the per-token scales, the norm's stage
// (stat, weight, rows), x.
struct NormGemvLayout {
  int xp;  // x row pitch (bytes): +16 so that token rows start on different banks
  int off_scale, off_stage, off_x, bytes;
};

NormGemvLayout make_layout(int M, int K, int Kp, int kw, int mode) {
  NormGemvLayout L = {};
  L.xp = Kp + 16;
  const int red = kw * 4 * 32 * 4;  // reduce_warps_and_store: kw warps x one fragment of 4 x 32 int32
  L.off_scale = (red + 15) / 16 * 16;
  L.off_stage = L.off_scale + kNormRowsMaxTokens * 4;
  L.off_x = L.off_stage + norm_rows_stage_bytes(M, K, mode);
  L.bytes = L.off_x + M * L.xp;
  return L;
}
// The launch attribute: more than any block takes (the most is K = 8192, one row, mode 1, 8 warps: 62.6 KB).
constexpr int kNormGemvMaxSmem = 64 * 1024;

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
  const NormRowsSmem stage = norm_rows_smem(smem_raw + L.off_stage, a.M, n.K, smem_raw + L.off_x, L.xp, a.Kp,
                                            reinterpret_cast<float*>(smem_raw + L.off_scale));
  norm_rows_copy_weight(n, stage.weight);
  pdl_launch_dependents();  // the kernel after this one may start fetching its weights
  pdl_wait();               // the input comes from the kernel before this one

  norm_rows_into_x<T>(n, a.M, stage, blockIdx.x == 0);
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
  out.x_scale = stage.scale;
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
