// The int8 GEMV with the residual add, RMSNorm and per-token int8 quantization of its output in the same kernel
// (a decode step's o projection and post_attention_layernorm): one kernel boundary fewer per layer.
//
// Every block runs the one-shot GEMV of bitlab_linear.cuh (one m-tile per block, its warps split K) and stores its
// rows of y; then thread 0 takes a ticket from a counter with an acquire-release atomic after a block barrier (the
// release publishes the block's y; the MLP kernel's grid barrier arrives the same way).  The block that takes the
// last ticket sees every block's y: it resets the counter for the next launch and computes h = T(res + y), writes
// it, and quantizes RMSNorm(h) * w per token into xq and x_scale with norm_quant.cu's bits (bitlab_norm_rows.cuh,
// mode 1).  Only that block does the norm's work; the separate norm kernel it replaces costs a kernel boundary
// (0.84 us with dependent launch on the H200, notes v15) where this costs one atomic round trip.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_linear.cuh"
#include "bitlab_norm_rows.cuh"

namespace bitlab {
namespace {

// Rows (token count x N) whose staged norm (bitlab_norm_rows.cuh: stat, weight, two rows per token) fits the
// default 48 KB of dynamic shared memory: no launch attribute, and room left beside the next kernel's blocks.
constexpr int kNormTailMaxSmem = 48 * 1024;

template <int FMT, typename T>
__global__ void __launch_bounds__(256) gemv_norm_tail_kernel(LinearArgs a, NormTailArgs t, int nchunks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ unsigned int last;
  gemv_oneshot_block<FMT, int8_t, 1, 1, false>(a, nchunks);
  __syncthreads();  // the block's y stores come before thread 0's release; the reduction's shared memory is free
  if (threadIdx.x == 0) {
    unsigned int old;
    asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(old) : "l"(t.counter) : "memory");
    last = old + 1 == gridDim.x;
    if (last) *t.counter = 0u;  // every block has taken its ticket: ready for the next launch
  }
  __syncthreads();
  if (!last) return;
  const NormInputArgs& n = t.norm;
  const NormRowsSmem s = norm_rows_smem(smem_raw, a.M, n.K, reinterpret_cast<unsigned char*>(t.xq), n.K, n.K,
                                        t.x_scale);
  norm_rows_copy_weight(n, s.weight);
  norm_rows_into_x<T>(n, a.M, s, true);
}

// Dynamic shared memory of a launch: the GEMV's cross-warp sums, then (the same bytes) the norm's stage.
int smem_bytes(int M, int N, int kw) {
  const int red = kw > 1 ? kw * 4 * 32 * 4 : 0;  // reduce_warps_and_store: kw warps x one fragment of 4 x 32 int32
  const int stage = norm_rows_stage_bytes(M, N, 1);
  return red > stage ? red : stage;
}

// The GEMV's warps per block, as launch_gemv_oneshot chooses them (int8 activations, one m-tile, one n-tile).
template <int FMT>
int warps_for(int nchunks) {
  constexpr int D = GemvDepth<FMT, int8_t, 1, 1>::value;
  const int kw = nchunks / D;
  return kw < 1 ? 1 : (kw > 8 ? 8 : kw);
}

template <int FMT, typename T>
cudaError_t launch_fmt(const LinearArgs& a, const NormTailArgs& t, cudaStream_t stream) {
  const int nchunks = a.Kp / 128;
  const int kw = warps_for<FMT>(nchunks);
  const int smem = smem_bytes(a.M, a.N, kw);
  if (smem > kNormTailMaxSmem) return cudaErrorInvalidValue;
  const int tiles = (a.N + 127) / 128 * 8;
  return launch_maybe_pdl(gemv_norm_tail_kernel<FMT, T>, dim3(tiles), dim3(32 * kw), static_cast<size_t>(smem), stream,
                          a.pdl != 0, a, t, nchunks);
}

template <typename T>
cudaError_t launch_typed(const LinearArgs& a, const NormTailArgs& t, cudaStream_t stream) {
  switch (a.fmt) {
    case kBinary: return launch_fmt<kBinary, T>(a, t, stream);
    case kTernary: return launch_fmt<kTernary, T>(a, t, stream);
    case kInt2: return launch_fmt<kInt2, T>(a, t, stream);
    case kInt4: return launch_fmt<kInt4, T>(a, t, stream);
    case kInt8: return launch_fmt<kInt8, T>(a, t, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool norm_tail_serves(int M, int N) {
  return M >= 1 && M <= kNormRowsMaxTokens && N >= 8 && N % 8 == 0 && N <= kNormRowsMaxK &&
         norm_rows_stage_bytes(M, N, 1) <= kNormTailMaxSmem;
}

cudaError_t launch_linear_int8_norm_tail(const LinearArgs& a, const NormTailArgs& t, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (!norm_tail_serves(a.M, a.N) || t.norm.K != a.N || t.norm.mode != 1 || a.out_dtype != t.norm.dtype ||
      a.epilogue != kEpilogueNone || t.counter == nullptr)
    return cudaErrorInvalidValue;
  if (t.norm.dtype == kDtypeHalf) return launch_typed<__half>(a, t, stream);
  if (t.norm.dtype == kDtypeBFloat16) return launch_typed<__nv_bfloat16>(a, t, stream);
  return cudaErrorInvalidValue;
}

}  // namespace bitlab
