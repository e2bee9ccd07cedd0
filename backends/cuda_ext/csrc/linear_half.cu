// Float activations in half: decode-to-half mma.sync m16n8k16 (layout: bitlab_mma.cuh).
#include "bitlab_linear.cuh"

namespace bitlab {

cudaError_t launch_linear_bf16(const LinearArgs& args, cudaStream_t stream);  // linear_bf16.cu

cudaError_t launch_linear_float(const LinearArgs& args, int x_dtype, cudaStream_t stream) {
  if (x_dtype == kDtypeHalf) return launch_linear_x<__half>(args, stream);
  if (x_dtype == kDtypeBFloat16) return launch_linear_bf16(args, stream);
  return cudaErrorInvalidValue;
}

}  // namespace bitlab
