// Shared by the timeline probes (attention_timeline.cu, mlp_timeline.cu): random fills, a producer kernel that
// stands in for the GEMV before the probed kernel, and the recording replay.  A probe defines BITLAB_TIMELINE
// and includes the kernel's .cu file before this header (bitlab_timeline.cuh holds the stamps).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "graph_timing.cuh"

namespace probe {

__device__ __forceinline__ unsigned hash(long i, unsigned seed) {
  unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  return h;
}
// Values in [-1, 1) (bf16) or random bytes: never zeros.
__global__ void fill_random(__nv_bfloat16* p, long n, unsigned seed) {
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(static_cast<float>(hash(i, seed) & 0xffff) / 32768.f - 1.f);
}
__global__ void fill_random(uint32_t* p, long n, unsigned seed) {
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x)
    p[i] = hash(i, seed) ^ (hash(i, seed + 1) << 16);
}

// Reads its own weight bytes before the wait (as the GEMVs prefetch theirs), letting its dependent start at
// once, then copies src to dst (the output the probed kernel reads; the xor keeps the weight loads alive).
template <typename E>
__global__ void producer_kernel(const uint4* weights, long words, const E* src, E* dst, int n) {
  bitlab::pdl_launch_dependents();
  unsigned acc = 0;
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += static_cast<long>(gridDim.x) * blockDim.x) {
    const uint4 w = __ldg(weights + i);
    acc ^= w.x ^ w.y ^ w.z ^ w.w;
  }
  bitlab::pdl_wait();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    dst[i] = acc == 0x12345678u ? src[(i + 1) % n] : src[i];
}

// One more replay of `exec` with the stamps cleared, recording the launch keyed by `key`; prints "clock_khz
// <SM clock>" and for every recorded block "block <i> <ns at start> <ns at its last stamp> <cycles at stages
// 1.. from stage 0, -1 if unset>".
inline void print_timeline(cudaGraphExec_t exec, cudaStream_t stream, const void* key) {
  static long long clocks[bitlab::kTimelineBlocks][bitlab::kTimelineStages];
  static unsigned long long ns[bitlab::kTimelineBlocks][2];
  std::memset(clocks, 0, sizeof(clocks));
  std::memset(ns, 0, sizeof(ns));
  CHECK(cudaMemcpyToSymbol(bitlab::g_timeline_clock, clocks, sizeof(clocks)));
  CHECK(cudaMemcpyToSymbol(bitlab::g_timeline_ns, ns, sizeof(ns)));
  const unsigned long long recorded = reinterpret_cast<unsigned long long>(key);
  CHECK(cudaMemcpyToSymbol(bitlab::g_timeline_key, &recorded, sizeof(recorded)));
  CHECK(cudaGraphLaunch(exec, stream));
  CHECK(cudaStreamSynchronize(stream));
  CHECK(cudaMemcpyFromSymbol(clocks, bitlab::g_timeline_clock, sizeof(clocks)));
  CHECK(cudaMemcpyFromSymbol(ns, bitlab::g_timeline_ns, sizeof(ns)));
  int khz = 0;
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  std::printf("clock_khz %d\n", khz);
  for (int b = 0; b < bitlab::kTimelineBlocks; ++b) {
    if (clocks[b][0] == 0) continue;
    std::printf("block %d %llu %llu", b, ns[b][0], ns[b][1]);
    for (int s = 1; s < bitlab::kTimelineStages; ++s) std::printf(" %lld", clocks[b][s] ? clocks[b][s] - clocks[b][0] : -1LL);
    std::printf("\n");
  }
}

}  // namespace probe
