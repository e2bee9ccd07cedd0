// BitLab cuda_ext: rows of a table in pinned host memory gathered into GPU memory by index.
//
// For an embedding table kept off the GPU (BitNet with a quantized lm_head: the float table is then read only
// for the lookup, a few rows per step).  The GPU reads the rows over the bus through the table's mapped
// address, so the lookup is one kernel on the current stream and a CUDA graph captures it like any other.
// An index outside [0, rows) stops the kernel with a message, as torch's embedding does on CUDA.
#include <stdint.h>
#include <stdio.h>

#include "bitlab_launch.h"

namespace bitlab {
namespace {

constexpr int kGatherThreads = 128;

// One block per index; each thread copies units of U bytes (16 when every row is 16-byte aligned, else 2).
template <typename U>
__global__ void __launch_bounds__(kGatherThreads) gather_host_rows_kernel(const U* __restrict__ table,
                                                                        const int64_t* __restrict__ ids, int64_t rows,
                                                                        int units_per_row, U* __restrict__ out) {
  const int64_t id = ids[blockIdx.x];
  if (id < 0 || id >= rows) {
    if (threadIdx.x == 0)
      printf("cuda_ext_gather_host_rows: index %lld at position %d is outside [0, %lld)\n",
             static_cast<long long>(id), static_cast<int>(blockIdx.x), static_cast<long long>(rows));
    __trap();
  }
  const U* src = table + id * units_per_row;
  U* dst = out + static_cast<int64_t>(blockIdx.x) * units_per_row;
  for (int i = threadIdx.x; i < units_per_row; i += kGatherThreads) dst[i] = src[i];
}

}  // namespace

cudaError_t launch_gather_host_rows(const void* table, const int64_t* ids, int64_t count, int64_t rows,
                                    int64_t row_bytes, void* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (count > 0x7fffffff || row_bytes % 2) return cudaErrorInvalidValue;
  const bool wide = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(table) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(count)), block(kGatherThreads);
  if (wide)
    gather_host_rows_kernel<uint4><<<grid, block, 0, stream>>>(static_cast<const uint4*>(table), ids, rows,
                                                               static_cast<int>(row_bytes / 16),
                                                               static_cast<uint4*>(out));
  else
    gather_host_rows_kernel<uint16_t><<<grid, block, 0, stream>>>(static_cast<const uint16_t*>(table), ids, rows,
                                                                   static_cast<int>(row_bytes / 2),
                                                                   static_cast<uint16_t*>(out));
  return cudaGetLastError();
}

}  // namespace bitlab
