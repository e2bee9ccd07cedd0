// BitLab cuda_ext: rows of tables gathered by index, several tables in one kernel.
//
// Two users: an embedding table kept off the GPU (BitNet with a quantized lm_head: the float table is then read
// only for the lookup, a few rows per step), whose rows the GPU reads over the bus through the table's mapped
// address; and a decode step's inputs, the embedding row of each token and its rotary cos / sin rows, which
// as torch ops are three kernels at the head of every step (an index_select and two index kernels), here one.
// Each lookup is one kernel on the current stream, so a CUDA graph captures it like any other; values are the
// tables', bit for bit (a copy, no arithmetic).  An index outside [0, rows) stops the kernel with a message, as
// torch's embedding does on CUDA.
#include <stdint.h>
#include <stdio.h>

#include "bitlab_launch.h"

namespace bitlab {
namespace {

constexpr int kGatherThreads = 128;

// Table t's rows copied in units of U bytes.
template <typename U>
__device__ __forceinline__ void copy_row(const RowGather& t, int64_t id, int64_t pos) {
  const int units = static_cast<int>(t.row_bytes / sizeof(U));
  const U* src = static_cast<const U*>(t.table) + id * units;
  U* dst = static_cast<U*>(t.out) + pos * units;
  for (int i = threadIdx.x; i < units; i += kGatherThreads) dst[i] = src[i];
}

// Block (position p, table blockIdx.y): out[p] = table[ids[p]], in 16-byte units where the table's rows and the
// output are 16-byte aligned, else 2-byte units.
__global__ void __launch_bounds__(kGatherThreads) gather_rows_kernel(RowGathers a) {
  const RowGather& t = a.t[blockIdx.y];
  const int64_t id = t.ids[blockIdx.x];
  if (id < 0 || id >= t.rows) {
    if (threadIdx.x == 0)
      printf("cuda_ext gather: index %lld at position %d of table %d is outside [0, %lld)\n",
             static_cast<long long>(id), static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y),
             static_cast<long long>(t.rows));
    __trap();
  }
  const bool wide = t.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(t.table) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(t.out) % 16 == 0;
  if (wide)
    copy_row<uint4>(t, id, blockIdx.x);
  else
    copy_row<uint16_t>(t, id, blockIdx.x);
}

}  // namespace

cudaError_t launch_gather_rows(const RowGathers& gathers, cudaStream_t stream) {
  if (gathers.count == 0) return cudaSuccess;
  if (gathers.count > 0x7fffffff || gathers.n < 1 || gathers.n > kMaxRowGathers) return cudaErrorInvalidValue;
  for (int i = 0; i < gathers.n; ++i)
    if (gathers.t[i].row_bytes % 2 || gathers.t[i].row_bytes / 16 > 0x7fffffff) return cudaErrorInvalidValue;
  gather_rows_kernel<<<dim3(static_cast<unsigned>(gathers.count), gathers.n), kGatherThreads, 0, stream>>>(gathers);
  return cudaGetLastError();
}

cudaError_t launch_gather_host_rows(const void* table, const int64_t* ids, int64_t count, int64_t rows,
                                    int64_t row_bytes, void* out, cudaStream_t stream) {
  RowGathers g = {};
  g.t[0] = {table, ids, rows, row_bytes, out};
  g.n = 1;
  g.count = count;
  return launch_gather_rows(g, stream);
}

}  // namespace bitlab
