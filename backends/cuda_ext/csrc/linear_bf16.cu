// Float activations in bfloat16: decode-to-bf16 mma.sync m16n8k16 (layout: bitlab_mma.cuh).
#include "bitlab_linear.cuh"

namespace bitlab {

cudaError_t launch_linear_bf16(const LinearArgs& args, cudaStream_t stream) {
  return launch_linear_x<__nv_bfloat16>(args, stream);
}

}  // namespace bitlab
