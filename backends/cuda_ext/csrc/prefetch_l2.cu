// BitLab cuda_ext: bring byte ranges into the L2 cache ahead of use (fire and forget).
//
// A decode step at one token is a chain of short kernels that each wait for their input and then for their
// weights; DRAM is mostly idle between them.  This kernel, launched on a side stream (a parallel branch of the
// captured step), asks the L2 for a later layer's weights and KV cache while the current layer computes, so the
// later kernels read them from L2.  sm_90: cp.async.bulk.prefetch.L2 per 64 KB piece (16-byte aligned, sizes a
// multiple of 16); sm_80: prefetch.global.L2 per 128-byte line.  Nothing is written; a wrong address range is
// the caller's bug (ranges come from tensors' storage).
#include <cuda_runtime.h>
#include <stdint.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"

namespace bitlab {
namespace {

// 32 KB per instruction, a few per warp, one warp per multiprocessor: a single multiprocessor's copy engine
// moves only ~0.2 TB/s (measured on the H200: 17 MB from two blocks took ~80 us), so the pieces are spread.
constexpr long long kPrefetchPiece = 1 << 15;
constexpr int kPrefetchThreads = 32;

// IN_CHAIN: launched as a programmatic dependent in the stream's chain of kernels, it issues its prefetches at
// once, lets the next kernel launch, and completes only after the kernel before it (so the next kernel's wait
// still covers that kernel's output).
template <bool IN_CHAIN>
__global__ void __launch_bounds__(kPrefetchThreads) prefetch_l2_kernel(PrefetchL2Args a) {
  const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int r = 0; r < a.count; ++r) {
    // Align the start down to 16 bytes and cover the range's end.
    const uintptr_t begin = reinterpret_cast<uintptr_t>(a.ptr[r]) & ~static_cast<uintptr_t>(15);
    const long long bytes = static_cast<long long>(reinterpret_cast<uintptr_t>(a.ptr[r]) - begin) + a.bytes[r];
    const long long pieces = (bytes + kPrefetchPiece - 1) / kPrefetchPiece;
    for (long long p = first; p < pieces; p += stride) {
      const long long off = p * kPrefetchPiece;
      const long long left = bytes - off;
      const unsigned size = static_cast<unsigned>(((left < kPrefetchPiece ? left : kPrefetchPiece) + 15) & ~15LL);
      const char* src = reinterpret_cast<const char*>(begin) + off;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(size) : "memory");
#elif defined(__CUDA_ARCH__)
      for (unsigned b = 0; b < size; b += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(src + b));
#endif
    }
  }
  if constexpr (IN_CHAIN) {
    pdl_launch_dependents();
    pdl_wait();
  }
}

}  // namespace

cudaError_t launch_prefetch_l2(const PrefetchL2Args& args, bool in_chain, cudaStream_t stream) {
  if (args.count <= 0) return cudaSuccess;
  if (args.count > kPrefetchMaxRanges) return cudaErrorInvalidValue;
  long long pieces = 0;  // of the largest range: the grid-stride loop walks each range with the whole grid
  for (int r = 0; r < args.count; ++r) {
    const long long p = (args.bytes[r] + 16 + kPrefetchPiece - 1) / kPrefetchPiece;
    pieces = p > pieces ? p : pieces;
  }
  const long long want = (pieces + kPrefetchThreads - 1) / kPrefetchThreads;
  const int blocks = static_cast<int>(want < device_sm_count() ? want : device_sm_count());
  const dim3 grid(blocks > 0 ? blocks : 1);
  if (in_chain) return launch_maybe_pdl(prefetch_l2_kernel<true>, grid, dim3(kPrefetchThreads), 0, stream, true, args);
  prefetch_l2_kernel<false><<<grid, kPrefetchThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace bitlab
