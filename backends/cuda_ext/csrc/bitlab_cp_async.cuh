// BitLab cuda_ext: asynchronous-copy (cp.async, sm_80+) and programmatic-dependent-launch (sm_90+)
// helpers.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>

namespace bitlab {

__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// 16 bytes, or zero-fill when !valid (the source is not read then).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Programmatic dependent launch: a kernel launched with it (launch_maybe_pdl) may start while the
// previous kernel on the stream still runs; it calls pdl_wait() before reading that kernel's
// output.  The previous kernel lets it start early with pdl_launch_dependents().  Both are
// no-ops below sm_90 and when the kernel was launched without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Dependent launch is used on sm_90 and newer unless BITLAB_CUDA_PDL=0 (read once per process;
// for A/B timing: docs/backends/cuda_ext_notes.md, v4, suspects it at the largest shapes).
inline bool device_has_pdl() {
  static int enabled = -1;
  if (enabled < 0) {
    int dev = 0, major = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    const char* env = std::getenv("BITLAB_CUDA_PDL");
    enabled = major >= 9 && !(env && env[0] == '0');
  }
  return enabled == 1;
}

// Launch `kernel`, as a programmatic dependent of the stream's previous kernel when `pdl` (and the
// device has it).  The kernel must call pdl_wait() before it reads what earlier kernels wrote and
// before it writes anything (its outputs may reuse memory an earlier kernel still reads); before
// the wait it may only read data no kernel writes (weights).
template <typename... Params, typename... Args>
cudaError_t launch_maybe_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             bool pdl, Args... args) {
  if (!pdl || !device_has_pdl()) {
    kernel<<<grid, block, smem, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

}  // namespace bitlab
