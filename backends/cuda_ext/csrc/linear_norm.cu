// The int8 one-shot GEMV that normalizes its own input: RMSNorm (+ residual add or squared-ReLU
// gate) and per-token int8 quantization in every block's prologue, then the W*A8 product.
//
// Why: at decode sizes a separate norm + quantization kernel costs a kernel boundary per
// projection (the GEMV waits for the norm grid to finish and then re-reads its output), four per
// BitNet layer.  Here each block recomputes the norm of the M <= 8 input rows (2560-6912 values
// per row, read from L2 by every block) while its first weight loads are in flight.  Past a few
// tokens that redundant work grows with M x K per block, so callers keep the two-kernel path for
// larger batches (measured in docs/bitnet.md).
#include "bitlab_linear.cuh"

namespace bitlab {
namespace {

template <int FMT>
cudaError_t launch_norm_fmt(const LinearArgs& a, const NormInputArgs& n, cudaStream_t stream) {
  const int nchunks = a.Kp / 128;
  const int tiles = (a.N + 127) / 128 * 8;
  // Two m-tiles per block as the plain one-shot GEMV chooses them (launch_linear_fmt).
  if (2 * tiles >= 3 * 2 * device_sm_count())
    return launch_gemv_oneshot<FMT, int8_t, 2, 1, true>(a, nchunks, stream, n);
  return launch_gemv_oneshot<FMT, int8_t, 1, 1, true>(a, nchunks, stream, n);
}

}  // namespace

cudaError_t launch_linear_norm_int8(const LinearArgs& a, const NormInputArgs& n, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.M > kNormGemvMaxTokens || n.K < 1 || n.K > kNormQuantMaxK || a.Kp < n.K || a.Kp % 128 != 0)
    return cudaErrorInvalidValue;
  if (n.dtype != kDtypeHalf && n.dtype != kDtypeBFloat16) return cudaErrorInvalidValue;
  switch (a.fmt) {
    case kBinary: return launch_norm_fmt<kBinary>(a, n, stream);
    case kTernary: return launch_norm_fmt<kTernary>(a, n, stream);
    case kInt2: return launch_norm_fmt<kInt2>(a, n, stream);
    case kInt4: return launch_norm_fmt<kInt4>(a, n, stream);
    case kInt8: return launch_norm_fmt<kInt8>(a, n, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace bitlab
