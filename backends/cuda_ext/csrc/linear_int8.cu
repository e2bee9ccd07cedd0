// int8 activations (W1.58A8, W8A8, ...): int8 mma.sync m16n8k32, exact int32 accumulation
// (layout: bitlab_mma.cuh; activations quantized by quantize.cu).
#include "bitlab_linear.cuh"

namespace bitlab {

cudaError_t launch_linear_int8(const LinearArgs& args, cudaStream_t stream) {
  return launch_linear_x<int8_t>(args, stream);
}

}  // namespace bitlab
