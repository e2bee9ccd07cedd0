// int8 activations (W1.58A8, W8A8, ...): int8 mma.sync m16n8k32, exact int32 accumulation
// (layout: bitlab_mma.cuh; activations quantized by quantize.cu).
#include "bitlab_linear.cuh"

namespace bitlab {

cudaError_t launch_linear_int8(const LinearArgs& args, cudaStream_t stream) {
  return launch_linear_x<int8_t>(args, stream);
}

// launch_linear_fmt's 17-64-token branch, asked from the host (bindings.cpp, gemm_on_cublas).
bool wide_gemv_runs(int M, int nchunks, bool int8_activations) {
  if (M <= 16 || M > kClusterWideMaxTokens) return false;
  const GemvChoice choice = gemv_choice();
  if (choice != kGemvAuto && choice != kGemvCluster) return false;
  return int8_activations ? cluster_gemv_fits<int8_t>(M, nchunks) : cluster_gemv_fits<__half>(M, nchunks);
}

}  // namespace bitlab
