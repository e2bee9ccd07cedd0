// Kernels of straight-line code, to measure instruction fetch (code_fetch.cu) and to evict a probed kernel's code
// from the instruction caches before it runs (the timeline probes' cold-code runs).
//
// code_kernel<ID, KB> runs KB kilobytes of independent FFMAs once (eight chains per thread, 16 bytes each: 64 per
// KB); ID only makes each instantiation a distinct piece of code.  Thread 0 of each block stores the cycles from
// the block's start to the end of its code at cycles[launch * gridDim.x + blockIdx.x] (when cycles is not null).
#pragma once
#include <cuda_runtime.h>

#include <array>
#include <utility>

#include "graph_timing.cuh"

namespace probe {

constexpr int kCodeChains = 8;
constexpr int kCodeFmaPerKb = 64;
constexpr int kCodeKernels = 16;  // distinct kernels per size

using CodeKernel = void (*)(float*, long long*, int, float);

template <int ID, int KB>
__global__ void code_kernel(float* out, long long* cycles, int launch, float a) {
  const long long start = clock64();
  const float c = 1e-3f + ID * 1e-6f;
  float acc[kCodeChains];
#pragma unroll
  for (int j = 0; j < kCodeChains; ++j) acc[j] = threadIdx.x * 1e-3f + j;
#pragma unroll
  for (int i = 0; i < KB * kCodeFmaPerKb / kCodeChains; ++i)
#pragma unroll
    for (int j = 0; j < kCodeChains; ++j) acc[j] = fmaf(acc[j], a, c);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kCodeChains; ++j) s += acc[j];
  __syncthreads();
  if (threadIdx.x == 0 && cycles != nullptr)
    cycles[static_cast<long>(launch) * gridDim.x + blockIdx.x] = clock64() - start;
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <int KB, int... IDs>
std::array<CodeKernel, sizeof...(IDs)> code_kernels_of(std::integer_sequence<int, IDs...>) {
  return {code_kernel<IDs, KB>...};
}

// The kCodeKernels distinct kernels of KB kilobytes.
template <int KB>
const std::array<CodeKernel, kCodeKernels>& code_kernels() {
  static const auto table = code_kernels_of<KB>(std::make_integer_sequence<int, kCodeKernels>{});
  return table;
}

// Runs `kb` kilobytes of distinct code (kernels of 32 KB, one block of 128 threads per multiprocessor) on
// `stream`: whatever code ran before is no longer in the instruction caches, up to kb.  `scratch` holds
// sms x 128 floats.
inline void evict_code(cudaStream_t stream, int kb, int sms, float* scratch) {
  const auto& table = code_kernels<32>();
  for (int i = 0; i < kb / 32; ++i) table[i % kCodeKernels]<<<sms, 128, 0, stream>>>(scratch, nullptr, 0, 0.999f);
  CHECK(cudaGetLastError());
}

}  // namespace probe
